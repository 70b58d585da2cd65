"""Tests of whole runs through ``batchrun.runner.run_batch``: retries, task kinds, failures and plugins.

Tasks call :mod:`tests.probe`, which records every attempt from inside the
worker, or small modules that each test writes into ``tmp_path``. The
config file's folder is on the import path of the supervisor and of the
workers, so those modules import by their bare names. Module names differ
between tests because ``sys.modules`` keeps a module for the whole session.
"""

from __future__ import annotations

import json
import os
import textwrap
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from loky.backend import popen_loky_posix

import batchrun
from batchrun.config import load_config
from batchrun.errors import PluginError
from batchrun.retry import exponential_delay
from batchrun.runner import build_plugin_manager, run_batch
from tests.conftest import Recorder
from tests.probe import read_records




def toml_string(value: object) -> str:
    """Quote ``value`` as a TOML basic string, which JSON string syntax also is."""
    return json.dumps(str(value))


def write_module(folder: Path, name: str, source: str) -> str:
    """Write ``source`` to ``folder/name.py`` and return ``name``."""
    (folder / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    return name


def run_recorded(config_path: Path, recorder: Recorder, *plugins: tuple[object, str]):
    """Run the batch at ``config_path`` with ``recorder`` and then ``plugins`` registered, and return the summary."""
    config = load_config(config_path)
    manager = build_plugin_manager(config, story_mode="quiet")
    manager.register(recorder, "recorder")
    for plugin, name in plugins:
        manager.register(plugin, name)
    return run_batch(config, manager=manager)


def count_records(log: Path) -> Counter:
    """Return the number of recorded attempts of each task."""
    return Counter(record["task"] for record in read_records(log))


def retry_events(recorder: Recorder) -> dict[tuple[str, int], float]:
    """Return the delay of every on_retry call, keyed by task id and failed attempt number."""
    return {(task_id, details[0]): details[1] for hook, task_id, details in recorder.events if hook == "on_retry"}


def fail_events(recorder: Recorder, task_id: str) -> list[tuple[int, str, str]]:
    """Return (attempt number, failure kind, exception type name) of every on_fail call of a task."""
    return [details for hook, event_task, details in recorder.events if hook == "on_fail" and event_task == task_id]


RETRY_FIXED = """
    [retry]
    policy = "fixed"
    delay = 0.01
    jitter = false
"""


# -- retry counts and policies ------------------------------------------------------------


@pytest.mark.timeout(60)
def test_retry_max_attempts_per_task(make_config, recorder, tmp_path):
    log = tmp_path / "records.jsonl"
    config_path = make_config(
        f"""
        {RETRY_FIXED}
        max_attempts = 2

        [[tasks]]
        id = "default"
        call = "tests.probe:record"
        kwargs = {{ log = {toml_string(log)}, fail_attempts = 9 }}

        [[tasks]]
        id = "own-limit"
        call = "tests.probe:record"
        max_attempts = 4
        kwargs = {{ log = {toml_string(log)}, fail_attempts = 9 }}
        """
    )

    summary = run_recorded(config_path, recorder)

    attempts = count_records(log)
    assert attempts["default"] == 2, "[retry] max_attempts = 2 applies"
    assert attempts["own-limit"] == 4, "the task's max_attempts = 4 overrides [retry]"
    assert recorder.outcomes()["own-limit"].attempts == 4
    assert summary.states["failed"] == 2


@pytest.mark.timeout(60)
def test_retry_on_skips_unlisted_error(make_config, recorder, tmp_path):
    log = tmp_path / "records.jsonl"
    config_path = make_config(
        f"""
        {RETRY_FIXED}
        max_attempts = 3
        retry_on = ["ConnectionError"]

        [[tasks]]
        id = "value-error"
        call = "tests.probe:record"
        kwargs = {{ log = {toml_string(log)}, fail_attempts = 1, error = "ValueError" }}

        [[tasks]]
        id = "connection-error"
        call = "tests.probe:record"
        kwargs = {{ log = {toml_string(log)}, fail_attempts = 1, error = "ConnectionError" }}
        """
    )

    run_recorded(config_path, recorder)

    attempts = count_records(log)
    outcomes = recorder.outcomes()
    assert attempts["value-error"] == 1, "ValueError is not in retry_on"
    assert outcomes["value-error"].state == "failed"
    assert outcomes["value-error"].error.type_name == "ValueError"
    assert attempts["connection-error"] == 2
    assert outcomes["connection-error"].state == "succeeded"


@pytest.mark.timeout(60)
def test_retry_on_matches_base_class(make_config, recorder, tmp_path):
    log = tmp_path / "records.jsonl"
    config_path = make_config(
        f"""
        {RETRY_FIXED}
        max_attempts = 3
        retry_on = ["OSError"]

        [[tasks]]
        id = "connection-error"
        call = "tests.probe:record"
        kwargs = {{ log = {toml_string(log)}, fail_attempts = 2 }}
        """
    )

    run_recorded(config_path, recorder)

    assert count_records(log)["connection-error"] == 3, "ConnectionError derives from OSError"
    assert recorder.outcomes()["connection-error"].state == "succeeded"


@pytest.mark.timeout(60)
def test_retry_policy_none_never_retries(make_config, recorder, tmp_path):
    log = tmp_path / "records.jsonl"
    config_path = make_config(
        f"""
        [retry]
        policy = "none"
        max_attempts = 5

        [[tasks]]
        id = "once-{{n}}"
        call = "tests.probe:record"
        matrix = {{ n = [1, 2, 3] }}
        kwargs = {{ log = {toml_string(log)}, fail_attempts = 1 }}
        """
    )

    summary = run_recorded(config_path, recorder)

    assert count_records(log) == {"once-1": 1, "once-2": 1, "once-3": 1}
    assert retry_events(recorder) == {}
    assert summary.states["failed"] == 3


@pytest.mark.timeout(60)
def test_retry_fixed_delay_seen_in_on_retry(make_config, recorder, tmp_path):
    log = tmp_path / "records.jsonl"
    config_path = make_config(
        f"""
        {RETRY_FIXED}
        max_attempts = 3

        [[tasks]]
        id = "fixed-{{n}}"
        call = "tests.probe:record"
        matrix = {{ n = [1, 2] }}
        kwargs = {{ log = {toml_string(log)}, fail_attempts = 2 }}
        """
    )

    run_recorded(config_path, recorder)

    delays = retry_events(recorder)
    assert sorted(delays) == [("fixed-1", 1), ("fixed-1", 2), ("fixed-2", 1), ("fixed-2", 2)]
    for key, delay in delays.items():
        assert delay == 0.01, f"{key}: delay {delay}"


@pytest.mark.timeout(60)
def test_retry_seeded_jitter_same_across_runs(make_config, tmp_path):
    config_text = """
        [retry]
        policy = "exponential"
        delay = 0.01
        max_delay = 0.04
        jitter = true
        seed = 11
        max_attempts = 4

        [[tasks]]
        id = "jitter-{{n}}"
        call = "tests.probe:record"
        matrix = {{ n = [1, 2, 3] }}
        kwargs = {{ log = {log}, fail_attempts = 9 }}
    """
    runs = []
    for run_number in (1, 2):
        recorder = Recorder()
        log = toml_string(tmp_path / f"records-{run_number}.jsonl")
        config_path = make_config(config_text.format(log=log), name=f"batch-{run_number}.toml")
        run_recorded(config_path, recorder)
        runs.append((load_config(config_path), retry_events(recorder)))

    (config, first), (_, second) = runs
    assert len(first) == 9, "3 tasks with 3 retries each"
    assert first == second, "seeded jitter must give the same delays in every run"
    settings = config.tasks[0].retry
    for (task_id, number), delay in first.items():
        assert delay == exponential_delay(settings, task_id, number), f"{task_id} attempt {number}"
    without_jitter = replace(settings, jitter=False)
    unjittered = {exponential_delay(without_jitter, "", number) for number in (1, 2, 3)}
    assert set(first.values()) - unjittered, "every delay equals an unjittered one, so jitter was not applied"


# -- kinds of tasks -------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_async_task_runs_and_retries(make_config, recorder, tmp_path):
    log = tmp_path / "records.jsonl"
    config_path = make_config(
        f"""
        {RETRY_FIXED}
        max_attempts = 3

        [[tasks]]
        id = "async-{{n}}"
        call = "tests.probe:record_async"
        matrix = {{ n = [1, 2] }}
        kwargs = {{ log = {toml_string(log)}, sleep = 0.02, fail_attempts = 1 }}
        """
    )

    summary = run_recorded(config_path, recorder)

    assert count_records(log) == {"async-1": 2, "async-2": 2}
    outcomes = recorder.outcomes()
    assert outcomes["async-1"].state == "succeeded"
    assert outcomes["async-1"].result == {"task": "async-1", "attempt": 2}
    assert summary.states["succeeded"] == 2


@pytest.mark.timeout(60)
def test_matrix_tasks_run_with_filled_arguments(make_config, recorder, tmp_path):
    log = tmp_path / "records.jsonl"
    config_path = make_config(
        f"""
        [[tasks]]
        id = "cell-{{n}}-{{mode}}"
        call = "tests.probe:record"
        matrix = {{ n = [1, 2], mode = ["a", "b"] }}
        kwargs = {{ log = {toml_string(log)}, value = ["{{n}}", "{{mode}}{{n}}"] }}
        """
    )

    summary = run_recorded(config_path, recorder)

    outcomes = recorder.outcomes()
    assert sorted(outcomes) == ["cell-1-a", "cell-1-b", "cell-2-a", "cell-2-b"]
    assert outcomes["cell-2-b"].result["value"] == [2, "b2"], "a whole-field template keeps the value's type"
    assert summary.states["succeeded"] == 4


@pytest.mark.timeout(60)
def test_source_tasks_run_after_explicit_tasks(make_config, recorder, tmp_path):
    log = tmp_path / "records.jsonl"
    module = write_module(
        tmp_path,
        "runner_source_tasks",
        """
        def generate(log, count):
            for index in range(count):
                yield {
                    "id": f"generated-{index}",
                    "call": "tests.probe:record",
                    "kwargs": {"log": log, "value": index, "fail_attempts": index % 2},
                }
        """,
    )
    config_path = make_config(
        f"""
        {RETRY_FIXED}
        max_attempts = 2

        [[tasks]]
        id = "explicit"
        call = "tests.probe:record"
        kwargs = {{ log = {toml_string(log)} }}

        [[sources]]
        call = "{module}:generate"
        kwargs = {{ log = {toml_string(log)}, count = 4 }}
        """
    )

    summary = run_recorded(config_path, recorder)

    outcomes = recorder.outcomes()
    assert sorted(outcomes) == ["explicit", "generated-0", "generated-1", "generated-2", "generated-3"]
    for index in range(4):
        outcome = outcomes[f"generated-{index}"]
        assert outcome.state == "succeeded", f"generated-{index}: {outcome}"
        assert outcome.result["value"] == index
        assert outcome.attempts == 1 + index % 2
    assert summary.tasks == 5


@pytest.mark.timeout(60)
def test_result_arrives_in_outcome(make_config, recorder, tmp_path):
    log = tmp_path / "records.jsonl"
    config_path = make_config(
        f"""
        [retry]
        policy = "none"

        [[tasks]]
        id = "returns"
        call = "tests.probe:record"
        kwargs = {{ log = {toml_string(log)}, value = {{ name = "x", sizes = [1, 2] }} }}

        [[tasks]]
        id = "raises"
        call = "tests.probe:record"
        kwargs = {{ log = {toml_string(log)}, fail_attempts = 1 }}
        """
    )

    run_recorded(config_path, recorder)

    outcomes = recorder.outcomes()
    assert outcomes["returns"].result == {"task": "returns", "attempt": 1, "value": {"name": "x", "sizes": [1, 2]}}
    assert outcomes["returns"].error is None
    assert outcomes["raises"].result is None
    assert outcomes["raises"].error.type_name == "ConnectionError"


@pytest.mark.timeout(60)
def test_current_attempt_inside_task(make_config, recorder, tmp_path):
    module = write_module(
        tmp_path,
        "runner_current_attempt",
        """
        import batchrun


        def report():
            attempt = batchrun.current_attempt()
            if attempt.number < 2:
                raise ConnectionError("fail the first attempt")
            return (attempt.task_id, attempt.number, attempt.max_attempts)
        """,
    )
    config_path = make_config(
        f"""
        {RETRY_FIXED}
        max_attempts = 3

        [[tasks]]
        id = "who-am-i"
        call = "{module}:report"
        """
    )

    run_recorded(config_path, recorder)

    assert recorder.outcomes()["who-am-i"].result == ("who-am-i", 2, 3)
    assert batchrun.current_attempt() is None, "outside a worker there is no attempt"


# -- failures that must not stop the run ------------------------------------------------------

FAILING_TASKS = """
    import os
    import sys
    import threading
    import time
    from pathlib import Path


    def return_lock():
        return threading.Lock()


    def _raise_when_unpickled():
        raise RuntimeError("this object cannot be rebuilt")


    class FailsToUnpickle:
        def __reduce__(self):
            return (_raise_when_unpickled, ())


    def return_fails_to_unpickle():
        return FailsToUnpickle()


    def exit_with_system_exit():
        sys.exit(5)


    def exit_when_flag_exists(flag):
        # Wait until the other task runs, so the crash happens while it does.
        deadline = time.monotonic() + 20
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.01)
        os._exit(3)


    def set_flag_and_sleep(flag, sleep):
        Path(flag).touch()
        time.sleep(sleep)
        return "slept"
"""


class PidRecorder:
    """A hook plugin that records the worker pid of every attempt."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    @batchrun.hookimpl
    def on_start(self, attempt):
        self.pids.append(attempt.pid)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("function", "fragment"),
    [("return_lock", "cannot be pickled"), ("return_fails_to_unpickle", "cannot be unpickled")],
    ids=["pickling-in-worker", "unpickling-in-supervisor"],
)
def test_unpicklable_result_fails_with_payload(make_config, recorder, tmp_path, function, fragment):
    log = tmp_path / "records.jsonl"
    module = write_module(tmp_path, f"runner_failing_payload_{function}", FAILING_TASKS)
    config_path = make_config(
        f"""
        {RETRY_FIXED}
        max_attempts = 2

        [[tasks]]
        id = "bad-result"
        call = "{module}:{function}"

        [[tasks]]
        id = "after-{{n}}"
        call = "tests.probe:record"
        matrix = {{ n = [1, 2, 3] }}
        kwargs = {{ log = {toml_string(log)} }}
        """
    )

    summary = run_recorded(config_path, recorder)

    failures = fail_events(recorder, "bad-result")
    assert [kind for _, kind, _ in failures] == ["payload", "payload"]
    assert fragment in recorder.outcomes()["bad-result"].error.message
    assert recorder.outcomes()["bad-result"].state == "failed"
    assert summary.states["succeeded"] == 3, "the run goes on after the payload failure"


@pytest.mark.timeout(60)
def test_system_exit_fails_attempt_only(make_config, recorder, tmp_path):
    log = tmp_path / "records.jsonl"
    module = write_module(tmp_path, "runner_failing_system_exit", FAILING_TASKS)
    config_path = make_config(
        f"""
        [run]
        max_concurrent = 1

        {RETRY_FIXED}
        max_attempts = 2

        [[tasks]]
        id = "exits"
        call = "{module}:exit_with_system_exit"

        [[tasks]]
        id = "after"
        call = "tests.probe:record"
        kwargs = {{ log = {toml_string(log)} }}
        """
    )

    pids = PidRecorder()
    summary = run_recorded(config_path, recorder, (pids, "pids"))

    assert fail_events(recorder, "exits") == [(1, "exception", "SystemExit"), (2, "exception", "SystemExit")]
    assert recorder.outcomes()["exits"].state == "failed"
    assert recorder.outcomes()["after"].state == "succeeded"
    assert len(set(pids.pids)) == 1, f"SystemExit must not end the worker, but attempts ran in {pids.pids}"
    assert summary.states == {"succeeded": 1, "failed": 1, "timed-out": 0, "cancelled": 0}


@pytest.mark.timeout(60)
def test_os_exit_fails_with_crash(make_config, recorder, tmp_path):
    log = tmp_path / "records.jsonl"
    flag = tmp_path / "sleeper-started"
    module = write_module(tmp_path, "runner_failing_crash", FAILING_TASKS)
    config_path = make_config(
        f"""
        [run]
        max_concurrent = 2

        {RETRY_FIXED}
        max_attempts = 2

        [[tasks]]
        id = "crashes"
        call = "{module}:exit_when_flag_exists"
        max_attempts = 1
        kwargs = {{ flag = {toml_string(flag)} }}

        [[tasks]]
        id = "sleeper"
        call = "{module}:set_flag_and_sleep"
        kwargs = {{ flag = {toml_string(flag)}, sleep = 0.5 }}

        [[tasks]]
        id = "after"
        call = "tests.probe:record"
        kwargs = {{ log = {toml_string(log)} }}
        """
    )

    summary = run_recorded(config_path, recorder)

    outcomes = recorder.outcomes()
    assert fail_events(recorder, "crashes") == [(1, "crash", "WorkerCrashedError")]
    assert outcomes["crashes"].state == "failed"
    assert "exited" in outcomes["crashes"].error.message
    assert outcomes["sleeper"].state == "succeeded"
    assert outcomes["sleeper"].attempts == 1, "the crash in another worker must not touch the sleeper"
    assert outcomes["sleeper"].result == "slept"
    assert outcomes["after"].state == "succeeded"
    assert outcomes["after"].attempts == 1
    assert summary.tasks == 3


@pytest.fixture
def loky_reaps_first(monkeypatch):
    """Make loky's own threads win the race to reap a dead worker, and store its exit status late.

    loky's management thread and the supervisor's thread both call
    ``waitpid`` on a dead worker. Whichever comes second gets ``ECHILD`` and
    finds no exit code until the first one has stored it. The patch delays the
    supervisor's thread by 0.1 s before it polls, and loky's thread by 0.3 s
    between reaping and storing, which is the order that happens by chance in
    about one run in ten without it.
    """
    original_poll = popen_loky_posix.Popen.poll

    def poll(self, flag=os.WNOHANG):
        if self.returncode is not None:
            return self.returncode
        if threading.current_thread() is threading.main_thread():
            time.sleep(0.1)
            return original_poll(self, flag)
        try:
            pid, status = os.waitpid(self.pid, flag)
        except ChildProcessError:
            return None
        if pid == self.pid:
            time.sleep(0.3)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    monkeypatch.setattr(popen_loky_posix.Popen, "poll", poll)


@pytest.mark.timeout(60)
def test_os_exit_message_names_exit_code(make_config, recorder, tmp_path, loky_reaps_first):
    module = write_module(
        tmp_path,
        "runner_exit_code",
        """
        import os


        def crash():
            os._exit(3)
        """,
    )
    config_path = make_config(
        f"""
        [retry]
        policy = "none"

        [[tasks]]
        id = "crashes"
        call = "{module}:crash"
        """
    )

    run_recorded(config_path, recorder)

    error = recorder.outcomes()["crashes"].error
    assert error.kind == "crash"
    assert "exited with code 3" in error.message, error.message


# -- plugins --------------------------------------------------------------------------------


class RaisingOnStart:
    """A hook plugin whose on_start always raises."""

    @batchrun.hookimpl
    def on_start(self, task, attempt):
        raise RuntimeError(f"broken plugin saw {task.id}")


@pytest.mark.timeout(60)
def test_plugin_error_counted_and_others_run(make_config, recorder, tmp_path):
    log = tmp_path / "records.jsonl"
    config_path = make_config(
        f"""
        {RETRY_FIXED}
        max_attempts = 2

        [[tasks]]
        id = "task-{{n}}"
        call = "tests.probe:record"
        matrix = {{ n = [1, 2, 3] }}
        kwargs = {{ log = {toml_string(log)}, fail_attempts = 1 }}
        """
    )

    # Registered last, so pluggy's order calls it before the recorder.
    summary = run_recorded(config_path, recorder, (RaisingOnStart(), "raising"))

    starts = [event for event in recorder.events if event[0] == "on_start"]
    assert len(starts) == 6, "the recorder's on_start runs after the broken one raised"
    assert summary.plugin_errors == 6
    assert summary.states["succeeded"] == 3


@pytest.mark.timeout(60)
def test_async_hook_rejected(make_config, tmp_path):
    module = write_module(
        tmp_path,
        "runner_async_hook",
        """
        from batchrun import hookimpl


        @hookimpl
        async def on_start(task, attempt):
            pass
        """,
    )
    config_path = make_config(
        f"""
        [run]
        plugins = ["{module}"]

        [[tasks]]
        id = "never-runs"
        call = "tests.probe:record"
        kwargs = {{ log = "unused" }}
        """
    )
    config = load_config(config_path)

    with pytest.raises(PluginError, match="async def") as raised:
        build_plugin_manager(config)
    assert "on_start" in str(raised.value)


POLICY_PLUGIN = """
    from batchrun import hookimpl


    @hookimpl
    def retry_policy_names():
        return ["steady"]


    @hookimpl
    def retry_delay(task, attempt):
        if task.retry.policy != "steady":
            return None
        return {delay}
"""


@pytest.mark.timeout(60)
def test_policy_plugin_sets_delay(make_config, recorder, tmp_path):
    log = tmp_path / "records.jsonl"
    module = write_module(tmp_path, "runner_policy_delay", POLICY_PLUGIN.format(delay="0.013"))
    config_path = make_config(
        f"""
        [run]
        plugins = ["{module}"]

        [retry]
        policy = "steady"
        max_attempts = 3

        [[tasks]]
        id = "steady"
        call = "tests.probe:record"
        kwargs = {{ log = {toml_string(log)}, fail_attempts = 2 }}
        """
    )

    summary = run_recorded(config_path, recorder)

    assert retry_events(recorder) == {("steady", 1): 0.013, ("steady", 2): 0.013}
    assert count_records(log)["steady"] == 3
    assert summary.plugin_errors == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("module", "delay"), [("runner_policy_negative", "-1"), ("runner_policy_nan", "float('nan')")])
def test_policy_plugin_invalid_delay_stops_retries(make_config, recorder, tmp_path, module, delay):
    log = tmp_path / "records.jsonl"
    write_module(tmp_path, module, POLICY_PLUGIN.format(delay=delay))
    config_path = make_config(
        f"""
        [run]
        plugins = ["{module}"]

        [retry]
        policy = "steady"
        max_attempts = 3

        [[tasks]]
        id = "stopped"
        call = "tests.probe:record"
        kwargs = {{ log = {toml_string(log)}, fail_attempts = 2 }}
        """
    )

    summary = run_recorded(config_path, recorder)

    assert count_records(log)["stopped"] == 1, f"a delay of {delay} must stop the retries"
    assert retry_events(recorder) == {}
    assert recorder.outcomes()["stopped"].state == "failed"
    assert summary.plugin_errors == 1, "the invalid delay is counted as a plugin error"


@pytest.mark.timeout(60)
def test_retry_delay_of_weeks_waits_without_error(make_config, recorder, tmp_path):
    # epoll accepts at most about 24.8 days per wait, and a delay past that
    # once crashed the supervisor with OverflowError.
    log = tmp_path / "records.jsonl"
    config_path = make_config(
        f"""
        [run]
        deadline = 2.0

        [retry]
        policy = "fixed"
        delay = 3000000.0
        max_delay = 3000000.0
        jitter = false

        [[tasks]]
        id = "waits-weeks"
        call = "tests.probe:record"
        kwargs = {{ log = {json.dumps(str(log))}, fail_attempts = 1 }}
        """
    )

    summary = run_recorded(config_path, recorder)

    outcome = recorder.outcomes()["waits-weeks"]
    assert summary.stop_reason == "deadline"
    assert outcome.state == "cancelled"
    assert outcome.attempts == 1
