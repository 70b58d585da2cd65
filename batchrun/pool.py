"""Worker processes behind a small backend interface; the only module that imports loky.

The supervisor drives a fixed number of *slots*. Each slot holds at most one
worker process, and each worker runs at most one attempt at a time, so the
number of slots is a hard ceiling on attempts running at once. A backend moves
batches of submissions into slots and brings back the workers' event lists;
it never decides anything about tasks.

:class:`LokyBackend` gives every slot its own single-worker loky executor.
loky starts the process and watches it, so a worker death breaks only that
slot's executor, and the other slots keep running. The attempts themselves
travel through one pipe per slot rather than through loky futures, because
one loky future per attempt tops out near 9,000 attempts per second, while a
long-lived loop fed through a pipe goes several times faster. A pipe per slot
also shares no lock between workers, so a worker killed mid-write cannot
block the others.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import select
import selectors
import signal
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import loky
import psutil

from batchrun import worker
from batchrun.errors import PoolBrokenError


if TYPE_CHECKING:
    from collections.abc import Sequence


log = logging.getLogger(__name__)


@dataclass(slots=True)
class SlotEvents:
    """Events one slot reported since the last wait."""

    #: Index of the slot.
    slot: int
    #: Event tuples from the worker (see :mod:`batchrun.worker`), in order.
    events: list[tuple] = field(default_factory=list)
    #: Set when the slot's worker has exited: a description of how it ended.
    lost: str | None = None


class Backend(ABC):
    """The interface the supervisor drives; one implementation per process engine."""

    #: Number of slots, which is the ceiling on attempts running at once.
    size: int

    @abstractmethod
    def start(self) -> None:
        """Start a worker in every slot."""

    @abstractmethod
    def submit(self, slot: int, batch: Sequence[worker.Submission]) -> None:
        """Queue a batch of submissions on a slot's worker, in order."""

    @abstractmethod
    def wait(self, timeout: float | None) -> list[SlotEvents]:
        """Wait up to ``timeout`` seconds for events, and return those that arrived."""

    @abstractmethod
    def wake(self) -> None:
        """Make a :meth:`wait` in progress return early; safe from signal handlers and threads."""

    @abstractmethod
    def stop_starting(self) -> None:
        """Tell every worker to start no further attempt; queued ones come back as skipped."""

    @abstractmethod
    def cancel(self, slot: int) -> None:
        """Ask a slot's worker to stop its running attempt softly, raising inside the task."""

    @abstractmethod
    def kill(self, slot: int, reason: str) -> None:
        """Kill a slot's worker and every process it started, logging ``reason``."""

    @abstractmethod
    def is_ready(self, slot: int) -> bool:
        """Return whether the slot has a live worker that accepts submissions."""

    @abstractmethod
    def restart_reaped_slots(self) -> list[int]:
        """Start a new worker in every lost slot whose old process has been reaped; return those slots."""

    @abstractmethod
    def pid(self, slot: int) -> int | None:
        """Return the process id of a slot's worker, once it has reported it."""

    @abstractmethod
    def close(self, grace: float) -> None:
        """Stop every worker: ask them to exit, wait ``grace`` seconds, then kill what is left."""


#: Maximum duration of a single wait for events, in seconds.
MAX_WAIT_SECONDS = 3600.0


class _Slot:
    """One worker process with its executor, pipe and state."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.executor: Any = None
        self.future: Any = None
        self.connection: Connection | None = None
        self.pid: int | None = None
        #: loky's process object of the worker, which records its exit code.
        self.process: Any = None
        #: File descriptor that turns readable when the worker process exits.
        self.sentinel: int | None = None
        #: A poll object on the pipe, to check for more messages without waiting.
        self.poller: Any = None
        #: Why batchrun itself killed the worker, when it did.
        self.kill_note = ""
        #: "starting", "ready", "lost" (waiting to be reaped), "reaped" (loss not
        #: yet reported), "down" (loss reported, ready to restart) or "closed".
        self.state = "closed"
        self.lost_reason = ""


@dataclass(frozen=True, slots=True)
class _Exited:
    """Selector data that marks a worker's exit sentinel, as opposed to its pipe."""

    slot: _Slot


class LokyBackend(Backend):
    """Slots that each own a single-worker loky executor and a pipe."""

    def __init__(self, size: int, *, import_paths: Sequence[str] = (), worker_log_level: int = logging.WARNING) -> None:
        if size < 1:
            raise ValueError(f"a pool needs at least 1 slot, got {size}")
        self.size = size
        self.import_paths = list(import_paths)
        self.worker_log_level = worker_log_level
        self.slots = [_Slot(index) for index in range(size)]
        # Closing the write end stops every worker from starting new attempts
        # at once, because each polls the read end, which turns readable at
        # end-of-file. The supervisor's death closes it too.
        self._stop_reader, self._stop_writer = multiprocessing.Pipe(duplex=False)
        self._wake_reader, self._wake_writer = multiprocessing.Pipe(duplex=False)
        self._wake_fd = self._wake_writer.fileno()
        os.set_blocking(self._wake_fd, False)
        self._lock = threading.Lock()
        # One selector for the whole run: multiprocessing.connection.wait()
        # builds and fills a new one on every call, which costs more than the
        # rest of an attempt's bookkeeping when tasks are tiny.
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_reader, selectors.EVENT_READ, None)

    # -- starting ------------------------------------------------------------------

    def start(self) -> None:
        for slot in self.slots:
            self._start_slot(slot)

    def _start_slot(self, slot: _Slot) -> None:
        parent_end, child_end = multiprocessing.Pipe(duplex=True)
        try:
            executor = loky.ProcessPoolExecutor(
                max_workers=1,
                initializer=worker.initialize,
                initargs=(child_end, self._stop_reader, self.import_paths, self.worker_log_level, os.getpid()),
            )
            future = executor.submit(worker.serve)
        except Exception as error:
            raise PoolBrokenError(f"cannot start a worker process for slot {slot.index}: {error}") from error

        # submit() has spawned the process, which inherited its end of the pipe;
        # closing ours lets the parent see end-of-file when the worker dies.
        child_end.close()
        slot.executor = executor
        slot.future = future
        slot.process = _worker_process(executor)
        slot.kill_note = ""
        slot.connection = parent_end
        # Connection.poll() builds a new selector on every call, which costs
        # more than the message it checks for, so each slot keeps a poll object.
        slot.poller = select.poll()
        slot.poller.register(parent_end.fileno(), select.POLLIN)
        slot.pid = None
        slot.state = "starting"
        self._selector.register(parent_end, selectors.EVENT_READ, slot)

        # End-of-file on the pipe is not enough to notice a worker's death: a
        # process the task forked keeps the worker's end open, and loky's
        # sentinel pipe too. A pidfd turns readable when the worker itself exits.
        slot.sentinel = _open_exit_watch(slot.process)
        if slot.sentinel is not None:
            self._selector.register(slot.sentinel, selectors.EVENT_READ, _Exited(slot))
        future.add_done_callback(lambda _future: self.wake())
        log.debug("worker-starting slot=%d", slot.index)

    # -- attempts ------------------------------------------------------------------

    def submit(self, slot: int, batch: Sequence[worker.Submission]) -> None:
        target = self.slots[slot]
        if target.connection is None or target.state not in ("starting", "ready"):
            raise PoolBrokenError(f"slot {slot} has no live worker")
        try:
            target.connection.send(list(batch))
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
            # The worker died; wait() reports the loss with its exit status.
            log.debug("submit-failed slot=%d", slot)

    def wait(self, timeout: float | None) -> list[SlotEvents]:
        if timeout is not None:
            # epoll takes at most 2**31 - 1 ms; the caller recomputes its
            # timeout after every wake-up, so an hour at a time is enough.
            timeout = min(max(timeout, 0.0), MAX_WAIT_SECONDS)
        reports: list[SlotEvents] = []
        for key, _ in self._selector.select(timeout):
            slot = key.data
            if slot is None:
                self._drain_wakeups()
                reports.extend(self._reaped_reports())
            elif isinstance(slot, _Exited):
                if slot.slot.connection is not None:
                    reports.append(self._drain_exited_slot(slot.slot))
            elif slot.connection is key.fileobj:
                reports.append(self._read_slot(slot, key.fileobj))
        return reports

    def _drain_exited_slot(self, slot: _Slot) -> SlotEvents:
        """Read what an exited worker sent before it died, without waiting for more, then mark it lost."""
        report = SlotEvents(slot.index)
        connection = slot.connection
        os.set_blocking(connection.fileno(), False)
        try:
            while connection.poll(0):
                for event in connection.recv():
                    if event[0] != worker.HELLO:
                        report.events.append(event)
        except (EOFError, OSError):
            pass  # The end of what the worker wrote, or a message it did not finish.
        self._mark_lost(slot)
        return report

    def _read_slot(self, slot: _Slot, connection: Connection) -> SlotEvents:
        report = SlotEvents(slot.index)
        # NOTE: recv() blocks until a whole message has arrived. A worker that
        # dies halfway through a message while a process its task forked keeps
        # the pipe open leaves this call waiting until that process exits.
        try:
            while True:
                events = connection.recv()
                for event in events:
                    if event[0] == worker.HELLO:
                        slot.pid = event[1]
                        slot.state = "ready"
                    else:
                        report.events.append(event)
                if not slot.poller.poll(0):
                    break
        except (EOFError, OSError):
            # The loss is reported by wait() once the process is reaped, so
            # the attempt it ran counts as running until then.
            self._mark_lost(slot)
        return report

    def _mark_lost(self, slot: _Slot) -> None:
        connection = slot.connection
        if connection is not None:
            self._selector.unregister(connection)
            connection.close()
        slot.connection = None
        self._unwatch_exit(slot)
        slot.state = "lost"
        log.debug("worker-lost slot=%d pid=%s", slot.index, slot.pid)

        # loky's executor reaps the process; waiting for that off the
        # supervisor's thread keeps a slow exit from stalling other slots.
        executor = slot.executor
        threading.Thread(target=self._reap, args=(slot, executor), name=f"batchrun-reap-{slot.index}", daemon=True).start()

    def _reap(self, slot: _Slot, executor: Any) -> None:
        # The worker's pipe closed, so it is dead or broken: kill its process
        # group too, which ends any process the task started.
        pid = slot.pid if slot.pid is not None else getattr(slot.process, "pid", None)
        if pid is not None:
            if slot.process is not None and slot.process.exitcode is None and _is_pid_running(pid):
                # Still running with its pipe closed (a task that closed file
                # descriptors, say): the SIGKILL below is batchrun's own.
                slot.kill_note = "its pipe to the supervisor closed while it still ran, so batchrun killed it"
            kill_process_group(pid)
        try:
            executor.shutdown(wait=True, kill_workers=True)
        except Exception:  # noqa: BLE001 - a failed shutdown of a dead executor changes nothing
            log.debug("executor-shutdown-failed slot=%d", slot.index, exc_info=True)

        # Only now is the exit status stored: loky's own thread may have
        # reaped the process before us.
        reason = describe_exit(slot)
        with self._lock:
            if slot.executor is executor and slot.state == "lost":
                slot.lost_reason = reason
                slot.state = "reaped"
        self.wake()

    def _unwatch_exit(self, slot: _Slot) -> None:
        if slot.sentinel is not None:
            try:
                self._selector.unregister(slot.sentinel)
            except (KeyError, ValueError):
                pass
            os.close(slot.sentinel)
            slot.sentinel = None

    def _reaped_reports(self) -> list[SlotEvents]:
        reports = []
        with self._lock:
            for slot in self.slots:
                if slot.state == "reaped":
                    slot.state = "down"
                    reports.append(SlotEvents(slot.index, lost=slot.lost_reason))
        return reports

    def restart_reaped_slots(self) -> list[int]:
        restarted = []
        for slot in self.slots:
            # A slot is "down" once wait() has reported its loss, so the
            # supervisor has settled the old worker's attempts first.
            with self._lock:
                is_down = slot.state == "down"
            if is_down:
                self._start_slot(slot)
                restarted.append(slot.index)
        return restarted

    def is_ready(self, slot: int) -> bool:
        return self.slots[slot].state in ("starting", "ready")

    def pid(self, slot: int) -> int | None:
        return self.slots[slot].pid

    # -- control -------------------------------------------------------------------

    def wake(self) -> None:
        try:
            os.write(self._wake_fd, b"\0")
        except (BlockingIOError, OSError):
            pass  # The pipe is full, so a wake-up is already pending.

    def _drain_wakeups(self) -> None:
        try:
            os.read(self._wake_reader.fileno(), 4096)
        except (BlockingIOError, OSError):
            pass

    def stop_starting(self) -> None:
        if not self._stop_writer.closed:
            self._stop_writer.close()

    def cancel(self, slot: int) -> None:
        pid = self.slots[slot].pid
        if pid is None:
            return
        try:
            os.kill(pid, worker.CANCEL_SIGNAL)
        except ProcessLookupError:
            pass

    def kill(self, slot: int, reason: str) -> None:
        target = self.slots[slot]
        if target.pid is None:
            log.warning("worker-kill slot=%d reason=%s: the worker has not reported its pid yet", slot, reason)
            return
        log.warning("worker-kill slot=%d pid=%d reason=%s", slot, target.pid, reason)
        kill_process_group(target.pid)

    def close(self, grace: float) -> None:
        self.stop_starting()
        for slot in self.slots:
            if slot.connection is not None:
                try:
                    slot.connection.send(None)
                except OSError:
                    pass

        deadline = time.monotonic() + grace
        for slot in self.slots:
            if slot.future is None:
                continue
            remaining = max(0.0, deadline - time.monotonic())
            try:
                slot.future.result(timeout=remaining)
            except Exception:  # noqa: BLE001 - a worker that failed or did not stop is killed below
                if slot.pid is not None and not slot.future.done():
                    log.warning("worker-kill slot=%d pid=%d reason=did not stop within %.1f s", slot.index, slot.pid, grace)
                    kill_process_group(slot.pid)

        for slot in self.slots:
            if slot.executor is not None:
                slot.executor.shutdown(wait=True, kill_workers=True)
            if slot.connection is not None:
                self._selector.unregister(slot.connection)
                slot.connection.close()
                slot.connection = None
            self._unwatch_exit(slot)
            slot.state = "closed"
        self._selector.close()


def kill_process_group(pid: int) -> None:
    """Kill a worker and the processes it started; workers lead their own process group."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_orphaned_workers(attempts: list[tuple[str, int | None]], timeout: float = 5.0) -> None:
    """Kill the workers of a dead supervisor that still run the given ``(task_id, pid)`` attempts.

    A pid counts as such a worker only while it still leads its own process
    group and runs loky's worker entry point, so a pid the system has since
    reused for another program is left alone.
    """
    victims = []
    for task_id, pid in attempts:
        if pid is None:
            continue
        try:
            process = psutil.Process(pid)
            is_worker = os.getpgid(pid) == pid and any("loky" in part for part in process.cmdline())
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
        if is_worker:
            log.warning("worker-orphan-killed pid=%d task=%s: its supervisor died while it ran the attempt", pid, task_id)
            kill_process_group(pid)
            victims.append(process)
    deadline = time.monotonic() + timeout
    while victims and time.monotonic() < deadline:
        victims = [process for process in victims if _is_running(process)]
        if victims:
            time.sleep(0.05)


def _is_pid_running(pid: int) -> bool:
    try:
        return _is_running(psutil.Process(pid))
    except psutil.Error:
        return False


def _is_running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def describe_exit(slot: _Slot) -> str:
    """Describe how a slot's worker ended, with the exit code or signal when loky recorded it."""
    pid = f"pid {slot.pid}" if slot.pid is not None else "a worker that had not reported its pid"
    code = _exit_code(slot)
    if slot.kill_note:
        return f"worker ({pid}) ended: {slot.kill_note}"
    if code is None:
        return f"worker ({pid}) exited"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"worker ({pid}) was killed by {name}"
    return f"worker ({pid}) exited with code {code}"


def _open_exit_watch(process: Any) -> int | None:
    """Return a pidfd of the worker process, which turns readable when it exits; ``None`` where unsupported.

    Without pidfds (Linux before 5.3, macOS) the pipe's end-of-file is the
    only notice, which a process the task forked can delay until it exits.
    """
    pid = getattr(process, "pid", None)
    if pid is None or not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        # Already gone, or pidfds are not allowed here: the pipe still ends.
        return None


def _worker_process(executor: Any) -> Any:
    # loky keeps its worker processes in a private mapping; the process
    # object is the only place that records the signal that killed a worker.
    # submit() has started the single worker, so the mapping contains it now.
    processes = getattr(executor, "_processes", None) or {}
    for process in list(processes.values()):
        return process
    return None


def _exit_code(slot: _Slot) -> int | None:
    process = slot.process
    if process is None:
        return None
    process.join(timeout=1.0)
    return process.exitcode
