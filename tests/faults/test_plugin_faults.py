"""Plugins that misbehave: hooks that raise, async hooks, broken retry policies and slow hooks.

A notification hook that raises is logged and counted, and the other
plugins' implementations of that hook still run. A retry policy that raises
or returns an invalid delay stops only that task's retries. None of it may
break the laws of the run.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import Counter

import pytest

from batchrun import PluginError, hookimpl
from batchrun.config import load_config
from batchrun.runner import build_plugin_manager
from tests.faults.conftest import hook_names, toml_string
from tests.probe import peak_overlap, read_records


def probe_tasks(log, *, tasks: int, sleep: float, fail_attempts: int = 0) -> str:
    """Return ``[[tasks]]`` TOML for ``tasks`` probe tasks that fail their first ``fail_attempts`` attempts."""
    return f"""
        [[tasks]]
        id = "task-{{n}}"
        call = "tests.probe:record"
        matrix = {{ n = {list(range(tasks))} }}
        kwargs = {{ log = {toml_string(log)}, sleep = {sleep}, fail_attempts = {fail_attempts} }}
        """


def log_messages(caplog, prefix: str) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.getMessage().startswith(prefix)]


# -- notification hooks that raise ----------------------------------------------------------

RAISING_PLUGIN = '''
from batchrun import hookimpl


@hookimpl
def on_run_start(run):
    raise RuntimeError("notifier is down")
'''


@pytest.mark.timeout(60)
def test_raising_hook_logged_once_with_plugin(run_text, tmp_path, caplog):
    # A module name used by no other test, because the supervisor process caches imports.
    (tmp_path / "plugin_raising_on_run_start.py").write_text(RAISING_PLUGIN, encoding="utf-8")
    summary, recorder = run_text(
        """
        [run]
        max_concurrent = 1
        plugins = ["plugin_raising_on_run_start"]

        [[tasks]]
        id = "works"
        call = "tests.faults.tasks:sleep"
        kwargs = { seconds = 0.01 }
        """
    )

    failures = log_messages(caplog, "hook-failed")
    assert failures == ["hook-failed plugin=plugin_raising_on_run_start hook=on_run_start error=RuntimeError: notifier is down"]
    assert summary.plugin_errors == 1
    assert [hook for hook, _, _ in recorder.events].count("on_run_start") == 1, "the recorder's on_run_start did not run"
    assert recorder.outcomes()["works"].state == "succeeded"


class RaisesOnStart:
    @hookimpl
    def on_start(self, task):
        raise RuntimeError(f"cannot announce {task.id}")


@pytest.mark.timeout(60)
def test_raising_on_start_keeps_run_intact(run_text, tmp_path, caplog):
    log = tmp_path / "records.jsonl"
    summary, recorder = run_text(
        "[run]\nmax_concurrent = 2\n[retry]\npolicy = 'fixed'\ndelay = 0.01\n" + probe_tasks(log, tasks=6, sleep=0.05, fail_attempts=1),
        plugins=[("raises-on-start", RaisesOnStart())],
    )

    records = read_records(log)
    starts = [task_id for hook, task_id, _ in recorder.events if hook == "on_start"]
    terminals = Counter(task_id for hook, task_id, _ in recorder.events if hook == "on_terminal")
    assert len(records) == 12
    assert len(starts) == 12, "the recorder's on_start did not run for every attempt"
    assert summary.plugin_errors == 12
    assert peak_overlap(records) <= 2
    assert summary.peak_running <= 2
    assert terminals == Counter(f"task-{n}" for n in range(6))
    assert summary.states["succeeded"] == 6
    # Three failures are logged with a traceback, the rest counted in one line at the end.
    assert len(log_messages(caplog, "hook-failed plugin=raises-on-start hook=on_start error=RuntimeError")) == 3
    assert log_messages(caplog, "hook-failed plugin=raises-on-start hook=on_start raised") == [
        "hook-failed plugin=raises-on-start hook=on_start raised 12 times in this run"
    ]


class ExitsOnStart:
    @hookimpl
    def on_start(self, task):
        if task.id == "task-1":
            sys.exit("plugin wants out")


@pytest.mark.timeout(60)
def test_hook_calling_sys_exit_keeps_run_going(run_text, tmp_path, caplog):
    log = tmp_path / "records.jsonl"
    summary, recorder = run_text(
        "[run]\nmax_concurrent = 2\n" + probe_tasks(log, tasks=4, sleep=0.05),
        plugins=[("exits-on-start", ExitsOnStart())],
    )

    terminals = Counter(task_id for hook, task_id, _ in recorder.events if hook == "on_terminal")
    assert terminals == Counter(f"task-{n}" for n in range(4))
    assert summary.plugin_errors == 1
    assert len(log_messages(caplog, "hook-failed plugin=exits-on-start hook=on_start error=SystemExit")) == 1


# -- async hooks ------------------------------------------------------------------------------

ASYNC_PLUGIN = '''
from batchrun import hookimpl


@hookimpl
async def on_start(task):
    pass
'''

TRIVIAL_BATCH = """
    [run]
    max_concurrent = 1
    plugins = ["{plugin}"]

    [[tasks]]
    id = "works"
    call = "tests.faults.tasks:sleep"
    """


def test_async_hook_is_rejected_at_load(make_config, tmp_path):
    (tmp_path / "plugin_async_on_start.py").write_text(ASYNC_PLUGIN, encoding="utf-8")
    config = load_config(make_config(TRIVIAL_BATCH.format(plugin="plugin_async_on_start")))

    with pytest.raises(PluginError) as raised:
        build_plugin_manager(config)

    assert "plugin 'plugin_async_on_start'" in str(raised.value)
    assert "hook 'on_start' is written as 'async def'" in str(raised.value)


@pytest.mark.timeout(60)
def test_async_hook_makes_cli_exit_2(make_config, start_cli, tmp_path):
    (tmp_path / "plugin_async_on_start_cli.py").write_text(ASYNC_PLUGIN, encoding="utf-8")
    config_path = make_config(TRIVIAL_BATCH.format(plugin="plugin_async_on_start_cli"))

    cli = start_cli(config_path)
    code = cli.wait(timeout=30)

    assert code == 2
    assert "is written as 'async def'" in cli.stderr()


# -- broken retry policies -----------------------------------------------------------------


class BrokenPolicy:
    """A retry policy named "custom" whose ``retry_delay`` raises or returns ``delay``."""

    def __init__(self, delay: object) -> None:
        self.delay = delay

    @hookimpl
    def retry_policy_names(self):
        return ["custom"]

    @hookimpl
    def retry_delay(self, task):
        if task.retry.policy != "custom":
            return None
        if self.delay == "raise":
            raise ZeroDivisionError("policy arithmetic failed")
        if self.delay == "exit":
            sys.exit("policy gave up")
        return self.delay


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("delay", "logged"),
    [
        pytest.param("raise", "retry-policy-failed task=flaky attempt=1/3 policy=custom error=ZeroDivisionError", id="raises"),
        pytest.param(-1, "retry-policy-invalid task=flaky attempt=1/3 policy=custom: returned -1", id="negative"),
        pytest.param(math.nan, "retry-policy-invalid task=flaky attempt=1/3 policy=custom: returned nan", id="nan"),
        pytest.param("soon", "retry-policy-invalid task=flaky attempt=1/3 policy=custom: returned 'soon'", id="string"),
        pytest.param("exit", "retry-policy-failed task=flaky attempt=1/3 policy=custom error=SystemExit", id="sys-exit"),
    ],
)
def test_broken_retry_policy_stops_task_retries(run_text, tmp_path, caplog, delay, logged):
    log = tmp_path / "records.jsonl"
    summary, recorder = run_text(
        f"""
        [run]
        max_concurrent = 1

        [retry]
        policy = "custom"
        max_attempts = 3

        [[tasks]]
        id = "flaky"
        call = "tests.probe:record"
        kwargs = {{ log = {toml_string(log)}, fail_attempts = 9 }}
        """,
        plugins=[("broken-policy", BrokenPolicy(delay))],
    )

    outcome = recorder.outcomes()["flaky"]
    assert hook_names(recorder, "flaky") == ["on_start", "on_fail", "on_terminal"]
    assert outcome.state == "failed"
    assert outcome.attempts == 1
    assert len(read_records(log)) == 1
    assert len(log_messages(caplog, logged)) == 1, [record.getMessage() for record in caplog.records]
    assert summary.plugin_errors == 1


# -- slow hooks ------------------------------------------------------------------------------


class SlowOnStart:
    @hookimpl
    def on_start(self):
        time.sleep(0.2)


@pytest.mark.timeout(60)
def test_slow_hook_keeps_ceiling(run_text, tmp_path):
    log = tmp_path / "records.jsonl"
    summary, recorder = run_text(
        "[run]\nmax_concurrent = 2\n[retry]\npolicy = 'fixed'\ndelay = 0.01\n" + probe_tasks(log, tasks=6, sleep=0.05, fail_attempts=1),
        plugins=[("slow-on-start", SlowOnStart())],
    )

    records = read_records(log)
    assert len(records) == 12
    assert peak_overlap(records) <= 2
    assert summary.peak_running <= 2
    assert summary.states["succeeded"] == 6
    assert len(recorder.outcomes()) == 6
