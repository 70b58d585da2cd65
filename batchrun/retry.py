"""Retry building blocks: the delay before the next attempt of a task.

Every function here is pure apart from the unseeded jitter draw, which uses
:func:`random.random`. The functions use no plugin machinery, so the built-in
policy plugin and third-party policies can share them, and tests can call them
on hand-built :class:`~batchrun.models.RetrySettings`.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import random
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from batchrun.models import RetrySettings


#: Number of random bits in a jitter fraction: the 53-bit mantissa of a float,
#: so every fraction ``k / 2**53`` is exact and the result stays below 1.
_FRACTION_BITS = 53


def is_valid_delay(value: object) -> bool:
    """Return whether ``value`` is a finite real number of seconds of at least 0.

    ``bool`` is rejected even though it is an ``int`` subclass, because
    ``True`` seconds is always a mistake.

    :param value: the candidate delay.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False

    return math.isfinite(value) and value >= 0


def jitter_fraction(seed: int, task_id: str, attempt_number: int) -> float:
    """Derive a fraction in [0, 1) from the seed, the task id and the attempt number.

    The fraction is a pure function of the three values, identical across
    processes and Python runs, because it comes from a BLAKE2b digest of their
    JSON encoding and not from the per-process randomized :func:`hash`.

    :param seed: the ``seed`` of the task's retry settings.
    :param task_id: id of the task.
    :param attempt_number: number of the attempt that failed, starting at 1.
    """
    encoded = json.dumps([seed, task_id, attempt_number]).encode("utf-8")
    digest = hashlib.blake2b(encoded, digest_size=8, person=b"batchrun-jitter").digest()
    bits = int.from_bytes(digest, "big") >> (64 - _FRACTION_BITS)
    return bits / (1 << _FRACTION_BITS)


def fixed_delay(settings: RetrySettings, task_id: str, attempt_number: int) -> float:
    """Compute the delay of the fixed policy: ``delay``, capped at ``max_delay``.

    With ``settings.jitter`` the result is a uniform draw between 0 and that
    value, as described in :func:`apply_jitter`.

    :param settings: the task's retry settings.
    :param task_id: id of the task, used only by seeded jitter.
    :param attempt_number: number of the attempt that failed, starting at 1.
    :raises ValueError: when a setting or the attempt number is invalid.
    """
    _check_arguments(settings, attempt_number)

    base = min(settings.delay, settings.max_delay)
    return apply_jitter(settings, task_id, attempt_number, base)


def exponential_delay(settings: RetrySettings, task_id: str, attempt_number: int) -> float:
    """Compute the delay of the exponential policy: ``delay * 2 ** (attempt_number - 1)``.

    The first retry waits ``delay`` and each later one twice as long as the one
    before, up to ``max_delay``. With ``settings.jitter`` the result is a
    uniform draw between 0 and that value, as described in :func:`apply_jitter`.

    :param settings: the task's retry settings.
    :param task_id: id of the task, used only by seeded jitter.
    :param attempt_number: number of the attempt that failed, starting at 1.
    :raises ValueError: when a setting or the attempt number is invalid.
    """
    _check_arguments(settings, attempt_number)

    # ldexp multiplies by a power of two exactly. It raises OverflowError instead
    # of returning inf once the product no longer fits in a float, which happens
    # only for attempt numbers far beyond any sensible max_attempts.
    try:
        growth = math.ldexp(settings.delay, attempt_number - 1)
    except OverflowError:
        growth = math.inf
    base = min(settings.max_delay, growth)
    return apply_jitter(settings, task_id, attempt_number, base)


def apply_jitter(settings: RetrySettings, task_id: str, attempt_number: int, base: float) -> float:
    """Apply full jitter to ``base`` when ``settings.jitter`` is set, else return ``base``.

    Full jitter draws the delay uniformly between 0 and ``base``. With
    ``settings.seed`` set, the draw is :func:`jitter_fraction` of the seed, the
    task id and the attempt number, so a rerun waits exactly as long. Without a
    seed it uses :func:`random.random`.

    :param settings: the task's retry settings.
    :param task_id: id of the task.
    :param attempt_number: number of the attempt that failed, starting at 1.
    :param base: the delay before jitter, in seconds.
    """
    if not settings.jitter:
        return base

    if settings.seed is None:
        fraction = random.random()
    else:
        fraction = jitter_fraction(settings.seed, task_id, attempt_number)
    return base * fraction


def _check_arguments(settings: RetrySettings, attempt_number: int) -> None:
    """Raise ValueError unless the delays are valid and the attempt number is at least 1."""
    if isinstance(attempt_number, bool) or not isinstance(attempt_number, int) or attempt_number < 1:
        msg = f"attempt number must be an integer of at least 1, got {attempt_number!r}"
        raise ValueError(msg)

    for name in ("delay", "max_delay"):
        value = getattr(settings, name)
        if not is_valid_delay(value):
            msg = f"retry {name} must be a finite number of seconds of at least 0, got {value!r}"
            raise ValueError(msg)
