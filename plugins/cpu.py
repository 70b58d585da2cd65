"""A CPU-bound workload for trying out batches: a chain of SHA-256 hashes.

Each step hashes the previous digest, so the steps cannot run in parallel and
the final digest depends on the seed and the number of steps. The steps run
in one Python loop, so a worker running :func:`burn` keeps one core busy.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import time
from typing import Any, Final


#: Hash steps between two reads of the CPU clock when the budget is in
#: milliseconds, so a budget is overrun by at most one batch. One step took
#: 0.43 us under CPython 3.11 on an AMD EPYC virtual machine (timeit of
#: hashlib.sha256 on 32 bytes), which makes a batch about 0.4 ms there.
_STEPS_PER_CLOCK_CHECK: Final = 1000

#: Number of hex digits of the final digest that :func:`burn` returns.
_DIGEST_PREFIX_LENGTH: Final = 16


def burn(millis: float | None = None, iterations: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Hash a chain of SHA-256 digests for ``millis`` of CPU time or ``iterations`` steps.

    Pass exactly one of ``millis`` and ``iterations``. With ``iterations`` the
    result is deterministic. With ``millis`` the chain runs in batches of
    ``_STEPS_PER_CLOCK_CHECK`` steps until :func:`time.process_time` has
    advanced by ``millis``, so the step count is a multiple of that batch size
    and ``burn(iterations=n, seed=s)`` reproduces the same digest.

    :param millis: CPU time to spend, in milliseconds.
    :param iterations: number of hash steps.
    :param seed: integer that picks the start of the chain.
    :returns: ``{"iterations": steps, "digest": hex prefix, "cpu_seconds": seconds}``,
        where ``cpu_seconds`` is the process CPU time the call used.
    :raises ValueError: when both or neither of ``millis`` and ``iterations``
        are given, or when an argument is invalid.
    """
    _validate_arguments(millis, iterations, seed)

    started = time.process_time()
    digest = hashlib.sha256(str(seed).encode("ascii")).digest()

    if iterations is not None:
        steps = iterations
        digest = _hash_chain(digest, steps)
    else:
        deadline = started + millis / 1000
        steps = 0
        while time.process_time() < deadline:
            digest = _hash_chain(digest, _STEPS_PER_CLOCK_CHECK)
            steps += _STEPS_PER_CLOCK_CHECK

    return {
        "iterations": steps,
        "digest": digest.hex()[:_DIGEST_PREFIX_LENGTH],
        "cpu_seconds": time.process_time() - started,
    }


def _hash_chain(digest: bytes, steps: int) -> bytes:
    for _ in range(steps):
        digest = hashlib.sha256(digest).digest()
    return digest


def _validate_arguments(millis: object, iterations: object, seed: object) -> None:
    """Raise ValueError unless exactly one budget is given and every argument is valid."""
    if (millis is None) == (iterations is None):
        msg = f"pass exactly one of millis and iterations, got millis={millis!r} and iterations={iterations!r}"
        raise ValueError(msg)

    if millis is not None:
        is_number = isinstance(millis, numbers.Real) and not isinstance(millis, bool)
        if not (is_number and math.isfinite(millis) and millis >= 0):
            msg = f"millis must be a finite number of milliseconds of at least 0, got {millis!r}"
            raise ValueError(msg)

    if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0):
        msg = f"iterations must be an integer of at least 0, got {iterations!r}"
        raise ValueError(msg)

    if isinstance(seed, bool) or not isinstance(seed, int):
        msg = f"seed must be an integer, got {seed!r}"
        raise ValueError(msg)
