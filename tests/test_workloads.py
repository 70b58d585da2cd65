"""Tests of the workloads that ship in plugins/: the fake API and the CPU burner."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest

import batchrun
from plugins import cpu, fake_api


if TYPE_CHECKING:
    from collections.abc import Callable


def decide(task_id: str = "fetch-2", attempt_number: int = 1, **overrides: object) -> str | None:
    """Call the fake API's decision function with fetch's defaults and ``overrides``."""
    options: dict[str, object] = {"succeed": True, "fail_attempts": 0, "failure_rate": 0.0, "seed": None}
    options.update(overrides)
    return fake_api._decide_failure(task_id, attempt_number, **options)


@pytest.fixture
def set_attempt(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Make ``batchrun.current_attempt()`` return the given attempt, or ``None`` when given none."""

    def install(task_id: str | None = None, number: int = 1, max_attempts: int = 3) -> None:
        attempt = None
        if task_id is not None:
            attempt = SimpleNamespace(task_id=task_id, number=number, max_attempts=max_attempts)
        # raising=False because batchrun/__init__.py may not export current_attempt yet.
        monkeypatch.setattr(batchrun, "current_attempt", lambda: attempt, raising=False)

    return install


# -- decision -----------------------------------------------------------------


def test_decide_failure_default_succeeds() -> None:
    for attempt_number in range(1, 5):
        assert decide(attempt_number=attempt_number) is None


def test_decide_failure_succeed_false_fails_every_attempt() -> None:
    for attempt_number in range(1, 5):
        reason = decide(attempt_number=attempt_number, succeed=False)
        assert reason is not None
        assert "succeed=False" in reason


def test_decide_failure_fail_attempts_fails_leading_attempts() -> None:
    outcomes = {number: decide(attempt_number=number, fail_attempts=2) for number in range(1, 5)}

    assert outcomes[1] is not None
    assert "fail_attempts=2" in outcomes[1]
    assert outcomes[2] is not None
    assert outcomes[3] is None
    assert outcomes[4] is None


def test_decide_failure_rate_bounds() -> None:
    for task_id in (f"item-{index}" for index in range(50)):
        assert decide(task_id, failure_rate=0.0, seed=3) is None
        assert decide(task_id, failure_rate=1.0, seed=3) is not None
        assert decide(task_id, failure_rate=1.0, seed=None) is not None


def test_decide_failure_seeded_rate_is_reproducible() -> None:
    task_ids = [f"item-{index}" for index in range(200)]

    first = [decide(task_id, 2, failure_rate=0.5, seed=42) for task_id in task_ids]
    second = [decide(task_id, 2, failure_rate=0.5, seed=42) for task_id in task_ids]
    failures = sum(reason is not None for reason in first)

    assert first == second
    # With seed 42 the draws fail some of the 200 requests, but not all.
    assert 0 < failures < len(task_ids)


def test_decide_failure_seeded_draws_vary() -> None:
    task_ids = [f"item-{index}" for index in range(200)]

    def pattern(seed: int, attempt_number: int) -> list[bool]:
        return [decide(task_id, attempt_number, failure_rate=0.5, seed=seed) is None for task_id in task_ids]

    assert pattern(42, 1) != pattern(43, 1)
    assert pattern(42, 1) != pattern(42, 2)
    assert len(set(pattern(42, 1))) == 2


def test_decide_failure_reason_names_seed() -> None:
    reason = decide(failure_rate=1.0, seed=9)

    assert reason is not None
    assert "failure_rate=1.0" in reason
    assert "seed=9" in reason


# -- fetch --------------------------------------------------------------------


def test_fetch_outside_worker_counts_attempt_one(set_attempt: Callable[..., None]) -> None:
    set_attempt(None)

    response = fake_api.fetch("fetch-1", 0.0)

    assert response == {"id": "fetch-1", "attempt": 1, "status": 200}


def test_fetch_outside_worker_fails_with_fail_attempts(set_attempt: Callable[..., None]) -> None:
    set_attempt(None)

    with pytest.raises(ConnectionError, match=r"'fetch-2' on attempt 1: fail_attempts=1"):
        fake_api.fetch("fetch-2", 0.0, fail_attempts=1)


def test_fetch_real_current_attempt_outside_worker() -> None:
    if not hasattr(batchrun, "current_attempt"):
        pytest.skip("batchrun does not export current_attempt yet")

    response = fake_api.fetch("fetch-1", 0.0, fail_attempts=0)

    assert response["attempt"] == 1


def test_fetch_fail_attempts_across_attempt_numbers(set_attempt: Callable[..., None]) -> None:
    for number in (1, 2):
        set_attempt("fetch-2", number=number, max_attempts=4)
        with pytest.raises(ConnectionError, match=f"on attempt {number}"):
            fake_api.fetch("fetch-2", 0.0, fail_attempts=2)

    set_attempt("fetch-2", number=3, max_attempts=4)
    response = fake_api.fetch("fetch-2", 0.0, fail_attempts=2)

    assert response == {"id": "fetch-2", "attempt": 3, "status": 200}


def test_fetch_succeed_false_always_raises(set_attempt: Callable[..., None]) -> None:
    for number in (1, 5):
        set_attempt("fetch-3", number=number, max_attempts=5)
        with pytest.raises(ConnectionError, match="succeed=False"):
            fake_api.fetch("fetch-3", 0.0, succeed=False)


def test_fetch_failure_draw_uses_task_id(set_attempt: Callable[..., None]) -> None:
    # The request id differs from the task id, so this checks which one feeds the draw.
    for task_id in (f"item-{index}" for index in range(30)):
        set_attempt(task_id, number=2)
        expected = decide(task_id, 2, failure_rate=0.5, seed=5)
        try:
            fake_api.fetch("shared-request", 0.0, failure_rate=0.5, seed=5)
        except ConnectionError as error:
            assert expected is not None
            assert expected in str(error)
        else:
            assert expected is None


def test_fetch_logs_one_line_per_call(set_attempt: Callable[..., None], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="plugins.fake_api")

    set_attempt("fetch-2", number=1, max_attempts=3)
    with pytest.raises(ConnectionError):
        fake_api.fetch("fetch-2", 0.0, fail_attempts=1)
    set_attempt("fetch-2", number=2, max_attempts=3)
    fake_api.fetch("fetch-2", 0.0, fail_attempts=1)

    messages = [record.getMessage() for record in caplog.records if record.name == "plugins.fake_api"]
    assert len(messages) == 2
    assert messages[0].startswith("request fetch-2 attempt 1/3: failed after ")
    assert "fail_attempts=1" in messages[0]
    assert messages[1].startswith("request fetch-2 attempt 2/3: ok after ")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"delay": -0.1}, "delay must be .* got -0.1"),
        ({"delay": math.nan}, "delay must be .* got nan"),
        ({"delay": "0.1"}, "delay must be .* got '0.1'"),
        ({"failure_rate": 1.5}, "failure_rate must be .* got 1.5"),
        ({"failure_rate": -0.5}, "failure_rate must be .* got -0.5"),
        ({"failure_rate": math.nan}, "failure_rate must be .* got nan"),
        ({"fail_attempts": -1}, "fail_attempts must be .* got -1"),
        ({"fail_attempts": 1.5}, "fail_attempts must be .* got 1.5"),
        ({"succeed": "no"}, "succeed must be .* got 'no'"),
        ({"seed": 1.5}, "seed must be .* got 1.5"),
    ],
)
def test_fetch_rejects_invalid_arguments(overrides: dict[str, object], fragment: str) -> None:
    arguments: dict[str, object] = {"id": "fetch-1", "delay": 0.0}
    arguments.update(overrides)

    with pytest.raises(ValueError, match=fragment):
        fake_api.fetch(**arguments)
    with pytest.raises(ValueError, match=fragment):
        asyncio.run(fake_api.fetch_async(**arguments))


# -- fetch_async --------------------------------------------------------------


def test_fetch_async_returns_response(set_attempt: Callable[..., None]) -> None:
    set_attempt("fetch-4", number=2, max_attempts=3)

    response = asyncio.run(fake_api.fetch_async("fetch-4", 0.01, fail_attempts=1))

    assert response == {"id": "fetch-4", "attempt": 2, "status": 200}


def test_fetch_async_fails_like_fetch(set_attempt: Callable[..., None]) -> None:
    set_attempt("fetch-4", number=1, max_attempts=3)

    with pytest.raises(ConnectionError) as sync_error:
        fake_api.fetch("fetch-4", 0.0, fail_attempts=1)
    with pytest.raises(ConnectionError) as async_error:
        asyncio.run(fake_api.fetch_async("fetch-4", 0.0, fail_attempts=1))

    assert str(async_error.value) == str(sync_error.value)


def test_fetch_async_runs_concurrently_in_one_loop(set_attempt: Callable[..., None]) -> None:
    set_attempt(None)

    async def gather_requests() -> list[dict[str, object]]:
        requests = [fake_api.fetch_async(f"fetch-{index}", 0.01) for index in range(5)]
        return await asyncio.gather(*requests)

    responses = asyncio.run(gather_requests())

    assert [response["id"] for response in responses] == [f"fetch-{index}" for index in range(5)]


# -- many ---------------------------------------------------------------------


def test_many_is_lazy() -> None:
    # A trillion tables would exhaust memory if many() built them eagerly.
    tasks = fake_api.many(10**12)

    first_three = list(itertools.islice(tasks, 3))

    assert [task["id"] for task in first_three] == ["item-0", "item-1", "item-2"]
    assert next(tasks)["id"] == "item-3"


def test_many_task_shape() -> None:
    tasks = list(fake_api.many(3, delay=0.01, failure_rate=0.25, seed=4, prefix="req"))

    assert len(tasks) == 3
    for index, task in enumerate(tasks):
        assert set(task) == {"id", "call", "kwargs"}
        assert task["id"] == f"req-{index}"
        assert task["call"] == "plugins.fake_api:fetch"
        assert task["kwargs"] == {"id": f"req-{index}", "delay": 0.01, "failure_rate": 0.25, "seed": 4}


def test_many_zero_count_yields_nothing() -> None:
    assert list(fake_api.many(0)) == []


def test_many_kwargs_are_valid_fetch_arguments(set_attempt: Callable[..., None]) -> None:
    set_attempt(None)

    for task in fake_api.many(3, call="plugins.fake_api:fetch_async"):
        response = asyncio.run(fake_api.fetch_async(**task["kwargs"]))
        assert response["id"] == task["id"]


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"count": -1}, "count must be .* got -1"),
        ({"count": 2.0}, "count must be .* got 2.0"),
        ({"call": "plugins.fake_api.fetch"}, "call must be .* got 'plugins.fake_api.fetch'"),
        ({"delay": -1}, "delay must be .* got -1"),
        ({"failure_rate": 2}, "failure_rate must be .* got 2"),
    ],
)
def test_many_rejects_invalid_arguments(overrides: dict[str, object], fragment: str) -> None:
    arguments: dict[str, object] = {"count": 3}
    arguments.update(overrides)

    with pytest.raises(ValueError, match=fragment):
        fake_api.many(**arguments)


# -- burn ---------------------------------------------------------------------


def test_burn_iterations_deterministic() -> None:
    first = cpu.burn(iterations=500, seed=3)
    second = cpu.burn(iterations=500, seed=3)

    assert first["iterations"] == 500
    assert first["digest"] == second["digest"]
    assert len(first["digest"]) == 16


def test_burn_digest_depends_on_seed_and_iterations() -> None:
    reference = cpu.burn(iterations=500, seed=3)["digest"]

    assert cpu.burn(iterations=500, seed=4)["digest"] != reference
    assert cpu.burn(iterations=501, seed=3)["digest"] != reference
    assert cpu.burn(iterations=0, seed=3)["digest"] != reference


def test_burn_millis_reproducible_by_iterations() -> None:
    result = cpu.burn(millis=1, seed=2)

    replay = cpu.burn(iterations=result["iterations"], seed=2)

    assert result["iterations"] > 0
    assert replay["digest"] == result["digest"]


def test_burn_zero_millis_does_no_work() -> None:
    result = cpu.burn(millis=0)

    assert result["iterations"] == 0
    assert result["digest"] == cpu.burn(iterations=0)["digest"]


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ({}, "exactly one of millis and iterations"),
        ({"millis": 1, "iterations": 1}, "exactly one of millis and iterations"),
        ({"millis": -1}, "millis must be .* got -1"),
        ({"millis": math.inf}, "millis must be .* got inf"),
        ({"millis": True}, "millis must be .* got True"),
        ({"iterations": -5}, "iterations must be .* got -5"),
        ({"iterations": 2.5}, "iterations must be .* got 2.5"),
        ({"iterations": 1, "seed": "x"}, "seed must be .* got 'x'"),
    ],
)
def test_burn_rejects_invalid_arguments(arguments: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        cpu.burn(**arguments)
