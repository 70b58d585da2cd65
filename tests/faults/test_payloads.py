"""Payloads that cannot travel between processes: arguments, results and exceptions.

Arguments that cannot be pickled fail their task before any attempt runs.
A result that cannot be pickled in the worker, or unpickled in the
supervisor, fails the attempt with kind "payload". An exception that cannot
be unpickled still arrives, as text, with its own type name.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.faults.conftest import hook_names, read_outcomes, write_outcome_plugin


LOCK_SOURCE = '''
import threading


def tasks():
    yield {"id": "before", "call": "tests.faults.tasks:sleep", "kwargs": {"seconds": 0.01}}
    yield {"id": "locked", "call": "tests.faults.tasks:sleep", "kwargs": {"seconds": threading.Lock()}}
    yield {"id": "after", "call": "tests.faults.tasks:sleep", "kwargs": {"seconds": 0.01}}
'''


@pytest.mark.timeout(60)
def test_unpicklable_arguments_fail_task_without_attempt(run_text, tmp_path):
    # A module name used by no other test, because the supervisor process caches imports.
    (tmp_path / "payload_lock_source.py").write_text(LOCK_SOURCE, encoding="utf-8")
    summary, recorder = run_text(
        """
        [run]
        max_concurrent = 2

        [retry]
        max_attempts = 3

        [[sources]]
        call = "payload_lock_source:tasks"
        """
    )

    outcome = recorder.outcomes()["locked"]
    assert hook_names(recorder, "locked") == ["on_terminal"]
    assert outcome.state == "failed"
    assert outcome.attempts == 0
    assert outcome.error.kind == "payload"
    assert "the arguments of task 'locked' cannot be pickled" in outcome.error.message
    assert "_thread.lock" in outcome.error.message
    assert recorder.outcomes()["before"].state == "succeeded"
    assert recorder.outcomes()["after"].state == "succeeded"
    assert summary.states == {"succeeded": 2, "failed": 1, "timed-out": 0, "cancelled": 0}


UNLOADABLE_SOURCE = '''
from tests.faults.tasks import Unloadable


def tasks():
    yield {"id": "before", "call": "tests.faults.tasks:sleep", "kwargs": {"seconds": 0.01}}
    yield {"id": "unloadable-args", "call": "tests.faults.tasks:sleep", "kwargs": {"seconds": Unloadable()}}
    yield {"id": "after", "call": "tests.faults.tasks:sleep", "kwargs": {"seconds": 0.01}}
'''


@pytest.mark.timeout(60)
def test_arguments_failing_to_unpickle_in_worker_fail_task(make_config, start_cli, tmp_path):
    # A module name used by no other test, because the supervisor process caches imports.
    (tmp_path / "payload_unloadable_source.py").write_text(UNLOADABLE_SOURCE, encoding="utf-8")
    outcome_file = write_outcome_plugin(tmp_path)
    config_path = make_config(
        """
        [run]
        max_concurrent = 1

        [retry]
        max_attempts = 1

        [[sources]]
        call = "payload_unloadable_source:tasks"
        """
    )

    cli = start_cli(config_path, "-p", "outcome_file")
    # The run takes about a second, so 10 s means it hung.
    code = cli.wait(timeout=10)

    outcomes = {record["task"]: record for record in read_outcomes(outcome_file)}
    assert code == 1, cli.stderr()
    assert outcomes["unloadable-args"]["state"] == "failed"
    assert outcomes["unloadable-args"]["kind"] == "payload"
    assert outcomes["before"]["state"] == "succeeded"
    assert outcomes["after"]["state"] == "succeeded"


@pytest.mark.timeout(60)
def test_unpicklable_result_fails_attempt_naming_type(run_text):
    summary, recorder = run_text(
        """
        [run]
        max_concurrent = 1

        [retry]
        max_attempts = 1

        [[tasks]]
        id = "returns-lock"
        call = "tests.faults.tasks:return_lock"
        """
    )

    outcome = recorder.outcomes()["returns-lock"]
    assert outcome.state == "failed"
    assert outcome.attempts == 1
    assert outcome.error.kind == "payload"
    assert "_thread.lock" in outcome.error.message
    assert "cannot be pickled" in outcome.error.message
    assert summary.states["failed"] == 1


@pytest.mark.timeout(60)
def test_unpicklable_exception_keeps_type_and_retries(run_text):
    summary, recorder = run_text(
        """
        [run]
        max_concurrent = 1

        [retry]
        policy = "fixed"
        delay = 0.01
        max_attempts = 2

        [[tasks]]
        id = "raises"
        call = "tests.faults.tasks:raise_unpicklable"
        """
    )

    failures = [details for hook, task_id, details in recorder.events if hook == "on_fail" and task_id == "raises"]
    error = recorder.outcomes()["raises"].error
    assert failures == [(1, "exception", "NeedsTwoArguments"), (2, "exception", "NeedsTwoArguments")]
    assert error.message == "code 7: remote refused"
    assert "tests.faults.tasks.NeedsTwoArguments" in error.type_names
    assert "raise_unpicklable" in error.traceback
    assert "NeedsTwoArguments: code 7: remote refused" in error.traceback
    assert recorder.outcomes()["raises"].state == "failed"
    assert summary.attempts == 2


@pytest.mark.timeout(60)
def test_unloadable_result_fails_attempt_as_payload(run_text):
    summary, recorder = run_text(
        """
        [run]
        max_concurrent = 1

        [retry]
        max_attempts = 1

        [[tasks]]
        id = "unloadable"
        call = "tests.faults.tasks:return_unloadable"
        """
    )

    outcome = recorder.outcomes()["unloadable"]
    assert outcome.state == "failed"
    assert outcome.error.kind == "payload"
    assert "cannot be unpickled" in outcome.error.message
    assert "this object refuses to be unpickled" in outcome.error.message
    assert summary.states["failed"] == 1


@pytest.mark.timeout(90)
def test_big_result_arrives_intact(run_text):
    summary, recorder = run_text(
        """
        [run]
        max_concurrent = 1

        [retry]
        max_attempts = 1

        [[tasks]]
        id = "big"
        call = "tests.faults.tasks:big_result"
        kwargs = { megabytes = 200 }
        """
    )

    outcome = recorder.outcomes()["big"]
    assert outcome.state == "succeeded", outcome.error
    assert len(outcome.result) == 200 * 1024 * 1024
    assert outcome.result.count(b"x") == len(outcome.result)
    assert summary.succeeded


@pytest.mark.timeout(60)
def test_task_returning_awaitable_is_awaited(run_text):
    summary, recorder = run_text(
        """
        [run]
        max_concurrent = 1

        [[tasks]]
        id = "awaitable"
        call = "tests.faults.tasks:returns_awaitable"
        """
    )

    outcome = recorder.outcomes()["awaitable"]
    assert outcome.state == "succeeded"
    assert outcome.result == 5
    assert summary.succeeded
