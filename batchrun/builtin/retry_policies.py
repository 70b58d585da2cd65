"""The built-in retry policies: "none", "fixed" and "exponential".

The supervisor checks ``max_attempts`` and ``retry_on`` before it calls
``retry_delay``, so these policies only pick the delay. Each returns ``None``
for a policy name it does not own, so that a plugin's policy of that name can
return the delay instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from batchrun.hookspecs import hookimpl
from batchrun.retry import exponential_delay, fixed_delay


if TYPE_CHECKING:
    from collections.abc import Callable

    from batchrun.models import Attempt, RetrySettings, Task


#: The delay function of each policy that waits before retrying. The "none"
#: policy has no entry because it never retries.
_DELAY_FUNCTIONS: Final[dict[str, Callable[[RetrySettings, str, int], float]]] = {
    "fixed": fixed_delay,
    "exponential": exponential_delay,
}

#: Names of the policies this plugin implements.
POLICY_NAMES: Final[tuple[str, ...]] = ("none", "fixed", "exponential")


@hookimpl
def retry_policy_names() -> tuple[str, ...]:
    """Return the names of the built-in retry policies."""
    return POLICY_NAMES


@hookimpl
def retry_delay(task: Task, attempt: Attempt) -> float | None:
    """Return the seconds to wait before the next attempt of ``task``.

    The hook's ``error`` argument is not used, because the built-in policies
    wait the same for every error. The result is ``None`` for the "none"
    policy, which stops the retries, and for names this plugin does not own.

    :param task: the task whose attempt failed, with its retry settings.
    :param attempt: the attempt that failed.
    :raises ValueError: when the task's delays or the attempt number are invalid.
    """
    delay_function = _DELAY_FUNCTIONS.get(task.retry.policy)
    if delay_function is None:
        return None

    return delay_function(task.retry, task.id, attempt.number)
