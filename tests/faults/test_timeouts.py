"""Attempt timeouts: the soft AttemptTimeoutError inside the task, then the kill after ``timeout_grace``.

A hung attempt first gets AttemptTimeoutError raised inside it, so its
``finally`` blocks run; an async task gets its future cancelled instead. An
attempt that still runs ``timeout_grace`` seconds later is killed with its
worker. Either way the attempt fails with kind "timeout", and a task whose
last attempt timed out ends "timed-out".
"""

from __future__ import annotations

import pytest

from batchrun import hookimpl

from tests.faults.conftest import hook_names, is_gone, toml_string
from tests.faults.scripted import read_attempts
from tests.probe import read_records


@pytest.mark.timeout(60)
def test_hung_task_times_out_and_runs_finally(run_text, started, tmp_path):
    marker = tmp_path / "cleanup.txt"
    summary, recorder = run_text(
        f"""
        [run]
        max_concurrent = 1
        timeout = 0.3

        [retry]
        max_attempts = 1

        [[tasks]]
        id = "hangs"
        call = "tests.faults.tasks:hang"
        kwargs = {{ marker = {toml_string(marker)} }}
        """
    )

    outcome = recorder.outcomes()["hangs"]
    [pid] = started.pids("hangs")
    assert outcome.state == "timed-out"
    assert outcome.error.kind == "timeout"
    assert outcome.error.type_name == "AttemptTimeoutError"
    assert "0.3 s" in outcome.error.message
    assert marker.read_text(encoding="utf-8") == f"cleanup {pid}\n"
    assert summary.states["timed-out"] == 1


@pytest.mark.timeout(60)
def test_hung_task_ignoring_signals_is_killed_after_grace(run_text, started, tmp_path):
    log = tmp_path / "attempts.jsonl"
    summary, recorder = run_text(
        f"""
        [run]
        max_concurrent = 2
        timeout_grace = 0.3

        [retry]
        max_attempts = 1

        [[tasks]]
        id = "deaf"
        call = "tests.faults.tasks:hang_ignoring_signals"
        timeout = 0.3

        [[tasks]]
        id = "neighbour"
        call = "tests.faults.scripted:run"
        kwargs = {{ log = {toml_string(log)}, behaviours = ["ok"], seconds = [1.5] }}
        """
    )

    outcome = recorder.outcomes()["deaf"]
    [pid] = started.pids("deaf")
    assert outcome.state == "timed-out"
    assert outcome.error.kind == "timeout"
    assert outcome.error.type_name == "AttemptTimeoutError"
    assert "did not stop within the 0.3 s grace period" in outcome.error.message
    assert f"pid {pid}" in outcome.error.message
    assert is_gone(pid)
    # Proves the run did not hang; the attempt had a 0.6 s budget in all.
    assert summary.wall_seconds < 30

    assert read_attempts(log)[("neighbour", 1)]["end"] is not None
    assert hook_names(recorder, "neighbour") == ["on_start", "on_terminal"]
    assert recorder.outcomes()["neighbour"].state == "succeeded"


@pytest.mark.timeout(60)
def test_hung_async_task_is_cancelled_at_timeout(run_text, started, tmp_path):
    marker = tmp_path / "cleanup.txt"
    summary, recorder = run_text(
        f"""
        [run]
        max_concurrent = 1
        timeout = 0.3

        [retry]
        max_attempts = 1

        [[tasks]]
        id = "hangs-async"
        call = "tests.faults.tasks:hang_async"
        kwargs = {{ marker = {toml_string(marker)} }}
        """
    )

    outcome = recorder.outcomes()["hangs-async"]
    [pid] = started.pids("hangs-async")
    assert outcome.state == "timed-out"
    assert outcome.error.kind == "timeout"
    assert outcome.error.type_name == "AttemptTimeoutError"
    assert marker.read_text(encoding="utf-8") == f"cleanup {pid}\n"
    assert summary.states["timed-out"] == 1


@pytest.mark.timeout(60)
def test_timeout_is_retried_by_default(run_text):
    summary, recorder = run_text(
        """
        [run]
        max_concurrent = 1
        timeout = 0.2

        [[tasks]]
        id = "hangs"
        call = "tests.faults.tasks:hang"
        """
    )

    failures = [details for hook, task_id, details in recorder.events if hook == "on_fail" and task_id == "hangs"]
    outcome = recorder.outcomes()["hangs"]
    assert failures == [(1, "timeout", "AttemptTimeoutError"), (2, "timeout", "AttemptTimeoutError"), (3, "timeout", "AttemptTimeoutError")]
    assert outcome.state == "timed-out"
    assert outcome.attempts == 3
    assert summary.attempts == 3


@pytest.mark.timeout(60)
def test_timeout_limit_stops_task_after_one_timeout(run_text):
    summary, recorder = run_text(
        """
        [run]
        max_concurrent = 1
        timeout = 0.2

        [retry]
        max_attempts = 5
        max_failures = { timeout = 1 }

        [[tasks]]
        id = "hangs"
        call = "tests.faults.tasks:hang"
        """
    )

    outcome = recorder.outcomes()["hangs"]
    assert hook_names(recorder, "hangs") == ["on_start", "on_fail", "on_terminal"]
    assert outcome.state == "timed-out"
    assert outcome.attempts == 1
    assert summary.attempts == 1


@pytest.mark.timeout(60)
def test_timeout_ignores_time_spent_queued(run_text, tmp_path):
    log = tmp_path / "records.jsonl"
    summary, recorder = run_text(
        f"""
        [run]
        max_concurrent = 1
        timeout = 0.8

        [retry]
        max_attempts = 1

        [[tasks]]
        id = "queued-{{n}}"
        call = "tests.probe:record"
        matrix = {{ n = [1, 2, 3] }}
        kwargs = {{ log = {toml_string(log)}, sleep = 0.5 }}
        """
    )

    records = sorted(read_records(log), key=lambda record: record["start"])
    assert len(records) == 3
    # The last task waited longer than the timeout before it started, so a
    # clock that counted from submission would have stopped it.
    assert records[2]["end"] - records[0]["start"] > 0.8
    assert summary.states["succeeded"] == 3
    assert all(outcome.state == "succeeded" for outcome in recorder.outcomes().values())


@pytest.mark.timeout(60)
def test_task_timeout_overrides_run_timeout(run_text):
    summary, recorder = run_text(
        """
        [run]
        max_concurrent = 2
        timeout = 0.3

        [retry]
        max_attempts = 1

        [[tasks]]
        id = "run-timeout"
        call = "tests.faults.tasks:hang"

        [[tasks]]
        id = "own-timeout"
        call = "tests.faults.tasks:sleep"
        kwargs = { seconds = 0.8 }
        timeout = 5
        """
    )

    outcomes = recorder.outcomes()
    assert outcomes["run-timeout"].state == "timed-out"
    assert outcomes["own-timeout"].state == "succeeded"
    assert outcomes["own-timeout"].result == 0.8
    assert summary.states == {"succeeded": 1, "failed": 0, "timed-out": 1, "cancelled": 0}


@pytest.mark.timeout(60)
def test_timed_out_task_child_gone_after_run(run_text, tmp_path):
    pid_file = tmp_path / "child.pid"
    summary, recorder = run_text(
        f"""
        [run]
        max_concurrent = 1
        timeout = 0.5
        timeout_grace = 0.3

        [retry]
        max_attempts = 1

        [[tasks]]
        id = "parent"
        call = "tests.faults.tasks:hang_with_child"
        kwargs = {{ pid_file = {toml_string(pid_file)} }}
        """
    )

    child_pid = int(pid_file.read_text(encoding="utf-8"))
    assert recorder.outcomes()["parent"].state == "timed-out"
    assert is_gone(child_pid), f"the task's child process {child_pid} outlived the run"


class ChildWatcher:
    """A plugin that checks, as the next task starts, whether the timed-out task's child still runs."""

    def __init__(self, pid_file) -> None:
        self.pid_file = pid_file
        self.child_gone_at_next_start: bool | None = None

    @hookimpl
    def on_start(self, task):
        if task.id == "next":
            self.child_gone_at_next_start = is_gone(int(self.pid_file.read_text(encoding="utf-8")))


@pytest.mark.timeout(60)
def test_timed_out_task_child_gone_before_next_task(run_text, started, tmp_path):
    pid_file = tmp_path / "child.pid"
    watcher = ChildWatcher(pid_file)
    summary, recorder = run_text(
        f"""
        [run]
        max_concurrent = 1
        timeout_grace = 0.3

        [retry]
        max_attempts = 1

        [[tasks]]
        id = "parent"
        call = "tests.faults.tasks:hang_with_child"
        kwargs = {{ pid_file = {toml_string(pid_file)} }}
        timeout = 0.5

        [[tasks]]
        id = "next"
        call = "tests.faults.tasks:sleep"
        kwargs = {{ seconds = 0.01 }}
        """,
        plugins=[("child-watcher", watcher)],
    )

    assert recorder.outcomes()["parent"].state == "timed-out"
    assert watcher.child_gone_at_next_start is True
    # The worker that killed the child survived and ran the next task.
    assert started.pids("next") == started.pids("parent")
    assert recorder.outcomes()["next"].state == "succeeded"
