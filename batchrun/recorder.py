"""Write each event to the journal, then fire its hooks: in that order, always.

The supervisor reports every event here. Events are queued, and
:meth:`EventRecorder.flush` commits the journal's transaction before it calls
the queued hooks, so a plugin never reports something the journal could lose.
The supervisor flushes when no worker event is waiting, or when the oldest
queued event is :data:`MAX_FLUSH_DELAY` seconds old or :data:`MAX_QUEUED`
events are queued, so a busy run pays for one commit per many events.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any



if TYPE_CHECKING:
    from collections.abc import Callable

    from batchrun.journal import Journal
    from batchrun.models import Attempt, ErrorInfo, Outcome, RunInfo, RunSummary, Task
    from batchrun.plugins import Hooks


#: Seconds an event may wait in the queue while worker events keep arriving.
MAX_FLUSH_DELAY = 0.02
#: Number of queued hook calls that forces a flush.
MAX_QUEUED = 1000

_SUCCEEDED_DATA = '{"status": "succeeded"}'


class EventRecorder:
    """The journal and the hooks behind one interface, flushed in order."""

    def __init__(self, hooks: Hooks, journal: Journal | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.hooks = hooks
        self.journal = journal
        self.clock = clock
        self._pending: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self._oldest = 0.0

    def has_pending(self) -> bool:
        """Return whether events wait to be committed or hooks wait to fire."""
        return bool(self._pending) or (self.journal is not None and self.journal.has_pending())

    def is_flush_due(self) -> bool:
        """Return whether the queue is old or long enough to flush even while events keep arriving."""
        return len(self._pending) >= MAX_QUEUED or self.clock() - self._oldest >= MAX_FLUSH_DELAY

    def _queue(self, hook: Callable[..., None], arguments: tuple[Any, ...]) -> None:
        if not self._pending:
            self._oldest = self.clock()
        self._pending.append((hook, arguments))

    def flush(self) -> None:
        """Commit the journal, then fire every queued hook in the order the events happened."""
        if self.journal is not None:
            self.journal.commit()
        pending = self._pending
        if not pending:
            return
        self._pending = []
        for hook, arguments in pending:
            hook(*arguments)

    # -- run -------------------------------------------------------------------------

    def run_started(self, run: RunInfo) -> None:
        self._queue(self.hooks.on_run_start, (run,))
        self.flush()

    def run_ended(self, summary: RunSummary, status: str) -> None:
        self.flush()
        if self.journal is not None:
            self.journal.end_run(status, summary.stop_reason)
        self.hooks.report_repeated_failures()
        self.hooks.on_run_end(summary)

    # -- tasks -----------------------------------------------------------------------

    def task_reset(self, task: Task, reason: str) -> None:
        if self.journal is not None:
            self.journal.task_reset(task)
            self.journal.record("task-reset", task.id, data={"reason": reason})

    def task_reopened(self, task: Task) -> None:
        """Record that a task cancelled in an earlier session runs on, so its next terminal state is its own."""
        if self.journal is not None:
            self.journal.record("task-reopened", task.id, data={"reason": "it was cancelled when an earlier session stopped"})

    def attempt_started(self, task: Task, attempt: Attempt, attempt_id: int, slot: int) -> None:
        if self.journal is not None:
            # The definition hash lets a resumed run notice that a task whose
            # attempt was cut short has changed since, although it has no row yet.
            data = f'{{"definition": "{self.journal.digest_of(task)}"}}'
            self.journal.record("attempt-started", task.id, attempt=attempt.number, attempt_id=attempt_id, slot=slot, pid=attempt.pid, mono=attempt.started_at, data=data)
        self._queue(self.hooks.on_start, (task, attempt))

    def attempt_succeeded(self, task: Task, attempt: Attempt, attempt_id: int, slot: int, ended_at: float) -> None:
        if self.journal is not None:
            self.journal.record("attempt-ended", task.id, attempt=attempt.number, attempt_id=attempt_id, slot=slot, pid=attempt.pid, mono=ended_at, data=_SUCCEEDED_DATA)

    def attempt_failed(self, task: Task, attempt: Attempt, attempt_id: int, slot: int, ended_at: float, error: ErrorInfo) -> None:
        """Record a failed attempt and queue ``on_fail``."""
        if self.journal is not None:
            data = {"status": "failed", "kind": error.kind, "type": error.type_name, "message": error.message}
            self.journal.record("attempt-ended", task.id, attempt=attempt.number, attempt_id=attempt_id, slot=slot, pid=attempt.pid, mono=ended_at, data=data)
        self._queue(self.hooks.on_fail, (task, attempt, error))

    def retry_scheduled(self, task: Task, attempt: Attempt, delay: float, attempts: int, failures: dict[str, int]) -> None:
        if self.journal is not None:
            due_wall = time.time() + delay
            self.journal.record("retry-scheduled", task.id, attempt=attempt.number, data={"delay": delay, "due_wall": due_wall})
            self.journal.task_changed(task, attempts, failures, due_wall)
        self._queue(self.hooks.on_retry, (task, attempt, delay))

    def task_finished(self, task: Task, outcome: Outcome, failures: dict[str, int], retry_due_wall: float | None = None) -> None:
        if self.journal is not None:
            error = outcome.error
            if error is None:
                data: dict[str, Any] | str = f'{{"state": "{outcome.state}", "attempts": {outcome.attempts}}}'
            else:
                data = {"state": outcome.state, "attempts": outcome.attempts, "error": {"kind": error.kind, "type": error.type_name, "message": error.message}}
            self.journal.record("task-finished", task.id, data=data)
            self.journal.task_finished(task, outcome.state, outcome.attempts, failures, outcome.result, error, outcome.duration, retry_due_wall)
        self._queue(self.hooks.on_terminal, (task, outcome))
