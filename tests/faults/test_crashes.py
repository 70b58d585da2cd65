"""Worker crashes: os._exit, SIGKILL, SIGSEGV and SIGABRT inside a task, and tasks that raise SystemExit.

A crash ends only the attempt that caused it. The other workers' attempts
run on, a new worker takes the crashed one's slot, and the retry policy
decides whether the task runs again.
"""

from __future__ import annotations

import pytest

from tests.faults.conftest import hook_names, is_gone, toml_string
from tests.faults.scripted import read_attempts
from tests.probe import peak_overlap


CRASH_MATRIX = [
    pytest.param("exit_hard", "exited with code 3", id="os-exit"),
    pytest.param("kill_self", "was killed by SIGKILL", id="sigkill"),
    pytest.param("segfault", "was killed by SIGSEGV", id="segfault"),
    pytest.param("abort", "was killed by SIGABRT", id="abort"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("function", "description"), CRASH_MATRIX)
def test_crash_fails_attempt_naming_exit_and_pid(run_text, started, function, description):
    summary, recorder = run_text(
        f"""
        [run]
        max_concurrent = 1

        [retry]
        max_attempts = 1

        [[tasks]]
        id = "crasher"
        call = "tests.faults.tasks:{function}"
        """
    )

    outcome = recorder.outcomes()["crasher"]
    [pid] = started.pids("crasher")
    assert outcome.state == "failed"
    assert outcome.attempts == 1
    assert outcome.error.kind == "crash"
    assert outcome.error.type_name == "WorkerCrashedError"
    assert outcome.error.message.startswith(f"worker (pid {pid}) ")
    assert description in outcome.error.message
    assert summary.states["failed"] == 1


@pytest.mark.timeout(90)
def test_crash_message_names_exit_code_or_signal(run_text):
    # Twelve crashes, because reading the exit status once raced loky's own
    # reaping thread and lost the code or signal in about one crash in five.
    tables = "".join(
        f"""
        [[tasks]]
        id = "{function}-{{n}}"
        call = "tests.faults.tasks:{function}"
        matrix = {{ n = [1, 2, 3] }}
        """
        for function, _ in (entry.values for entry in CRASH_MATRIX)
    )
    summary, recorder = run_text(
        """
        [run]
        max_concurrent = 2

        [retry]
        max_attempts = 1
        """
        + tables
    )

    outcomes = recorder.outcomes()
    assert summary.states["failed"] == 12
    for function, description in (entry.values for entry in CRASH_MATRIX):
        for n in (1, 2, 3):
            message = outcomes[f"{function}-{n}"].error.message
            assert description in message, f"{function}-{n}: {message}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("crash", ["crash", "segfault", "sigkill", "abort"])
def test_crash_leaves_other_attempts_running(run_text, tmp_path, crash):
    log = tmp_path / "attempts.jsonl"
    summary, recorder = run_text(
        f"""
        [run]
        max_concurrent = 3

        [retry]
        policy = "fixed"
        delay = 0.01
        jitter = false

        [[tasks]]
        id = "neighbour-{{n}}"
        call = "tests.faults.scripted:run"
        matrix = {{ n = [1, 2] }}
        kwargs = {{ log = {toml_string(log)}, behaviours = ["ok"], seconds = [1.5], wait_for_starts = 3 }}

        [[tasks]]
        id = "crasher"
        call = "tests.faults.scripted:run"
        kwargs = {{ log = {toml_string(log)}, behaviours = ["{crash}", "ok"], seconds = [0.3, 0.0], wait_for_starts = 3 }}
        """
    )

    attempts = read_attempts(log)
    crashed = attempts[("crasher", 1)]
    outcomes = recorder.outcomes()
    for task_id in ("neighbour-1", "neighbour-2"):
        neighbour = attempts[(task_id, 1)]
        # The crash happened while the neighbour ran, or the test proves nothing.
        assert neighbour["start"] < crashed["end"] < neighbour["end"], f"{task_id} did not overlap the crash"
        assert (task_id, 2) not in attempts, f"{task_id} ran a second attempt"
        assert neighbour["starts"] == 1
        assert hook_names(recorder, task_id) == ["on_start", "on_terminal"]
        assert outcomes[task_id].state == "succeeded"
        assert outcomes[task_id].attempts == 1

    assert ("on_fail", "crasher", (1, "crash", "WorkerCrashedError")) in recorder.events
    assert outcomes["crasher"].state == "succeeded"
    assert outcomes["crasher"].attempts == 2
    assert summary.states["succeeded"] == 3


@pytest.mark.timeout(60)
def test_crash_noticed_while_forked_child_holds_pipe(run_text, tmp_path):
    pid_file = tmp_path / "child.pid"
    summary, recorder = run_text(
        f"""
        [run]
        max_concurrent = 1

        [retry]
        max_attempts = 1

        [[tasks]]
        id = "forks-then-crashes"
        call = "tests.faults.tasks:fork_then_exit"
        kwargs = {{ pid_file = {toml_string(pid_file)}, seconds = 6.0 }}
        """
    )

    outcome = recorder.outcomes()["forks-then-crashes"]
    assert outcome.error.kind == "crash"
    assert "exited with code 3" in outcome.error.message
    # The forked child lives 6 s, so a run that took 4 s did not wait for it.
    assert summary.wall_seconds < 4
    assert is_gone(int(pid_file.read_text(encoding="utf-8")))


@pytest.mark.timeout(60)
def test_crashed_worker_is_replaced_in_its_slot(run_text, tmp_path):
    log = tmp_path / "attempts.jsonl"
    summary, recorder = run_text(
        f"""
        [run]
        max_concurrent = 1

        [retry]
        max_attempts = 1

        [[tasks]]
        id = "crasher"
        call = "tests.faults.scripted:run"
        kwargs = {{ log = {toml_string(log)}, behaviours = ["crash"] }}

        [[tasks]]
        id = "after-{{n}}"
        call = "tests.faults.scripted:run"
        matrix = {{ n = [1, 2, 3] }}
        kwargs = {{ log = {toml_string(log)}, behaviours = ["ok"], seconds = [0.05] }}
        """
    )

    attempts = read_attempts(log)
    crashed_pid = attempts[("crasher", 1)]["pid"]
    later_pids = {attempts[(f"after-{n}", 1)]["pid"] for n in (1, 2, 3)}
    outcomes = recorder.outcomes()
    assert crashed_pid not in later_pids
    assert is_gone(crashed_pid)
    # Tasks queued behind the crash in the dead worker's pipe are not charged for it.
    assert [outcomes[f"after-{n}"].attempts for n in (1, 2, 3)] == [1, 1, 1]
    assert peak_overlap(list(attempts.values())) == 1
    assert summary.peak_running == 1
    assert summary.states == {"succeeded": 3, "failed": 1, "timed-out": 0, "cancelled": 0}
    assert outcomes["crasher"].error.kind == "crash"


@pytest.mark.timeout(60)
def test_crash_limit_stops_task_after_first_crash(run_text):
    summary, recorder = run_text(
        """
        [run]
        max_concurrent = 1

        [retry]
        policy = "fixed"
        delay = 0.01
        max_attempts = 5
        max_failures = { crash = 1 }

        [[tasks]]
        id = "crasher"
        call = "tests.faults.tasks:exit_hard"
        """
    )

    outcome = recorder.outcomes()["crasher"]
    assert hook_names(recorder, "crasher") == ["on_start", "on_fail", "on_terminal"]
    assert outcome.state == "failed"
    assert outcome.attempts == 1
    assert outcome.error.kind == "crash"
    assert summary.attempts == 1


@pytest.mark.timeout(60)
def test_crash_on_first_attempt_succeeds_on_retry(run_text, started):
    summary, recorder = run_text(
        """
        [run]
        max_concurrent = 1

        [[tasks]]
        id = "recovers"
        call = "tests.faults.tasks:crash_on_first_attempt"
        """
    )

    outcome = recorder.outcomes()["recovers"]
    first_pid, second_pid = started.pids("recovers")
    assert hook_names(recorder, "recovers") == ["on_start", "on_fail", "on_retry", "on_start", "on_terminal"]
    assert outcome.state == "succeeded"
    assert outcome.attempts == 2
    assert outcome.result == "recovered"
    assert first_pid != second_pid, "the retry ran in the crashed worker's pid"
    assert summary.succeeded


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("function", "type_name", "message"),
    [
        pytest.param("raise_system_exit", "SystemExit", "4", id="sys-exit"),
        pytest.param("raise_keyboard_interrupt", "KeyboardInterrupt", "", id="keyboard-interrupt"),
    ],
)
def test_base_exception_in_task_fails_attempt_only(run_text, started, function, type_name, message):
    summary, recorder = run_text(
        f"""
        [run]
        max_concurrent = 1

        [[tasks]]
        id = "exits"
        call = "tests.faults.tasks:{function}"

        [[tasks]]
        id = "after"
        call = "tests.faults.tasks:sleep"
        kwargs = {{ seconds = 0.01 }}
        """
    )

    failures = [details for hook, task_id, details in recorder.events if hook == "on_fail" and task_id == "exits"]
    outcome = recorder.outcomes()["exits"]
    assert failures == [(1, "exception", type_name), (2, "exception", type_name), (3, "exception", type_name)]
    assert outcome.state == "failed"
    assert outcome.error.message == message
    assert type_name in outcome.error.traceback
    # Every attempt, and the next task, ran in the same worker: it survived.
    assert len(set(started.pids("exits") + started.pids("after"))) == 1
    assert recorder.outcomes()["after"].state == "succeeded"
    assert summary.states == {"succeeded": 1, "failed": 1, "timed-out": 0, "cancelled": 0}
