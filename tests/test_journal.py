"""Tests of the run journal: what lands in the SQLite file, where the file goes, and damaged files.

The journal is read with :mod:`sqlite3` directly, so these tests check the
file itself rather than batchrun's own readers. Command-line runs start
``python -m batchrun`` in the project root, where workers import
:mod:`tests.probe`; configs live in ``tmp_path``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import multiprocessing.resource_tracker
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from loky.backend import resource_tracker as loky_resource_tracker

from batchrun import hookimpl
from batchrun.config import load_config
from batchrun.runner import build_plugin_manager, run_batch
from tests.probe import read_records


ROOT = Path(__file__).resolve().parents[1]

#: Seconds a command may run before the test fails it; far above the longest run here.
COMMAND_TIMEOUT = 60


@pytest.fixture(autouse=True)
def stop_resource_trackers():
    """Stop the resource trackers that in-process runs start, before conftest looks for leftover children.

    loky and multiprocessing each keep one tracker process per parent process
    for the parent's lifetime, so they outlive every in-process run by design.
    """
    yield
    gc.collect()
    loky_resource_tracker._resource_tracker._stop()
    multiprocessing.resource_tracker._resource_tracker._stop()


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


def start_cli(*arguments: object) -> subprocess.Popen[str]:
    """Start ``python -m batchrun`` in the project root without waiting for it."""
    return subprocess.Popen(
        [sys.executable, "-m", "batchrun", *map(str, arguments)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def toml_string(value: object) -> str:
    """Quote ``value`` as a TOML basic string; JSON string syntax is valid TOML."""
    return json.dumps(str(value))


def probe_task(task_id: str, log: Path, **kwargs: object) -> str:
    """Return a ``[[tasks]]`` table that runs :func:`tests.probe.record` with ``kwargs``."""
    pairs = ", ".join([f"log = {toml_string(log)}", *(f"{key} = {json.dumps(value)}" for key, value in kwargs.items())])
    return f'\n[[tasks]]\nid = "{task_id}"\ncall = "tests.probe:record"\nkwargs = {{ {pairs} }}\n'


def read_events(journal: Path) -> list[dict]:
    """Return every row of the journal's ``events`` table as a dict, in ``seq`` order, with ``data`` decoded."""
    connection = sqlite3.connect(journal)
    connection.row_factory = sqlite3.Row
    try:
        rows = [dict(row) for row in connection.execute("SELECT * FROM events ORDER BY seq")]
    finally:
        connection.close()
    for row in rows:
        row["data"] = json.loads(row["data"]) if row["data"] is not None else None
    return rows


def query(journal: Path, sql: str, parameters: tuple = ()) -> list[dict]:
    """Return the rows of one query on the journal as dicts."""
    connection = sqlite3.connect(journal)
    connection.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in connection.execute(sql, parameters)]
    finally:
        connection.close()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wait_for_event(journal: Path, event: str, timeout: float) -> bool:
    """Poll the journal until it contains a committed ``event``; return whether one appeared in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if journal.exists():
            try:
                if query(journal, "SELECT seq FROM events WHERE event = ? LIMIT 1", (event,)):
                    return True
            except sqlite3.OperationalError:
                pass  # the writer has not created the tables yet
        time.sleep(0.05)
    return False


# -- what a run records -------------------------------------------------------------------------


FIELDS_RETRY = """
[retry]
policy = "fixed"
delay = 0.05
jitter = false
max_attempts = 2
"""


class JournalWitness:
    """A plugin that checks, inside each hook, that the hook's event is already committed to the journal.

    It reads through its own SQLite connection, which reads only committed
    transactions, so a hook that fired before the commit shows up as a miss.
    """

    def __init__(self, journal: Path) -> None:
        self.journal = journal
        #: ``(hook, task id, attempt number, whether the event was committed)`` per hook call.
        self.checks: list[tuple[str, str | None, int | None, bool]] = []

    def _check(self, hook: str, event: str, task_id: str | None = None, attempt: int | None = None) -> None:
        sql = "SELECT COUNT(*) FROM events WHERE event = ? AND task_id IS ? AND attempt IS ?"
        connection = sqlite3.connect(self.journal)
        try:
            count = connection.execute(sql, (event, task_id, attempt)).fetchone()[0]
        finally:
            connection.close()
        self.checks.append((hook, task_id, attempt, count > 0))

    @hookimpl
    def on_run_start(self, run):
        self._check("on_run_start", "run-started")

    @hookimpl
    def on_start(self, task, attempt):
        self._check("on_start", "attempt-started", task.id, attempt.number)

    @hookimpl
    def on_fail(self, task, attempt, error):
        self._check("on_fail", "attempt-ended", task.id, attempt.number)

    @hookimpl
    def on_retry(self, task, attempt, delay):
        self._check("on_retry", "retry-scheduled", task.id, attempt.number)

    @hookimpl
    def on_terminal(self, task, outcome):
        self._check("on_terminal", "task-finished", task.id)

    @hookimpl
    def on_run_end(self, summary):
        self._check("on_run_end", "run-ended")


@pytest.fixture(scope="module")
def fields_run(tmp_path_factory):
    """Run three probe tasks in this process (one succeeds, one after a retry, one never) with a JournalWitness.

    Returns a dict with the journal path, the probe log, the witness and the summary.
    """
    folder = tmp_path_factory.mktemp("fields")
    log = folder / "records.jsonl"
    config_path = folder / "batch.toml"
    text = '[run]\nname = "fields"\nmax_concurrent = 2\n' + FIELDS_RETRY
    text += probe_task("ok", log, sleep=0.05, value=[1, "two"])
    text += probe_task("flaky", log, fail_attempts=1)
    text += probe_task("broken", log, fail_attempts=5, error="ValueError")
    config_path.write_text(text, encoding="utf-8")

    config = load_config(config_path)
    journal = folder / ".batchrun" / "fields.sqlite"
    witness = JournalWitness(journal)
    manager = build_plugin_manager(config, story_mode="quiet")
    manager.register(witness, "witness")
    summary = run_batch(config, manager=manager)
    return {"journal": journal, "log": log, "witness": witness, "summary": summary, "config_path": config_path}


def events_of(events: list[dict], task_id: str) -> list[dict]:
    return [event for event in events if event["task_id"] == task_id]


@pytest.mark.timeout(60)
def test_journal_run_row_stores_resolved_config(fields_run):
    [run] = query(fields_run["journal"], "SELECT * FROM runs")
    config = json.loads(run["config_json"])

    assert run["name"] == "fields"
    assert run["config_path"] == str(fields_run["config_path"])
    assert run["status"] == "finished"
    assert run["max_concurrent"] == 2
    assert run["ended_wall"] is not None
    assert config["run"]["max_concurrent"] == 2
    assert config["retry"]["delay"] == 0.05
    assert config["retry"]["max_attempts"] == 2
    assert config["tasks"] == 3


@pytest.mark.timeout(60)
def test_journal_session_row_names_supervisor_pid(fields_run):
    [session] = query(fields_run["journal"], "SELECT * FROM sessions")

    assert session["pid"] == os.getpid()
    assert session["max_concurrent"] == 2
    assert session["ended_wall"] is not None


@pytest.mark.timeout(60)
def test_journal_run_events_open_and_close_the_log(fields_run):
    events = read_events(fields_run["journal"])

    assert events[0]["event"] == "run-started"
    assert events[0]["data"]["name"] == "fields"
    assert events[0]["data"]["config_path"] == str(fields_run["config_path"])
    assert events[-1]["event"] == "run-ended"
    assert events[-1]["data"] == {"status": "finished", "stop_reason": None}


@pytest.mark.timeout(60)
def test_journal_retried_task_events_in_order(fields_run):
    flaky = events_of(read_events(fields_run["journal"]), "flaky")

    assert [(event["event"], event["attempt"]) for event in flaky] == [
        ("attempt-started", 1),
        ("attempt-ended", 1),
        ("retry-scheduled", 1),
        ("attempt-started", 2),
        ("attempt-ended", 2),
        ("task-finished", None),
    ]
    failed_end = flaky[1]["data"]
    assert failed_end["status"] == "failed"
    assert failed_end["kind"] == "exception"
    assert failed_end["type"] == "ConnectionError"
    assert failed_end["message"] == "probe failure of flaky attempt 1"
    assert flaky[2]["data"]["delay"] == 0.05
    assert flaky[2]["data"]["due_wall"] >= flaky[2]["wall"]
    assert flaky[4]["data"] == {"status": "succeeded"}
    assert flaky[5]["data"] == {"state": "succeeded", "attempts": 2}


@pytest.mark.timeout(60)
def test_journal_attempt_pids_match_workers(fields_run):
    events = read_events(fields_run["journal"])
    started = {(event["task_id"], event["attempt"]): event for event in events if event["event"] == "attempt-started"}
    records = read_records(fields_run["log"])

    assert len(started) == len(records) == 5
    for record in records:
        event = started[(record["task"], record["attempt"])]
        assert event["pid"] == record["pid"], f"{record['task']} attempt {record['attempt']}"
        # The worker stamps the start before it calls the task, which stamps its own.
        assert event["mono"] <= record["start"], f"{record['task']} attempt {record['attempt']}"
        assert event["slot"] in (0, 1)


@pytest.mark.timeout(60)
def test_journal_failed_task_keeps_last_error(fields_run):
    broken = events_of(read_events(fields_run["journal"]), "broken")
    [row] = query(fields_run["journal"], "SELECT * FROM tasks WHERE task_id = 'broken'")
    error = json.loads(row["error_json"])

    assert broken[-1]["event"] == "task-finished"
    assert broken[-1]["data"]["state"] == "failed"
    assert broken[-1]["data"]["error"]["type"] == "ValueError"
    assert row["state"] == "failed"
    assert row["attempts"] == 2
    assert json.loads(row["failures_json"]) == {"exception": 2}
    assert error["type"] == "ValueError"
    assert error["message"] == "probe failure of broken attempt 2"
    assert "Traceback" in error["traceback"]
    assert row["result"] is None


@pytest.mark.timeout(60)
def test_journal_succeeded_task_row_stores_result(fields_run):
    [row] = query(fields_run["journal"], "SELECT * FROM tasks WHERE task_id = 'ok'")

    assert row["state"] == "succeeded"
    assert row["attempts"] == 1
    assert row["result_format"] == "json"
    assert json.loads(row["result"]) == {"task": "ok", "attempt": 1, "value": [1, "two"]}
    assert row["error_json"] is None
    assert row["retry_due_wall"] is None


@pytest.mark.timeout(60)
def test_journal_commits_each_event_before_its_hooks(fields_run):
    checks = fields_run["witness"].checks
    missed = [check for check in checks if not check[3]]
    hooks = {check[0] for check in checks}

    assert missed == []
    assert hooks == {"on_run_start", "on_start", "on_fail", "on_retry", "on_terminal", "on_run_end"}


# -- results as JSON, repr or omitted -----------------------------------------------------------


RESULTS_MODULE = """
import math


def as_json():
    return {"numbers": [1, 2, 3]}


def as_set():
    return {3}


def as_nan():
    return math.nan


def too_big():
    return "x" * 500
"""


@pytest.fixture(scope="module")
def results_journal(tmp_path_factory):
    """Run four tasks whose results take each storage format, with ``max_result_bytes = 64``; return the journal."""
    folder = tmp_path_factory.mktemp("results")
    (folder / "results_tasks.py").write_text(RESULTS_MODULE, encoding="utf-8")
    text = '[run]\nname = "results"\nmax_result_bytes = 64\n'
    for name in ("as_json", "as_set", "as_nan", "too_big"):
        text += f'\n[[tasks]]\nid = "{name}"\ncall = "results_tasks:{name}"\n'
    config_path = folder / "batch.toml"
    config_path.write_text(text, encoding="utf-8")

    result = run_cli("run", config_path)

    assert result.returncode == 0, result.stderr
    return config_path, folder / ".batchrun" / "results.sqlite"


def stored_result(journal: Path, task_id: str) -> tuple[str, str]:
    [row] = query(journal, "SELECT result_format, result FROM tasks WHERE task_id = ?", (task_id,))
    return row["result_format"], row["result"]


@pytest.mark.timeout(60)
def test_journal_stores_json_result_as_json(results_journal):
    _, journal = results_journal

    assert stored_result(journal, "as_json") == ("json", '{"numbers": [1, 2, 3]}')


@pytest.mark.timeout(60)
def test_journal_stores_non_json_result_as_repr(results_journal):
    _, journal = results_journal

    assert stored_result(journal, "as_set") == ("repr", "{3}")
    assert stored_result(journal, "as_nan") == ("repr", "nan")


@pytest.mark.timeout(60)
def test_journal_omits_result_above_max_result_bytes(results_journal):
    _, journal = results_journal
    result_format, text = stored_result(journal, "too_big")
    description = json.loads(text)

    assert result_format == "omitted"
    assert description["type"] == "str"
    assert description["max_result_bytes"] == 64
    assert description["length"] >= 500
    assert "xxxx" not in text


@pytest.mark.timeout(60)
def test_journal_results_command_shows_each_format(results_journal):
    config_path, _ = results_journal

    result = run_cli("results", config_path, "--format", "jsonl")
    rows = {row["task"]: row for row in map(json.loads, result.stdout.splitlines())}

    assert result.returncode == 0, result.stderr
    assert rows["as_json"]["result"] == {"numbers": [1, 2, 3]}
    assert rows["as_json"]["result_format"] == "json"
    assert rows["as_set"]["result"] == "{3}"
    assert rows["as_set"]["result_format"] == "repr"
    assert rows["as_nan"]["result"] == "nan"
    assert rows["too_big"]["result_format"] == "omitted"
    assert rows["too_big"]["result"].startswith("<omitted: ")


def test_journal_encode_result_formats_directly():
    from batchrun.journal import encode_result

    assert encode_result([1, 2], 64) == ("json", "[1, 2]")
    assert encode_result(math.inf, 64) == ("repr", "inf")
    assert encode_result(b"\x00", 64) == ("repr", "b'\\x00'")
    assert encode_result("y" * 100, 64)[0] == "omitted"


# -- the events file ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_journal_events_file_mirrors_journal(make_config, tmp_path):
    log = tmp_path / "records.jsonl"
    events_path = tmp_path / "events.jsonl"
    text = '[run]\nname = "mirror"\nmax_concurrent = 2\n' + FIELDS_RETRY
    text += probe_task("ok", log) + probe_task("flaky", log, fail_attempts=1) + probe_task("broken", log, fail_attempts=5)
    config_path = make_config(text)

    result = run_cli("run", config_path, "--events", events_path)
    exported = [json.loads(line) for line in events_path.read_text(encoding="utf-8").splitlines()]
    journal_events = read_events(tmp_path / ".batchrun" / "mirror.sqlite")

    assert result.returncode == 1, result.stderr
    assert len(exported) == len(journal_events)
    for line, row in zip(exported, journal_events):
        assert line["event"] == row["event"], f"event #{row['seq']}"
        assert line["run_id"] == row["run_id"], f"event #{row['seq']}"
        assert line["session_id"] == row["session_id"], f"event #{row['seq']}"
        assert line["wall"] == row["wall"], f"event #{row['seq']}"
        assert line.get("data") == row["data"], f"event #{row['seq']}"
        for key, column in (("task", "task_id"), ("attempt", "attempt"), ("attempt_id", "attempt_id"), ("slot", "slot"), ("pid", "pid"), ("mono", "mono")):
            assert line.get(key) == row[column], f"event #{row['seq']} field {key}"


@pytest.mark.timeout(60)
def test_journal_events_file_appends_across_runs(make_config, tmp_path):
    log = tmp_path / "records.jsonl"
    events_path = tmp_path / "events.jsonl"
    config_path = make_config('[run]\nname = "twice"\n' + probe_task("ok", log))

    first = run_cli("run", config_path, "--events", events_path)
    second = run_cli("run", config_path, "--events", events_path)
    exported = [json.loads(line) for line in events_path.read_text(encoding="utf-8").splitlines()]

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert [line["run_id"] for line in exported if line["event"] == "run-started"] == [1, 2]
    assert len(exported) == len(read_events(tmp_path / ".batchrun" / "twice.sqlite"))


# -- where the journal goes ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_journal_default_path_next_to_config(make_config, tmp_path):
    config_path = make_config('[run]\nname = "placed"\n' + probe_task("ok", tmp_path / "records.jsonl"))

    result = run_cli("run", config_path)

    assert result.returncode == 0, result.stderr
    assert (tmp_path / ".batchrun" / "placed.sqlite").is_file()
    assert not (ROOT / ".batchrun" / "placed.sqlite").exists()


@pytest.mark.timeout(60)
def test_journal_config_path_relative_to_config_folder(make_config, tmp_path):
    config_path = make_config('[run]\nname = "placed"\njournal = "records/run.sqlite"\n' + probe_task("ok", tmp_path / "records.jsonl"))

    result = run_cli("run", config_path)

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "records" / "run.sqlite").is_file()
    assert not (tmp_path / ".batchrun").exists()
    assert not (ROOT / "records" / "run.sqlite").exists()


@pytest.mark.timeout(60)
def test_journal_option_overrides_config(make_config, tmp_path):
    config_path = make_config('[run]\njournal = "from-config.sqlite"\n' + probe_task("ok", tmp_path / "records.jsonl"))
    journal = tmp_path / "elsewhere" / "chosen.sqlite"

    result = run_cli("run", config_path, "--journal", journal)

    assert result.returncode == 0, result.stderr
    assert journal.is_file()
    assert not (tmp_path / "from-config.sqlite").exists()


@pytest.mark.timeout(60)
def test_journal_false_in_config_writes_no_file(make_config, tmp_path):
    config_path = make_config("[run]\njournal = false\n" + probe_task("ok", tmp_path / "records.jsonl"))

    result = run_cli("run", config_path)

    assert result.returncode == 0, result.stderr
    assert len(read_records(tmp_path / "records.jsonl")) == 1
    assert sorted(path.name for path in tmp_path.rglob("*.sqlite*")) == []
    assert not (tmp_path / ".batchrun").exists()


@pytest.mark.timeout(60)
def test_journal_no_journal_option_writes_no_file(make_config, tmp_path):
    config_path = make_config(probe_task("ok", tmp_path / "records.jsonl"))

    result = run_cli("run", config_path, "--no-journal")

    assert result.returncode == 0, result.stderr
    assert len(read_records(tmp_path / "records.jsonl")) == 1
    assert sorted(path.name for path in tmp_path.rglob("*.sqlite*")) == []
    assert not (tmp_path / ".batchrun").exists()


# -- one writer at a time -----------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_journal_second_supervisor_exits_2(make_config, tmp_path):
    log = tmp_path / "records.jsonl"
    config_path = make_config('[run]\nname = "locked"\nmax_concurrent = 1\n' + probe_task("slow", log, sleep=30))
    journal = tmp_path / ".batchrun" / "locked.sqlite"

    first = start_cli("run", config_path, "--grace", "0.2")
    try:
        assert wait_for_event(journal, "attempt-started", timeout=30), "the first run never started its attempt"
        second = run_cli("run", config_path)
        resumed = run_cli("run", config_path, "--resume")
    finally:
        first.send_signal(signal.SIGINT)
        _, first_stderr = first.communicate(timeout=COMMAND_TIMEOUT)

    assert second.returncode == 2, second.stderr
    assert str(journal) in second.stderr
    assert "in use" in second.stderr
    assert f"pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    assert resumed.returncode == 2, resumed.stderr
    assert str(journal) in resumed.stderr
    assert first.returncode == 130, first_stderr
    assert len(query(journal, "SELECT run_id FROM runs")) == 1
    assert len(query(journal, "SELECT session_id FROM sessions")) == 1


# -- damaged and foreign files ------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_journal(tmp_path_factory) -> Path:
    """Return a finished journal of twenty tasks, for tests to copy and damage."""
    folder = tmp_path_factory.mktemp("real")
    log = folder / "records.jsonl"
    text = '[run]\nname = "real"\nmax_concurrent = 2\n'
    text += "".join(probe_task(f"task-{number}", log, value="v" * 200) for number in range(20))
    config_path = folder / "batch.toml"
    config_path.write_text(text, encoding="utf-8")

    result = run_cli("run", config_path)

    assert result.returncode == 0, result.stderr
    journal = folder / ".batchrun" / "real.sqlite"
    assert not journal.with_name(journal.name + "-wal").exists(), "a finished run leaves its log checkpointed"
    return journal


def make_text_file(folder: Path, real: Path) -> Path:
    path = folder / "x.sqlite"
    path.write_text("this is a text file, not a database\n" * 50, encoding="utf-8")
    return path


def make_newer_schema(folder: Path, real: Path) -> Path:
    path = folder / "newer.sqlite"
    shutil.copyfile(real, path)
    connection = sqlite3.connect(path)
    connection.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    connection.commit()
    connection.close()
    return path


def make_truncated(folder: Path, real: Path) -> Path:
    path = folder / "cut.sqlite"
    shutil.copyfile(real, path)
    with open(path, "r+b") as stream:
        stream.truncate(path.stat().st_size // 2)
    return path


DAMAGED = [
    pytest.param(make_text_file, ["not a readable batchrun journal", "not a database"], id="text-file"),
    pytest.param(make_newer_schema, ["schema version 99", "upgrade batchrun"], id="newer-schema"),
    pytest.param(make_truncated, ["not a readable batchrun journal", "malformed"], id="truncated"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("make_damaged", "fragments"), DAMAGED)
@pytest.mark.parametrize("command", ["status", "results", "verify"])
def test_journal_damaged_file_rejected_by_readers(tmp_path, real_journal, make_damaged, fragments, command):
    path = make_damaged(tmp_path, real_journal)
    before = file_digest(path)

    result = run_cli(command, path)

    assert result.returncode == 2, result.stderr
    assert str(path) in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in stderr: {result.stderr}"
    assert "Traceback" not in result.stderr
    assert file_digest(path) == before, "a reader changed the file"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("make_damaged", "fragments"), DAMAGED)
@pytest.mark.parametrize("resume", [False, True], ids=["new-run", "resume"])
def test_journal_damaged_file_rejected_by_run(make_config, tmp_path, real_journal, make_damaged, fragments, resume):
    path = make_damaged(tmp_path, real_journal)
    before = file_digest(path)
    log = tmp_path / "records.jsonl"
    config_path = make_config('[run]\nname = "real"\n' + probe_task("task-0", log))

    result = run_cli("run", config_path, "--journal", path, *(["--resume"] if resume else []))

    assert result.returncode == 2, result.stderr
    assert str(path) in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in stderr: {result.stderr}"
    assert "Traceback" not in result.stderr
    assert read_records(log) == [], "a task ran although the journal is unusable"
    assert file_digest(path) == before, "the run changed the damaged journal"


def make_foreign_database(path: Path) -> None:
    """Write a SQLite database of another program, in SQLite's default rollback-journal mode."""
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE people (name TEXT)")
    connection.execute("INSERT INTO people VALUES ('ann')")
    connection.commit()
    connection.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["status", "results", "verify"])
def test_journal_foreign_database_rejected_by_readers(tmp_path, command):
    path = tmp_path / "other.sqlite"
    make_foreign_database(path)
    before = file_digest(path)

    result = run_cli(command, path)

    assert result.returncode == 2, result.stderr
    assert str(path) in result.stderr
    assert "not a batchrun journal" in result.stderr
    assert "Traceback" not in result.stderr
    # A reader that switched the file to WAL mode would have rewritten its header.
    assert file_digest(path) == before, "a reader changed the file"


@pytest.mark.timeout(60)
def test_journal_run_rejects_foreign_database(make_config, tmp_path):
    path = tmp_path / "other.sqlite"
    make_foreign_database(path)
    log = tmp_path / "records.jsonl"
    config_path = make_config(probe_task("ok", log))

    result = run_cli("run", config_path, "--journal", path)
    tables = {row["name"] for row in query(path, "SELECT name FROM sqlite_master WHERE type = 'table'")}

    assert result.returncode == 2, result.stderr
    assert str(path) in result.stderr
    assert "not a batchrun journal" in result.stderr
    assert tables == {"people"}
    assert read_records(log) == []


@pytest.mark.timeout(60)
def test_journal_missing_file_rejected_by_status(tmp_path):
    path = tmp_path / "absent.sqlite"

    result = run_cli("status", path)

    assert result.returncode == 2, result.stderr
    assert "journal not found" in result.stderr
    assert str(path) in result.stderr
    assert not path.exists()


@pytest.mark.timeout(60)
@pytest.mark.broken_journal
@pytest.mark.parametrize("command", ["status", "results", "verify"])
def test_journal_empty_file_rejected_by_readers(tmp_path, command):
    # SQLite creates the file when the writer connects, before the schema is
    # committed, so a supervisor killed in between leaves an empty journal.
    path = tmp_path / "empty.sqlite"
    path.touch()

    result = run_cli(command, path)

    assert result.returncode == 2, result.stderr
    assert str(path) in result.stderr
    assert "Traceback" not in result.stderr
    assert path.stat().st_size == 0, "a reader changed the file"


def read_only_rows(journal: Path, sql: str) -> list[tuple]:
    """Return the rows of one query through a read-only connection, which never checkpoints the write-ahead log."""
    connection = sqlite3.connect(f"{journal.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return [tuple(row) for row in connection.execute(sql)]
    finally:
        connection.close()


@pytest.mark.timeout(120)
def test_journal_torn_log_tail_keeps_committed_rows(make_config, tmp_path):
    log = tmp_path / "records.jsonl"
    text = '[run]\nname = "torn"\nmax_concurrent = 2\n' + "".join(probe_task(f"task-{number}", log, sleep=0.3) for number in range(6))
    config_path = make_config(text)
    journal = tmp_path / ".batchrun" / "torn.sqlite"

    process = start_cli("run", config_path)
    finished = wait_for_event(journal, "task-finished", timeout=30)
    process.kill()
    _, killed_stderr = process.communicate(timeout=COMMAND_TIMEOUT)
    # Copy the killed run's files, then cut the end of the copy's write-ahead
    # log as a write torn by a crash would.
    torn = tmp_path / "torn" / "torn.sqlite"
    torn.parent.mkdir()
    shutil.copyfile(journal, torn)
    wal = torn.with_name("torn.sqlite-wal")
    shutil.copyfile(journal.with_name("torn.sqlite-wal"), wal)
    with open(wal, "r+b") as stream:
        stream.truncate(wal.stat().st_size - 1000)
    rows_before = read_only_rows(torn, "SELECT seq, event, task_id, attempt FROM events ORDER BY seq")
    status = run_cli("status", torn)
    resumed = run_cli("run", config_path, "--resume", "--journal", torn)
    verify = run_cli("verify", torn)
    rows_after = read_only_rows(torn, "SELECT seq, event, task_id, attempt FROM events ORDER BY seq")
    states = read_only_rows(torn, "SELECT task_id, state FROM tasks ORDER BY task_id")

    assert finished, f"no task finished before the kill: {killed_stderr}"
    assert rows_before, "the torn copy lost every committed row"
    assert status.returncode == 0, status.stderr
    assert "interrupted" in status.stdout
    assert resumed.returncode == 0, resumed.stderr
    assert verify.returncode == 0, verify.stdout
    assert rows_after[: len(rows_before)] == rows_before, "resuming changed or deleted rows the torn journal kept"
    assert states == [(f"task-{number}", "succeeded") for number in range(6)]
