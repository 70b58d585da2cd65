"""Tests of ``batchrun status`` and ``batchrun results``: what they print, and which journal they read.

One real run of five tasks (two quick, one slow, one that succeeds on its
retry, one that fails for good) is made once per module and read back by
most tests. Target resolution is tested in this process through
:mod:`batchrun.status` and :func:`batchrun.cli.main`, with ``monkeypatch.chdir``
for the default ``./.batchrun/`` folder.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from batchrun import cli, status
from batchrun.errors import ConfigError, UsageError
from batchrun.journal import JournalError


ROOT = Path(__file__).resolve().parents[1]

#: Seconds a command may run before the test fails it; far above the longest run here.
COMMAND_TIMEOUT = 60

RETRY_FIXED = """
[retry]
policy = "fixed"
delay = 0.01
jitter = false
max_attempts = 2
"""


def run_cli(*arguments: object) -> subprocess.CompletedProcess[str]:
    """Run ``python -m batchrun`` with ``arguments`` in the project root and return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "batchrun", *map(str, arguments)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def toml_string(value: object) -> str:
    """Quote ``value`` as a TOML basic string; JSON string syntax is valid TOML."""
    return json.dumps(str(value))


def probe_task(task_id: str, log: Path, **kwargs: object) -> str:
    """Return a ``[[tasks]]`` table that runs :func:`tests.probe.record` with ``kwargs``."""
    pairs = ", ".join([f"log = {toml_string(log)}", *(f"{key} = {json.dumps(value)}" for key, value in kwargs.items())])
    return f'\n[[tasks]]\nid = "{task_id}"\ncall = "tests.probe:record"\nkwargs = {{ {pairs} }}\n'


def report_batch(folder: Path, name: str = "report", extra_run_keys: str = "") -> Path:
    """Write the five-task batch to ``folder/<name>.toml`` and return its path."""
    log = folder / "records.jsonl"
    text = f'[run]\nname = "{name}"\nmax_concurrent = 2\n{extra_run_keys}' + RETRY_FIXED
    text += probe_task("quick-1", log, sleep=0.01, value="q1")
    text += probe_task("quick-2", log, sleep=0.01, value="q2")
    text += probe_task("slow", log, sleep=0.4, value=["big", 3])
    text += probe_task("flaky", log, fail_attempts=1)
    text += probe_task("broken", log, fail_attempts=5, error="ValueError")
    config_path = folder / f"{name}.toml"
    config_path.write_text(text, encoding="utf-8")
    return config_path


@pytest.fixture(scope="module")
def report_run(tmp_path_factory):
    """Run the five-task batch once through the command line; return its config and journal paths."""
    folder = tmp_path_factory.mktemp("report")
    config_path = report_batch(folder)

    result = run_cli("run", config_path)

    assert result.returncode == 1, result.stderr
    return config_path, folder / ".batchrun" / "report.sqlite"


def read_status(target: str | None) -> str:
    buffer = io.StringIO()
    code = status.show_status(target, output=buffer)
    assert code == 0
    return buffer.getvalue()


# -- status -------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_status_command_prints_run_summary(report_run):
    config_path, journal = report_run

    result = run_cli("status", config_path)
    lines = result.stdout.splitlines()

    assert result.returncode == 0, result.stderr
    assert lines[0] == f"run 'report' (run 1 in {journal}): finished"
    assert "1 supervisor session, ended" in lines[1]
    assert lines[2] == "  tasks: 4 succeeded, 1 failed, 0 timed-out, 0 cancelled, 0 unfinished (tasks not reached yet are not counted)"
    assert lines[3] == "  attempts started: 7"


@pytest.mark.timeout(60)
def test_status_lists_slowest_tasks_first(report_run):
    config_path, _ = report_run

    lines = read_status(str(config_path)).splitlines()
    at = lines.index("slowest tasks (last attempt):")
    slowest = lines[at + 1 : at + 6]

    assert slowest[0].startswith("  slow: 0.4")
    assert slowest[0].endswith(" s (succeeded)")
    assert len(slowest) == 5
    assert {line.split(":")[0].strip() for line in slowest} == {"slow", "quick-1", "quick-2", "flaky", "broken"}


@pytest.mark.timeout(60)
def test_status_lists_failures_with_error_text(report_run):
    config_path, _ = report_run

    lines = read_status(str(config_path)).splitlines()
    at = lines.index("tasks that did not succeed:")

    assert lines[at + 1:] == ["  broken: failed after 2 attempts: ValueError: probe failure of broken attempt 2"]


@pytest.mark.timeout(60)
def test_status_reads_journal_path_like_config(report_run):
    config_path, journal = report_run

    assert read_status(str(journal)) == read_status(str(config_path))


@pytest.mark.timeout(60)
def test_status_shows_unfinished_tasks_of_stopped_run(make_config, tmp_path):
    log = tmp_path / "records.jsonl"
    config_path = make_config('[run]\nname = "cut"\nmax_concurrent = 1\n' + probe_task("slow", log, sleep=1.0) + probe_task("later", log))

    stopped = run_cli("run", config_path, "--deadline", "0.5")
    lines = read_status(str(config_path)).splitlines()

    assert stopped.returncode == 3, stopped.stderr
    assert lines[0].endswith(": stopped, stopped by deadline")
    assert "2 cancelled" in lines[2]
    assert any(line.startswith("  later: cancelled after 0 attempts: CancelledError") for line in lines)


# -- results ------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_status_results_jsonl_rows(report_run):
    config_path, _ = report_run

    result = run_cli("results", config_path, "--format", "jsonl")
    rows = {row["task"]: row for row in map(json.loads, result.stdout.splitlines())}

    assert result.returncode == 0, result.stderr
    assert sorted(rows) == ["broken", "flaky", "quick-1", "quick-2", "slow"]
    assert rows["slow"]["result"] == {"task": "slow", "attempt": 1, "value": ["big", 3]}
    assert rows["slow"]["result_format"] == "json"
    assert rows["slow"]["state"] == "succeeded"
    assert rows["slow"]["error"] is None
    assert rows["slow"]["duration"] >= 0.4
    assert rows["flaky"]["attempts"] == 2
    assert rows["flaky"]["result"] == {"task": "flaky", "attempt": 2, "value": None}
    assert rows["broken"]["state"] == "failed"
    assert rows["broken"]["attempts"] == 2
    assert rows["broken"]["result"] is None
    assert rows["broken"]["error"] == "ValueError: probe failure of broken attempt 2"


@pytest.mark.timeout(60)
def test_status_results_default_format_is_jsonl(report_run):
    config_path, _ = report_run

    default = run_cli("results", config_path)
    explicit = run_cli("results", config_path, "--format", "jsonl")

    assert default.returncode == 0, default.stderr
    assert default.stdout == explicit.stdout


@pytest.mark.timeout(60)
def test_status_results_csv_header_and_rows(report_run):
    config_path, _ = report_run

    result = run_cli("results", config_path, "--format", "csv")
    rows = list(csv.reader(io.StringIO(result.stdout)))
    by_task = {row[0]: row for row in rows[1:]}

    assert result.returncode == 0, result.stderr
    assert rows[0] == ["task", "state", "attempts", "duration", "result", "error"]
    assert sorted(by_task) == ["broken", "flaky", "quick-1", "quick-2", "slow"]
    assert by_task["quick-1"][1:3] == ["succeeded", "1"]
    assert json.loads(by_task["quick-1"][4]) == {"task": "quick-1", "attempt": 1, "value": "q1"}
    assert by_task["quick-1"][5] == ""
    assert float(by_task["slow"][3]) >= 0.4
    assert by_task["broken"][1:3] == ["failed", "2"]
    assert by_task["broken"][4] == ""
    assert by_task["broken"][5] == "ValueError: probe failure of broken attempt 2"


@pytest.mark.timeout(60)
def test_status_results_rejects_unknown_format(report_run):
    config_path, _ = report_run

    result = run_cli("results", config_path, "--format", "xml")

    assert result.returncode == 2
    assert "--format" in result.stderr
    assert result.stdout == ""


# -- which journal a target names ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_status_default_target_is_only_journal(report_run, tmp_path, monkeypatch):
    _, journal = report_run
    (tmp_path / ".batchrun").mkdir()
    shutil.copyfile(journal, tmp_path / ".batchrun" / "report.sqlite")
    monkeypatch.chdir(tmp_path)

    output = read_status(None)

    assert output.startswith("run 'report' (run 1 in .batchrun/report.sqlite): finished")


@pytest.mark.timeout(60)
def test_status_default_target_rejects_several_journals(report_run, tmp_path, monkeypatch, capsys):
    _, journal = report_run
    (tmp_path / ".batchrun").mkdir()
    shutil.copyfile(journal, tmp_path / ".batchrun" / "one.sqlite")
    shutil.copyfile(journal, tmp_path / ".batchrun" / "two.sqlite")
    monkeypatch.chdir(tmp_path)

    with pytest.raises(UsageError) as raised:
        status.locate_journal(None)
    code = cli.main(["status"])
    stderr = capsys.readouterr().err

    assert "several journals" in str(raised.value)
    assert ".batchrun/one.sqlite" in str(raised.value)
    assert ".batchrun/two.sqlite" in str(raised.value)
    assert code == 2
    assert "several journals" in stderr


def test_status_default_target_without_journal(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    code = cli.main(["results"])
    stderr = capsys.readouterr().err

    assert code == 2
    assert "no journal in ./.batchrun/" in stderr


def test_status_config_target_uses_journal_setting(tmp_path):
    (tmp_path / "sub").mkdir()
    config_path = tmp_path / "sub" / "batch.toml"
    config_path.write_text('[run]\nname = "named"\njournal = "../records/run.sqlite"\n', encoding="utf-8")

    path, name = status.locate_journal(str(config_path))

    assert path == tmp_path / "sub" / "../records/run.sqlite"
    assert name == "named"


def test_status_config_target_default_name_from_file(tmp_path):
    config_path = tmp_path / "my batch.toml"
    config_path.write_text('[[tasks]]\nid = "a"\ncall = "not.importable:anything"\n', encoding="utf-8")

    path, name = status.locate_journal(str(config_path))

    assert name == "my-batch"
    assert path == tmp_path / ".batchrun" / "my-batch.sqlite"


def test_status_config_without_journal_rejected(tmp_path, capsys):
    config_path = tmp_path / "batch.toml"
    config_path.write_text("[run]\njournal = false\n", encoding="utf-8")

    with pytest.raises(ConfigError) as raised:
        status.locate_journal(str(config_path))
    code = cli.main(["status", str(config_path)])
    stderr = capsys.readouterr().err

    assert "keeps no journal" in str(raised.value)
    assert code == 2
    assert "keeps no journal" in stderr


@pytest.mark.timeout(90)
def test_status_config_picks_its_run_in_shared_journal(tmp_path):
    alpha = report_batch(tmp_path, "alpha", 'journal = "shared.sqlite"\n')
    beta = report_batch(tmp_path, "beta", 'journal = "shared.sqlite"\n')

    first = run_cli("run", alpha)
    second = run_cli("run", beta)
    alpha_status = read_status(str(alpha))
    journal_status = read_status(str(tmp_path / "shared.sqlite"))

    assert first.returncode == 1, first.stderr
    assert second.returncode == 1, second.stderr
    assert alpha_status.startswith("run 'alpha' (run 1 in ")
    # A journal path names no run, so the latest run of any name is shown.
    assert journal_status.startswith("run 'beta' (run 2 in ")


@pytest.mark.timeout(60)
def test_status_config_names_run_absent_from_journal(report_run, tmp_path):
    _, journal = report_run
    config_path = tmp_path / "other.toml"
    shutil.copyfile(journal, tmp_path / "copy.sqlite")
    config_path.write_text('[run]\nname = "other"\njournal = "copy.sqlite"\n', encoding="utf-8")

    with pytest.raises(JournalError) as raised:
        status.show_status(str(config_path), output=io.StringIO())

    assert "contains no run named 'other'" in str(raised.value)


@pytest.mark.timeout(60)
def test_status_cli_writes_to_current_stdout(report_run):
    config_path, _ = report_run
    buffer = io.StringIO()

    with contextlib.redirect_stdout(buffer):
        code = cli.main(["status", str(config_path)])

    assert code == 0
    assert buffer.getvalue().startswith("run 'report'")
