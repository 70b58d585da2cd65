"""Tests of ``batchrun verify``: the three laws replayed from a journal.

A real run must pass. Each law's violations are caught on journals built by
hand with :class:`batchrun.journal.Journal`, whose ``record`` calls write the
same rows a supervisor writes. Those tests call :func:`batchrun.status.verify`,
the function behind the command, in this process, so they start no process
and carry no timeout marker. The one test that runs ``python -m batchrun
verify`` on a broken journal is marked ``broken_journal`` so the autouse law
check leaves that journal alone.
"""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from batchrun import status
from batchrun.journal import Journal, JournalView
from batchrun.verify import verify_run
from tests.probe import read_records


ROOT = Path(__file__).resolve().parents[1]

#: Seconds a command may run before the test fails it; far above the longest run here.
COMMAND_TIMEOUT = 60


def run_cli(*arguments: object) -> subprocess.CompletedProcess[str]:
    """Run ``python -m batchrun`` with ``arguments`` in the project root and return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "batchrun", *map(str, arguments)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def toml_string(value: object) -> str:
    """Quote ``value`` as a TOML basic string; JSON string syntax is valid TOML."""
    return json.dumps(str(value))


# -- hand-made journals -------------------------------------------------------------------------


def started(task_id: str, attempt: int, attempt_id: int, mono: float) -> tuple:
    return ("attempt-started", task_id, {"attempt": attempt, "attempt_id": attempt_id, "slot": 0, "pid": 4000 + attempt_id, "mono": mono})


def ended(task_id: str, attempt: int, attempt_id: int, mono: float) -> tuple:
    return ("attempt-ended", task_id, {"attempt": attempt, "attempt_id": attempt_id, "slot": 0, "pid": 4000 + attempt_id, "mono": mono, "data": {"status": "succeeded"}})


def finished(task_id: str) -> tuple:
    return ("task-finished", task_id, {"data": {"state": "succeeded", "attempts": 1}})


def write_journal(path: Path, events: list[tuple], *, max_concurrent: int = 1, ended_run: bool = True) -> Path:
    """Record ``events`` as one session of a run named 'crafted', and end the run unless ``ended_run`` is false."""
    journal = Journal(path)
    try:
        journal.start_run("crafted", None, {"run": {"max_concurrent": max_concurrent}}, max_concurrent)
        for event, task_id, fields in events:
            journal.record(event, task_id, **fields)
        journal.commit()
        if ended_run:
            journal.end_run("finished", None)
    finally:
        journal.close()
    return path


def violations_of(path: Path) -> list:
    """Return the violations ``verify_run`` finds in the journal's only run."""
    view = JournalView.open(path)
    try:
        return verify_run(view.connection, view.latest_run()).violations
    finally:
        view.close()


def verify_output(path: Path) -> tuple[int, str]:
    """Run what ``batchrun verify PATH`` runs, in this process; return its exit code and output."""
    buffer = io.StringIO()
    code = status.verify(str(path), output=buffer)
    return code, buffer.getvalue()


# -- a real run ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_verify_passes_real_run(make_config, tmp_path):
    log = tmp_path / "records.jsonl"
    text = '[run]\nname = "real"\nmax_concurrent = 2\n[retry]\npolicy = "fixed"\ndelay = 0.01\njitter = false\n'
    for number in range(6):
        text += f'\n[[tasks]]\nid = "task-{number}"\ncall = "tests.probe:record"\nkwargs = {{ log = {toml_string(log)}, sleep = 0.05, fail_attempts = {number % 2} }}\n'
    config_path = make_config(text)

    run = run_cli("run", config_path)
    result = run_cli("verify", config_path)
    view = JournalView.open(tmp_path / ".batchrun" / "real.sqlite")
    try:
        verdict = verify_run(view.connection, view.latest_run())
    finally:
        view.close()

    assert run.returncode == 0, run.stderr
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all three laws hold" in result.stdout
    assert "VIOLATION" not in result.stdout
    assert verdict.ok
    assert verdict.ended
    assert verdict.attempts == len(read_records(log)) == 9
    assert 1 <= verdict.peak_open <= 2


def test_verify_passes_clean_crafted_journal(tmp_path):
    path = write_journal(tmp_path / "clean.sqlite", [started("a", 1, 1, 1.0), ended("a", 1, 1, 2.0), finished("a"), started("b", 1, 2, 2.0), ended("b", 1, 2, 3.0), finished("b")])

    code, output = verify_output(path)

    assert violations_of(path) == []
    assert code == 0
    assert "all three laws hold" in output


def test_verify_accepts_attempt_interrupted_by_resume(tmp_path):
    path = write_journal(tmp_path / "resumed.sqlite", [started("a", 1, 1, 1.0)], ended_run=False)
    journal = Journal(path)
    try:
        run = journal.latest_run("crafted")
        journal.resume_run(run, 1)
        for event, task_id, fields in (started("a", 1, 1, 5.0), ended("a", 1, 1, 6.0), finished("a")):
            journal.record(event, task_id, **fields)
        journal.end_run("finished", None)
    finally:
        journal.close()

    assert violations_of(path) == []


def test_verify_reports_unended_run_without_violation(tmp_path):
    path = write_journal(tmp_path / "unended.sqlite", [started("a", 1, 1, 1.0)], ended_run=False)

    code, output = verify_output(path)

    assert violations_of(path) == []
    assert code == 0
    assert "has not ended" in output


# -- each law broken ----------------------------------------------------------------------------


def test_verify_catches_ceiling_exceeded(tmp_path):
    path = write_journal(
        tmp_path / "ceiling.sqlite",
        [started("a", 1, 1, 1.0), started("b", 1, 2, 1.5), ended("a", 1, 1, 2.0), ended("b", 1, 2, 2.5), finished("a"), finished("b")],
        max_concurrent=1,
    )

    violations = violations_of(path)
    ceiling = [violation for violation in violations if violation.law == "ceiling"]

    assert ceiling, violations
    assert "2 attempts open at once, above the ceiling of 1" in ceiling[0].message
    assert [(event["event"], event["task"]) for event in ceiling[0].events] == [("attempt-started", "a"), ("attempt-started", "b")]


def test_verify_catches_overlap_reported_by_workers(tmp_path):
    # The supervisor handled a's end before b's start, but the workers' own clocks overlap.
    path = write_journal(
        tmp_path / "overlap.sqlite",
        [started("a", 1, 1, 1.0), ended("a", 1, 1, 3.0), finished("a"), started("b", 1, 2, 2.0), ended("b", 1, 2, 4.0), finished("b")],
        max_concurrent=1,
    )

    violations = violations_of(path)

    assert [violation.law for violation in violations] == ["ceiling"]
    assert "workers report 2 attempts running at once" in violations[0].message


def test_verify_catches_two_attempts_of_task_open(tmp_path):
    path = write_journal(
        tmp_path / "two-open.sqlite",
        [started("a", 1, 1, 1.0), started("a", 2, 2, 1.5), ended("a", 1, 1, 2.0), ended("a", 2, 2, 2.5), finished("a")],
        max_concurrent=2,
    )

    violations = violations_of(path)
    live = [violation for violation in violations if violation.law == "one-live-attempt"]

    assert len(live) == 1, violations
    assert live[0].message == "task 'a' started attempt 2 while attempt 1 was still open"
    assert [event["attempt"] for event in live[0].events] == [1, 2]


def test_verify_catches_task_finished_twice(tmp_path):
    path = write_journal(tmp_path / "twice.sqlite", [started("a", 1, 1, 1.0), ended("a", 1, 1, 2.0), finished("a"), finished("a")])

    violations = violations_of(path)

    assert [violation.law for violation in violations] == ["everything-ends"]
    assert violations[0].message == "task 'a' reached a terminal state twice"
    assert [event["event"] for event in violations[0].events] == ["task-finished", "task-finished"]


def test_verify_allows_finish_again_after_reset(tmp_path):
    path = write_journal(
        tmp_path / "reset.sqlite",
        [started("a", 1, 1, 1.0), ended("a", 1, 1, 2.0), finished("a"), ("task-reset", "a", {"data": {"reason": "test"}}), started("a", 1, 2, 3.0), ended("a", 1, 2, 4.0), finished("a")],
    )

    assert violations_of(path) == []


def test_verify_catches_attempt_never_closed(tmp_path):
    path = write_journal(
        tmp_path / "unclosed.sqlite",
        [started("a", 1, 1, 1.0), started("b", 1, 2, 2.0), ended("b", 1, 2, 3.0), finished("b")],
        max_concurrent=2,
    )

    violations = violations_of(path)

    assert [violation.law for violation in violations] == ["everything-ends"]
    assert violations[0].message == "task 'a' attempt 1 never closed"
    assert [(event["event"], event["task"]) for event in violations[0].events] == [("attempt-started", "a")]


def test_verify_catches_end_without_start(tmp_path):
    path = write_journal(tmp_path / "no-start.sqlite", [ended("a", 1, 7, 2.0), finished("a")])

    violations = violations_of(path)

    assert [violation.law for violation in violations] == ["everything-ends"]
    assert violations[0].message == "task 'a' attempt 1 ended without having started"
    assert [event["event"] for event in violations[0].events] == ["attempt-ended"]


def test_verify_catches_finish_with_attempt_open(tmp_path):
    path = write_journal(tmp_path / "early-finish.sqlite", [started("a", 1, 1, 1.0), finished("a"), ended("a", 1, 1, 2.0)])

    violations = violations_of(path)

    assert [violation.law for violation in violations] == ["one-live-attempt"]
    assert violations[0].message == "task 'a' finished while its attempt 1 was still open"


def test_verify_catches_terminal_state_without_event(tmp_path):
    path = write_journal(tmp_path / "silent.sqlite", [])
    connection = sqlite3.connect(path)
    connection.execute("INSERT INTO tasks (run_id, task_id, definition_hash, attempts, state) VALUES (1, 'ghost', 'x', 1, 'succeeded')")
    connection.commit()
    connection.close()

    violations = violations_of(path)

    assert [violation.law for violation in violations] == ["everything-ends"]
    assert "'ghost' is succeeded in the tasks table, but no task-finished event records it" in violations[0].message


# -- what the command prints --------------------------------------------------------------------


def test_verify_cli_prints_violation_with_events(tmp_path):
    path = write_journal(
        tmp_path / "printed.sqlite",
        [started("a", 1, 1, 1.0), started("a", 2, 2, 1.5), ended("a", 1, 1, 2.0), ended("a", 2, 2, 2.5), finished("a")],
        max_concurrent=2,
    )

    code, output = verify_output(path)
    lines = output.splitlines()
    at = lines.index("VIOLATION [one-live-attempt] task 'a' started attempt 2 while attempt 1 was still open")

    assert code == 1
    assert lines[at + 1] == "    #2 attempt-started task=a attempt=1 slot=0 pid=4001 at=1.000000"
    assert lines[at + 2] == "    #3 attempt-started task=a attempt=2 slot=0 pid=4002 at=1.500000"
    assert lines[-1] == "1 violation"


def test_verify_cli_counts_several_violations(tmp_path):
    path = write_journal(tmp_path / "several.sqlite", [started("a", 1, 1, 1.0), ended("b", 1, 9, 2.0), finished("c"), finished("c")])

    code, output = verify_output(path)

    assert code == 1
    assert output.count("VIOLATION [everything-ends]") == 3
    assert output.splitlines()[-1] == "3 violations"


@pytest.mark.timeout(60)
@pytest.mark.broken_journal
def test_verify_command_exits_1_on_violation(tmp_path):
    path = write_journal(tmp_path / "twice.sqlite", [started("a", 1, 1, 1.0), ended("a", 1, 1, 2.0), finished("a"), finished("a")])

    result = run_cli("verify", path)

    assert result.returncode == 1, result.stderr
    assert "VIOLATION [everything-ends] task 'a' reached a terminal state twice" in result.stdout
    assert result.stdout.count("task-finished task=a") == 2
    assert result.stderr == ""
