"""A fake API for trying out batches: requests that wait, then succeed or fail on demand.

Every request logs one INFO line on the ``plugins.fake_api`` logger that
states whether it succeeded and, if it failed, why, so a run's log can be
checked against its outcomes. A failed request raises :class:`ConnectionError`.

The task id and attempt number come from ``batchrun.current_attempt()``, so
``fail_attempts`` and ``failure_rate`` see the real attempt when the request
runs in a batchrun worker. Outside a worker a request counts as attempt 1 of a
task whose id is the request id.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import numbers
import random
import time
from typing import TYPE_CHECKING, Any, Final

from batchrun.retry import is_valid_delay


if TYPE_CHECKING:
    from collections.abc import Iterator


_logger = logging.getLogger("plugins.fake_api")

#: The HTTP status a successful request reports.
_STATUS_OK: Final = 200

#: Number of random bits in a failure draw: the 53-bit mantissa of a float.
_DRAW_BITS: Final = 53


def fetch(
    id: str,  # noqa: A002 - batch files pass it as the keyword "id"
    delay: float,
    succeed: bool = True,
    fail_attempts: int = 0,
    failure_rate: float = 0.0,
    seed: int | None = None,
) -> dict[str, Any]:
    """Wait ``delay`` seconds, then return a response or raise ConnectionError.

    The request fails on every attempt when ``succeed`` is false, on attempts
    1 to ``fail_attempts``, and on any other attempt with probability
    ``failure_rate``. With a ``seed`` the random failures are a pure function of
    (seed, task id, attempt number), so a rerun fails the same attempts. Without
    one they use :func:`random.random`.

    :param id: id of the request, copied into the response and the log.
    :param delay: seconds to wait before responding.
    :param succeed: ``False`` makes every attempt fail.
    :param fail_attempts: number of leading attempts that fail.
    :param failure_rate: probability, from 0 to 1, that any other attempt fails.
    :param seed: seed of the random failures, or ``None`` for unseeded ones.
    :returns: ``{"id": id, "attempt": number, "status": 200}``.
    :raises ConnectionError: when the request fails, with the reason.
    :raises ValueError: when an argument is invalid.
    """
    _validate_arguments(delay, succeed, fail_attempts, failure_rate, seed)
    task_id, attempt_number, max_attempts = _read_current_attempt(id)
    failure = _decide_failure(
        task_id,
        attempt_number,
        succeed=succeed,
        fail_attempts=fail_attempts,
        failure_rate=failure_rate,
        seed=seed,
    )

    started = time.monotonic()
    time.sleep(delay)
    elapsed = time.monotonic() - started

    return _respond(id, attempt_number, max_attempts, failure, elapsed)


async def fetch_async(
    id: str,  # noqa: A002 - batch files pass it as the keyword "id"
    delay: float,
    succeed: bool = True,
    fail_attempts: int = 0,
    failure_rate: float = 0.0,
    seed: int | None = None,
) -> dict[str, Any]:
    """Wait ``delay`` seconds with :func:`asyncio.sleep`, then respond as :func:`fetch` does.

    The response, the log line and the failures are those of :func:`fetch`.

    :param id: id of the request, copied into the response and the log.
    :param delay: seconds to wait before responding.
    :param succeed: ``False`` makes every attempt fail.
    :param fail_attempts: number of leading attempts that fail.
    :param failure_rate: probability, from 0 to 1, that any other attempt fails.
    :param seed: seed of the random failures, or ``None`` for unseeded ones.
    :returns: ``{"id": id, "attempt": number, "status": 200}``.
    :raises ConnectionError: when the request fails, with the reason.
    :raises ValueError: when an argument is invalid.
    """
    _validate_arguments(delay, succeed, fail_attempts, failure_rate, seed)
    task_id, attempt_number, max_attempts = _read_current_attempt(id)
    failure = _decide_failure(
        task_id,
        attempt_number,
        succeed=succeed,
        fail_attempts=fail_attempts,
        failure_rate=failure_rate,
        seed=seed,
    )

    started = time.monotonic()
    await asyncio.sleep(delay)
    elapsed = time.monotonic() - started

    return _respond(id, attempt_number, max_attempts, failure, elapsed)


def many(
    count: int,
    call: str = "plugins.fake_api:fetch",
    delay: float = 0.0,
    failure_rate: float = 0.0,
    seed: int | None = None,
    prefix: str = "item",
) -> Iterator[dict[str, Any]]:
    """Generate ``count`` task tables for a large batch of fake API requests.

    Each table has the keys ``id``, ``call`` and ``kwargs``, like a
    ``[[tasks]]`` table of a batch file. The ids are ``<prefix>-0`` to
    ``<prefix>-<count - 1>``, and each task's kwargs are its id, ``delay``,
    ``failure_rate`` and ``seed``, so ``call`` must accept those keywords, as
    :func:`fetch` and :func:`fetch_async` do.

    The arguments are checked at once, but the tables are built one at a time
    as the caller iterates, so a batch of a million tasks is never held in memory.

    :param count: number of tasks.
    :param call: import path of the function each task calls.
    :param delay: seconds each request waits.
    :param failure_rate: probability, from 0 to 1, that an attempt fails.
    :param seed: seed of the random failures, or ``None`` for unseeded ones.
    :param prefix: start of every task id.
    :raises ValueError: when an argument is invalid.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        msg = f"count must be an integer of at least 0, got {count!r}"
        raise ValueError(msg)

    if not isinstance(call, str) or ":" not in call:
        msg = f"call must be an import path written as 'module:function', got {call!r}"
        raise ValueError(msg)

    _validate_arguments(delay, True, 0, failure_rate, seed)
    return _generate_tasks(count, call, delay, failure_rate, seed, prefix)


def _generate_tasks(
    count: int,
    call: str,
    delay: float,
    failure_rate: float,
    seed: int | None,
    prefix: str,
) -> Iterator[dict[str, Any]]:
    for index in range(count):
        task_id = f"{prefix}-{index}"
        kwargs = {"id": task_id, "delay": delay, "failure_rate": failure_rate, "seed": seed}
        yield {"id": task_id, "call": call, "kwargs": kwargs}


def _validate_arguments(
    delay: object,
    succeed: object,
    fail_attempts: object,
    failure_rate: object,
    seed: object,
) -> None:
    """Raise ValueError naming the first argument that is invalid."""
    if not is_valid_delay(delay):
        msg = f"delay must be a finite number of seconds of at least 0, got {delay!r}"
        raise ValueError(msg)

    if not isinstance(succeed, bool):
        msg = f"succeed must be true or false, got {succeed!r}"
        raise ValueError(msg)

    if isinstance(fail_attempts, bool) or not isinstance(fail_attempts, int) or fail_attempts < 0:
        msg = f"fail_attempts must be an integer of at least 0, got {fail_attempts!r}"
        raise ValueError(msg)

    # The chained comparison is false for NaN, so NaN is rejected too.
    is_rate = isinstance(failure_rate, numbers.Real) and not isinstance(failure_rate, bool)
    if not (is_rate and 0 <= failure_rate <= 1):
        msg = f"failure_rate must be a number from 0 to 1, got {failure_rate!r}"
        raise ValueError(msg)

    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        msg = f"seed must be an integer or None, got {seed!r}"
        raise ValueError(msg)


def _read_current_attempt(request_id: object) -> tuple[str, int, int | None]:
    """Return the task id, attempt number and max attempts of the running attempt.

    Outside a batchrun worker the request is attempt 1 of a task whose id is
    the request id, with no known maximum.
    """
    # TODO: move this import to the top of the module once batchrun/__init__.py
    # exports current_attempt. Until then, importing it here keeps this module
    # importable without it.
    from batchrun import current_attempt

    attempt = current_attempt()
    if attempt is None:
        return str(request_id), 1, None

    return attempt.task_id, attempt.number, attempt.max_attempts


def _decide_failure(
    task_id: str,
    attempt_number: int,
    *,
    succeed: bool,
    fail_attempts: int,
    failure_rate: float,
    seed: int | None,
) -> str | None:
    """Return why this attempt of the request fails, or ``None`` when it succeeds.

    :func:`fetch` and :func:`fetch_async` both decide here, so they fail the
    same attempts for the same arguments.
    """
    if not succeed:
        return "succeed=False fails every attempt"

    if attempt_number <= fail_attempts:
        return f"fail_attempts={fail_attempts} fails attempts up to number {fail_attempts}"

    if failure_rate == 0:
        return None

    if seed is None:
        draw = random.random()
    else:
        draw = _draw_failure_fraction(seed, task_id, attempt_number)
    if draw < failure_rate:
        return f"random failure: draw {draw:.4f} is below failure_rate={failure_rate} (seed={seed})"

    return None


def _draw_failure_fraction(seed: int, task_id: str, attempt_number: int) -> float:
    """Derive a fraction in [0, 1) from the seed, the task id and the attempt number.

    The derivation matches :func:`batchrun.retry.jitter_fraction` but uses its
    own BLAKE2b personalization, so failures and retry delays drawn from the
    same seed are independent.
    """
    encoded = json.dumps([seed, task_id, attempt_number]).encode("utf-8")
    digest = hashlib.blake2b(encoded, digest_size=8, person=b"fake-api-fail").digest()
    bits = int.from_bytes(digest, "big") >> (64 - _DRAW_BITS)
    return bits / (1 << _DRAW_BITS)


def _respond(
    request_id: object,
    attempt_number: int,
    max_attempts: int | None,
    failure: str | None,
    elapsed: float,
) -> dict[str, Any]:
    """Log the request's outcome, then return its response or raise ConnectionError."""
    if max_attempts is None:
        attempt_label = str(attempt_number)
    else:
        attempt_label = f"{attempt_number}/{max_attempts}"

    if failure is not None:
        _logger.info("request %s attempt %s: failed after %.2f s: %s", request_id, attempt_label, elapsed, failure)
        msg = f"fake API rejected request {request_id!r} on attempt {attempt_number}: {failure}"
        raise ConnectionError(msg)

    _logger.info("request %s attempt %s: ok after %.2f s", request_id, attempt_label, elapsed)
    return {"id": request_id, "attempt": attempt_number, "status": _STATUS_OK}
