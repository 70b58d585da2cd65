"""Workloads for tests that record ground truth from inside the worker.

Each attempt writes one JSON line with its task id, attempt number, pid and
the worker's own monotonic start and end times, so a test can check the laws
from what workers did rather than from the supervisor's bookkeeping. Lines
are appended with one ``os.write`` on a file opened with ``O_APPEND``, which
keeps concurrent writers' lines whole.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import batchrun


def _append(path: str, record: dict) -> None:
    line = (json.dumps(record) + "\n").encode()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(descriptor, line)
    finally:
        os.close(descriptor)


def _context() -> tuple[str, int]:
    attempt = batchrun.current_attempt()
    if attempt is None:
        raise RuntimeError("probe tasks run only inside a batchrun worker")
    return attempt.task_id, attempt.number


def record(log: str, sleep: float = 0.0, fail_attempts: int = 0, error: str = "ConnectionError", value: object = None) -> dict:
    """Sleep, record the attempt, and fail the first ``fail_attempts`` attempts with ``error``."""
    task_id, number = _context()
    started = time.monotonic()
    time.sleep(sleep)
    ended = time.monotonic()
    failed = number <= fail_attempts
    _append(log, {"task": task_id, "attempt": number, "pid": os.getpid(), "start": started, "end": ended, "failed": failed})
    if failed:
        raise {"ConnectionError": ConnectionError, "ValueError": ValueError, "TimeoutError": TimeoutError}[error](
            f"probe failure of {task_id} attempt {number}"
        )
    return {"task": task_id, "attempt": number, "value": value}


async def record_async(log: str, sleep: float = 0.0, fail_attempts: int = 0) -> dict:
    """Do what :func:`record` does, awaiting ``asyncio.sleep``."""
    task_id, number = _context()
    started = time.monotonic()
    await asyncio.sleep(sleep)
    ended = time.monotonic()
    failed = number <= fail_attempts
    _append(log, {"task": task_id, "attempt": number, "pid": os.getpid(), "start": started, "end": ended, "failed": failed})
    if failed:
        raise ConnectionError(f"probe failure of {task_id} attempt {number}")
    return {"task": task_id, "attempt": number}


def read_records(path) -> list[dict]:
    """Return every record a probe wrote to ``path``."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


def peak_overlap(records: list[dict]) -> int:
    """Return the highest number of recorded attempts that ran at the same moment."""
    edges = []
    for item in records:
        edges.append((item["start"], 1))
        edges.append((item["end"], -1))
    # Ends sort before starts at the same instant: touching intervals do not overlap.
    edges.sort(key=lambda edge: (edge[0], edge[1]))
    running = peak = 0
    for _, change in edges:
        running += change
        peak = max(peak, running)
    return peak
