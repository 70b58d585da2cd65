"""Tasks that misbehave on purpose, run by the fault-injection tests.

Each records its own start through :func:`tests.probe.record`-style JSON lines
where a test needs worker-side ground truth.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

import batchrun


def exit_hard(code: int = 3) -> None:
    """End the worker process at once, skipping cleanup."""
    os._exit(code)


def kill_self(signal_name: str = "SIGKILL") -> None:
    """Kill the worker process with a signal, as the kernel's OOM killer does with SIGKILL."""
    os.kill(os.getpid(), getattr(signal, signal_name))
    time.sleep(10)


def segfault() -> None:
    """Read address 0, which makes the worker die of SIGSEGV."""
    ctypes.string_at(0)


def abort() -> None:
    """Abort the worker process (SIGABRT)."""
    os.abort()


def crash_on_first_attempt(code: int = 3) -> str:
    """Crash the worker on attempt 1 and succeed after that."""
    attempt = batchrun.current_attempt()
    if attempt is not None and attempt.number == 1:
        os._exit(code)
    return "recovered"


def hang(seconds: float = 3600.0, marker: str | None = None) -> None:
    """Sleep for a long time; write ``marker`` from a ``finally`` block when interrupted."""
    try:
        time.sleep(seconds)
    finally:
        if marker:
            with open(marker, "a", encoding="utf-8") as stream:
                stream.write(f"cleanup {os.getpid()}\n")


def hang_ignoring_signals(seconds: float = 3600.0) -> None:
    """Block the signals a soft stop uses, then sleep: only a kill from outside ends it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGUSR1, signal.SIGTERM})
    time.sleep(seconds)


def hang_with_child(pid_file: str, seconds: float = 3600.0) -> None:
    """Start a child process, record its pid, then hang."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    with open(pid_file, "w", encoding="utf-8") as stream:
        stream.write(str(child.pid))
    time.sleep(seconds)


async def hang_async(seconds: float = 3600.0, marker: str | None = None) -> None:
    """Await a long sleep; write ``marker`` when cancelled."""
    import asyncio

    try:
        await asyncio.sleep(seconds)
    finally:
        if marker:
            with open(marker, "a", encoding="utf-8") as stream:
                stream.write(f"cleanup {os.getpid()}\n")


def sleep(seconds: float = 0.1) -> float:
    """Sleep and return the seconds slept."""
    time.sleep(seconds)
    return seconds


def return_lock() -> object:
    """Return a value that cannot be pickled."""
    return threading.Lock()


class NeedsTwoArguments(Exception):
    """An exception whose __init__ needs more arguments than ``args`` keeps, so it cannot be unpickled."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"code {code}: {detail}")
        self.code = code
        self.detail = detail


def raise_unpicklable() -> None:
    raise NeedsTwoArguments(7, "remote refused")


def raise_system_exit(code: int = 4) -> None:
    sys.exit(code)


def raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


def big_result(megabytes: int = 200) -> bytes:
    """Return a large bytes object."""
    return b"x" * (megabytes * 1024 * 1024)


class Unloadable:
    """Pickles fine in the worker but fails to unpickle in the supervisor."""

    def __reduce__(self):
        return (_fail_on_load, ())


def _fail_on_load():
    raise RuntimeError("this object refuses to be unpickled")


def return_unloadable() -> object:
    return Unloadable()


def returns_awaitable(value: int = 5):
    """A plain function that returns a coroutine, as a decorated async function does."""

    async def inner() -> int:
        return value

    return inner()


def fork_then_exit(pid_file: str, seconds: float = 6.0, code: int = 3) -> None:
    """Fork a child that sleeps ``seconds``, record its pid, then end the worker with ``os._exit(code)``.

    The forked child inherits every file descriptor of the worker, its end
    of the supervisor's pipe included, and keeps them open until it exits.
    """
    child = os.fork()
    if child == 0:
        time.sleep(seconds)
        os._exit(0)
    with open(pid_file, "w", encoding="utf-8") as stream:
        stream.write(str(child))
    os._exit(code)
