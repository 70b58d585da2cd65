"""Hook specifications of batchrun.

Every hook runs in the supervisor process, never in a worker, and receives the
read-only objects of :mod:`batchrun.models`. An implementation may accept any
subset of a hook's arguments, so new arguments can be added without breaking
plugins.

For one task the notification hooks fire in this order: ``on_start`` for each
attempt, then ``on_fail`` and, when the task will run again, ``on_retry``, and
finally exactly one ``on_terminal``. ``on_run_start`` comes before every task
hook and ``on_run_end`` after all of them. Every event is committed to the run
journal before its hooks fire, so hooks may fire up to a few tens of
milliseconds after the event while a busy run groups events into one commit.

When a notification hook implementation raises, batchrun logs the error once
with the plugin name, counts it in the run summary and still calls the other
implementations of that hook. Implementations must be plain functions:
``async def`` implementations are rejected when the plugin is registered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy


if TYPE_CHECKING:
    from collections.abc import Iterable

    from batchrun.models import Attempt, ErrorInfo, Outcome, RunInfo, RunSummary, Task


PROJECT_NAME = "batchrun"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# -- run ----------------------------------------------------------------------


@hookspec
def on_run_start(run: RunInfo) -> None:
    """Called once when the run starts, before any task starts.

    :param run: the run name, its ceiling and its worker count.

    .. versionadded:: 0.1
    """


@hookspec
def on_run_end(summary: RunSummary) -> None:
    """Called once when the run ends, after every task reached its terminal state.

    :param summary: counts by final state, attempts, peak concurrency and wall time.

    .. versionadded:: 0.1
    """


# -- task ---------------------------------------------------------------------


@hookspec
def on_start(task: Task, attempt: Attempt) -> None:
    """Called when a worker has started running an attempt.

    The worker reported the start itself, so ``attempt.pid`` and
    ``attempt.started_at`` are the worker's own values.

    :param task: the task the attempt runs.
    :param attempt: the attempt that started.

    .. versionadded:: 0.1
    """


@hookspec
def on_fail(task: Task, attempt: Attempt, error: ErrorInfo) -> None:
    """Called after an attempt fails, before ``on_retry`` or ``on_terminal`` of its task.

    The retry policy may already have been asked by then, so a policy must
    not depend on its own ``on_fail`` having run.

    :param task: the task whose attempt failed.
    :param attempt: the attempt that failed, with ``ended_at`` set.
    :param error: the failure kind, exception type name, message and traceback text.

    .. versionadded:: 0.1
    """


@hookspec
def on_retry(task: Task, attempt: Attempt, delay: float) -> None:
    """Called when a failed attempt will be followed by another one.

    :param task: the task that will run again.
    :param attempt: the attempt that failed.
    :param delay: seconds until the next attempt becomes ready to run.

    .. versionadded:: 0.1
    """


@hookspec
def on_terminal(task: Task, outcome: Outcome) -> None:
    """Called exactly once per task, when it reaches its final state.

    A resumed run does not call it again for tasks that ended in an earlier
    session; it calls it once more for a task that runs again there
    (cancelled earlier, or rerun by ``--retry-failed`` or ``--rerun-changed``).

    :param task: the task that ended.
    :param outcome: its final state, attempt count, result or last error.

    .. versionadded:: 0.1
    """


# -- policy -------------------------------------------------------------------


@hookspec
def retry_policy_names() -> Iterable[str]:
    """Return the names of the retry policies this plugin implements.

    ``[retry] policy`` must be one of the names returned by all plugins
    together; an unknown name is a configuration error.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def retry_delay(task: Task, attempt: Attempt, error: ErrorInfo) -> float | None:
    """Return the seconds to wait before the next attempt, or ``None`` to stop.

    Called only while the task has attempts left and its error matches
    ``retry_on``. The first implementation that returns a value other than
    ``None`` decides, so a policy returns ``None`` for policy names
    (``task.retry.policy``) that are not its own. When no implementation
    returns a value, the task stops retrying.

    A policy that raises, or returns a value that is not a finite number of
    seconds of at least 0, stops the task's retries and the error is logged.

    :param task: the task whose attempt failed, with its retry settings.
    :param attempt: the attempt that failed.
    :param error: why it failed.

    .. versionadded:: 0.1
    """
