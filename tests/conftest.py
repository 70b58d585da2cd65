"""Shared fixtures: configs written to tmp_path, a hook recorder, and a check for leftover processes."""

from __future__ import annotations

import textwrap
import time

import psutil
import pytest

from batchrun import hookimpl
from batchrun.journal import JournalError, JournalView, list_runs
from batchrun.verify import verify_run


@pytest.fixture
def make_config(tmp_path):
    """Write TOML text to ``tmp_path/batch.toml`` (or another name) and return its path."""

    def write(text: str, name: str = "batch.toml"):
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


class Recorder:
    """A plugin that records ``(hook, task_id, details)`` for every hook call, in order."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.summary = None

    @hookimpl
    def on_run_start(self, run):
        self.events.append(("on_run_start", None, run))

    @hookimpl
    def on_start(self, task, attempt):
        self.events.append(("on_start", task.id, attempt.number))

    @hookimpl
    def on_fail(self, task, attempt, error):
        self.events.append(("on_fail", task.id, (attempt.number, error.kind, error.type_name)))

    @hookimpl
    def on_retry(self, task, attempt, delay):
        self.events.append(("on_retry", task.id, (attempt.number, delay)))

    @hookimpl
    def on_terminal(self, task, outcome):
        self.events.append(("on_terminal", task.id, outcome))

    @hookimpl
    def on_run_end(self, summary):
        self.summary = summary
        self.events.append(("on_run_end", None, summary))

    def for_task(self, task_id: str) -> list[tuple]:
        return [event for event in self.events if event[1] == task_id]

    def outcomes(self) -> dict:
        return {event[1]: event[2] for event in self.events if event[0] == "on_terminal"}


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture(autouse=True)
def journals_keep_the_laws(request, tmp_path):
    """Replay every run journal a test left in its tmp_path and fail on any broken law."""
    yield
    if request.node.get_closest_marker("timeout") is None or request.node.get_closest_marker("broken_journal"):
        return
    for path in sorted(tmp_path.rglob("*.sqlite")):
        try:
            view = JournalView.open(path)
        except JournalError:
            continue  # a test that corrupts a journal on purpose checks it itself
        try:
            for run in list_runs(view.connection):
                verdict = verify_run(view.connection, run)
                problems = "; ".join(violation.message for violation in verdict.violations)
                assert verdict.ok, f"{path} run {run.run_id}: {problems}"
        finally:
            view.close()


@pytest.fixture(autouse=True)
def no_leftover_processes(request):
    """Fail a test that leaves child processes of the test process running."""
    yield
    if request.node.get_closest_marker("timeout") is None:
        return
    me = psutil.Process()
    deadline = time.monotonic() + 5.0
    alive = []
    while time.monotonic() < deadline:
        alive = [child for child in me.children(recursive=True) if _is_alive(child)]
        if not alive:
            return
        time.sleep(0.05)
    names = ", ".join(f"{child.pid} ({' '.join(child.cmdline()[:3])})" for child in alive)
    pytest.fail(f"child processes left running after the test: {names}")


#: Helper processes that live as long as the test process, on purpose: loky
#: 3.7 starts its own resource tracker and the standard library's, one each.
RESOURCE_TRACKERS = ("loky.backend.resource_tracker", "multiprocessing.resource_tracker")


def _is_alive(process: psutil.Process) -> bool:
    """Return whether a child is a live process of a run, other than a resource tracker."""
    try:
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        command = " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return False
    return not any(tracker in command for tracker in RESOURCE_TRACKERS)
