"""Helpers of the fault-injection tests: in-process runs with hooks recorded, and command-line runs.

In-process runs go through :func:`batchrun.runner.run_batch` with the hook
recorder registered, so a test gets both the summary and every hook call.
Command-line runs start ``python -m batchrun run`` as a child process, which a
test can signal or kill; a reader thread collects its stderr lines.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from batchrun import hookimpl
from batchrun.config import load_config
from batchrun.runner import build_plugin_manager, run_batch
from tests.faults.scripted import read_attempts


#: The project root, where workers import ``tests.faults.tasks`` from.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def toml_string(value: object) -> str:
    """Quote ``value`` as a TOML basic string; JSON string syntax is valid TOML."""
    return json.dumps(str(value))


class StartedAttempts:
    """A plugin that keeps the :class:`batchrun.Attempt` of every ``on_start``, for pids and times."""

    def __init__(self) -> None:
        self.attempts = []

    @hookimpl
    def on_start(self, attempt):
        self.attempts.append(attempt)

    def pids(self, task_id: str) -> list[int]:
        """Return the worker pid of each attempt of ``task_id``, in start order."""
        return [attempt.pid for attempt in self.attempts if attempt.task_id == task_id]


@pytest.fixture
def started():
    return StartedAttempts()


@pytest.fixture
def run_text(make_config, recorder, started, monkeypatch):
    """Return a function that runs a batch given as TOML text and returns ``(summary, recorder)``.

    The recorder and the ``started`` plugin are registered after the config's
    own plugins; ``plugins`` adds more ``(name, plugin)`` pairs before them.
    """
    # A command-line run in this process would have turned propagation off,
    # which hides batchrun's log records from caplog.
    monkeypatch.setattr(logging.getLogger("batchrun"), "propagate", True)

    def run(text: str, *, plugins=(), grace: float = 10.0):
        config = load_config(make_config(text))
        manager = build_plugin_manager(config, story_mode="quiet")
        for name, plugin in plugins:
            manager.register(plugin, name)
        manager.register(recorder, "recorder")
        manager.register(started, "started")
        summary = run_batch(config, manager=manager, grace=grace)
        return summary, recorder

    return run


def hook_names(recorder, task_id: str) -> list[str]:
    """Return the names of the hooks fired for ``task_id``, in order."""
    return [hook for hook, _, _ in recorder.for_task(task_id)]


# -- processes -----------------------------------------------------------------------


def is_gone(pid: int) -> bool:
    """Return whether process ``pid`` has exited; a zombie waiting to be reaped counts as exited."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until_gone(pids, timeout: float) -> list[int]:
    """Wait up to ``timeout`` seconds for every process in ``pids`` to exit; return those still alive."""
    deadline = time.monotonic() + timeout
    alive = [pid for pid in pids if not is_gone(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [pid for pid in alive if not is_gone(pid)]
    return alive


def wait_for_file(path: Path, timeout: float, *, lines: int = 1) -> bool:
    """Wait up to ``timeout`` seconds until ``path`` has at least ``lines`` lines; return whether it does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text(encoding="utf-8").splitlines()) >= lines:
            return True
        time.sleep(0.02)
    return False


def wait_for_started(log: Path, task_ids, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds until scripted attempts of every task in ``task_ids`` have started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started_tasks = {task_id for task_id, _ in read_attempts(log)}
        if started_tasks >= set(task_ids):
            return True
        time.sleep(0.02)
    return False


class CliRun:
    """A ``python -m batchrun run`` child process whose stderr lines are collected as they arrive."""

    def __init__(self, arguments: list[str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "batchrun", "run", *arguments],
            cwd=PROJECT_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="cli-stderr-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for_lines(self, pattern: str, count: int = 1, timeout: float = 20.0) -> list[str]:
        """Wait until ``count`` stderr lines match ``pattern``; return the matches, fewer on timeout."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                matches = [line for line in self.lines if regex.search(line)]
                remaining = deadline - time.monotonic()
                if len(matches) >= count or remaining <= 0 or not self._reader.is_alive():
                    return matches
                self._changed.wait(min(remaining, 0.1))

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit and its stderr to be read; return its exit code."""
        code = self.process.wait(timeout)
        self._reader.join(5.0)
        return code

    def stderr(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def worker_pids(self) -> set[int]:
        """Return the worker pids named in the story log's STARTING lines."""
        found = set()
        for line in list(self.lines):
            match = re.search(r"STARTING \S+ attempt \d+/\d+ \(pid (\d+)\)", line)
            if match:
                found.add(int(match.group(1)))
        return found

    def stop(self) -> None:
        """Kill the process and its workers if a failed test left them running."""
        if self.process.poll() is None:
            try:
                children = psutil.Process(self.process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                children = []
            self.process.kill()
            self.process.wait(10)
            for child in children:
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass
        if self.process.stderr is not None:
            self._reader.join(5.0)
            self.process.stderr.close()


@pytest.fixture
def start_cli():
    """Return a function that starts ``python -m batchrun run ARGUMENTS...``; stops leftovers at teardown."""
    runs: list[CliRun] = []

    def start(*arguments: str) -> CliRun:
        run = CliRun([str(argument) for argument in arguments])
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.stop()


#: A plugin module for command-line runs: it appends one JSON line per
#: ``on_terminal`` to the file named in the module, so a test reads the
#: outcomes of a run in another process. Format it with ``path``.
OUTCOME_PLUGIN = '''
import json

from batchrun import hookimpl

PATH = {path}


@hookimpl
def on_terminal(outcome):
    error = outcome.error
    record = {{
        "task": outcome.task_id,
        "state": outcome.state,
        "attempts": outcome.attempts,
        "kind": error.kind if error else None,
        "type_name": error.type_name if error else None,
        "message": error.message if error else None,
    }}
    with open(PATH, "a", encoding="utf-8") as stream:
        stream.write(json.dumps(record) + "\\n")
'''


def write_outcome_plugin(folder: Path, name: str = "outcome_file") -> Path:
    """Write the outcome-recording plugin as module ``name`` in ``folder``; return its output file."""
    output = folder / "outcomes.jsonl"
    (folder / f"{name}.py").write_text(OUTCOME_PLUGIN.format(path=repr(str(output))), encoding="utf-8")
    return output


def read_outcomes(path: Path) -> list[dict]:
    """Return the outcomes the plugin of :func:`write_outcome_plugin` wrote, in order."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
