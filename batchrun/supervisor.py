"""The supervisor: the one owner of a run's state, in the main process.

::

    config.iter_tasks()  --(lazy pull)-->  ready deque  <--(due)--  retry heap
                                               |
                                   submit batches per slot
                                               v
             +----------------- Backend (one pipe per slot) -----------------+
             |  slot 0: worker process   slot 1: worker process   ...       |
             +---------------------------------------------------------------+
                                               |
                 began / ended / skipped events, and lost slots
                                               v
                   supervisor loop: count running, fire hooks, decide retries

One thread, the caller's, runs the loop and owns every field here. The only
other threads are loky's and the reapers in :mod:`batchrun.pool`, and they
touch none of it. Signal handlers only set a flag and wake the loop.

The three laws hold by construction:

- Each slot runs at most one attempt at a time and a lost slot is replaced
  only once its process is reaped, so no more than ``max_concurrent``
  attempts run at once. ``peak_running`` is counted from the workers' own
  start and end notices.
- A task sits in exactly one place: the ready deque, the retry heap, or
  ``in_flight`` under one attempt id. A new attempt is created only after the
  previous one ended, and events of an attempt id that is no longer in flight
  are dropped.
- Every task leaves through :meth:`Supervisor.finish_task`, which fires
  ``on_terminal`` once. The loop ends only when nothing is ready, delayed or
  in flight and the task source is exhausted.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import pickle
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from batchrun import worker
from batchrun.errors import ConfigError, PoolBrokenError
from batchrun.journal import definition_hash
from batchrun.models import TASK_STATES, Attempt, ErrorInfo, Outcome, RunInfo, RunSummary, Task
from batchrun.recorder import EventRecorder


if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from batchrun.config import BatchConfig
    from batchrun.journal import Journal
    from batchrun.plugins import Hooks
    from batchrun.pool import Backend, SlotEvents
    from batchrun.resume import ResumePlan


log = logging.getLogger(__name__)

#: Seconds of queued work to keep in each worker's pipe, estimated from recent
#: attempt durations. Queuing hides the round trip between attempts for short
#: tasks; long tasks get no queue, so no attempt waits behind a slow one.
PREFETCH_SECONDS = 0.002
MAX_PREFETCH = 64
#: Largest pickled arguments queued to a worker that is running an attempt.
#: MAX_PREFETCH of them fit the pipe's buffer of about 200 KiB on Linux.
MAX_QUEUED_ARGUMENT_BYTES = 2048

#: Most tasks a stopping run reads from its sources only to cancel them, and
#: the most seconds it spends doing so: a source may be endless.
MAX_CANCELLED_UNREAD = 100_000
MAX_CANCEL_SECONDS = 10.0

#: A slot whose worker dies this many times in a row before it reports its pid
#: means workers cannot start at all, and the run stops.
MAX_FAILED_WORKER_STARTS = 3

CRASH_ERROR = ("WorkerCrashedError", "batchrun.WorkerCrashedError", "Exception", "BaseException")
TIMEOUT_ERROR = ("AttemptTimeoutError", "batchrun.worker.AttemptTimeoutError", "TimeoutError", "OSError", "Exception", "BaseException")


@dataclass(slots=True)
class _TaskRecord:
    task: Task
    #: The pickled ``(args, kwargs)`` pair sent to workers, made once per task
    #: so that arguments which cannot be pickled fail only their own task.
    arguments: bytes
    #: Number of attempts that started running.
    attempts: int = 0
    last_error: ErrorInfo | None = None
    last_duration: float = 0.0
    #: Number of failed attempts by failure kind.
    failures: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _InFlight:
    record: _TaskRecord
    slot: int
    number: int
    #: Set once the worker reported the start.
    attempt: Attempt | None = None


@dataclass(slots=True)
class _SlotState:
    #: Attempt ids sent to this slot and not yet ended, oldest first.
    queued: deque[int] = field(default_factory=deque)
    #: Attempt id the worker reported as running, if any.
    running: int | None = None
    #: Why the supervisor killed this slot's worker, and the failure kind it means.
    kill_kind: str | None = None
    kill_reason: str = ""
    #: The attempt the kill was meant for; the worker may have moved on to the next one.
    kill_attempt: int | None = None
    failed_starts: int = 0


class Supervisor:
    """Run one batch on a backend's slots and report it through hooks."""

    def __init__(
        self,
        config: BatchConfig,
        hooks: Hooks,
        backend: Backend,
        *,
        clock: Callable[[], float] = time.monotonic,
        grace: float = 10.0,
        policy_names: set[str] | None = None,
        journal: Journal | None = None,
        resume: ResumePlan | None = None,
    ) -> None:
        self.config = config
        self.hooks = hooks
        self.backend = backend
        #: Writes each event to the journal, then fires its hooks.
        self.recorder = EventRecorder(hooks, journal)
        #: What an earlier session of this run already did, when resuming.
        self.resume = resume
        self.clock = clock
        #: Seconds running attempts get to finish after a first stop signal.
        self.grace = grace
        #: Names of the registered retry policies; a task naming another is invalid.
        self.policy_names = policy_names

        self.tasks: Iterator[Task] = iter(())
        self.source_exhausted = False
        self.ready: deque[_TaskRecord] = deque()
        self.delayed: list[tuple[float, int, _TaskRecord]] = []
        self.in_flight: dict[int, _InFlight] = {}
        self.kill_deadlines: list[tuple[float, int]] = []
        self.slots = [_SlotState() for _ in range(backend.size)]
        self.attempt_ids = itertools.count(1)
        self.sequence = itertools.count()

        self.states = dict.fromkeys(TASK_STATES, 0)
        #: Tasks that ended in an earlier session of a resumed run, by state.
        self.states_before = dict.fromkeys(TASK_STATES, 0)
        self.unsuccessful: list[str] = []
        self.attempts_started = 0
        self.running = 0
        self.peak_running = 0
        self.mean_duration: float | None = None
        self.lost_slots = 0

        self.stop_reason: str | None = None
        #: When running attempts get the cancel signal, then the kill, during a stop.
        self.stop_cancel_at: float | None = None
        self.stop_kill_at: float | None = None
        self.pending_signals: list[int] = []
        self.fatal_error: BaseException | None = None

    # -- the run ------------------------------------------------------------------------

    def run(self) -> RunSummary:
        """Run every task to a terminal state and return the run summary."""
        started = self.clock()
        self.tasks = self.config.iter_tasks()
        previous_handlers = self._install_signal_handlers()
        try:
            self.backend.start()
            self.recorder.run_started(self._run_info())
            self._loop()
        finally:
            self._restore_signal_handlers(previous_handlers)
            self.backend.close(grace=2.0)
            self.recorder.flush()

        if any(self.states_before.values()):
            log.info(
                "run-resumed tasks finished in earlier sessions: %s",
                ", ".join(f"{count} {state}" for state, count in self.states_before.items() if count),
            )
        summary = RunSummary(
            name=self.config.run.name,
            states={state: self.states[state] + self.states_before[state] for state in TASK_STATES},
            attempts=self.attempts_started,
            peak_running=self.peak_running,
            max_concurrent=self.backend.size,
            wall_seconds=self.clock() - started,
            plugin_errors=self.hooks.errors,
            stop_reason=self.stop_reason,
            unsuccessful=tuple(self.unsuccessful),
        )
        finished = self.stop_reason is None and self.fatal_error is None
        self.recorder.run_ended(summary, "finished" if finished else "stopped")
        if self.fatal_error is not None:
            raise self.fatal_error
        return summary

    def _run_info(self) -> RunInfo:
        return RunInfo(
            name=self.config.run.name,
            config_path=str(self.config.path) if self.config.path else None,
            max_concurrent=self.config.run.max_concurrent,
            workers=self.backend.size,
            plugins=tuple(name for name, _ in self.hooks.manager.list_name_plugin()),
        )

    def _loop(self) -> None:
        deadline = self._run_deadline()
        while True:
            self._handle_signals()
            now = self.clock()
            if deadline is not None and now >= deadline and self.stop_reason is None:
                self.begin_stop("deadline", cancel_after=0.0)
            self._promote_due_retries(now)
            self._enforce_kill_deadlines(now)
            if self.lost_slots:
                self._restart_slots()
            if self.stop_reason is None:
                self.submit_ready_attempts()
            else:
                self._advance_stop(now)

            if self._is_finished():
                return

            for report in self._wait_for_reports(deadline):
                self._handle_report(report)

    def _wait_for_reports(self, deadline: float | None) -> list[SlotEvents]:
        """Wait for worker events, flushing queued events first unless more are already waiting."""
        if self.recorder.has_pending():
            reports = self.backend.wait(0)
            if reports and not self.recorder.is_flush_due():
                return reports
            self.recorder.flush()
            if reports:
                return reports
        return self.backend.wait(self._next_wakeup(deadline))

    def _is_finished(self) -> bool:
        if self.stop_reason is not None:
            self._cancel_unstarted_tasks()
            return not self.in_flight
        if self.in_flight or self.ready or self.delayed:
            return False
        return self.source_exhausted

    def _next_wakeup(self, deadline: float | None) -> float | None:
        candidates = []
        if self.delayed:
            candidates.append(self.delayed[0][0])
        if self.kill_deadlines:
            candidates.append(self.kill_deadlines[0][0])
        if deadline is not None and self.stop_reason is None:
            candidates.append(deadline)
        if self.stop_cancel_at is not None:
            candidates.append(self.stop_cancel_at)
        if self.stop_kill_at is not None:
            candidates.append(self.stop_kill_at)
        if self.lost_slots:
            candidates.append(self.clock() + 0.05)
        if not candidates:
            return None
        return max(0.0, min(candidates) - self.clock())

    def _run_deadline(self) -> float | None:
        seconds = self.config.run.deadline
        return None if seconds is None else self.clock() + seconds

    # -- submitting ---------------------------------------------------------------------

    def submit_ready_attempts(self) -> None:
        """Fill every live slot's queue, one level at a time so work spreads evenly."""
        depth = self._prefetch_depth()
        batches: dict[int, list[worker.Submission]] = {}
        for level in range(1, depth + 1):
            for index, slot in enumerate(self.slots):
                if len(slot.queued) >= level or not self.backend.is_ready(index):
                    continue
                record = self._next_ready_record()
                if record is None:
                    self._send_batches(batches)
                    return
                if level > 1 and len(record.arguments) > MAX_QUEUED_ARGUMENT_BYTES:
                    # A busy worker reads its pipe only between attempts, so
                    # big arguments queued behind a running attempt could fill
                    # the pipe and block this thread. They wait for an idle worker.
                    self.ready.appendleft(record)
                    self._send_batches(batches)
                    return
                batches.setdefault(index, []).append(self._new_submission(record, index))
        self._send_batches(batches)

    def _prefetch_depth(self) -> int:
        if self.mean_duration is None:
            return 2
        extra = int(PREFETCH_SECONDS / max(self.mean_duration, 1e-6))
        return 1 + min(extra, MAX_PREFETCH)

    def _next_ready_record(self) -> _TaskRecord | None:
        while True:
            if self.ready:
                return self.ready.popleft()
            if self.source_exhausted:
                return None
            record = self._pull_task()
            if record is not None:
                return record

    def _pull_task(self) -> _TaskRecord | None:
        """Take the next task from the source; return it when it is ready to run now."""
        try:
            task = next(self.tasks)
        except StopIteration:
            self.source_exhausted = True
            return None
        except Exception as error:  # noqa: BLE001 - a source is user code and may raise anything
            # Stop taking tasks, let the started ones finish, and report the
            # error at the end: finished work is kept.
            if not isinstance(error, ConfigError):
                error = ConfigError(f"a task source raised {type(error).__name__}: {error}")
            self._reject_source(error)
            return None
        if self.policy_names is not None and task.retry.policy not in self.policy_names:
            self._reject_source(ConfigError(f"task {task.id!r}: unknown retry policy {task.retry.policy!r}"))
            return None

        try:
            arguments = pickle.dumps((tuple(task.args), dict(task.kwargs)), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as error:  # noqa: BLE001 - pickling user objects can raise almost anything
            self._fail_unpicklable_arguments(task, error)
            return None
        record = _TaskRecord(task, arguments)
        if self.resume is None or not self.resume.is_known(task.id):
            return record
        return self._admit_resumed(record)

    def _fail_unpicklable_arguments(self, task: Task, error: Exception) -> None:
        """Fail a task whose arguments cannot be pickled; retrying cannot help, so it gets no attempt."""
        message = f"the arguments of task {task.id!r} cannot be pickled: {type(error).__name__}: {error}"
        log.error("arguments-unpicklable task=%s: %s", task.id, message)
        record = _TaskRecord(task, b"")
        record.last_error = ErrorInfo("payload", "PicklingError", message, "", ("PicklingError",))
        self.finish_task(record, "failed")

    def _admit_resumed(self, record: _TaskRecord) -> _TaskRecord | None:
        task = record.task
        admission = self.resume.admit(task.id, definition_hash(task))
        if admission.action == "changed":
            self._reject_source(ConfigError(changed_task_message(task.id)))
            return None
        if admission.action == "skip":
            self.states_before[admission.state] += 1
            if admission.state != "succeeded":
                self.unsuccessful.append(task.id)
            return None
        if admission.reset:
            self.recorder.task_reset(task, admission.reason)
        elif admission.reopen:
            self.recorder.task_reopened(task)
        record.attempts = admission.attempts
        record.failures = admission.failures
        if record.attempts >= task.retry.max_attempts:
            # A definition with a lower max_attempts counts as changed, so
            # this guards the journal's own consistency rather than a user path.
            message = f"task {task.id!r} already made {record.attempts} attempts, and max_attempts is now {task.retry.max_attempts}"
            record.last_error = ErrorInfo("exception", "AttemptsExhaustedError", message, "", ("AttemptsExhaustedError",))
            self.finish_task(record, "failed")
            return None
        if admission.delay > 0:
            heapq.heappush(self.delayed, (self.clock() + admission.delay, next(self.sequence), record))
            return None
        return record

    def _reject_source(self, error: ConfigError) -> None:
        """Stop taking tasks because the source produced an invalid one; started attempts finish."""
        self.source_exhausted = True
        if self.fatal_error is None:
            self.fatal_error = error
        if self.stop_reason is None:
            self.begin_stop("invalid task source", cancel_after=None)

    def _new_submission(self, record: _TaskRecord, slot: int) -> worker.Submission:
        attempt_id = next(self.attempt_ids)
        number = record.attempts + 1
        self.in_flight[attempt_id] = _InFlight(record, slot, number)
        self.slots[slot].queued.append(attempt_id)
        task = record.task
        return (attempt_id, task.id, number, task.retry.max_attempts, task.call, record.arguments, task.timeout)

    def _send_batches(self, batches: dict[int, list[worker.Submission]]) -> None:
        # Submissions hold only plain values and bytes, so a batch always pickles.
        for slot, batch in batches.items():
            self.backend.submit(slot, batch)

    # -- events from workers ------------------------------------------------------------

    def _handle_report(self, report: SlotEvents) -> None:
        for event in report.events:
            kind = event[0]
            if kind == worker.BEGAN:
                self._on_began(report.slot, event)
            elif kind == worker.ENDED:
                self._on_ended(report.slot, event)
            elif kind == worker.SKIPPED:
                self._on_skipped(report.slot, event[1])
        if report.lost is not None:
            self._on_slot_lost(report.slot, report.lost)
        elif report.events:
            self.slots[report.slot].failed_starts = 0

    def _on_began(self, slot_index: int, event: tuple) -> None:
        _, attempt_id, started_at, started_wall = event
        flight = self.in_flight.get(attempt_id)
        if flight is None:
            log.warning("event-dropped event=began attempt_id=%d: the attempt is no longer in flight", attempt_id)
            return
        record = flight.record
        record.attempts = flight.number
        self.attempts_started += 1
        slot = self.slots[slot_index]
        slot.running = attempt_id
        self.running += 1
        if self.running > self.peak_running:
            self.peak_running = self.running

        pid = self.backend.pid(slot_index) or 0
        flight.attempt = Attempt(record.task.id, flight.number, record.task.retry.max_attempts, pid, started_at, started_wall)
        timeout = record.task.timeout
        if timeout is not None:
            kill_at = started_at + timeout + self.config.run.timeout_grace
            heapq.heappush(self.kill_deadlines, (kill_at, attempt_id))
        self.recorder.attempt_started(record.task, flight.attempt, attempt_id, slot_index)

    def _on_ended(self, slot_index: int, event: tuple) -> None:
        _, attempt_id, ended_at, succeeded, payload = event
        flight = self._end_attempt(slot_index, attempt_id, "ended")
        if flight is None or flight.attempt is None:
            return
        record = flight.record
        duration = max(0.0, ended_at - flight.attempt.started_at)
        record.last_duration = duration
        self._note_duration(duration)

        if succeeded:
            try:
                result = pickle.loads(payload)
            except Exception as error:  # noqa: BLE001 - unpickling runs arbitrary reducers
                message = f"the result of task {record.task.id!r} cannot be unpickled: {type(error).__name__}: {error}"
                self.fail_attempt(flight, attempt_id, ErrorInfo("payload", "UnpicklingError", message, "", ("UnpicklingError",)), ended_at)
                return
            self.recorder.attempt_succeeded(record.task, flight.attempt, attempt_id, slot_index, ended_at)
            self.finish_task(record, "succeeded", result=result)
            return

        kind, type_name, message, formatted, type_names = payload
        self.fail_attempt(flight, attempt_id, ErrorInfo(kind, type_name, message, formatted, type_names), ended_at)

    def _on_skipped(self, slot_index: int, attempt_id: int) -> None:
        flight = self._end_attempt(slot_index, attempt_id, "skipped")
        if flight is not None:
            self._return_unstarted(flight.record)

    def _end_attempt(self, slot_index: int, attempt_id: int, event_name: str) -> _InFlight | None:
        flight = self.in_flight.pop(attempt_id, None)
        if flight is None:
            log.warning("event-dropped event=%s attempt_id=%d: the attempt is no longer in flight", event_name, attempt_id)
            return None
        slot = self.slots[slot_index]
        if slot.queued and slot.queued[0] == attempt_id:
            slot.queued.popleft()
        else:
            slot.queued.remove(attempt_id)
        if slot.running == attempt_id:
            slot.running = None
            self.running -= 1
        return flight

    def _note_duration(self, duration: float) -> None:
        if self.mean_duration is None:
            self.mean_duration = duration
        else:
            self.mean_duration += 0.1 * (duration - self.mean_duration)

    def _return_unstarted(self, record: _TaskRecord) -> None:
        # The attempt never ran, so it is not charged; the task runs next.
        self.ready.appendleft(record)

    # -- lost workers and kills ---------------------------------------------------------

    def _on_slot_lost(self, slot_index: int, how: str) -> None:
        slot = self.slots[slot_index]
        self.lost_slots += 1
        if slot.running is None and not slot.queued and slot.kill_kind is None:
            log.debug("worker-exited slot=%d: %s", slot_index, how)
        else:
            log.warning("worker-crashed slot=%d: %s", slot_index, how)
        if self.backend.pid(slot_index) is None:
            slot.failed_starts += 1
            if slot.failed_starts >= MAX_FAILED_WORKER_STARTS:
                self._give_up(PoolBrokenError(f"worker processes keep dying before they start: {how}"))

        running_id = slot.running
        for attempt_id in list(slot.queued):
            flight = self._end_attempt(slot_index, attempt_id, "lost")
            if flight is None:
                continue
            if attempt_id != running_id or flight.attempt is None:
                self._return_unstarted(flight.record)
                continue
            self.fail_attempt(flight, attempt_id, self._lost_attempt_error(slot, attempt_id, flight, how), self.clock())
        slot.kill_kind = None
        slot.kill_reason = ""
        slot.kill_attempt = None

    def _lost_attempt_error(self, slot: _SlotState, attempt_id: int, flight: _InFlight, how: str) -> ErrorInfo:
        task_id = flight.record.task.id
        where = f"task {task_id!r} (attempt {flight.number} of {flight.record.task.retry.max_attempts})"
        if slot.kill_attempt is not None and slot.kill_attempt != attempt_id:
            # The worker finished the attempt the kill was meant for and had
            # just started this one: a rare race at the end of a grace period.
            message = f"{how} while running {where}: the kill was meant for the worker's previous attempt, which {slot.kill_reason}"
            return ErrorInfo("crash", "WorkerCrashedError", message, "", CRASH_ERROR)
        if slot.kill_kind == "timeout":
            message = f"{where} {slot.kill_reason}; {how}"
            return ErrorInfo("timeout", "AttemptTimeoutError", message, "", TIMEOUT_ERROR)
        if slot.kill_kind == "cancelled":
            return ErrorInfo("cancelled", "CancelledError", f"{where} was stopped: {slot.kill_reason}", "", ("CancelledError",))
        message = f"{how} while running {where}"
        if how.endswith("SIGKILL"):
            message += "; nothing in batchrun sent that signal, and the kernel's out-of-memory killer is the usual cause, so check memory use or lower [run] max_concurrent"
        return ErrorInfo("crash", "WorkerCrashedError", message, "", CRASH_ERROR)

    def _enforce_kill_deadlines(self, now: float) -> None:
        while self.kill_deadlines and self.kill_deadlines[0][0] <= now:
            _, attempt_id = heapq.heappop(self.kill_deadlines)
            flight = self.in_flight.get(attempt_id)
            if flight is None or self.slots[flight.slot].running != attempt_id:
                continue
            timeout = flight.record.task.timeout
            grace = self.config.run.timeout_grace
            reason = f"ran past its timeout of {timeout:g} s and did not stop within the {grace:g} s grace period"
            self._kill_slot(flight.slot, "timeout", reason)

    def _kill_running(self, kind: str, reason: str) -> None:
        for index, slot in enumerate(self.slots):
            if slot.running is not None:
                self._kill_slot(index, kind, reason)

    def _kill_slot(self, slot_index: int, kind: str, reason: str) -> None:
        slot = self.slots[slot_index]
        slot.kill_kind = kind
        slot.kill_reason = reason
        slot.kill_attempt = slot.running
        self.backend.kill(slot_index, reason)

    def _restart_slots(self) -> None:
        if self.stop_reason is not None and not self.in_flight:
            return
        try:
            restarted = self.backend.restart_reaped_slots()
        except PoolBrokenError as error:
            self._give_up(error)
            return
        self.lost_slots -= len(restarted)
        for index in restarted:
            log.info("worker-replaced slot=%d", index)

    def _give_up(self, error: BaseException) -> None:
        log.critical("pool-broken: %s; stopping the run", error)
        if self.fatal_error is None:
            self.fatal_error = error
        if self.stop_reason is None:
            self.begin_stop("pool broken", cancel_after=None)
            self.stop_now()

    # -- retries and terminal states ----------------------------------------------------

    def fail_attempt(self, flight: _InFlight, attempt_id: int, error: ErrorInfo, ended_at: float) -> None:
        """Record a failed attempt, fire ``on_fail``, then retry the task or finish it."""
        record = flight.record
        attempt = flight.attempt
        record.last_error = error
        if attempt is None:
            self.finish_task(record, "failed")
            return
        attempt = dataclasses.replace(attempt, ended_at=ended_at)
        record.last_duration = attempt.duration or 0.0
        self.recorder.attempt_failed(record.task, attempt, attempt_id, flight.slot, ended_at, error)

        delay = self._retry_delay(record, attempt, error)
        if delay is None:
            self.finish_task(record, _terminal_state(error))
            return
        if self.stop_reason is not None:
            # The task would run again, but the run is stopping: it is unfinished.
            self.finish_task(record, "cancelled", retry_due_wall=time.time() + delay)
            return
        self.recorder.retry_scheduled(record.task, attempt, delay, record.attempts, record.failures)
        if delay <= 0:
            self.ready.append(record)
        else:
            heapq.heappush(self.delayed, (self.clock() + delay, next(self.sequence), record))

    def _retry_delay(self, record: _TaskRecord, attempt: Attempt, error: ErrorInfo) -> float | None:
        """Return the delay before the next attempt, or ``None`` when the task must stop.

        Crashes and timeouts count against ``max_attempts`` like any failure,
        so a task that keeps killing its worker stops.
        """
        settings = record.task.retry
        kind = error.kind
        record.failures[kind] = record.failures.get(kind, 0) + 1
        if kind == "cancelled" or error.type_name == worker.ARGUMENTS_ERROR:
            # Arguments that a worker cannot unpickle will not unpickle next time either.
            return None
        if attempt.number >= settings.max_attempts:
            return None
        limit = settings.failure_limit(kind)
        if limit is not None and record.failures[kind] >= limit:
            return None
        if kind == "exception" and settings.retry_on is not None and not error.matches(settings.retry_on):
            return None
        return self.hooks.retry_delay(record.task, attempt, error)

    def _promote_due_retries(self, now: float) -> None:
        while self.delayed and self.delayed[0][0] <= now:
            _, _, record = heapq.heappop(self.delayed)
            self.ready.append(record)

    def finish_task(self, record: _TaskRecord, state: str, *, result: Any = None, retry_due_wall: float | None = None) -> None:
        """Put a task in its terminal state and fire ``on_terminal``; called once per task.

        :param retry_due_wall: for a task cancelled while a retry was pending,
            the wall time that retry was due, which a resumed run keeps.
        """
        self.states[state] += 1
        if state != "succeeded":
            self.unsuccessful.append(record.task.id)
        error = None if state == "succeeded" else record.last_error
        outcome = Outcome(record.task.id, state, record.attempts, result, error, record.last_duration)
        self.recorder.task_finished(record.task, outcome, record.failures, retry_due_wall)

    # -- stopping -----------------------------------------------------------------------

    def begin_stop(self, reason: str, *, cancel_after: float | None) -> None:
        """Start nothing new, and stop running attempts after ``cancel_after`` seconds.

        Stopping an attempt is soft first: the worker raises
        AttemptCancelledError inside the task so its ``finally`` blocks run.
        An attempt still running ``timeout_grace`` seconds later is killed
        with its worker. With ``cancel_after=None`` running attempts finish.
        """
        self.stop_reason = reason
        self.backend.stop_starting()
        log.warning("run-stopping reason=%s running=%d", reason, self.running)
        if cancel_after is not None:
            self.stop_cancel_at = self.clock() + cancel_after

    def stop_now(self) -> None:
        """Kill every running attempt at once."""
        self.stop_cancel_at = None
        self.stop_kill_at = self.clock()

    def _advance_stop(self, now: float) -> None:
        if self.stop_cancel_at is not None and now >= self.stop_cancel_at:
            self.stop_cancel_at = None
            self.stop_kill_at = now + self.config.run.timeout_grace
            for index, slot in enumerate(self.slots):
                if slot.running is not None:
                    slot.kill_kind = "cancelled"
                    slot.kill_reason = "the run is stopping"
                    self.backend.cancel(index)
        if self.stop_kill_at is not None and now >= self.stop_kill_at:
            self.stop_kill_at = None
            self._kill_running("cancelled", "the run is stopping and the attempt did not end in time")

    def _cancel_unstarted_tasks(self) -> None:
        cancelled = ErrorInfo("cancelled", "CancelledError", f"the run stopped ({self.stop_reason}) before the task finished", "", ("CancelledError",))
        while self.ready or self.delayed:
            retry_due_wall = None
            if self.ready:
                record = self.ready.popleft()
            else:
                due, _, record = heapq.heappop(self.delayed)
                # A resumed run waits out the rest of the delay.
                retry_due_wall = time.time() + max(0.0, due - self.clock())
            record.last_error = cancelled
            self.finish_task(record, "cancelled", retry_due_wall=retry_due_wall)
        # Tasks the source has not produced yet end as cancelled too, so every
        # task of the batch is accounted for. A source that produced an
        # invalid table has already been marked exhausted. A source may be
        # endless, so reading it stops after a bound; a resumed run reads on.
        drained = 0
        started = self.clock()
        while not self.source_exhausted:
            if drained >= MAX_CANCELLED_UNREAD or self.clock() - started > MAX_CANCEL_SECONDS or self.pending_signals:
                log.warning(
                    "source-not-read after cancelling %d tasks it had not produced yet, the run stops reading its task"
                    " sources; tasks they still hold were not read and are not counted (resume the run to read them)",
                    drained,
                )
                self.source_exhausted = True
                break
            record = self._next_ready_record()
            if record is None:
                break
            record.last_error = cancelled
            self.finish_task(record, "cancelled")
            drained += 1

    def _install_signal_handlers(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[signum] = signal.signal(signum, self._on_signal)
            except ValueError:
                # Not the main thread: the caller keeps its own signal handling.
                return previous
        return previous

    def _restore_signal_handlers(self, previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.pending_signals.append(signum)
        self.backend.wake()

    def _handle_signals(self) -> None:
        while self.pending_signals:
            signum = self.pending_signals.pop(0)
            name = signal.Signals(signum).name
            if self.stop_reason is None:
                log.warning(
                    "signal-received signal=%s: starting nothing new; running attempts get %.1f s to finish."
                    " Send it again to stop them at once",
                    name,
                    self.grace,
                )
                self.begin_stop(name, cancel_after=self.grace)
            else:
                log.warning("signal-received signal=%s: stopping running attempts now", name)
                if self.stop_reason not in ("SIGINT", "SIGTERM"):
                    self.stop_reason = name
                self.stop_now()


def _terminal_state(error: ErrorInfo) -> str:
    if error.kind == "timeout":
        return "timed-out"
    if error.kind == "cancelled":
        return "cancelled"
    return "failed"


def changed_task_message(task_id: str) -> str:
    """Return the error for a resumed task whose definition no longer matches the journal."""
    return (
        f"task {task_id!r} changed since the journal recorded it (its call, arguments, timeout or retry settings"
        " differ); restore its definition, or resume with --rerun-changed to run it again from its first attempt"
    )
