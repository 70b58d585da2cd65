"""The story log: one line per event, readable by a person at 3 AM.

Lines start with a capitalised verb and the task id::

    STARTING fetch-2 attempt 1/3 (pid 4242)
    FAILED fetch-2 attempt 1/3 after 1003 ms: ConnectionError: refused
    RETRYING fetch-2 in 0.20 s
    SUCCEEDED fetch-2 attempt 2/3 after 998 ms
    GAVE UP fetch-3 after 3 attempts: ConnectionError: refused

A batch of thousands of short tasks would flood a terminal, so in the default
``auto`` mode the STARTING and SUCCEEDED lines are rate-limited: once they
pass :data:`LINES_PER_SECOND` on average, they give way to a PROGRESS line
every :data:`PROGRESS_INTERVAL` seconds. Failure, retry and unsuccessful-task
lines have a limit of their own, :data:`PROBLEM_LINES_PER_SECOND`, so a
thousand failures in a second cannot flood the log either. Tasks cancelled
before they started are counted and named in one line at the end. ``all``
logs every event; ``quiet`` logs only failures and the summary.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Literal

from batchrun.hookspecs import hookimpl


if TYPE_CHECKING:
    from batchrun.models import Attempt, ErrorInfo, Outcome, RunInfo, RunSummary, Task


log = logging.getLogger("batchrun.plugins.story")

StoryMode = Literal["auto", "all", "quiet"]

#: Average rate of STARTING and SUCCEEDED lines that ``auto`` mode allows.
LINES_PER_SECOND = 20.0
#: Number of lines ``auto`` mode may print in a burst above the average rate.
LINE_BURST = 100.0
#: Seconds between PROGRESS lines while event lines are suppressed.
PROGRESS_INTERVAL = 5.0
#: Number of unsuccessful task ids the closing summary names.
UNSUCCESSFUL_LISTED = 20
#: Average rate and burst of FAILED, RETRYING and unsuccessful-task lines outside ``all`` mode.
PROBLEM_LINES_PER_SECOND = 50.0
PROBLEM_LINE_BURST = 500.0


class _TokenBucket:
    """A rate limit: ``rate`` lines a second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.refilled_at = now

    def allow(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.refilled_at) * self.rate)
        self.refilled_at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class StoryLog:
    """A plugin that logs the story of a run through the ``batchrun.plugins.story`` logger."""

    def __init__(self, mode: StoryMode = "auto", clock=time.monotonic) -> None:
        self.mode = mode
        self.clock = clock
        self.routine_lines = _TokenBucket(LINES_PER_SECOND, LINE_BURST, clock())
        self.problem_lines = _TokenBucket(PROBLEM_LINES_PER_SECOND, PROBLEM_LINE_BURST, clock())
        self.suppressed = 0
        self.suppressed_problems = 0
        self.cancelled_unstarted = 0
        self.progress_at = 0.0
        self.started_at = 0.0
        self.attempts = 0
        self.ended_attempts = 0
        self.finished = 0
        self.unsuccessful = 0

    # -- hooks -------------------------------------------------------------------------

    @hookimpl
    def on_run_start(self, run: RunInfo) -> None:
        self.started_at = self.clock()
        self.progress_at = self.started_at + PROGRESS_INTERVAL
        log.info(
            "RUN %s: up to %s at once on %s (plugins: %s)",
            run.name,
            _count(run.max_concurrent, "attempt"),
            _count(run.workers, "worker process", "worker processes"),
            ", ".join(run.plugins) or "none",
        )

    @hookimpl
    def on_start(self, task: Task, attempt: Attempt) -> None:
        self.attempts += 1
        if self._allow_routine_line():
            log.info("STARTING %s attempt %d/%d (pid %d)", task.id, attempt.number, attempt.max_attempts, attempt.pid)

    @hookimpl
    def on_fail(self, task: Task, attempt: Attempt, error: ErrorInfo) -> None:
        self.ended_attempts += 1
        if not self._allow_problem_line():
            return
        log.warning(
            "FAILED %s attempt %d/%d after %s: %s",
            task.id,
            attempt.number,
            attempt.max_attempts,
            _milliseconds(attempt.duration if attempt.duration is not None else time.monotonic() - attempt.started_at),
            _first_line(str(error)),
        )
        if error.traceback and log.isEnabledFor(logging.DEBUG):
            log.debug("traceback of %s attempt %d:\n%s", task.id, attempt.number, error.traceback.rstrip())

    @hookimpl
    def on_retry(self, task: Task, attempt: Attempt, delay: float) -> None:
        if self._allow_problem_line():
            log.info("RETRYING %s in %.2f s", task.id, delay)

    @hookimpl
    def on_terminal(self, task: Task, outcome: Outcome) -> None:
        self.finished += 1
        if outcome.state == "succeeded":
            self.ended_attempts += 1
            if self._allow_routine_line():
                log.info(
                    "SUCCEEDED %s attempt %d/%d after %s",
                    task.id,
                    outcome.attempts,
                    task.max_attempts,
                    _milliseconds(outcome.duration),
                )
            return

        self.unsuccessful += 1
        if outcome.state == "cancelled" and outcome.attempts == 0 and self.mode != "all":
            # A stopped run cancels every task it had not started; the summary counts them.
            self.cancelled_unstarted += 1
            return
        if not self._allow_problem_line():
            return
        reason = _first_line(str(outcome.error)) if outcome.error else "no attempt ran"
        verb = {"failed": "GAVE UP", "timed-out": "TIMED OUT", "cancelled": "CANCELLED"}[outcome.state]
        plural = "" if outcome.attempts == 1 else "s"
        log.error("%s %s after %d attempt%s: %s", verb, task.id, outcome.attempts, plural, reason)

    @hookimpl
    def on_run_end(self, summary: RunSummary) -> None:
        if self.suppressed:
            log.info("(%d routine lines were left out to keep the log readable; use -v to see every event)", self.suppressed)
        if self.suppressed_problems:
            log.warning(
                "(%d failure and retry lines were left out to keep the log readable; 'batchrun status' lists the failures)",
                self.suppressed_problems,
            )
        if self.cancelled_unstarted:
            log.warning("CANCELLED %s before they started", _count(self.cancelled_unstarted, "task"))
        states = ", ".join(f"{count} {state}" for state, count in summary.states.items())
        stopped = f"; stopped early: {summary.stop_reason}" if summary.stop_reason else ""
        plugin_errors = f"; {summary.plugin_errors} plugin hook errors" if summary.plugin_errors else ""
        level = logging.INFO if summary.succeeded and not summary.stop_reason else logging.WARNING
        log.log(
            level,
            "SUMMARY %s: %s (%s); %s; peak %d running of %d allowed; %.2f s wall%s%s",
            summary.name,
            _count(summary.tasks, "task"),
            states,
            _count(summary.attempts, "attempt"),
            summary.peak_running,
            summary.max_concurrent,
            summary.wall_seconds,
            stopped,
            plugin_errors,
        )
        if summary.unsuccessful:
            listed_ids = ", ".join(summary.unsuccessful[:UNSUCCESSFUL_LISTED])
            more = len(summary.unsuccessful) - UNSUCCESSFUL_LISTED
            suffix = f" and {more} more" if more > 0 else ""
            log.log(level, "UNSUCCESSFUL %s%s", listed_ids, suffix)

    # -- rate limiting -----------------------------------------------------------------

    def _allow_problem_line(self) -> bool:
        if self.mode == "all" or self.problem_lines.allow(self.clock()):
            return True
        self.suppressed_problems += 1
        return False

    def _allow_routine_line(self) -> bool:
        if self.mode == "all":
            return True
        if self.mode == "quiet":
            return False

        now = self.clock()
        if self.routine_lines.allow(now):
            return True

        self.suppressed += 1
        if now >= self.progress_at:
            self.progress_at = now + PROGRESS_INTERVAL
            elapsed = max(now - self.started_at, 1e-9)
            log.info(
                "PROGRESS %d tasks finished (%d unsuccessful), %d running, %.0f attempts/s",
                self.finished,
                self.unsuccessful,
                self.attempts - self.ended_attempts,
                self.attempts / elapsed,
            )
        return False


def _count(number: int, singular: str, plural: str | None = None) -> str:
    word = singular if number == 1 else (plural or f"{singular}s")
    return f"{number} {word}"


def _milliseconds(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def _first_line(text: str) -> str:
    line, _, rest = text.partition("\n")
    return f"{line} ..." if rest else line
