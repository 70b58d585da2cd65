"""Tests of the ``batchrun`` command line, run as ``python -m batchrun`` in a child process.

Each run starts in the project root, so workers import :mod:`tests.probe`
from the current folder, while configs and plugin modules live in
``tmp_path``, the config file's folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import psutil
import pytest

from tests.probe import peak_overlap, read_records


ROOT = Path(__file__).resolve().parent.parent

#: Seconds a command may run before the test fails it; far above the longest run here.
COMMAND_TIMEOUT = 50


def run_cli(*arguments: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m batchrun`` with ``arguments`` in the project root and return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "batchrun", *map(str, arguments)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def toml_string(value: object) -> str:
    """Quote ``value`` as a TOML basic string, which JSON string syntax also is."""
    return json.dumps(str(value))


def write_module(folder: Path, name: str, source: str) -> str:
    """Write ``source`` to ``folder/name.py`` and return ``name``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    return name


def probe_tasks(log: Path, *, count: int, sleep: float = 0.0, fail_attempts: int = 0) -> str:
    """Return a [[tasks]] table of ``count`` probe tasks."""
    return f"""
        [[tasks]]
        id = "task-{{n}}"
        call = "tests.probe:record"
        matrix = {{ n = {list(range(count))} }}
        kwargs = {{ log = {toml_string(log)}, sleep = {sleep}, fail_attempts = {fail_attempts} }}
    """


RETRY_FIXED = """
    [retry]
    policy = "fixed"
    delay = 0.01
    jitter = false
"""

#: A hook plugin that writes the run's plugin names and task count next to its own file.
MARKER_PLUGIN = """
    import json
    from pathlib import Path

    from batchrun import hookimpl

    MARKER = Path(__file__).with_suffix(".json")


    @hookimpl
    def on_run_start(run):
        MARKER.write_text(json.dumps({"plugins": list(run.plugins)}))


    @hookimpl
    def on_run_end(summary):
        data = json.loads(MARKER.read_text())
        data["tasks"] = summary.tasks
        MARKER.write_text(json.dumps(data))
"""


def read_marker(folder: Path, module: str) -> dict:
    """Return what the marker plugin ``module`` in ``folder`` wrote, or an empty dict if its hooks never ran."""
    marker = folder / f"{module}.json"
    if not marker.exists():
        return {}
    return json.loads(marker.read_text(encoding="utf-8"))


def is_running(pid: int) -> bool:
    """Return whether a process with ``pid`` exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- exit codes -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_cli_all_succeeded_exits_0(make_config, tmp_path):
    log = tmp_path / "records.jsonl"
    config_path = make_config("[run]\nmax_concurrent = 2\n" + probe_tasks(log, count=4, sleep=0.02))

    result = run_cli("run", config_path)

    assert result.returncode == 0, result.stderr
    assert len(read_records(log)) == 4
    assert "SUMMARY" in result.stderr


@pytest.mark.timeout(60)
def test_cli_leaves_no_worker_running(make_config, tmp_path):
    log = tmp_path / "records.jsonl"
    config_path = make_config("[run]\nmax_concurrent = 3\n" + probe_tasks(log, count=6, sleep=0.02))

    result = run_cli("run", config_path)

    assert result.returncode == 0, result.stderr
    worker_pids = {record["pid"] for record in read_records(log)}
    assert worker_pids, "no attempt was recorded"
    for pid in sorted(worker_pids):
        assert not is_running(pid), f"worker {pid} still runs after the command exited"


@pytest.mark.timeout(60)
def test_cli_task_failure_exits_1(make_config, tmp_path):
    log = tmp_path / "records.jsonl"
    config_path = make_config(
        f"""
        [retry]
        policy = "none"

        [[tasks]]
        id = "ok"
        call = "tests.probe:record"
        kwargs = {{ log = {toml_string(log)} }}

        [[tasks]]
        id = "fails"
        call = "tests.probe:record"
        kwargs = {{ log = {toml_string(log)}, fail_attempts = 1 }}
        """
    )

    result = run_cli("run", config_path)

    assert result.returncode == 1, result.stderr
    assert "GAVE UP fails" in result.stderr


CONFIG_ERRORS = [
    pytest.param('[run]\nmax_concurent = 2\n[[tasks]]\nid = "a"\ncall = "tests.probe:record"\n', [], ["max_concurent"], id="unknown-key"),
    pytest.param('[run\nname = "broken"\n', [], ["invalid TOML", "line 1"], id="toml-syntax"),
    pytest.param(None, [], ["missing.toml", "not found"], id="missing-file"),
    pytest.param('[[tasks]]\nid = "a"\ncall = "tests.probe:record"\n', ["--max-concurrent", "0"], ["--max-concurrent", "0"], id="max-concurrent-zero"),
    pytest.param('[[tasks]]\nid = "a"\ncall = "tests.probe:record"\n', ["--max-concurrent", "x"], ["--max-concurrent", "'x'"], id="max-concurrent-text"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("text", "options", "fragments"), CONFIG_ERRORS)
def test_cli_config_error_exits_2(tmp_path, text, options, fragments):
    config_path = tmp_path / ("missing.toml" if text is None else "batch.toml")
    if text is not None:
        config_path.write_text(text, encoding="utf-8")

    result = run_cli("run", config_path, *options)

    assert result.returncode == 2, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in stderr: {result.stderr}"
    if text is not None and not options:
        assert str(config_path) in result.stderr, "the message must name the config file"
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("arguments", [["--help"], ["run", "--help"]], ids=["batchrun", "batchrun-run"])
def test_cli_help_exits_0(arguments):
    result = run_cli(*arguments)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: batchrun")


# -- overrides ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_cli_max_concurrent_overrides_config(make_config, tmp_path):
    log = tmp_path / "records.jsonl"
    config_path = make_config("[run]\nmax_concurrent = 4\n" + probe_tasks(log, count=8, sleep=0.05))

    result = run_cli("run", config_path, "--max-concurrent", 2)

    assert result.returncode == 0, result.stderr
    records = read_records(log)
    assert len(records) == 8
    # Every slot gets a task before any slot gets a second one, so the
    # number of worker pids is the number of slots.
    assert len({record["pid"] for record in records}) == 2, "--max-concurrent 2 means two workers"
    assert peak_overlap(records) <= 2


@pytest.mark.timeout(60)
def test_cli_max_attempts_overrides_config(make_config, tmp_path):
    log = tmp_path / "records.jsonl"
    module = write_module(
        tmp_path,
        "cli_max_attempts_source",
        """
        def generate(log):
            yield {"id": "from-source", "call": "tests.probe:record", "max_attempts": 6, "kwargs": {"log": log, "fail_attempts": 9}}
        """,
    )
    config_path = make_config(
        f"""
        {RETRY_FIXED}
        max_attempts = 5

        [[tasks]]
        id = "from-retry-table"
        call = "tests.probe:record"
        kwargs = {{ log = {toml_string(log)}, fail_attempts = 9 }}

        [[tasks]]
        id = "own-limit"
        call = "tests.probe:record"
        max_attempts = 4
        kwargs = {{ log = {toml_string(log)}, fail_attempts = 9 }}

        [[sources]]
        call = "{module}:generate"
        kwargs = {{ log = {toml_string(log)} }}
        """
    )

    result = run_cli("run", config_path, "--max-attempts", 2)

    assert result.returncode == 1, result.stderr
    attempts = Counter(record["task"] for record in read_records(log))
    assert attempts == {"from-retry-table": 2, "own-limit": 2, "from-source": 2}, "--max-attempts 2 overrides every max_attempts"


# -- plugin loading -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_cli_plugin_from_run_table(make_config, tmp_path):
    log = tmp_path / "records.jsonl"
    module = write_module(tmp_path, "cli_plugin_run_table", MARKER_PLUGIN)
    config_path = make_config(f'[run]\nplugins = ["{module}"]\n' + probe_tasks(log, count=2))

    result = run_cli("run", config_path)

    assert result.returncode == 0, result.stderr
    marker = read_marker(tmp_path, module)
    assert module in marker.get("plugins", []), f"plugin hooks did not run: {marker}"
    assert marker["tasks"] == 2


@pytest.mark.timeout(60)
def test_cli_plugin_from_option(make_config, tmp_path):
    log = tmp_path / "records.jsonl"
    module = write_module(tmp_path, "cli_plugin_option", MARKER_PLUGIN)
    config_path = make_config(probe_tasks(log, count=2))

    result = run_cli("run", config_path, "-p", module)

    assert result.returncode == 0, result.stderr
    marker = read_marker(tmp_path, module)
    assert module in marker.get("plugins", []), f"plugin hooks did not run: {marker}"
    assert marker["tasks"] == 2


@pytest.mark.timeout(60)
def test_cli_plugin_from_entry_point(make_config, tmp_path):
    log = tmp_path / "records.jsonl"
    site = tmp_path / "site"
    module = write_module(site, "cli_plugin_entry_point", MARKER_PLUGIN)
    # An installed distribution as importlib.metadata finds it on sys.path.
    dist_info = site / "cli_plugin_dist-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: cli-plugin-dist\nVersion: 0.1\n", encoding="utf-8")
    (dist_info / "entry_points.txt").write_text(f"[batchrun]\nmyplug = {module}\n", encoding="utf-8")
    config_path = make_config(probe_tasks(log, count=2))
    env = {**os.environ, "PYTHONPATH": str(site)}

    result = run_cli("run", config_path, env=env)

    assert result.returncode == 0, result.stderr
    marker = read_marker(site, module)
    assert "myplug" in marker.get("plugins", []), f"entry point hooks did not run: {marker}"
    assert marker["tasks"] == 2


PLUGIN_LISTED_TWICE = [
    pytest.param('["{module}", "{module}"]', [], "listed twice", id="run-table"),
    pytest.param('["{module}"]', ["-p", "{module}"], "already listed", id="run-table-and-option"),
    pytest.param("[]", ["-p", "{module}", "-p", "{module}"], "given twice", id="option"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("listed", "options", "fragment"), PLUGIN_LISTED_TWICE)
def test_cli_plugin_listed_twice_exits_2(make_config, tmp_path, listed, options, fragment):
    log = tmp_path / "records.jsonl"
    module = write_module(tmp_path, "cli_plugin_twice", MARKER_PLUGIN)
    config_path = make_config(f"[run]\nplugins = {listed.format(module=module)}\n" + probe_tasks(log, count=1))

    result = run_cli("run", config_path, *(option.format(module=module) for option in options))

    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr
    assert module in result.stderr
    assert "Traceback" not in result.stderr
    assert read_records(log) == [], "no task may run when the config is invalid"


# -- the demo batch -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_cli_demo_batch_exits_1_with_story(tmp_path):
    # The journal goes to tmp_path, so the run leaves nothing in the project tree.
    result = run_cli("run", "configs/batch.toml", "--journal", tmp_path / "demo.sqlite")

    assert result.returncode == 1, result.stderr
    for word in ("STARTING", "FAILED", "RETRYING", "SUCCEEDED", "GAVE UP", "SUMMARY"):
        assert word in result.stderr, f"no {word} line in the demo's log"
    assert "GAVE UP fetch-down" in result.stderr
    assert "Traceback" not in result.stderr
