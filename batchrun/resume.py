"""Decide what a resumed run does with each task the journal already recorded.

A task that succeeded keeps its result and does not run again. A task that
failed for good, or timed out, stays that way unless ``retry_failed`` is set.
A task that was cancelled or never finished carries on with its charged
attempts, its failures by kind and its pending retry delay. Attempts that the
run itself cancelled while stopping are not charged. A task whose
definition changed since the journal was written is an error, unless
``rerun_changed`` is set, in which case it starts again from attempt 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal


if TYPE_CHECKING:
    from batchrun.journal import TaskRecord


Action = Literal["run", "skip", "changed"]


@dataclass(slots=True)
class Admission:
    """The decision for one task when a resumed run reaches it."""

    #: "run" (with ``attempts`` and ``failures`` carried on), "skip" (keep ``state``), or "changed".
    action: Action
    attempts: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    #: Seconds to wait before the next attempt, from a retry the earlier session scheduled.
    delay: float = 0.0
    #: The terminal state a skipped task keeps.
    state: str | None = None
    #: Whether the journal's row must be reset before the task runs again.
    reset: bool = False
    #: Whether the task ended as cancelled in an earlier session and now runs on.
    reopen: bool = False
    reason: str = ""


class ResumePlan:
    """The earlier sessions' view of each task, and the user's choices for resuming."""

    def __init__(self, previous: dict[str, TaskRecord], *, retry_failed: bool = False, rerun_changed: bool = False) -> None:
        self.previous = previous
        self.retry_failed = retry_failed
        self.rerun_changed = rerun_changed

    def is_known(self, task_id: str) -> bool:
        return task_id in self.previous

    def admit(self, task_id: str, digest: str) -> Admission:
        """Return what to do with a task, given its current definition hash."""
        record = self.previous.get(task_id)
        if record is None:
            return Admission("run")

        if record.definition_hash != digest:
            if not self.rerun_changed:
                return Admission("changed")
            return Admission("run", reset=True, reason="its definition changed since the journal was written")

        if record.state == "succeeded":
            return Admission("skip", state="succeeded")
        if record.state in ("failed", "timed-out"):
            if not self.retry_failed:
                return Admission("skip", state=record.state, attempts=record.attempts)
            return Admission("run", reset=True, reason=f"it {record.state} in an earlier session and --retry-failed was given")

        delay = 0.0
        if record.retry_due_wall is not None:
            delay = max(0.0, record.retry_due_wall - time.time())

        # An attempt the run cancelled as it stopped was not the task's fault,
        # so it is not charged, like an attempt the supervisor's death cut short.
        failures = dict(record.failures)
        cancelled = failures.pop("cancelled", 0)
        attempts = max(0, record.attempts - cancelled)
        return Admission("run", attempts=attempts, failures=failures, delay=delay, reopen=record.state == "cancelled")
