"""Tests of the three laws of a run, checked against what the workers recorded.

The workload is :mod:`tests.probe`: every attempt appends one JSON line with
the worker's own monotonic start and end times. ``CLOCK_MONOTONIC`` is shared
by all processes on Linux, so intervals from different workers compare
directly. The hook recorder adds the supervisor's side of the same run.

1. Concurrency is a hard ceiling: never more than ``max_concurrent`` attempts
   run at once, retries included.
2. One live attempt per task: a task's attempts never overlap, and every
   attempt calls the function again.
3. Everything ends: every task reaches exactly one terminal state.
"""

from __future__ import annotations

import json
import re
import tempfile
import textwrap
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchrun.config import load_config
from batchrun.runner import build_plugin_manager, run_batch
from tests.conftest import Recorder
from tests.probe import peak_overlap, read_records


CEILINGS = [1, 2, 3, 5]

#: Hook names shortened to one letter, so the order of a task's hooks can be
#: matched with a regular expression.
HOOK_LETTERS = {"on_start": "S", "on_fail": "F", "on_retry": "R", "on_terminal": "T"}

#: A task's hooks: a start, then for every retry a fail, a retry and a new
#: start, then a fail if the last attempt failed, then one terminal.
TASK_HOOK_ORDER = re.compile(r"S(FRS)*F?T")




def toml_string(value: object) -> str:
    """Quote ``value`` as a TOML basic string, which JSON string syntax also is."""
    return json.dumps(str(value))


def probe_batch(log: Path, *, ceiling: int, tasks: int, sleep: float, fail_attempts: int = 0, max_attempts: int = 3) -> str:
    """Return a batch of ``tasks`` probe tasks that fail their first ``fail_attempts`` attempts."""
    return f"""
        [run]
        max_concurrent = {ceiling}

        [retry]
        policy = "fixed"
        delay = 0.01
        jitter = false
        max_attempts = {max_attempts}

        [[tasks]]
        id = "task-{{n}}"
        call = "tests.probe:record"
        matrix = {{ n = {list(range(tasks))} }}
        kwargs = {{ log = {toml_string(log)}, sleep = {sleep}, fail_attempts = {fail_attempts} }}
    """


def run_recorded(config_path: Path, recorder: Recorder):
    """Run the batch at ``config_path`` with ``recorder`` registered and return the summary."""
    config = load_config(config_path)
    manager = build_plugin_manager(config, story_mode="quiet")
    manager.register(recorder, "recorder")
    return run_batch(config, manager=manager)


def records_by_task(records: list[dict]) -> dict[str, list[dict]]:
    """Group probe records by task id, each group sorted by start time."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        groups[record["task"]].append(record)
    for group in groups.values():
        group.sort(key=lambda record: record["start"])
    return groups


def peak_from_hooks(recorder: Recorder) -> int:
    """Replay the hook stream and return the highest number of attempts it shows running at once.

    An attempt counts from its ``on_start`` to its ``on_fail``, or to the
    ``on_terminal`` of a success. Each change of the supervisor's count of
    running attempts comes with one of these hooks, in order, so the replay
    is the supervisor's view.
    """
    running = peak = 0
    for hook, _, details in recorder.events:
        if hook == "on_start":
            running += 1
            peak = max(peak, running)
        elif hook == "on_fail" or (hook == "on_terminal" and details.state == "succeeded"):
            running -= 1
    return peak


def check_attempts_disjoint(task_id: str, group: list[dict]) -> None:
    """Assert that a task's recorded attempts are numbered 1..n in time order and never overlap."""
    numbers = [record["attempt"] for record in group]
    assert numbers == list(range(1, len(group) + 1)), f"{task_id}: attempt numbers in time order are {numbers}"
    for earlier, later in zip(group, group[1:]):
        assert earlier["end"] <= later["start"], (
            f"{task_id}: attempt {later['attempt']} started at {later['start']} "
            f"before attempt {earlier['attempt']} ended at {earlier['end']}"
        )


def check_task_hooks(recorder: Recorder, task_id: str) -> None:
    """Assert the order of one task's hooks and that their attempt numbers agree."""
    events = recorder.for_task(task_id)
    letters = "".join(HOOK_LETTERS[hook] for hook, _, _ in events)
    assert TASK_HOOK_ORDER.fullmatch(letters), f"{task_id}: hook order {letters} does not match S(FRS)*F?T"

    started = [details for hook, _, details in events if hook == "on_start"]
    assert started == list(range(1, len(started) + 1)), f"{task_id}: on_start attempt numbers {started}"

    current = 0
    for hook, _, details in events:
        if hook == "on_start":
            current = details
        elif hook in ("on_fail", "on_retry"):
            assert details[0] == current, f"{task_id}: {hook} names attempt {details[0]}, but attempt {current} ran"

    outcome = events[-1][2]
    assert outcome.attempts == len(started), f"{task_id}: outcome counts {outcome.attempts} attempts, {len(started)} started"
    ends_with_fail = letters.endswith("FT")
    assert ends_with_fail == (outcome.state != "succeeded"), f"{task_id}: state {outcome.state} after hooks {letters}"


# -- law 1: the ceiling ------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ceiling", CEILINGS)
def test_ceiling_holds_in_worker_records(make_config, recorder, tmp_path, ceiling):
    log = tmp_path / "records.jsonl"
    config_path = make_config(probe_batch(log, ceiling=ceiling, tasks=12, sleep=0.05))

    summary = run_recorded(config_path, recorder)

    records = read_records(log)
    assert len(records) == 12
    assert peak_overlap(records) <= ceiling
    if ceiling > 1:
        # Without overlap the check above would prove nothing.
        assert peak_overlap(records) >= 2, "the attempts never ran in parallel"
    assert summary.states["succeeded"] == 12


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ceiling", CEILINGS)
def test_ceiling_holds_while_tasks_retry(make_config, recorder, tmp_path, ceiling):
    log = tmp_path / "records.jsonl"
    config_path = make_config(probe_batch(log, ceiling=ceiling, tasks=10, sleep=0.03, fail_attempts=2))

    summary = run_recorded(config_path, recorder)

    records = read_records(log)
    assert len(records) == 30, "each task should run three attempts"
    assert sum(record["failed"] for record in records) == 20
    assert peak_overlap(records) <= ceiling
    assert summary.states["succeeded"] == 10


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ceiling", [1, 3])
def test_ceiling_summary_peak_matches_supervisor(make_config, recorder, tmp_path, ceiling):
    log = tmp_path / "records.jsonl"
    config_path = make_config(probe_batch(log, ceiling=ceiling, tasks=9, sleep=0.03, fail_attempts=1))

    summary = run_recorded(config_path, recorder)

    assert summary.max_concurrent == ceiling
    assert 1 <= summary.peak_running <= ceiling
    assert summary.peak_running == peak_from_hooks(recorder), "summary peak differs from the hook stream's peak"
    assert recorder.summary == summary, "on_run_end received a different summary than run_batch returned"
    assert summary.attempts == len(read_records(log))


# -- law 2: one live attempt per task ------------------------------------------------------


@pytest.mark.timeout(60)
def test_attempts_of_task_never_overlap(make_config, recorder, tmp_path):
    log = tmp_path / "records.jsonl"
    config_path = make_config(probe_batch(log, ceiling=3, tasks=12, sleep=0.03, fail_attempts=2))

    run_recorded(config_path, recorder)

    groups = records_by_task(read_records(log))
    assert len(groups) == 12
    for task_id, group in groups.items():
        check_attempts_disjoint(task_id, group)


@pytest.mark.timeout(60)
def test_attempts_each_call_function_again(make_config, recorder, tmp_path):
    log = tmp_path / "records.jsonl"
    config_path = make_config(probe_batch(log, ceiling=3, tasks=6, sleep=0.02, fail_attempts=9, max_attempts=4))

    run_recorded(config_path, recorder)

    groups = records_by_task(read_records(log))
    outcomes = recorder.outcomes()
    for task_id, group in groups.items():
        assert len(group) == 4, f"{task_id}: 4 attempts allowed, {len(group)} recorded"
        assert len({record["start"] for record in group}) == 4, f"{task_id}: attempts share a start time"
        assert outcomes[task_id].attempts == 4
        assert outcomes[task_id].state == "failed"


# -- law 3: everything ends -----------------------------------------------------------------

FAILURE_TASKS = '''
    import os
    import threading
    import time

    import batchrun


    def crash():
        os._exit(3)


    def ignore_timeout():
        # Swallows the soft timeout, so only the supervisor's hard kill ends it.
        while True:
            try:
                time.sleep(10)
            except batchrun.AttemptTimeoutError:
                pass


    def unpicklable():
        return threading.Lock()
'''


@pytest.mark.timeout(60)
def test_terminal_once_for_every_failure_kind(make_config, recorder, tmp_path):
    log = tmp_path / "records.jsonl"
    module = "laws_failure_tasks"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(FAILURE_TASKS), encoding="utf-8")
    config_path = make_config(
        f"""
        [run]
        max_concurrent = 3
        timeout_grace = 0.2

        [retry]
        policy = "fixed"
        delay = 0.01
        jitter = false
        max_attempts = 2

        [[tasks]]
        id = "ok"
        call = "tests.probe:record"
        kwargs = {{ log = {toml_string(log)}, sleep = 0.02 }}

        [[tasks]]
        id = "raises"
        call = "tests.probe:record"
        kwargs = {{ log = {toml_string(log)}, fail_attempts = 9 }}

        [[tasks]]
        id = "crashes"
        call = "{module}:crash"

        [[tasks]]
        id = "soft-timeout"
        call = "tests.probe:record"
        kwargs = {{ log = {toml_string(log)}, sleep = 5.0 }}
        timeout = 0.1

        [[tasks]]
        id = "hard-timeout"
        call = "{module}:ignore_timeout"
        timeout = 0.1

        [[tasks]]
        id = "unpicklable"
        call = "{module}:unpicklable"
        """
    )

    summary = run_recorded(config_path, recorder)

    expected = {
        "ok": ("succeeded", None),
        "raises": ("failed", "exception"),
        "crashes": ("failed", "crash"),
        "soft-timeout": ("timed-out", "timeout"),
        "hard-timeout": ("timed-out", "timeout"),
        "unpicklable": ("failed", "payload"),
    }
    terminals = Counter(task_id for hook, task_id, _ in recorder.events if hook == "on_terminal")
    assert terminals == Counter(expected.keys()), "each task needs exactly one on_terminal"
    outcomes = recorder.outcomes()
    for task_id, (state, kind) in expected.items():
        assert outcomes[task_id].state == state, f"{task_id}: {outcomes[task_id]}"
        error_kind = outcomes[task_id].error.kind if outcomes[task_id].error else None
        assert error_kind == kind, f"{task_id}: {outcomes[task_id].error}"
    assert summary.tasks == len(expected)
    assert summary.states == {"succeeded": 1, "failed": 3, "timed-out": 2, "cancelled": 0}
    assert summary.peak_running <= 3, "replaced workers must not raise the ceiling"


@pytest.mark.timeout(60)
def test_terminal_once_per_task_with_retries(make_config, recorder, tmp_path):
    log = tmp_path / "records.jsonl"
    config_path = make_config(
        f"""
        [run]
        max_concurrent = 3

        [retry]
        policy = "fixed"
        delay = 0.01
        jitter = false
        max_attempts = 3
        retry_on = ["ConnectionError"]

        [[tasks]]
        id = "fails-{{n}}-times"
        call = "tests.probe:record"
        matrix = {{ n = [0, 1, 2, 3] }}
        kwargs = {{ log = {toml_string(log)}, sleep = 0.02, fail_attempts = "{{n}}" }}

        [[tasks]]
        id = "not-retried"
        call = "tests.probe:record"
        kwargs = {{ log = {toml_string(log)}, fail_attempts = 1, error = "ValueError" }}
        """
    )

    summary = run_recorded(config_path, recorder)

    task_ids = ["fails-0-times", "fails-1-times", "fails-2-times", "fails-3-times", "not-retried"]
    terminals = Counter(task_id for hook, task_id, _ in recorder.events if hook == "on_terminal")
    assert terminals == Counter(task_ids)
    assert summary.tasks == len(task_ids)
    assert summary.states["succeeded"] == 3
    assert summary.states["failed"] == 2
    assert set(summary.unsuccessful) == {"fails-3-times", "not-retried"}


# -- hook order -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_hook_order_per_task(make_config, recorder, tmp_path):
    log = tmp_path / "records.jsonl"
    config_path = make_config(
        f"""
        [run]
        max_concurrent = 3

        [retry]
        policy = "fixed"
        delay = 0.01
        jitter = false
        max_attempts = 3

        [[tasks]]
        id = "task-{{n}}-fails-{{f}}"
        call = "tests.probe:record"
        matrix = {{ n = [1, 2, 3], f = [0, 1, 2, 5] }}
        kwargs = {{ log = {toml_string(log)}, sleep = 0.02, fail_attempts = "{{f}}" }}
        """
    )

    run_recorded(config_path, recorder)

    hooks = [hook for hook, _, _ in recorder.events]
    assert hooks[0] == "on_run_start"
    assert hooks[-1] == "on_run_end"
    assert hooks.count("on_run_start") == 1
    assert hooks.count("on_run_end") == 1
    task_ids = {task_id for _, task_id, _ in recorder.events if task_id is not None}
    assert len(task_ids) == 12
    for task_id in sorted(task_ids):
        check_task_hooks(recorder, task_id)


# -- all laws on generated batches ------------------------------------------------------------

task_plans = st.lists(
    st.tuples(st.integers(min_value=0, max_value=3), st.integers(min_value=1, max_value=3)),
    min_size=1,
    max_size=8,
)


@pytest.mark.timeout(60)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ceiling=st.integers(min_value=1, max_value=4), plans=task_plans)
def test_laws_hold_for_generated_batches(ceiling, plans):
    """Each plan is (failing leading attempts, max_attempts) of one task."""
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "records.jsonl"
        tables = [
            f"""
            [[tasks]]
            id = "task-{index}"
            call = "tests.probe:record"
            max_attempts = {max_attempts}
            kwargs = {{ log = {toml_string(log)}, sleep = 0.01, fail_attempts = {fail_attempts} }}
            """
            for index, (fail_attempts, max_attempts) in enumerate(plans)
        ]
        config_path = Path(folder) / "batch.toml"
        text = f'[run]\nmax_concurrent = {ceiling}\n[retry]\npolicy = "fixed"\ndelay = 0.01\njitter = false\n'
        config_path.write_text(text + "".join(textwrap.dedent(table) for table in tables), encoding="utf-8")
        recorder = Recorder()

        summary = run_recorded(config_path, recorder)
        records = read_records(log)

    assert peak_overlap(records) <= ceiling
    assert summary.peak_running <= ceiling
    groups = records_by_task(records)
    outcomes = recorder.outcomes()
    assert len(outcomes) == len(plans)
    for index, (fail_attempts, max_attempts) in enumerate(plans):
        task_id = f"task-{index}"
        expected_attempts = min(fail_attempts + 1, max_attempts)
        assert len(groups[task_id]) == expected_attempts, f"{task_id}: {groups[task_id]}"
        check_attempts_disjoint(task_id, groups[task_id])
        check_task_hooks(recorder, task_id)
        expected_state = "succeeded" if fail_attempts < max_attempts else "failed"
        assert outcomes[task_id].state == expected_state
