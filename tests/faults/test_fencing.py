"""Fencing: events of an attempt that is no longer in flight are dropped and logged.

A worker's last events can reach the supervisor after the supervisor has
already failed the attempt because the worker's slot was lost. Acting on
such a stale event would end a task twice, count a phantom running attempt,
or queue a task that is already running. These tests drive a real
:class:`~batchrun.supervisor.Supervisor` with a backend that replays scripted
worker events, so each race happens in exactly the order the test names.
"""

from __future__ import annotations

import pickle
import time
from collections import Counter, deque

import pytest

from batchrun import worker
from batchrun.config import load_config
from batchrun.plugins import Hooks
from batchrun.pool import Backend, SlotEvents
from batchrun.runner import build_plugin_manager
from batchrun.supervisor import Supervisor
from tests.faults.conftest import hook_names


class ScriptedBackend(Backend):
    """A backend without processes: each ``wait`` returns the next scripted step's events.

    A step is a function of the backend that returns a list of
    :class:`SlotEvents`, or ``None`` while it still waits for a submission;
    the step then stays first in line. Lost slots come back at once, as if
    their worker had been reaped.
    """

    #: Upper bound on ``wait`` calls, so a supervisor that never finishes fails the test instead of hanging.
    MAX_WAITS = 1000

    def __init__(self, size: int, script) -> None:
        self.size = size
        self.script = deque(script)
        #: ``(slot, attempt_id, task_id, number)`` of every submission, in order.
        self.submitted: list[tuple[int, int, str, int]] = []
        self.lost_slots: set[int] = set()
        self.generation = [0] * size
        self.waits = 0

    def start(self) -> None:
        pass

    def submit(self, slot, batch) -> None:
        assert slot not in self.lost_slots, f"the supervisor submitted to lost slot {slot}"
        for submission in batch:
            attempt_id, task_id, number = submission[0], submission[1], submission[2]
            self.submitted.append((slot, attempt_id, task_id, number))

    def wait(self, timeout):
        self.waits += 1
        assert self.waits <= self.MAX_WAITS, "the supervisor kept waiting for events the script does not have"
        assert self.script, f"the script ran out while the supervisor still waits; submitted {self.submitted}"
        reports = self.script[0](self)
        if reports is None:
            return []
        self.script.popleft()
        return reports

    def wake(self) -> None:
        pass

    def stop_starting(self) -> None:
        pass

    def cancel(self, slot) -> None:
        pass

    def kill(self, slot, reason) -> None:
        pass

    def is_ready(self, slot) -> bool:
        return slot not in self.lost_slots

    def restart_reaped_slots(self) -> list[int]:
        restarted = sorted(self.lost_slots)
        for slot in restarted:
            self.generation[slot] += 1
        self.lost_slots.clear()
        return restarted

    def pid(self, slot) -> int:
        return 40000 + 100 * slot + self.generation[slot]

    def close(self, grace) -> None:
        pass


def submission(backend: ScriptedBackend, index: int):
    """Return the ``index``-th submission, or ``None`` when the supervisor has not sent it yet."""
    return backend.submitted[index] if index < len(backend.submitted) else None


def began(index: int):
    """Step: the worker of the ``index``-th submission reports that it started."""

    def step(backend):
        sent = submission(backend, index)
        if sent is None:
            return None
        slot, attempt_id, _, _ = sent
        return [SlotEvents(slot, [(worker.BEGAN, attempt_id, time.monotonic(), time.time())])]

    return step


def ended(index: int, value: object):
    """Step: the ``index``-th submission reports that it returned ``value``."""

    def step(backend):
        sent = submission(backend, index)
        if sent is None:
            return None
        slot, attempt_id, _, _ = sent
        return [SlotEvents(slot, [(worker.ENDED, attempt_id, time.monotonic(), True, pickle.dumps(value))])]

    return step


def skipped(index: int):
    """Step: the worker of the ``index``-th submission reports that it did not start it."""

    def step(backend):
        sent = submission(backend, index)
        if sent is None:
            return None
        slot, attempt_id, _, _ = sent
        return [SlotEvents(slot, [(worker.SKIPPED, attempt_id)])]

    return step


def slot_lost(slot: int):
    """Step: the worker in ``slot`` died of SIGKILL."""

    def step(backend):
        backend.lost_slots.add(slot)
        return [SlotEvents(slot, [], lost=f"worker (pid {backend.pid(slot)}) was killed by SIGKILL")]

    return step


ONE_TASK = """
    [run]
    max_concurrent = 1
    journal = false

    [retry]
    policy = "fixed"
    delay = 0
    jitter = false
    max_attempts = 2

    [[tasks]]
    id = "a"
    call = "tests.faults.tasks:sleep"
    """


@pytest.fixture
def supervise(make_config, recorder):
    """Return a function that runs ``config_text`` on a ScriptedBackend and returns ``(summary, backend)``."""

    def run(config_text: str, script):
        config = load_config(make_config(config_text))
        manager = build_plugin_manager(config, story_mode="quiet")
        manager.register(recorder, "recorder")
        hooks = Hooks(manager)
        backend = ScriptedBackend(config.run.max_concurrent, script)
        supervisor = Supervisor(config, hooks, backend, policy_names=hooks.retry_policy_names())
        return supervisor.run(), backend

    return run


@pytest.mark.timeout(30)
def test_late_end_of_lost_attempt_is_dropped(supervise, recorder, caplog):
    summary, backend = supervise(
        ONE_TASK,
        [began(0), slot_lost(0), began(1), ended(0, "stale"), ended(1, "fresh")],
    )

    outcome = recorder.outcomes()["a"]
    stale_id = backend.submitted[0][1]
    assert hook_names(recorder, "a") == ["on_start", "on_fail", "on_retry", "on_start", "on_terminal"]
    assert ("on_fail", "a", (1, "crash", "WorkerCrashedError")) in recorder.events
    assert outcome.state == "succeeded"
    assert outcome.result == "fresh"
    assert outcome.attempts == 2
    assert summary.attempts == 2
    assert summary.peak_running == 1
    assert f"event-dropped event=ended attempt_id={stale_id}: the attempt is no longer in flight" in caplog.messages


TWO_TASKS = """
    [run]
    max_concurrent = 2
    journal = false

    [retry]
    max_attempts = 1

    [[tasks]]
    id = "a"
    call = "tests.faults.tasks:sleep"

    [[tasks]]
    id = "b"
    call = "tests.faults.tasks:sleep"
    """


@pytest.mark.timeout(30)
def test_late_end_after_task_finished_is_dropped(supervise, recorder, caplog):
    # Task "b" keeps the run going, so the stale end of "a" reaches the supervisor.
    summary, backend = supervise(
        TWO_TASKS,
        [began(0), began(1), slot_lost(0), ended(0, "stale"), ended(1, "b done")],
    )

    terminals = Counter(task_id for hook, task_id, _ in recorder.events if hook == "on_terminal")
    outcomes = recorder.outcomes()
    stale_id, stale_task = backend.submitted[0][1], backend.submitted[0][2]
    assert stale_task == "a"
    assert terminals == Counter(["a", "b"])
    assert outcomes["a"].state == "failed"
    assert outcomes["a"].error.kind == "crash"
    assert outcomes["b"].result == "b done"
    assert summary.states == {"succeeded": 1, "failed": 1, "timed-out": 0, "cancelled": 0}
    assert f"event-dropped event=ended attempt_id={stale_id}: the attempt is no longer in flight" in caplog.messages


@pytest.mark.timeout(30)
def test_late_start_not_counted_as_running(supervise, recorder, caplog):
    summary, backend = supervise(
        ONE_TASK,
        [began(0), slot_lost(0), began(1), began(0), ended(1, "fresh")],
    )

    stale_id = backend.submitted[0][1]
    starts = [details for hook, task_id, details in recorder.events if hook == "on_start"]
    assert starts == [1, 2]
    assert summary.peak_running == 1
    assert summary.attempts == 2
    assert recorder.outcomes()["a"].state == "succeeded"
    assert f"event-dropped event=began attempt_id={stale_id}: the attempt is no longer in flight" in caplog.messages


@pytest.mark.timeout(30)
def test_late_skip_does_not_requeue_task(supervise, recorder, caplog):
    summary, backend = supervise(
        ONE_TASK,
        [began(0), slot_lost(0), began(1), skipped(0), ended(1, "fresh")],
    )

    stale_id = backend.submitted[0][1]
    task_submissions = [task_id for _, _, task_id, _ in backend.submitted]
    assert task_submissions == ["a", "a"], "a stale skip put the task back in the ready queue"
    assert Counter(task_id for hook, task_id, _ in recorder.events if hook == "on_terminal") == Counter(["a"])
    assert recorder.outcomes()["a"].attempts == 2
    assert summary.peak_running == 1
    assert f"event-dropped event=skipped attempt_id={stale_id}: the attempt is no longer in flight" in caplog.messages
