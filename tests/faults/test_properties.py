"""The three laws on random batches of misbehaving tasks, checked from the workers' own records.

Each generated task runs :func:`tests.faults.scripted.run` with one scripted
behaviour per attempt: succeed at once, run 0.05-0.2 s and succeed, raise,
crash its worker with ``os._exit``, or hang past the 0.5 s timeout. The
workers' start and end records give the ground truth for the ceiling and for
one live attempt per task. The hook stream gives the terminal states.
"""

from __future__ import annotations

import tempfile
import textwrap
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from batchrun.config import load_config
from batchrun.runner import build_plugin_manager, run_batch
from tests.conftest import Recorder
from tests.faults.conftest import toml_string
from tests.faults.scripted import read_attempts
from tests.probe import peak_overlap


TIMEOUT = 0.5
TIMEOUT_GRACE = 0.3

#: The failure kind each failing behaviour produces, and the terminal state
#: of a task whose last attempt failed that way.
FAILURES = {"raise": ("exception", "failed"), "crash": ("crash", "failed"), "hang": ("timeout", "timed-out")}

#: One attempt: a behaviour and the seconds it runs before it acts. Succeeding
#: and raising are drawn more often than crashes and hangs, which cost a new
#: worker or a timeout each.
attempt_steps = st.one_of(
    st.just(("ok", 0.0)),
    st.tuples(st.just("ok"), st.floats(min_value=0.05, max_value=0.2)),
    st.just(("raise", 0.0)),
    st.sampled_from([("crash", 0.0), ("hang", 0.0)]),
)

#: One task: ``(max_attempts, steps)`` with one step per allowed attempt.
task_plans = st.integers(min_value=1, max_value=3).flatmap(
    lambda max_attempts: st.tuples(st.just(max_attempts), st.lists(attempt_steps, min_size=max_attempts, max_size=max_attempts))
)


def expected_outcome(max_attempts: int, steps: list[tuple[str, float]]) -> tuple[str, int, str | None]:
    """Return the terminal state, the number of attempts and the last error kind a plan must produce."""
    for number, (behaviour, _) in enumerate(steps, start=1):
        if behaviour == "ok":
            return "succeeded", number, None
        if number == max_attempts:
            kind, state = FAILURES[behaviour]
            return state, number, kind
    raise AssertionError(f"a plan has one step per attempt: {steps}")


def estimated_seconds(plans, ceiling: int) -> float:
    """Estimate a batch's run time: hangs wait out the timeout, crashes start a new worker."""
    cost = {"hang": TIMEOUT, "crash": 0.3}
    total = 0.0
    for max_attempts, steps in plans:
        _, attempts, _ = expected_outcome(max_attempts, steps)
        total += sum(cost.get(behaviour, seconds) for behaviour, seconds in steps[:attempts])
    return total / ceiling


def batch_text(log: Path, ceiling: int, plans) -> str:
    header = f"""
        [run]
        max_concurrent = {ceiling}
        timeout = {TIMEOUT}
        timeout_grace = {TIMEOUT_GRACE}

        [retry]
        policy = "fixed"
        delay = 0.01
        jitter = false
        """
    tables = [
        f"""
        [[tasks]]
        id = "task-{index}"
        call = "tests.faults.scripted:run"
        max_attempts = {max_attempts}
        kwargs = {{ log = {toml_string(log)}, behaviours = {[behaviour for behaviour, _ in steps]!r}, seconds = {[seconds for _, seconds in steps]!r} }}
        """
        for index, (max_attempts, steps) in enumerate(plans)
    ]
    return textwrap.dedent(header) + "".join(textwrap.dedent(table) for table in tables)


def peak_from_hooks(recorder: Recorder) -> int:
    """Replay the hook stream: an attempt runs from its on_start to its on_fail or successful on_terminal."""
    running = peak = 0
    for hook, _, details in recorder.events:
        if hook == "on_start":
            running += 1
            peak = max(peak, running)
        elif hook == "on_fail" or (hook == "on_terminal" and details.state == "succeeded"):
            running -= 1
    return peak


@pytest.mark.timeout(180)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ceiling=st.integers(min_value=1, max_value=4), plans=st.lists(task_plans, min_size=3, max_size=10))
def test_laws_hold_for_random_faulty_batches(ceiling, plans):
    # Batches estimated to run longer than 4 s are skipped, so the whole test stays short.
    assume(estimated_seconds(plans, ceiling) <= 4.0)
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "attempts.jsonl"
        config_path = Path(folder) / "batch.toml"
        config_path.write_text(batch_text(log, ceiling, plans), encoding="utf-8")
        config = load_config(config_path)
        manager = build_plugin_manager(config, story_mode="quiet")
        recorder = Recorder()
        manager.register(recorder, "recorder")

        summary = run_batch(config, manager=manager)
        attempts = read_attempts(log)

    # Law 1: no more attempts run at once than the ceiling, in the workers' records and in the supervisor's count.
    assert all(entry["end"] is not None for entry in attempts.values()), "an attempt wrote no end record"
    assert peak_overlap(list(attempts.values())) <= ceiling
    assert summary.peak_running <= ceiling
    assert peak_from_hooks(recorder) <= ceiling

    # Law 2: each task's attempts are numbered 1..n in time order and never overlap.
    by_task: dict[str, list[dict]] = defaultdict(list)
    for entry in attempts.values():
        by_task[entry["task"]].append(entry)
    for task_id, entries in by_task.items():
        entries.sort(key=lambda entry: entry["start"])
        assert [entry["attempt"] for entry in entries] == list(range(1, len(entries) + 1)), f"{task_id}: {entries}"
        assert all(entry["starts"] == 1 for entry in entries), f"{task_id}: an attempt number ran twice"
        for earlier, later in zip(entries, entries[1:]):
            assert earlier["end"] <= later["start"], f"{task_id}: attempt {later['attempt']} overlapped attempt {earlier['attempt']}"

    # Law 3: every task ends exactly once, in the state its script leads to.
    terminals = Counter(task_id for hook, task_id, _ in recorder.events if hook == "on_terminal")
    assert terminals == Counter(f"task-{index}" for index in range(len(plans)))
    outcomes = recorder.outcomes()
    starts = defaultdict(list)
    for hook, task_id, number in recorder.events:
        if hook == "on_start":
            starts[task_id].append(number)
    for index, (max_attempts, steps) in enumerate(plans):
        task_id = f"task-{index}"
        state, attempt_count, kind = expected_outcome(max_attempts, steps)
        outcome = outcomes[task_id]
        assert starts[task_id] == list(range(1, attempt_count + 1)), f"{task_id}: on_start numbers {starts[task_id]}"
        assert len(by_task[task_id]) == attempt_count, f"{task_id}: {len(by_task[task_id])} attempts recorded"
        assert outcome.state == state, f"{task_id}: {steps} with max_attempts {max_attempts} gave {outcome}"
        assert outcome.attempts == attempt_count, f"{task_id}: {outcome}"
        assert (outcome.error.kind if outcome.error else None) == kind, f"{task_id}: {outcome.error}"
    assert summary.tasks == len(plans)
