"""Plain, read-only objects that describe a run, its tasks and their attempts.

These are the objects hooks receive. They are frozen dataclasses so a plugin
cannot change the supervisor's state through them, and they hold only plain
values so no plugin depends on unpickling anything a worker produced.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal


#: Final state of a task. Each task reaches exactly one of them.
TaskState = Literal["succeeded", "failed", "timed-out", "cancelled"]

#: Why an attempt failed: the task raised, its worker process died, it ran past
#: its timeout, the run stopped it, or its arguments or result could not travel
#: between processes.
FailureKind = Literal["exception", "crash", "timeout", "cancelled", "payload"]

TASK_STATES: tuple[TaskState, ...] = ("succeeded", "failed", "timed-out", "cancelled")

_EMPTY_MAPPING: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """How failed attempts of a task are retried.

    The supervisor stops retrying when ``max_attempts`` or a ``max_failures``
    limit is reached, or when a raised exception does not match ``retry_on``.
    Otherwise the ``retry_delay`` hook of the policy named by ``policy`` picks
    the delay, or stops the retries.
    """

    #: Name of the retry policy: "none", "fixed", "exponential" or one a plugin registers.
    policy: str = "exponential"
    #: Total number of attempts, the first included.
    max_attempts: int = 3
    #: Seconds: the fixed delay, or the first exponential step.
    delay: float = 0.2
    #: Upper bound of any single delay, in seconds.
    max_delay: float = 10.0
    #: Whether delays use full jitter (a uniform draw between 0 and the computed delay).
    jitter: bool = True
    #: Seed that makes jittered delays a pure function of (seed, task id, attempt number).
    seed: int | None = None
    #: Exception type names to retry on; ``None`` retries any raised exception.
    #: It applies to raised exceptions only: crashes, timeouts and payload
    #: errors are governed by ``max_failures``.
    retry_on: tuple[str, ...] | None = None
    #: ``(kind, limit)`` pairs: the task stops retrying once this many of its
    #: attempts failed with that kind ("exception", "crash", "timeout" or
    #: "payload"). Kinds not listed are limited by ``max_attempts`` alone.
    max_failures: tuple[tuple[str, int], ...] = ()

    def failure_limit(self, kind: str) -> int | None:
        """Return the most failures of ``kind`` the task may have before it stops, or ``None``."""
        for limited_kind, limit in self.max_failures:
            if limited_kind == kind:
                return limit
        return None


@dataclass(frozen=True, slots=True)
class Task:
    """One unit of work of a batch: a function to call with its arguments."""

    #: Unique id of the task within its run.
    id: str
    #: Import path of the function, written as ``"module:function"``.
    call: str
    #: Positional arguments of the call.
    args: tuple[Any, ...] = ()
    #: Keyword arguments of the call (read-only).
    kwargs: Mapping[str, Any] = field(default_factory=lambda: _EMPTY_MAPPING)
    #: Seconds an attempt may run before it is stopped, or ``None`` for no limit.
    timeout: float | None = None
    #: The retry settings of this task, with its own overrides applied.
    retry: RetrySettings = field(default_factory=RetrySettings)

    @property
    def max_attempts(self) -> int:
        """Total number of attempts this task may make."""
        return self.retry.max_attempts


@dataclass(frozen=True, slots=True)
class Attempt:
    """One execution of a task inside a worker process."""

    #: Id of the task this attempt runs.
    task_id: str
    #: Attempt number, starting at 1.
    number: int
    #: Total number of attempts the task may make.
    max_attempts: int
    #: Process id of the worker running the attempt.
    pid: int
    #: ``time.monotonic()`` when the attempt started running in the worker.
    started_at: float
    #: ``time.time()`` when the attempt started running in the worker.
    started_wall: float
    #: ``time.monotonic()`` when the attempt ended, or ``None`` while it runs.
    ended_at: float | None = None

    @property
    def duration(self) -> float | None:
        """Seconds the attempt ran, or ``None`` while it runs."""
        return None if self.ended_at is None else max(0.0, self.ended_at - self.started_at)


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """The cause of an attempt's failure, as plain text that needs no unpickling."""

    #: The failure kind: exception, crash, timeout, cancelled or payload.
    kind: FailureKind
    #: Name of the exception type, for example ``"ConnectionError"``.
    type_name: str
    #: The exception message.
    message: str
    #: The formatted traceback from the worker, or an empty string.
    traceback: str = ""
    #: Names of the exception type and its base classes, most derived first,
    #: each also in ``module.Name`` form where the module is not ``builtins``.
    type_names: tuple[str, ...] = ()

    def __str__(self) -> str:
        if not self.message:
            return self.type_name
        return f"{self.type_name}: {self.message}"

    def matches(self, names: tuple[str, ...]) -> bool:
        """Return whether the error's type, or one of its bases, is named in ``names``."""
        own = self.type_names or (self.type_name,)
        return any(name in own for name in names)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The final state of a task, passed to ``on_terminal``."""

    #: Id of the task.
    task_id: str
    #: The terminal state.
    state: TaskState
    #: Number of attempts that ran.
    attempts: int
    #: Return value of the successful attempt, or ``None``.
    result: Any = None
    #: The error of the last failed attempt, or ``None`` when the task succeeded.
    error: ErrorInfo | None = None
    #: Seconds the last attempt ran, or 0.0 when no attempt ran.
    duration: float = 0.0


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A run as it starts, passed to ``on_run_start``."""

    #: The run name from ``[run] name``.
    name: str
    #: Path of the configuration file, or ``None`` for a run built in Python.
    config_path: str | None
    #: The ceiling on attempts running at once.
    max_concurrent: int
    #: Number of worker processes.
    workers: int
    #: Names of the registered plugins.
    plugins: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RunSummary:
    """A run as it ends, passed to ``on_run_end``."""

    #: The run name.
    name: str
    #: Number of tasks in each terminal state; every state is present.
    states: Mapping[str, int]
    #: Number of attempts started.
    attempts: int
    #: Highest number of attempts running at once.
    peak_running: int
    #: The ceiling on attempts running at once.
    max_concurrent: int
    #: Seconds from run start to run end.
    wall_seconds: float
    #: Number of hook calls that raised.
    plugin_errors: int = 0
    #: Why the run stopped early ("deadline", "SIGINT", "SIGTERM"), or ``None``.
    stop_reason: str | None = None
    #: Ids of the tasks that did not succeed, in the order they ended.
    unsuccessful: tuple[str, ...] = ()

    @property
    def tasks(self) -> int:
        """Total number of tasks."""
        return sum(self.states.values())

    @property
    def succeeded(self) -> bool:
        """Whether every task succeeded."""
        return self.tasks == self.states.get("succeeded", 0)
