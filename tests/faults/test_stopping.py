"""Stopping a run early: the run deadline, SIGINT and SIGTERM, and a supervisor killed with SIGKILL.

A stop starts nothing new. Running attempts get a grace period (none for the
deadline), then the cancel signal, then the kill, and every unfinished task
ends "cancelled". The command-line tests run ``python -m batchrun run`` as a
child process and read the outcomes through a plugin that writes them to a
file, and the worker pids from the tasks' own records.
"""

from __future__ import annotations

import signal
import time
from collections import Counter

import psutil
import pytest

from tests.faults.conftest import (
    hook_names,
    is_gone,
    read_outcomes,
    toml_string,
    wait_for_file,
    wait_for_started,
    wait_until_gone,
    write_outcome_plugin,
)
from tests.faults.scripted import read_attempts


# -- deadline -------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_deadline_cancels_running_and_unstarted_tasks(run_text, tmp_path):
    # The deadline leaves both hangs seconds to start even when workers start slowly.
    marker = tmp_path / "cleanup.txt"
    summary, recorder = run_text(
        f"""
        [run]
        max_concurrent = 2
        deadline = 3
        timeout_grace = 0.5

        [[tasks]]
        id = "hangs-{{n}}"
        call = "tests.faults.tasks:hang"
        matrix = {{ n = [1, 2] }}
        kwargs = {{ marker = {toml_string(marker)} }}

        [[tasks]]
        id = "unstarted-{{n}}"
        call = "tests.faults.tasks:sleep"
        matrix = {{ n = [1, 2, 3] }}
        """
    )

    outcomes = recorder.outcomes()
    assert summary.stop_reason == "deadline"
    assert summary.states == {"succeeded": 0, "failed": 0, "timed-out": 0, "cancelled": 5}
    for task_id in ("hangs-1", "hangs-2"):
        assert hook_names(recorder, task_id) == ["on_start", "on_fail", "on_terminal"]
        assert outcomes[task_id].state == "cancelled"
        assert outcomes[task_id].error.kind == "cancelled"
    for task_id in ("unstarted-1", "unstarted-2", "unstarted-3"):
        assert hook_names(recorder, task_id) == ["on_terminal"]
        assert outcomes[task_id].state == "cancelled"
        assert outcomes[task_id].attempts == 0
        assert outcomes[task_id].error.kind == "cancelled"
    # The cancel is soft first: both hung attempts ran their finally blocks.
    assert len(marker.read_text(encoding="utf-8").splitlines()) == 2


@pytest.mark.timeout(60)
def test_deadline_cancels_task_waiting_to_retry(run_text, tmp_path):
    log = tmp_path / "records.jsonl"
    summary, recorder = run_text(
        f"""
        [run]
        max_concurrent = 1
        deadline = 2

        [retry]
        policy = "fixed"
        delay = 60
        max_delay = 60
        jitter = false

        [[tasks]]
        id = "waits-to-retry"
        call = "tests.probe:record"
        kwargs = {{ log = {toml_string(log)}, fail_attempts = 1 }}
        """
    )

    outcome = recorder.outcomes()["waits-to-retry"]
    assert hook_names(recorder, "waits-to-retry") == ["on_start", "on_fail", "on_retry", "on_terminal"]
    assert outcome.state == "cancelled"
    assert outcome.attempts == 1
    assert outcome.error.kind == "cancelled"
    assert summary.stop_reason == "deadline"


@pytest.mark.timeout(60)
def test_deadline_kills_attempt_that_ignores_cancel(run_text, started):
    summary, recorder = run_text(
        """
        [run]
        max_concurrent = 1
        deadline = 2
        timeout_grace = 0.3

        [[tasks]]
        id = "deaf"
        call = "tests.faults.tasks:hang_ignoring_signals"
        """
    )

    outcome = recorder.outcomes()["deaf"]
    [pid] = started.pids("deaf")
    assert outcome.state == "cancelled"
    assert outcome.error.kind == "cancelled"
    assert summary.stop_reason == "deadline"
    assert is_gone(pid)


@pytest.mark.timeout(60)
def test_cancelled_task_child_gone_after_run(run_text, tmp_path):
    pid_file = tmp_path / "child.pid"
    summary, recorder = run_text(
        f"""
        [run]
        max_concurrent = 1
        deadline = 2
        timeout_grace = 0.3

        [[tasks]]
        id = "parent"
        call = "tests.faults.tasks:hang_with_child"
        kwargs = {{ pid_file = {toml_string(pid_file)} }}
        """
    )

    child_pid = int(pid_file.read_text(encoding="utf-8"))
    assert recorder.outcomes()["parent"].state == "cancelled"
    assert is_gone(child_pid), f"the task's child process {child_pid} outlived the run"


@pytest.mark.timeout(60)
def test_cli_deadline_cancels_tasks_and_exits_3(make_config, start_cli, tmp_path):
    log = tmp_path / "attempts.jsonl"
    outcome_file = write_outcome_plugin(tmp_path)
    config_path = make_config(
        f"""
        [run]
        max_concurrent = 1
        timeout_grace = 0.5

        [[tasks]]
        id = "hangs"
        call = "tests.faults.scripted:run"
        kwargs = {{ log = {toml_string(log)}, behaviours = ["hang"] }}

        [[tasks]]
        id = "unstarted"
        call = "tests.faults.scripted:run"
        kwargs = {{ log = {toml_string(log)}, behaviours = ["ok"] }}
        """
    )

    cli = start_cli(config_path, "--deadline", "3", "-p", "outcome_file")
    code = cli.wait(timeout=30)

    outcomes = {record["task"]: record for record in read_outcomes(outcome_file)}
    attempts = read_attempts(log)
    assert code == 3, cli.stderr()
    assert outcomes["hangs"]["state"] == "cancelled"
    assert outcomes["hangs"]["kind"] == "cancelled"
    assert outcomes["unstarted"]["state"] == "cancelled"
    assert outcomes["unstarted"]["attempts"] == 0
    assert list(attempts) == [("hangs", 1)]
    assert attempts[("hangs", 1)]["end"] is not None, "the cancelled attempt did not run its finally block"
    assert is_gone(attempts[("hangs", 1)]["pid"])


# -- signals ------------------------------------------------------------------------------

SIGNALS = [
    pytest.param(signal.SIGINT, 130, id="SIGINT"),
    pytest.param(signal.SIGTERM, 143, id="SIGTERM"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("signum", "expected_code"), SIGNALS)
def test_signal_grants_grace_then_cancels(make_config, start_cli, tmp_path, signum, expected_code):
    log = tmp_path / "attempts.jsonl"
    outcome_file = write_outcome_plugin(tmp_path)
    config_path = make_config(
        f"""
        [run]
        max_concurrent = 2
        timeout_grace = 0.5

        [[tasks]]
        id = "finishes"
        call = "tests.faults.scripted:run"
        kwargs = {{ log = {toml_string(log)}, behaviours = ["ok"], seconds = [1.0], wait_for_starts = 2 }}

        [[tasks]]
        id = "hangs"
        call = "tests.faults.scripted:run"
        kwargs = {{ log = {toml_string(log)}, behaviours = ["hang"] }}

        [[tasks]]
        id = "unstarted"
        call = "tests.faults.scripted:run"
        kwargs = {{ log = {toml_string(log)}, behaviours = ["ok"] }}
        """
    )

    # "finishes" ends about 1 s after the signal, inside the 2 s grace period.
    cli = start_cli(config_path, "--grace", "2", "-p", "outcome_file")
    assert wait_for_started(log, ["finishes", "hangs"], timeout=20), f"the first two attempts did not start:\n{cli.stderr()}"
    cli.process.send_signal(signum)
    code = cli.wait(timeout=30)

    records = read_outcomes(outcome_file)
    outcomes = {record["task"]: record for record in records}
    attempts = read_attempts(log)
    assert code == expected_code, cli.stderr()
    assert Counter(record["task"] for record in records) == Counter(["finishes", "hangs", "unstarted"])
    assert outcomes["finishes"]["state"] == "succeeded"
    assert outcomes["hangs"]["state"] == "cancelled"
    assert outcomes["hangs"]["kind"] == "cancelled"
    assert outcomes["unstarted"]["state"] == "cancelled"
    assert outcomes["unstarted"]["attempts"] == 0
    assert ("unstarted", 1) not in attempts, "an attempt started after the signal"
    assert attempts[("hangs", 1)]["end"] is not None, "the cancelled attempt did not run its finally block"
    worker_pids = {attempt["pid"] for attempt in attempts.values()}
    assert wait_until_gone(worker_pids, timeout=5) == []


@pytest.mark.timeout(60)
def test_second_signal_stops_attempts_at_once(make_config, start_cli, tmp_path):
    log = tmp_path / "attempts.jsonl"
    outcome_file = write_outcome_plugin(tmp_path)
    config_path = make_config(
        f"""
        [run]
        max_concurrent = 2

        [[tasks]]
        id = "slow"
        call = "tests.faults.scripted:run"
        kwargs = {{ log = {toml_string(log)}, behaviours = ["ok"], seconds = [120] }}

        [[tasks]]
        id = "hangs"
        call = "tests.faults.scripted:run"
        kwargs = {{ log = {toml_string(log)}, behaviours = ["hang"] }}
        """
    )

    cli = start_cli(config_path, "--grace", "120", "-p", "outcome_file")
    assert wait_for_started(log, ["slow", "hangs"], timeout=20), f"the attempts did not start:\n{cli.stderr()}"
    cli.process.send_signal(signal.SIGINT)
    assert cli.wait_for_lines("signal-received signal=SIGINT"), f"the first signal was not logged:\n{cli.stderr()}"
    cli.process.send_signal(signal.SIGINT)
    # The grace period is 120 s, so an exit within 30 s means the second signal cut it short.
    code = cli.wait(timeout=30)

    outcomes = {record["task"]: record for record in read_outcomes(outcome_file)}
    worker_pids = {attempt["pid"] for attempt in read_attempts(log).values()}
    assert code == 130, cli.stderr()
    assert outcomes["slow"]["state"] == "cancelled"
    assert outcomes["hangs"]["state"] == "cancelled"
    assert len(worker_pids) == 2
    assert wait_until_gone(worker_pids, timeout=5) == []


# -- a killed supervisor ----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_killed_supervisor_leaves_no_worker_behind(make_config, start_cli, tmp_path):
    log = tmp_path / "attempts.jsonl"
    pid_file = tmp_path / "child.pid"
    config_path = make_config(
        f"""
        [run]
        max_concurrent = 2

        [[tasks]]
        id = "hangs"
        call = "tests.faults.scripted:run"
        kwargs = {{ log = {toml_string(log)}, behaviours = ["hang"] }}

        [[tasks]]
        id = "parent"
        call = "tests.faults.tasks:hang_with_child"
        kwargs = {{ pid_file = {toml_string(pid_file)} }}
        """
    )

    cli = start_cli(config_path)
    assert wait_for_started(log, ["hangs"], timeout=20), f"the scripted attempt did not start:\n{cli.stderr()}"
    assert wait_for_file(pid_file, timeout=20), f"the task did not start its child:\n{cli.stderr()}"
    assert cli.wait_for_lines(r"STARTING \S+ attempt 1/", count=2), f"no STARTING lines:\n{cli.stderr()}"
    worker_pids = cli.worker_pids()
    child_pid = int(pid_file.read_text(encoding="utf-8"))
    cli.process.send_signal(signal.SIGKILL)
    cli.wait(timeout=10)

    assert len(worker_pids) == 2
    assert wait_until_gone([*worker_pids, child_pid], timeout=10) == []


def is_loky_worker(process: psutil.Process) -> bool:
    """Return whether ``process`` is a loky worker process, as its command line shows."""
    try:
        return "popen_loky_posix" in " ".join(process.cmdline())
    except psutil.Error:
        return False


@pytest.mark.timeout(60)
def test_supervisor_killed_while_workers_start_leaves_none_behind(make_config, start_cli, tmp_path):
    config_path = make_config(
        """
        [run]
        max_concurrent = 2

        [[tasks]]
        id = "sleeps-{n}"
        call = "tests.faults.tasks:sleep"
        matrix = { n = [1, 2] }
        kwargs = { seconds = 30 }
        """
    )

    cli = start_cli(config_path)
    supervisor = psutil.Process(cli.process.pid)
    # Kill the supervisor as soon as its first worker process exists, before
    # the worker has finished starting.
    descendants = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and cli.process.poll() is None and not any(is_loky_worker(child) for child in descendants):
        try:
            descendants = supervisor.children(recursive=True)
        except psutil.Error:
            # A child exited while psutil listed it; list again.
            continue
        time.sleep(0.002)
    workers = [child.pid for child in descendants if is_loky_worker(child)]
    cli.process.send_signal(signal.SIGKILL)
    cli.wait(timeout=10)

    try:
        assert workers, "no worker process started"
        assert wait_until_gone(workers, timeout=10) == []
    finally:
        # The processes outlive the test otherwise, because they are no longer its children.
        for child in descendants:
            try:
                child.kill()
            except psutil.Error:
                pass
