"""Replay a run's journal and check the three laws.

The checks, over the events in the order the supervisor handled them:

1. **Ceiling.** Within each supervisor session, never more attempts open than
   that session's ``max_concurrent``. The workers' own start and end times are
   checked too: the intervals of ended attempts never overlap more than the
   ceiling.
2. **One live attempt per task.** A task never starts an attempt while another
   of its attempts is open, and never finishes while one is.
3. **Everything ends.** Once the run has ended, every attempt that started is
   closed: ended, or interrupted when a resumed run took over. Every task has
   exactly one ``task-finished`` event since a resumed run last reset or
   reopened it.

A run whose supervisor died, and that was not resumed yet, is reported as
unfinished rather than as a violation of the third law.
"""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from batchrun.journal import RunRecord


@dataclass(slots=True)
class Violation:
    """One broken law, with the events that show it."""

    #: "ceiling", "one-live-attempt" or "everything-ends".
    law: str
    #: Description of the broken rule, in one sentence.
    message: str
    #: The journal events involved, as dicts.
    events: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class Verdict:
    """The result of verifying one run."""

    run: RunRecord
    violations: list[Violation]
    #: Number of events replayed.
    events: int
    #: Number of attempts that started.
    attempts: int
    #: Highest number of attempts open at once in any session.
    peak_open: int
    #: Whether the run ended (``finished`` or ``stopped``) rather than being cut short.
    ended: bool

    @property
    def ok(self) -> bool:
        return not self.violations


def verify_run(connection: sqlite3.Connection, run: RunRecord) -> Verdict:
    """Replay the events of ``run`` and return every violation of the three laws."""
    ceilings = {row[0]: row[1] for row in connection.execute("SELECT session_id, max_concurrent FROM sessions WHERE run_id = ?", (run.run_id,))}
    violations: list[Violation] = []
    open_attempts: dict[tuple[int, int], dict[str, Any]] = {}
    open_by_task: dict[str, tuple[int, int]] = {}
    open_per_session: dict[int, int] = defaultdict(int)
    intervals: dict[int, list[tuple[float, float, dict[str, Any], dict[str, Any]]]] = defaultdict(list)
    finished_count: dict[str, int] = defaultdict(int)
    finished_event: dict[str, dict[str, Any]] = {}
    peak_open = 0
    attempts = 0
    count = 0

    rows = connection.execute(
        "SELECT seq, session_id, event, task_id, attempt, attempt_id, slot, pid, mono, wall, data FROM events WHERE run_id = ? ORDER BY seq",
        (run.run_id,),
    )
    for row in rows:
        count += 1
        event = _event_dict(row)
        kind = event["event"]
        session = event["session_id"]
        task_id = event["task"]

        if kind == "attempt-started":
            attempts += 1
            key = (session, event["attempt_id"])
            other = open_by_task.get(task_id)
            if other is not None:
                violations.append(Violation("one-live-attempt", f"task {task_id!r} started attempt {event['attempt']} while attempt {open_attempts[other]['attempt']} was still open", [open_attempts[other], event]))
            open_attempts[key] = event
            open_by_task[task_id] = key
            open_per_session[session] += 1
            peak_open = max(peak_open, open_per_session[session])
            ceiling = ceilings.get(session, run.max_concurrent)
            if open_per_session[session] > ceiling:
                involved = [item for (item_session, _), item in open_attempts.items() if item_session == session]
                violations.append(Violation("ceiling", f"{open_per_session[session]} attempts open at once, above the ceiling of {ceiling}", involved))

        elif kind in ("attempt-ended", "attempt-interrupted"):
            key = (session, event["attempt_id"])
            if kind == "attempt-interrupted":
                key = _find_interrupted(open_attempts, event)
            started = open_attempts.pop(key, None) if key is not None else None
            if started is None:
                violations.append(Violation("everything-ends", f"task {task_id!r} attempt {event['attempt']} ended without having started", [event]))
                continue
            open_per_session[key[0]] -= 1
            if open_by_task.get(task_id) == key:
                del open_by_task[task_id]
            if kind == "attempt-ended" and started["mono"] is not None and event["mono"] is not None:
                intervals[session].append((started["mono"], event["mono"], started, event))

        elif kind in ("task-reset", "task-reopened"):
            finished_count[task_id] = 0

        elif kind == "task-finished":
            finished_count[task_id] += 1
            if finished_count[task_id] > 1:
                violations.append(Violation("everything-ends", f"task {task_id!r} reached a terminal state twice", [finished_event[task_id], event]))
            finished_event[task_id] = event
            if task_id in open_by_task:
                violations.append(Violation("one-live-attempt", f"task {task_id!r} finished while its attempt {open_attempts[open_by_task[task_id]]['attempt']} was still open", [open_attempts[open_by_task[task_id]], event]))

    for session, spans in intervals.items():
        violations.extend(_overlap_violations(spans, ceilings.get(session, run.max_concurrent)))

    ended = run.status in ("finished", "stopped")
    if ended:
        for event in open_attempts.values():
            violations.append(Violation("everything-ends", f"task {event['task']!r} attempt {event['attempt']} never closed", [event]))
        for (task_id,) in connection.execute("SELECT task_id FROM tasks WHERE run_id = ? AND state IS NULL", (run.run_id,)):
            violations.append(Violation("everything-ends", f"task {task_id!r} has no terminal state although the run ended"))
    for task_id, state in connection.execute("SELECT task_id, state FROM tasks WHERE run_id = ? AND state IS NOT NULL", (run.run_id,)):
        if finished_count.get(task_id, 0) == 0:
            violations.append(Violation("everything-ends", f"task {task_id!r} is {state} in the tasks table, but no task-finished event records it"))

    return Verdict(run, violations, count, attempts, peak_open, ended)


def _find_interrupted(open_attempts: dict[tuple[int, int], dict[str, Any]], event: dict[str, Any]) -> tuple[int, int] | None:
    # A resumed session closes attempts that an earlier session opened; the
    # event's data names the session the attempt ran in.
    started_in = (event["data"] or {}).get("session_id")
    key = (started_in, event["attempt_id"])
    return key if key in open_attempts else None


def _overlap_violations(spans: list[tuple[float, float, dict[str, Any], dict[str, Any]]], ceiling: int) -> list[Violation]:
    edges = []
    for index, (start, end, _, _) in enumerate(spans):
        edges.append((start, 1, index))
        edges.append((end, -1, index))
    # An end sorts before a start at the same instant: touching intervals do not overlap.
    edges.sort(key=lambda edge: (edge[0], edge[1]))
    running: set[int] = set()
    for _, change, index in edges:
        if change < 0:
            running.discard(index)
            continue
        running.add(index)
        if len(running) > ceiling:
            involved = [spans[item][2] for item in sorted(running)]
            return [Violation("ceiling", f"workers report {len(running)} attempts running at once, above the ceiling of {ceiling}", involved)]
    return []


def _event_dict(row: sqlite3.Row | tuple) -> dict[str, Any]:
    seq, session_id, event, task_id, attempt, attempt_id, slot, pid, mono, wall, data = tuple(row)
    return {
        "seq": seq,
        "session_id": session_id,
        "event": event,
        "task": task_id,
        "attempt": attempt,
        "attempt_id": attempt_id,
        "slot": slot,
        "pid": pid,
        "mono": mono,
        "wall": wall,
        "data": json.loads(data) if data else None,
    }


def format_event(event: dict[str, Any]) -> str:
    """Render one event on one line for a violation report."""
    parts = [f"#{event['seq']}", event["event"]]
    for key in ("task", "attempt", "slot", "pid"):
        if event.get(key) is not None:
            parts.append(f"{key}={event[key]}")
    if event.get("mono") is not None:
        parts.append(f"at={event['mono']:.6f}")
    return " ".join(str(part) for part in parts)
