"""Code that runs inside worker processes.

A worker is a long-lived loop fed through its own pipe by the supervisor. It
receives batches of attempts, runs them one at a time, and reports each start
and end. The supervisor learns that an attempt runs only from this loop's own
notice, so its count of running attempts is the workers' ground truth.

Messages from the supervisor are lists of :data:`Submission` tuples, or
``None`` to stop. Messages to the supervisor are lists of event tuples; the
first field of each names the event:

- ``(BEGAN, attempt_id, monotonic_time, wall_time)``
- ``(ENDED, attempt_id, monotonic_time, True, result_pickle)``
- ``(ENDED, attempt_id, monotonic_time, False, error_fields)``
- ``(SKIPPED, attempt_id)`` for an attempt not started because the run is stopping
- ``(HELLO, pid)`` once, when the loop starts

The end of one attempt travels in the same message as the start of the next,
so a busy worker sends one message per attempt. This module never imports
plugins: hooks fire only in the supervisor.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil


if TYPE_CHECKING:
    from collections.abc import Callable
    from multiprocessing.connection import Connection


HELLO = "hello"
BEGAN = "began"
ENDED = "ended"
SKIPPED = "skipped"

#: One attempt as the supervisor sends it:
#: (attempt_id, task_id, number, max_attempts, call, arguments, timeout), where
#: ``arguments`` is the pickled ``(args, kwargs)`` pair. Keeping the arguments
#: in their own pickle lets one that fails to unpickle fail only its attempt.
Submission = tuple

#: Error type name of an attempt whose arguments the worker could not unpickle.
ARGUMENTS_ERROR = "ArgumentsUnpicklingError"

#: Seconds between checks that the supervisor is still alive.
PARENT_CHECK_INTERVAL = 0.5


@dataclass(frozen=True, slots=True)
class AttemptContext:
    """The attempt a worker is running, as seen from inside the task."""

    #: Id of the task.
    task_id: str
    #: Attempt number, starting at 1.
    number: int
    #: Total number of attempts the task may make.
    max_attempts: int


_current: AttemptContext | None = None


def current_attempt() -> AttemptContext | None:
    """Return the attempt running in this process, or ``None`` outside a worker."""
    return _current


class AttemptTimeoutError(TimeoutError):
    """Raised inside a task when its attempt runs past its timeout."""


class AttemptCancelledError(BaseException):
    """Raised inside a task when the run stops it; ``finally`` blocks still run.

    It derives from BaseException, like KeyboardInterrupt, so that a task's
    ``except Exception`` does not swallow the stop.
    """


# -- process setup --------------------------------------------------------------

_connection: Connection | None = None
_stop_signal: Connection | None = None


def initialize(connection: Connection, stop_signal: Connection, import_paths: list[str], log_level: int, supervisor_pid: int) -> None:
    """Prepare a fresh worker process; loky calls this once at process start.

    :param connection: this worker's end of its pipe to the supervisor.
    :param stop_signal: a pipe that turns readable when no new attempt may start.
    :param import_paths: folders to put at the front of ``sys.path``.
    :param log_level: level for the worker's own log records, written to stderr.
    :param supervisor_pid: the supervisor's pid; the worker exits once it is no longer its parent.
    """
    global _connection, _stop_signal
    _connection = connection
    _stop_signal = stop_signal

    # A process group of its own lets the supervisor stop the worker together
    # with any child the task started, and keeps a terminal's Ctrl-C away from
    # workers so the supervisor alone decides how the run stops.
    try:
        os.setsid()
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(CANCEL_SIGNAL, _on_cancel_signal)
    # The supervisor's pid comes from the supervisor itself: one killed while
    # this process started would otherwise leave init as the parent to watch.
    if os.getppid() != supervisor_pid:
        os._exit(1)
    _watch_parent(supervisor_pid)

    for path in reversed(import_paths):
        if path not in sys.path:
            sys.path.insert(0, path)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [pid %(process)d] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(log_level)


#: The signal the supervisor sends to stop the running attempt softly.
CANCEL_SIGNAL = signal.SIGUSR1

#: The attempt's cancellation hook while a task runs, or ``None`` between attempts.
_cancel_running: Callable[[], None] | None = None


def _on_cancel_signal(signum: int, frame: object) -> None:
    if _cancel_running is not None:
        _cancel_running()


def _watch_parent(parent_pid: int) -> None:
    """Kill this worker's process group soon after the supervisor dies.

    A task may run for hours without returning to the loop, so the check runs
    in its own thread rather than between attempts.
    """

    def watch() -> None:
        while True:
            time.sleep(PARENT_CHECK_INTERVAL)
            if os.getppid() != parent_pid:
                try:
                    os.killpg(os.getpgid(0), signal.SIGKILL)
                finally:
                    os._exit(1)

    threading.Thread(target=watch, name="batchrun-parent-watch", daemon=True).start()


def serve() -> None:
    """Run attempts from the supervisor's pipe until it sends ``None``; loky runs this as one long call."""
    if _connection is None:
        raise RuntimeError("batchrun.worker.serve() runs only in a worker prepared by initialize()")
    _WorkerLoop(_connection, _stop_signal).run()


# -- the loop --------------------------------------------------------------------


class _WorkerLoop:
    def __init__(self, connection: Connection, stop_signal: Connection | None) -> None:
        self.connection = connection
        self.stop_signal = stop_signal
        self.parent_pid = os.getppid()
        self.pending: deque[Submission] = deque()
        self.outbox: list[tuple] = []
        self.functions: dict[str, Callable[..., Any]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    def run(self) -> None:
        self.connection.send([(HELLO, os.getpid())])
        while True:
            if not self.pending:
                self.flush()
                batch = self.receive()
                if batch is None:
                    return
                self.pending.extend(batch)
                continue

            submission = self.pending.popleft()
            if self.is_stopping():
                self.outbox.append((SKIPPED, submission[0]))
                continue
            self.run_attempt(submission)

    def is_stopping(self) -> bool:
        return self.stop_signal is not None and self.stop_signal.poll()

    def flush(self) -> None:
        if self.outbox:
            self.send(self.outbox)
            self.outbox = []

    def receive(self) -> list[Submission] | None:
        """Wait for the next batch; return ``None`` when the supervisor sends it, and exit when the supervisor has died."""
        while not self.connection.poll(PARENT_CHECK_INTERVAL):
            if os.getppid() != self.parent_pid:
                os._exit(0)
        try:
            return self.connection.recv()
        except (EOFError, ConnectionResetError, BrokenPipeError):
            # The supervisor is gone. Exiting at once spares loky's own loop a
            # failed attempt to report to a dead parent.
            os._exit(0)
        except Exception:  # noqa: BLE001 - a message this worker cannot decode leaves it nothing to run
            logging.getLogger(__name__).exception("worker-receive-failed pid=%d: exiting", os.getpid())
            os._exit(70)

    def send(self, events: list[tuple]) -> None:
        try:
            self.connection.send(events)
        except (BrokenPipeError, ConnectionResetError, EOFError):
            # The supervisor is gone; nothing can report to it any more.
            os._exit(0)

    def run_attempt(self, submission: Submission) -> None:
        global _current
        attempt_id, task_id, number, max_attempts, call, arguments, timeout = submission

        # The start notice goes out before the call, so the supervisor counts
        # the attempt as running and starts its clock from the worker's time.
        started = time.monotonic()
        self.outbox.append((BEGAN, attempt_id, started, time.time()))
        self.flush()

        try:
            args, kwargs = pickle.loads(arguments)
        except Exception as error:  # noqa: BLE001 - unpickling runs arbitrary reducers
            message = f"the arguments of task {task_id!r} cannot be unpickled in the worker: {type(error).__name__}: {error}"
            formatted = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            self.outbox.append((ENDED, attempt_id, time.monotonic(), False, ("payload", ARGUMENTS_ERROR, message, formatted, (ARGUMENTS_ERROR,))))
            return

        _current = AttemptContext(task_id, number, max_attempts)
        stop = _AttemptStop(timeout)
        try:
            function = self.resolve(call)
            with stop:
                result = function(*args, **kwargs)
                if inspect.isawaitable(result):
                    result = self.await_result(result, stop)
        except BaseException as error:  # noqa: BLE001 - every failure of a task is reported, never raised here
            kind = stop.kind(error)
            if kind in ("timeout", "cancelled"):
                # A stopped attempt takes the processes it started down with
                # it, so the next attempt in this worker starts clean.
                kill_descendants()
            self.outbox.append((ENDED, attempt_id, time.monotonic(), False, describe_error(error, kind)))
        else:
            ended = time.monotonic()
            if stop.timed_out:
                # The task caught its timeout and returned late: the attempt
                # still ran past its limit, so it counts as timed out.
                message = f"attempt ran past its timeout of {timeout:g} s; the task caught the timeout and returned late"
                self.outbox.append((ENDED, attempt_id, ended, False, ("timeout", "AttemptTimeoutError", message, "", _type_names(AttemptTimeoutError))))
                return
            try:
                payload = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as error:  # noqa: BLE001 - pickling can raise almost anything
                message = f"the result of type {_type_name(type(result))!r} cannot be pickled: {type(error).__name__}: {error}"
                self.outbox.append((ENDED, attempt_id, ended, False, ("payload", "PicklingError", message, "", ())))
            else:
                self.outbox.append((ENDED, attempt_id, ended, True, payload))
        finally:
            _current = None

    def resolve(self, call: str) -> Callable[..., Any]:
        function = self.functions.get(call)
        if function is None:
            module_name, _, attribute = call.partition(":")
            function = getattr(importlib.import_module(module_name), attribute)
            self.functions[call] = function
        return function

    def await_result(self, awaitable: Any, stop: _AttemptStop) -> Any:
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
        future = asyncio.ensure_future(awaitable, loop=self.loop)
        # Cancellation first, so the task's own cleanup runs before any hard
        # kill: the timer and the stop signal cancel the future instead of
        # raising into the event loop.
        stop.use_loop(self.loop, future)
        try:
            return self.loop.run_until_complete(future)
        except asyncio.CancelledError:
            if stop.timed_out:
                raise AttemptTimeoutError(f"attempt ran past its timeout of {stop.timeout:g} s") from None
            if stop.cancelled:
                raise AttemptCancelledError("the run stopped this attempt") from None
            raise


class _AttemptStop:
    """The soft ways an attempt is stopped: its timeout, and the supervisor's cancel signal.

    For a sync task both raise an exception in the task's thread; for an async
    task both cancel its future. A signal timer interrupts Python code only, so
    a task stuck in C code is stopped by the supervisor's hard kill after the
    grace period.
    """

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.timed_out = False
        self.cancelled = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.future: asyncio.Future | None = None

    def __enter__(self) -> _AttemptStop:
        global _cancel_running
        _cancel_running = self.on_cancel
        if self.timeout is not None:
            signal.signal(signal.SIGALRM, self.on_alarm)
            signal.setitimer(signal.ITIMER_REAL, self.timeout)
        return self

    def __exit__(self, *exc_info: object) -> None:
        global _cancel_running
        if self.timeout is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
        _cancel_running = None

    def use_loop(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
        self.loop = loop
        self.future = future

    def on_alarm(self, signum: int, frame: object) -> None:
        self.timed_out = True
        if self.cancel_future():
            return
        raise AttemptTimeoutError(f"attempt ran past its timeout of {self.timeout:g} s")

    def on_cancel(self) -> None:
        self.cancelled = True
        if self.cancel_future():
            return
        raise AttemptCancelledError("the run stopped this attempt")

    def cancel_future(self) -> bool:
        if self.future is None or self.loop is None:
            return False
        # The thread-safe call also wakes the event loop from its wait.
        self.loop.call_soon_threadsafe(self.future.cancel)
        return True

    def kind(self, error: BaseException) -> str:
        """Return the failure kind of an attempt that ended with ``error``."""
        if self.cancelled or isinstance(error, AttemptCancelledError):
            return "cancelled"
        if self.timed_out or isinstance(error, AttemptTimeoutError):
            return "timeout"
        return "exception"


def kill_descendants() -> None:
    """Kill every process this worker started, and theirs, leaving the worker itself alive."""
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass

    # Reap our own children. A grandchild becomes a zombie of another parent,
    # which psutil.wait_procs would wait on for its whole timeout, so a
    # zombie counts as gone here.
    deadline = time.monotonic() + 2.0
    remaining = list(children)
    while remaining and time.monotonic() < deadline:
        _, remaining = psutil.wait_procs(remaining, timeout=0.05)
        remaining = [child for child in remaining if not _is_zombie(child)]


def _is_zombie(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


# -- payloads --------------------------------------------------------------------


def describe_error(error: BaseException, kind: str) -> tuple[str, str, str, str, tuple[str, ...]]:
    """Turn an exception into plain text fields that need no unpickling."""
    try:
        message = str(error)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the failure
        message = f"<{type(error).__name__} with an unprintable message>"
    formatted = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return (kind, type(error).__name__, message, formatted, _type_names(type(error)))


def _type_names(error_type: type) -> tuple[str, ...]:
    names: list[str] = []
    for klass in error_type.__mro__:
        if klass is object:
            break
        names.append(klass.__name__)
        if klass.__module__ != "builtins":
            names.append(_type_name(klass))
    return tuple(names)


def _type_name(klass: type) -> str:
    if klass.__module__ == "builtins":
        return klass.__qualname__
    return f"{klass.__module__}.{klass.__qualname__}"
