"""A task whose behaviour on each attempt is given in its arguments, with worker-side records.

``run(log, behaviours, seconds)`` looks up its attempt number and does what
``behaviours[number - 1]`` names (the last entry for later attempts), after
``seconds[number - 1]`` seconds:

- ``"ok"``: return a string naming the task and attempt.
- ``"raise"``: raise ValueError.
- ``"crash"``, ``"segfault"``, ``"sigkill"``, ``"abort"``: end the worker with
  ``os._exit(3)``, SIGSEGV, SIGKILL or SIGABRT.
- ``"hang"``: sleep for an hour, so only a timeout or a stop ends it.

Every attempt appends a ``start`` record as it begins and an ``end`` record
as it stops, from a ``finally`` block or right before a crash, so each record
pair is the worker's own view of when the attempt ran. Times are
``time.monotonic()``, which all processes on Linux share.

With ``wait_for_starts=N`` an attempt first waits until ``log`` contains
``N`` start records, so attempts in different workers act at nearly the same
moment however long their workers took to start.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import time
from collections import defaultdict

import batchrun


CRASHES = ("crash", "segfault", "sigkill", "abort")
BEHAVIOURS = ("ok", "raise", "hang", *CRASHES)


def _append(path: str, record: dict) -> None:
    # One os.write on an O_APPEND file keeps lines of concurrent writers whole.
    line = (json.dumps(record) + "\n").encode()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(descriptor, line)
    finally:
        os.close(descriptor)


#: Seconds an attempt waits for ``wait_for_starts`` start records before it raises.
START_WAIT_LIMIT = 30.0


def run(log: str, behaviours: list[str], seconds: list[float] | None = None, wait_for_starts: int = 0) -> str:
    """Behave as ``behaviours`` names for the current attempt and record its start and end in ``log``."""
    attempt = batchrun.current_attempt()
    if attempt is None:
        raise RuntimeError("scripted tasks run only inside a batchrun worker")
    index = min(attempt.number, len(behaviours)) - 1
    behaviour = behaviours[index]
    wait = seconds[index] if seconds else 0.0
    if behaviour not in BEHAVIOURS:
        raise ValueError(f"unknown behaviour {behaviour!r}; expected one of {', '.join(BEHAVIOURS)}")

    base = {"task": attempt.task_id, "attempt": attempt.number, "pid": os.getpid(), "behaviour": behaviour}
    _append(log, {**base, "event": "start", "time": time.monotonic()})
    crashing = False
    try:
        if wait_for_starts:
            _wait_for_starts(log, wait_for_starts)
        if behaviour == "hang":
            time.sleep(3600)
        time.sleep(wait)
        if behaviour == "raise":
            raise ValueError(f"scripted failure of {attempt.task_id} attempt {attempt.number}")
        crashing = behaviour in CRASHES
    finally:
        _append(log, {**base, "event": "end", "time": time.monotonic()})

    if crashing:
        _crash(behaviour)
    return f"{attempt.task_id} attempt {attempt.number}"


def _wait_for_starts(log: str, count: int) -> None:
    deadline = time.monotonic() + START_WAIT_LIMIT
    while sum(1 for entry in _read_lines(log) if entry["event"] == "start") < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{log} did not reach {count} start records within {START_WAIT_LIMIT:g} s")
        time.sleep(0.01)


def _read_lines(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


def _crash(behaviour: str) -> None:
    if behaviour == "crash":
        os._exit(3)
    if behaviour == "segfault":
        ctypes.string_at(0)
    if behaviour == "abort":
        os.abort()
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)


def read_attempts(path) -> dict[tuple[str, int], dict]:
    """Return one entry per recorded attempt, keyed by ``(task, attempt)``.

    Each entry contains ``pid``, ``behaviour``, ``start``, ``end`` and
    ``starts``, the number of start records, which is 1 unless an attempt
    number ran twice. ``end`` is ``None`` when the attempt never wrote its end
    record. The entries also fit :func:`tests.probe.peak_overlap` once every
    ``end`` is set.
    """
    attempts: dict[tuple[str, int], dict] = defaultdict(dict)
    if not os.path.exists(path):
        return {}
    for record in _read_lines(path):
        entry = attempts[(record["task"], record["attempt"])]
        entry.setdefault("end", None)
        entry.update(task=record["task"], attempt=record["attempt"], pid=record["pid"], behaviour=record["behaviour"])
        entry[record["event"]] = record["time"]
        if record["event"] == "start":
            entry["starts"] = entry.get("starts", 0) + 1
    return dict(attempts)
