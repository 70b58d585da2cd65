"""Read a run back from its journal: ``batchrun status``, ``results`` and ``verify``."""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from batchrun import _config_checks as checks
from batchrun.errors import ConfigError, UsageError
from batchrun.journal import JournalError, JournalView, default_journal_path, is_in_use, list_runs, load_tasks, open_attempts
from batchrun.models import TASK_STATES
from batchrun.verify import format_event, verify_run


if TYPE_CHECKING:
    from batchrun.journal import RunRecord, TaskRecord


SLOWEST_SHOWN = 5
FAILURES_SHOWN = 20


def locate_journal(target: str | None) -> tuple[Path, str | None]:
    """Return the journal file and the run name that a ``[CONFIG|JOURNAL]`` argument points to.

    A ``.toml`` file is read for its ``[run] name`` and ``journal`` keys only,
    so its tasks need not be importable. With no argument, the single journal
    in ``./.batchrun/`` is used.
    """
    if target is None:
        candidates = sorted(Path(".batchrun").glob("*.sqlite"))
        if len(candidates) == 1:
            return candidates[0], None
        if not candidates:
            raise UsageError("no journal in ./.batchrun/; name the batch's config file or its journal")
        names = ", ".join(str(path) for path in candidates)
        raise UsageError(f"several journals in ./.batchrun/ ({names}); name the config file or the journal to read")

    path = Path(target)
    if path.suffix != ".toml":
        return path, None
    data = checks.parse_toml(checks.read_text(path, str(path)), str(path))
    run = data.get("run", {}) if isinstance(data.get("run", {}), dict) else {}
    name = run.get("name") if isinstance(run.get("name"), str) else checks.default_run_name(path.stem)
    journal = run.get("journal")
    if journal is False:
        raise ConfigError(f"{path}: [run].journal is false, so this batch keeps no journal to read")
    if isinstance(journal, str):
        return path.resolve().parent / journal, name
    return default_journal_path(path, name), name


def show_status(target: str | None, output: TextIO | None = None) -> int:
    """Print a run's tasks by state, attempts, slowest tasks and failures; return the exit code."""
    output = output if output is not None else sys.stdout
    view, run = _open(target)
    try:
        tasks = load_tasks(view.connection, run.run_id)
        # A task whose only record is an attempt still open has no task row yet.
        in_flight = {task_id for _, task_id, _, _, _, _ in open_attempts(view.connection, run.run_id)} - set(tasks)
        attempts = view.connection.execute("SELECT COUNT(*) FROM events WHERE run_id = ? AND event = 'attempt-started'", (run.run_id,)).fetchone()[0]
        sessions = view.connection.execute("SELECT COUNT(*) FROM sessions WHERE run_id = ?", (run.run_id,)).fetchone()[0]
    finally:
        view.close()

    counts = dict.fromkeys(TASK_STATES, 0)
    unfinished = len(in_flight)
    for task in tasks.values():
        if task.state in counts:
            counts[task.state] += 1
        else:
            unfinished += 1

    write = output.write
    stopped = f", stopped by {run.stop_reason}" if run.stop_reason else ""
    status = run.status
    if status == "running" and not is_in_use(view.path):
        status = "interrupted (its supervisor is gone; continue it with 'batchrun run CONFIG --resume')"
    write(f"run {run.name!r} (run {run.run_id} in {view.path}): {status}{stopped}\n")
    write(f"  started {_when(run.created_wall)}, {sessions} supervisor session{'s' if sessions != 1 else ''}")
    write(f", ended {_when(run.ended_wall)}\n" if run.ended_wall else "\n")
    states = ", ".join(f"{count} {state}" for state, count in counts.items())
    write(f"  tasks: {states}, {unfinished} unfinished (tasks not reached yet are not counted)\n")
    write(f"  attempts started: {attempts}\n")

    timed = sorted((task for task in tasks.values() if task.duration is not None), key=lambda task: task.duration, reverse=True)
    if timed:
        write("slowest tasks (last attempt):\n")
        for task in timed[:SLOWEST_SHOWN]:
            write(f"  {task.task_id}: {task.duration:.3f} s ({task.state})\n")

    failures = [task for task in tasks.values() if task.state not in (None, "succeeded")]
    if failures:
        write("tasks that did not succeed:\n")
        for task in failures[:FAILURES_SHOWN]:
            write(f"  {task.task_id}: {task.state} after {task.attempts} attempt{'s' if task.attempts != 1 else ''}: {_error_text(task)}\n")
        if len(failures) > FAILURES_SHOWN:
            write(f"  ... and {len(failures) - FAILURES_SHOWN} more; see 'batchrun results'\n")
    return 0


def write_results(target: str | None, result_format: str, output: TextIO | None = None) -> int:
    """Write one row per finished task: id, state, attempts, duration and result."""
    output = output if output is not None else sys.stdout
    view, run = _open(target)
    try:
        tasks = load_tasks(view.connection, run.run_id)
    finally:
        view.close()

    rows = [_result_row(task) for task in tasks.values() if task.state is not None]
    if result_format == "jsonl":
        for row in rows:
            output.write(json.dumps(row) + "\n")
        return 0

    writer = csv.writer(output)
    writer.writerow(["task", "state", "attempts", "duration", "result", "error"])
    for row in rows:
        result = row["result"]
        if result is None:
            result_text = ""
        elif isinstance(result, str):
            result_text = result
        else:
            result_text = json.dumps(result)
        writer.writerow([row["task"], row["state"], row["attempts"], row["duration"], result_text, row["error"] or ""])
    return 0


def verify(target: str | None, output: TextIO | None = None) -> int:
    """Check the three laws on every run in a journal; return 1 when one is broken, else 0.

    With a config file as the target, only the runs of that batch's name are checked.
    """
    output = output if output is not None else sys.stdout
    path, name = locate_journal(target)
    view = JournalView.open(path)
    try:
        runs = [run for run in list_runs(view.connection) if name is None or run.name == name]
        if not runs:
            raise JournalError(f"the journal {path} contains no run{f' named {name!r}' if name else ''}")
        verdicts = [verify_run(view.connection, run) for run in runs]
    finally:
        view.close()

    write = output.write
    violations = 0
    for verdict in verdicts:
        run = verdict.run
        write(f"verified run {run.name!r} (run {run.run_id}): {verdict.events} events, {verdict.attempts} attempts, at most {verdict.peak_open} open at once\n")
        if not verdict.ended:
            write("  the run has not ended: its supervisor is running or died; resume it to finish its tasks\n")
        for violation in verdict.violations:
            write(f"VIOLATION [{violation.law}] {violation.message}\n")
            for event in violation.events:
                write(f"    {format_event(event)}\n")
        violations += len(verdict.violations)
    if not violations:
        write("all three laws hold\n")
        return 0
    write(f"{violations} violation{'s' if violations != 1 else ''}\n")
    return 1


def _open(target: str | None) -> tuple[JournalView, RunRecord]:
    path, name = locate_journal(target)
    view = JournalView.open(path)
    try:
        return view, view.latest_run(name)
    except JournalError:
        view.close()
        raise


def _result_row(task: TaskRecord) -> dict[str, Any]:
    result: Any = None
    if task.result_format == "json" and task.result is not None:
        result = json.loads(task.result)
    elif task.result_format == "repr":
        result = task.result
    elif task.result_format == "omitted":
        result = f"<omitted: {task.result}>"
    return {
        "task": task.task_id,
        "state": task.state,
        "attempts": task.attempts,
        "duration": task.duration,
        "result": result,
        "result_format": task.result_format,
        "error": _error_text(task) if task.error else None,
    }


def _error_text(task: TaskRecord) -> str:
    if not task.error:
        return "no error recorded"
    message = task.error.get("message") or ""
    first_line = message.splitlines()[0] if message else ""
    return f"{task.error.get('type')}: {first_line}" if first_line else str(task.error.get("type"))


def _when(wall: float | None) -> str:
    if wall is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall))


def render(function, *arguments: Any) -> str:
    """Run one of the functions above into a string; for tests and embedding."""
    buffer = io.StringIO()
    function(*arguments, output=buffer)
    return buffer.getvalue()
