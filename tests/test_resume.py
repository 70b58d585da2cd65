"""Tests of ``batchrun run --resume``: a run carries on from its journal after a kill, a stop or a change.

Runs go through ``python -m batchrun`` in a child process started in the
project root, so a test can SIGKILL or SIGINT the supervisor. Ground truth
comes from three places: the probe records each attempt writes from inside
its worker (:mod:`tests.probe`), the journal read with :mod:`sqlite3`, and
``batchrun results``.

Worker processes of a killed supervisor are orphans: they are no longer
children of the test process, so conftest's leftover check cannot see them,
and the tests that kill a supervisor wait for those workers themselves.
"""

from __future__ import annotations

import gc
import json
import multiprocessing.resource_tracker
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import psutil
import pytest
from loky.backend import resource_tracker as loky_resource_tracker

from batchrun.config import load_config
from batchrun.report import exit_code
from batchrun.runner import build_plugin_manager, run_batch
from tests.probe import read_records


ROOT = Path(__file__).resolve().parents[1]

#: Seconds a command may run before the test fails it; far above the longest run here.
COMMAND_TIMEOUT = 60

#: Seconds a test waits for an event in the journal or for a process to exit before failing.
WAIT_TIMEOUT = 30

#: Seconds orphaned workers get to notice that their supervisor died and exit.
ORPHAN_EXIT_TIMEOUT = 10

RETRY_FIXED = """
[retry]
policy = "fixed"
delay = 0.05
jitter = false
max_attempts = 3
"""


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


# -- helpers ------------------------------------------------------------------------------------


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


def start_cli(*arguments: object, stderr_path: Path) -> subprocess.Popen:
    """Start ``python -m batchrun`` in the project root with stderr going to ``stderr_path``."""
    with open(stderr_path, "w", encoding="utf-8") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "batchrun", *map(str, arguments)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def toml_string(value: object) -> str:
    """Quote ``value`` as a TOML basic string; JSON string syntax is valid TOML."""
    return json.dumps(str(value))


def probe_task(task_id: str, log: Path, **kwargs: object) -> str:
    """Return a ``[[tasks]]`` table that runs :func:`tests.probe.record` with ``kwargs``."""
    pairs = ", ".join([f"log = {toml_string(log)}", *(f"{key} = {json.dumps(value)}" for key, value in kwargs.items())])
    return f'\n[[tasks]]\nid = "{task_id}"\ncall = "tests.probe:record"\nkwargs = {{ {pairs} }}\n'


def query(journal: Path, sql: str, parameters: tuple = ()) -> list[dict]:
    """Return the rows of one query on the journal as dicts."""
    connection = sqlite3.connect(journal)
    connection.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in connection.execute(sql, parameters)]
    finally:
        connection.close()


def read_events(journal: Path) -> list[dict]:
    """Return every row of the journal's ``events`` table as a dict, in ``seq`` order, with ``data`` decoded."""
    rows = query(journal, "SELECT * FROM events ORDER BY seq")
    for row in rows:
        row["data"] = json.loads(row["data"]) if row["data"] is not None else None
    return rows


def holds_run(journal: Path) -> bool:
    """Return whether the journal exists and has committed a run record."""
    if not journal.exists():
        return False
    try:
        return bool(query(journal, "SELECT run_id FROM runs LIMIT 1"))
    except sqlite3.OperationalError:
        return False  # killed before the tables were created


def wait_for_event(journal: Path, sql_condition: str, parameters: tuple = (), timeout: float = WAIT_TIMEOUT) -> dict | None:
    """Poll the journal for a committed event matching ``sql_condition``; return it, or ``None`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if holds_run(journal):
            try:
                rows = query(journal, f"SELECT * FROM events WHERE {sql_condition} ORDER BY seq LIMIT 1", parameters)
            except sqlite3.OperationalError:
                rows = []
            if rows:
                return rows[0]
        time.sleep(0.02)
    return None


def results_by_task(target: Path) -> dict[str, dict]:
    """Return ``batchrun results --format jsonl`` for ``target`` as rows by task id."""
    result = run_cli("results", target, "--format", "jsonl")
    assert result.returncode == 0, result.stderr
    return {row["task"]: row for row in map(json.loads, result.stdout.splitlines())}


def is_gone(pid: int) -> bool:
    """Return whether process ``pid`` has exited; a zombie waiting to be reaped counts as exited."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until_gone(pids, timeout: float) -> list[int]:
    """Wait up to ``timeout`` seconds for every process in ``pids`` to exit; return those still alive."""
    deadline = time.monotonic() + timeout
    alive = sorted(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if not is_gone(pid)]
        if alive:
            time.sleep(0.05)
    return alive


def kill_survivors(pids) -> None:
    """SIGKILL whatever is left of ``pids``, so a failing test leaves no process behind."""
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass


def worker_pids(journal: Path, log: Path) -> set[int]:
    """Return every worker pid the journal or the probe records name."""
    pids = {record["pid"] for record in read_records(log)}
    if holds_run(journal):
        pids |= {row["pid"] for row in query(journal, "SELECT pid FROM events WHERE pid IS NOT NULL")}
    return pids


# -- the headline test: SIGKILL the supervisor again and again ----------------------------------


KILLED_TASKS = 12


def killed_batch(log: Path) -> tuple[str, dict[str, int]]:
    """Return the TOML text of the batch the kill test runs, and each task's number of failing first attempts."""
    text = '[run]\nname = "killed"\nmax_concurrent = 2\n' + RETRY_FIXED
    fail_attempts = {}
    for number in range(KILLED_TASKS):
        task_id = f"task-{number:02d}"
        fail_attempts[task_id] = 1 if number % 3 == 0 else 0
        text += probe_task(task_id, log, sleep=0.2 + 0.03 * (number % 4), fail_attempts=fail_attempts[task_id])
    return text, fail_attempts


def attempt_closings(events: list[dict]) -> dict[tuple[int, int], dict]:
    """Return the event that closed each attempt, by ``(session id, attempt id)`` of its start."""
    closings = {}
    for event in events:
        if event["event"] == "attempt-ended":
            closings[(event["session_id"], event["attempt_id"])] = event
        elif event["event"] == "attempt-interrupted":
            closings[(event["data"]["session_id"], event["attempt_id"])] = event
    return closings


def journal_attempt_of(record: dict, starts: list[dict]) -> dict | None:
    """Return the journal's attempt-started event of a probe record, or ``None`` when the start was never committed.

    The worker stamps the attempt's start before it calls the task, so the
    matching start is the latest one of the same task, attempt number and
    worker pid stamped no later than the record's own start.
    """
    candidates = [
        start
        for start in starts
        if start["task_id"] == record["task"] and start["attempt"] == record["attempt"] and start["pid"] == record["pid"] and start["mono"] <= record["start"]
    ]
    return max(candidates, key=lambda start: start["mono"]) if candidates else None


@pytest.mark.timeout(180)
def test_resume_survives_repeated_sigkill(make_config, tmp_path):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    print(f"kill delays drawn with random.Random({seed})")
    log = tmp_path / "records.jsonl"
    text, fail_attempts = killed_batch(log)
    config_path = make_config(text)
    journal = tmp_path / ".batchrun" / "killed.sqlite"

    kills = 0
    rounds = 0
    for round_number in range(8):
        # A supervisor killed before it recorded the run leaves nothing to resume.
        resume = ["--resume"] if holds_run(journal) else []
        rounds += 1
        process = start_cli("run", config_path, "-q", *resume, stderr_path=tmp_path / f"round-{round_number}.log")
        try:
            returncode = process.wait(timeout=rng.uniform(0.3, 1.5))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=WAIT_TIMEOUT)
            kills += 1
            continue
        stderr = (tmp_path / f"round-{round_number}.log").read_text(encoding="utf-8")
        assert returncode == 0, f"round {round_number} ended by itself with exit code {returncode}: {stderr}"
        break
    final = run_cli("run", config_path, "--resume")
    verify = run_cli("verify", config_path)
    results = results_by_task(config_path)
    events = read_events(journal)
    records = read_records(log)
    left = wait_until_gone(worker_pids(journal, log), ORPHAN_EXIT_TIMEOUT)
    kill_survivors(left)
    interrupted = sum(event["event"] == "attempt-interrupted" for event in events)
    lost_successes = sum(not record["failed"] for record in records) - KILLED_TASKS
    print(f"{kills} kills in {rounds} rounds; {interrupted} attempts interrupted; {lost_successes} successes died uncommitted")

    # The task sleeps, spread over two slots, take longer than the longest
    # kill delay, so at least the first round is killed.
    assert kills >= 1, "no round was killed"
    assert final.returncode == 0, final.stderr
    assert verify.returncode == 0, verify.stdout
    assert left == [], f"workers still running {ORPHAN_EXIT_TIMEOUT} s after the last run: {left}"

    # Every task succeeded once, at the attempt its failures call for:
    # interrupted attempts are not charged.
    assert sorted(results) == sorted(fail_attempts)
    for task_id, failing in fail_attempts.items():
        row = results[task_id]
        assert row["state"] == "succeeded", f"{task_id}: {row}"
        assert row["attempts"] == failing + 1, f"{task_id}: {row}"
        assert row["result"] == {"task": task_id, "attempt": failing + 1, "value": None}, f"{task_id}: {row}"

    starts = [event for event in events if event["event"] == "attempt-started"]
    closings = attempt_closings(events)
    successes = [event for event in events if event["event"] == "attempt-ended" and event["data"]["status"] == "succeeded"]
    records_by_task = defaultdict(list)
    for record in records:
        records_by_task[record["task"]].append(record)

    for task_id in fail_attempts:
        committed = [event for event in successes if event["task_id"] == task_id]
        assert len(committed) == 1, f"{task_id}: the journal committed {len(committed)} successes"
        [success] = committed
        success_key = (success["session_id"], success["attempt_id"])
        matched = [record for record in records_by_task[task_id] if (attempt := journal_attempt_of(record, starts)) is not None and (attempt["session_id"], attempt["attempt_id"]) == success_key]
        assert len(matched) == 1, f"{task_id}: {len(matched)} probe records match the committed success"
        [success_record] = matched
        assert success_record["failed"] is False, f"{task_id}: the committed success ran as a failure"

        for record in records_by_task[task_id]:
            if record is success_record:
                continue
            where = f"{task_id} attempt {record['attempt']} in worker {record['pid']}"
            # Once the journal committed the success, no execution of the task may start again.
            assert record["start"] < success_record["start"], f"{where} ran after the committed success: recomputed"
            attempt = journal_attempt_of(record, starts)
            closing = None if attempt is None else closings.get((attempt["session_id"], attempt["attempt_id"]))
            if not record["failed"]:
                # A second success is allowed only when the supervisor died before committing it.
                assert closing is None or closing["event"] == "attempt-interrupted", f"{where}: a committed success besides the one kept"
            elif closing is not None and closing["event"] == "attempt-ended":
                assert closing["data"]["status"] == "failed", f"{where}: the journal and the worker disagree"


# -- resuming after a stop ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def deadline_resumed(tmp_path_factory):
    """Stop a batch of six 0.5 s tasks by a 0.6 s deadline, then resume it; return what each step left.

    The journal lives in a module folder, outside the test's tmp_path, so the
    autouse law check does not see it: ``test_resume_after_deadline_keeps_laws``
    checks it instead.
    """
    folder = tmp_path_factory.mktemp("deadline")
    log = folder / "records.jsonl"
    config_path = folder / "batch.toml"
    text = '[run]\nname = "deadline"\nmax_concurrent = 2\n' + RETRY_FIXED
    text += "".join(probe_task(f"task-{number}", log, sleep=0.5) for number in range(6))
    config_path.write_text(text, encoding="utf-8")

    stopped = run_cli("run", config_path, "--deadline", "0.6")
    status_between = run_cli("status", config_path)
    resumed = run_cli("run", config_path, "--resume")
    return {
        "config_path": config_path,
        "journal": folder / ".batchrun" / "deadline.sqlite",
        "log": log,
        "stopped": stopped,
        "status_between": status_between,
        "resumed": resumed,
    }


@pytest.mark.timeout(90)
def test_resume_after_deadline_exits_0(deadline_resumed):
    stopped = deadline_resumed["stopped"]
    resumed = deadline_resumed["resumed"]

    assert stopped.returncode == 3, stopped.stderr
    assert "stopped by deadline" in deadline_resumed["status_between"].stdout
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.timeout(90)
def test_resume_after_deadline_succeeds_once(deadline_resumed):
    results = results_by_task(deadline_resumed["config_path"])
    successes = defaultdict(int)
    for record in read_records(deadline_resumed["log"]):
        successes[record["task"]] += not record["failed"]

    assert sorted(results) == [f"task-{number}" for number in range(6)]
    for task_id, row in results.items():
        assert row["state"] == "succeeded", f"{task_id}: {row}"
        assert row["attempts"] == 1, f"{task_id}: the cancelled attempt was charged: {row}"
        assert successes[task_id] == 1, f"{task_id} succeeded {successes[task_id]} times"


@pytest.mark.timeout(90)
def test_resume_after_deadline_keeps_laws(deadline_resumed):
    verify = run_cli("verify", deadline_resumed["config_path"])
    cancelled = query(deadline_resumed["journal"], "SELECT DISTINCT task_id FROM events WHERE event = 'task-finished' AND session_id = 1 AND data LIKE '%cancelled%'")
    reopened = query(deadline_resumed["journal"], "SELECT DISTINCT task_id FROM events WHERE event = 'task-reopened'")

    assert verify.returncode == 0, verify.stdout
    assert cancelled, "the deadline must have cancelled some task"
    assert sorted(row["task_id"] for row in reopened) == sorted(row["task_id"] for row in cancelled)


@pytest.mark.timeout(90)
def test_resume_cancelled_attempt_not_charged(make_config, tmp_path):
    log = tmp_path / "records.jsonl"
    config_path = make_config('[run]\nname = "ceiling"\n[retry]\nmax_attempts = 1\n' + probe_task("slow", log, sleep=2.0))
    journal = tmp_path / ".batchrun" / "ceiling.sqlite"

    stopped = run_cli("run", config_path, "--deadline", "1")
    started_before_stop = query(journal, "SELECT attempt FROM events WHERE event = 'attempt-started'")
    resumed = run_cli("run", config_path, "--resume")
    attempts = [record["attempt"] for record in read_records(log)]
    row = results_by_task(config_path)["slow"]

    assert stopped.returncode == 3, stopped.stderr
    assert started_before_stop == [{"attempt": 1}], "the attempt must start before the deadline stops the run"
    assert resumed.returncode == 0, resumed.stderr
    # The deadline cancelled attempt 1 inside its sleep, so only the resumed attempt 1 recorded itself.
    assert attempts == [1]
    assert "attempt 2/1" not in resumed.stderr
    assert row["state"] == "succeeded"
    assert row["attempts"] == 1


@pytest.mark.timeout(90)
def test_resume_after_deadline_keeps_retry_delay(make_config, tmp_path):
    log = tmp_path / "records.jsonl"
    text = '[run]\nname = "waiting"\n[retry]\npolicy = "fixed"\ndelay = 3\njitter = false\n' + probe_task("flaky", log, fail_attempts=1)
    config_path = make_config(text)
    journal = tmp_path / ".batchrun" / "waiting.sqlite"

    stopped = run_cli("run", config_path, "--deadline", "1")
    [scheduled] = query(journal, "SELECT data FROM events WHERE event = 'retry-scheduled'")
    resumed = run_cli("run", config_path, "--resume")
    [second_start] = query(journal, "SELECT wall FROM events WHERE event = 'attempt-started' AND attempt = 2")

    assert stopped.returncode == 3, stopped.stderr
    assert resumed.returncode == 0, resumed.stderr
    # Both times come from time.time() in supervisors on this machine.
    assert second_start["wall"] >= json.loads(scheduled["data"])["due_wall"]


@pytest.fixture(scope="module")
def sigint_resumed(tmp_path_factory):
    """Stop a batch of four 1 s tasks with SIGINT once an attempt started, then resume it; return what each step left.

    Like ``deadline_resumed``, its journal is checked by its own test rather than by the autouse law check.
    """
    folder = tmp_path_factory.mktemp("sigint")
    log = folder / "records.jsonl"
    config_path = folder / "batch.toml"
    text = '[run]\nname = "sigint"\nmax_concurrent = 2\n' + RETRY_FIXED
    text += "".join(probe_task(f"task-{number}", log, sleep=1.0) for number in range(4))
    config_path.write_text(text, encoding="utf-8")
    journal = folder / ".batchrun" / "sigint.sqlite"

    process = start_cli("run", config_path, "--grace", "0.1", stderr_path=folder / "stopped.log")
    started = wait_for_event(journal, "event = 'attempt-started'")
    process.send_signal(signal.SIGINT)
    process.wait(timeout=COMMAND_TIMEOUT)
    resumed = run_cli("run", config_path, "--resume")
    return {
        "config_path": config_path,
        "log": log,
        "started": started,
        "stopped_code": process.returncode,
        "stopped_stderr": (folder / "stopped.log").read_text(encoding="utf-8"),
        "resumed": resumed,
    }


@pytest.mark.timeout(90)
def test_resume_after_sigint_exits_0(sigint_resumed):
    assert sigint_resumed["started"] is not None, "no attempt started before SIGINT"
    assert sigint_resumed["stopped_code"] == 130, sigint_resumed["stopped_stderr"]
    assert sigint_resumed["resumed"].returncode == 0, sigint_resumed["resumed"].stderr


@pytest.mark.timeout(90)
def test_resume_after_sigint_succeeds_once(sigint_resumed):
    results = results_by_task(sigint_resumed["config_path"])
    successes = defaultdict(int)
    for record in read_records(sigint_resumed["log"]):
        successes[record["task"]] += not record["failed"]

    assert sorted(results) == [f"task-{number}" for number in range(4)]
    for task_id, row in results.items():
        assert row["state"] == "succeeded", f"{task_id}: {row}"
        assert row["attempts"] == 1, f"{task_id}: the cancelled attempt was charged: {row}"
        assert successes[task_id] == 1, f"{task_id} succeeded {successes[task_id]} times"


@pytest.mark.timeout(90)
def test_resume_after_sigint_keeps_laws(sigint_resumed):
    verify = run_cli("verify", sigint_resumed["config_path"])

    assert verify.returncode == 0, verify.stdout


# -- failed and changed tasks -------------------------------------------------------------------


FLAG_MODULE = """
import json
import os

import batchrun


def succeed_once_flag_exists(flag, log):
    attempt = batchrun.current_attempt()
    with open(log, "a", encoding="utf-8") as stream:
        stream.write(json.dumps({"task": attempt.task_id, "attempt": attempt.number, "flag": os.path.exists(flag)}) + "\\n")
    if not os.path.exists(flag):
        raise ValueError(f"{flag} does not exist yet")
    return "done"
"""


def flag_batch(folder: Path) -> tuple[Path, Path, Path]:
    """Write a batch whose task 'gated' fails both its attempts until a flag file exists; return config, flag and log."""
    (folder / "flag_tasks.py").write_text(FLAG_MODULE, encoding="utf-8")
    flag = folder / "flag"
    log = folder / "attempts.jsonl"
    config_path = folder / "batch.toml"
    config_path.write_text(
        f"""[run]
name = "gated"
[retry]
policy = "fixed"
delay = 0.01
jitter = false
max_attempts = 2
[[tasks]]
id = "gated"
call = "flag_tasks:succeed_once_flag_exists"
kwargs = {{ flag = {toml_string(flag)}, log = {toml_string(log)} }}
""",
        encoding="utf-8",
    )
    return config_path, flag, log


@pytest.mark.timeout(90)
def test_resume_keeps_failed_task_failed(tmp_path):
    config_path, flag, log = flag_batch(tmp_path)

    first = run_cli("run", config_path)
    flag.touch()
    resumed = run_cli("run", config_path, "--resume")
    attempts = [record["attempt"] for record in read_records(log)]
    row = results_by_task(config_path)["gated"]

    assert first.returncode == 1, first.stderr
    assert resumed.returncode == 1, resumed.stderr
    assert attempts == [1, 2], "the resumed run must not run a task that failed for good"
    assert row["state"] == "failed"
    assert row["attempts"] == 2
    assert "ValueError" in row["error"]


@pytest.mark.timeout(90)
def test_resume_retry_failed_reruns_failed_task(tmp_path):
    config_path, flag, log = flag_batch(tmp_path)

    first = run_cli("run", config_path)
    flag.touch()
    resumed = run_cli("run", config_path, "--resume", "--retry-failed")
    records = read_records(log)
    row = results_by_task(config_path)["gated"]

    assert first.returncode == 1, first.stderr
    assert resumed.returncode == 0, resumed.stderr
    # The task starts again from its first attempt.
    assert [(record["attempt"], record["flag"]) for record in records] == [(1, False), (2, False), (1, True)]
    assert row["state"] == "succeeded"
    assert row["attempts"] == 1
    assert row["result"] == "done"


@pytest.mark.timeout(60)
def test_resume_retry_failed_needs_resume(tmp_path):
    config_path, _, log = flag_batch(tmp_path)

    result = run_cli("run", config_path, "--retry-failed")

    assert result.returncode == 2, result.stderr
    assert "--resume" in result.stderr
    assert read_records(log) == []


def changed_batch(folder: Path, sleep_of_b: float) -> Path:
    """Write a batch of tasks 'a' and 'b', where only b's sleep varies; return the config path."""
    log = folder / "records.jsonl"
    config_path = folder / "batch.toml"
    text = '[run]\nname = "changing"\nmax_concurrent = 2\n' + probe_task("a", log, sleep=0.05) + probe_task("b", log, sleep=sleep_of_b)
    config_path.write_text(text, encoding="utf-8")
    return config_path


@pytest.fixture(scope="module")
def change_rejected(tmp_path_factory):
    """Run tasks a and b, change b's arguments, then resume without --rerun-changed; return what each step left."""
    folder = tmp_path_factory.mktemp("changed")
    config_path = changed_batch(folder, sleep_of_b=0.05)
    first = run_cli("run", config_path)
    journal = folder / ".batchrun" / "changing.sqlite"
    runs_before = query(journal, "SELECT * FROM runs")
    changed_batch(folder, sleep_of_b=0.06)
    rejected = run_cli("run", config_path, "--resume")
    return {
        "folder": folder,
        "journal": journal,
        "first": first,
        "rejected": rejected,
        "runs_before": runs_before,
        "records": read_records(folder / "records.jsonl"),
    }


@pytest.mark.timeout(60)
def test_resume_changed_definition_exits_2(change_rejected):
    rejected = change_rejected["rejected"]

    assert change_rejected["first"].returncode == 0, change_rejected["first"].stderr
    assert rejected.returncode == 2, rejected.stderr
    assert "task 'b' changed" in rejected.stderr
    assert "--rerun-changed" in rejected.stderr
    assert "task 'a'" not in rejected.stderr
    assert "Traceback" not in rejected.stderr
    assert len(change_rejected["records"]) == 2, "no task may run when the resume is rejected"


@pytest.mark.timeout(60)
def test_resume_rejected_change_keeps_run_record(change_rejected):
    journal = change_rejected["journal"]
    runs_after = query(journal, "SELECT * FROM runs")
    sessions = query(journal, "SELECT * FROM sessions")
    resumed_events = query(journal, "SELECT seq FROM events WHERE event = 'run-resumed'")

    assert runs_after == change_rejected["runs_before"]
    assert runs_after[0]["status"] == "finished"
    assert len(sessions) == 1
    assert resumed_events == []


@pytest.mark.timeout(90)
def test_resume_rerun_changed_reruns_changed_task(tmp_path):
    log = tmp_path / "records.jsonl"
    config_path = changed_batch(tmp_path, sleep_of_b=0.05)

    first = run_cli("run", config_path)
    changed_batch(tmp_path, sleep_of_b=0.06)
    resumed = run_cli("run", config_path, "--resume", "--rerun-changed")
    records = [(record["task"], record["attempt"]) for record in read_records(log)]
    results = results_by_task(config_path)
    resets = query(tmp_path / ".batchrun" / "changing.sqlite", "SELECT task_id FROM events WHERE event = 'task-reset'")

    assert first.returncode == 0, first.stderr
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(records) == [("a", 1), ("b", 1), ("b", 1)]
    assert results["b"]["state"] == "succeeded"
    assert results["b"]["attempts"] == 1
    assert results["a"]["state"] == "succeeded"
    assert resets == [{"task_id": "b"}]


# -- resuming a finished run, and the notice for an unfinished one ------------------------------


@pytest.mark.timeout(60)
def test_resume_finished_run_runs_nothing(make_config, tmp_path, recorder):
    log = tmp_path / "records.jsonl"
    config_path = make_config('[run]\nname = "done"\nmax_concurrent = 2\n' + "".join(probe_task(f"task-{n}", log) for n in range(3)))
    config = load_config(config_path)

    first = run_batch(config, story_mode="quiet")
    manager = build_plugin_manager(config, story_mode="quiet")
    manager.register(recorder, "recorder")
    second = run_batch(config, manager=manager, resume=True)
    hooks = [event[0] for event in recorder.events]

    assert exit_code(first) == 0
    assert exit_code(second) == 0
    assert "on_start" not in hooks
    assert "on_terminal" not in hooks
    assert second.states["succeeded"] == 3
    assert second.attempts == 0
    assert len(read_records(log)) == 3


@pytest.mark.timeout(90)
def test_resume_notice_names_unfinished_run(make_config, tmp_path):
    log = tmp_path / "records.jsonl"
    config_path = make_config('[run]\nname = "notice"\n' + probe_task("slow", log, sleep=0.8) + probe_task("later", log))
    journal = tmp_path / ".batchrun" / "notice.sqlite"

    stopped = run_cli("run", config_path, "--deadline", "0.2")
    events_of_first = len(query(journal, "SELECT seq FROM events WHERE run_id = 1"))
    fresh = run_cli("run", config_path)
    notices = [line for line in fresh.stderr.splitlines() if "did not finish" in line]
    runs = query(journal, "SELECT run_id, status FROM runs ORDER BY run_id")

    assert stopped.returncode == 3, stopped.stderr
    assert fresh.returncode == 0, fresh.stderr
    assert len(notices) == 1, fresh.stderr
    assert "--resume" in notices[0]
    assert str(config_path) in notices[0]
    assert runs == [{"run_id": 1, "status": "stopped"}, {"run_id": 2, "status": "finished"}]
    assert len(query(journal, "SELECT seq FROM events WHERE run_id = 1")) == events_of_first


@pytest.mark.timeout(60)
def test_resume_without_notice_after_finished_run(make_config, tmp_path):
    config_path = make_config('[run]\nname = "quiet"\n' + probe_task("ok", tmp_path / "records.jsonl"))

    first = run_cli("run", config_path)
    second = run_cli("run", config_path)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert "did not finish" not in second.stderr


@pytest.mark.timeout(60)
def test_resume_without_run_in_journal_exits_2(make_config, tmp_path):
    log = tmp_path / "records.jsonl"
    config_path = make_config('[run]\nname = "never"\n' + probe_task("ok", log))

    result = run_cli("run", config_path, "--resume")

    assert result.returncode == 2, result.stderr
    assert "contains no run named 'never'" in result.stderr
    assert read_records(log) == []


# -- attempts in flight when the supervisor dies ------------------------------------------------


@pytest.mark.timeout(120)
def test_resume_interrupted_attempts_not_charged(make_config, tmp_path):
    log = tmp_path / "records.jsonl"
    text = '[run]\nname = "interrupted"\nmax_concurrent = 2\n' + RETRY_FIXED
    text += probe_task("flaky", log, sleep=0.8, fail_attempts=1) + probe_task("slow", log, sleep=2.5)
    config_path = make_config(text)
    journal = tmp_path / ".batchrun" / "interrupted.sqlite"

    process = start_cli("run", config_path, stderr_path=tmp_path / "killed.log")
    second_attempt = wait_for_event(journal, "event = 'attempt-started' AND task_id = 'flaky' AND attempt = 2")
    process.kill()
    process.wait(timeout=WAIT_TIMEOUT)
    resumed = run_cli("run", config_path, "--resume")
    events = read_events(journal)
    interrupted = sorted((event["task_id"], event["attempt"]) for event in events if event["event"] == "attempt-interrupted")
    resumed_starts = sorted((event["task_id"], event["attempt"]) for event in events if event["event"] == "attempt-started" and event["session_id"] == 2)
    results = results_by_task(config_path)
    flaky_attempts = sorted({record["attempt"] for record in read_records(log) if record["task"] == "flaky"})
    left = wait_until_gone(worker_pids(journal, log), ORPHAN_EXIT_TIMEOUT)
    kill_survivors(left)

    assert second_attempt is not None, "flaky never started its second attempt"
    assert resumed.returncode == 0, resumed.stderr
    assert interrupted == [("flaky", 2), ("slow", 1)]
    assert resumed_starts == [("flaky", 2), ("slow", 1)]
    assert results["flaky"]["attempts"] == 2
    assert results["slow"]["attempts"] == 1
    assert flaky_attempts == [1, 2]
    assert left == []


@pytest.mark.timeout(120)
def test_resume_carries_on_retry_delay(make_config, tmp_path):
    log = tmp_path / "records.jsonl"
    text = '[run]\nname = "delayed"\n[retry]\npolicy = "fixed"\ndelay = 3\njitter = false\n'
    text += probe_task("flaky", log, fail_attempts=1)
    config_path = make_config(text)
    journal = tmp_path / ".batchrun" / "delayed.sqlite"

    process = start_cli("run", config_path, stderr_path=tmp_path / "killed.log")
    scheduled = wait_for_event(journal, "event = 'retry-scheduled'")
    process.kill()
    process.wait(timeout=WAIT_TIMEOUT)
    resumed = run_cli("run", config_path, "--resume")
    [second_start] = query(journal, "SELECT wall FROM events WHERE event = 'attempt-started' AND attempt = 2")
    due_wall = json.loads(scheduled["data"])["due_wall"] if scheduled is not None else None
    left = wait_until_gone(worker_pids(journal, log), ORPHAN_EXIT_TIMEOUT)
    kill_survivors(left)

    assert scheduled is not None, "the first attempt never scheduled its retry"
    assert resumed.returncode == 0, resumed.stderr
    # Both times come from time.time() in supervisors on this machine; the
    # resumed supervisor waits out what was left of the delay.
    assert second_start["wall"] >= due_wall
    assert left == []


# -- orphaned workers ---------------------------------------------------------------------------


SPAWNING_MODULE = """
import os
import subprocess
import time


def spawn_and_wait(folder, name):
    child = subprocess.Popen(["sleep", "60"])
    path = os.path.join(folder, name + ".pids")
    with open(path + ".tmp", "w", encoding="utf-8") as stream:
        stream.write(f"{os.getpid()} {child.pid}")
    os.replace(path + ".tmp", path)
    time.sleep(30)
"""


@pytest.mark.timeout(90)
def test_resume_orphaned_workers_exit_after_sigkill(make_config, tmp_path):
    (tmp_path / "spawning_tasks.py").write_text(SPAWNING_MODULE, encoding="utf-8")
    text = '[run]\nname = "orphans"\nmax_concurrent = 2\n'
    for name in ("first", "second"):
        text += f'\n[[tasks]]\nid = "{name}"\ncall = "spawning_tasks:spawn_and_wait"\nkwargs = {{ folder = {toml_string(tmp_path)}, name = "{name}" }}\n'
    config_path = make_config(text)
    pid_files = [tmp_path / "first.pids", tmp_path / "second.pids"]

    process = start_cli("run", config_path, stderr_path=tmp_path / "killed.log")
    deadline = time.monotonic() + WAIT_TIMEOUT
    while not all(path.exists() for path in pid_files) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.kill()
    process.wait(timeout=WAIT_TIMEOUT)
    pids = [int(pid) for path in pid_files if path.exists() for pid in path.read_text(encoding="utf-8").split()]
    left = wait_until_gone(pids, ORPHAN_EXIT_TIMEOUT)
    kill_survivors(left)

    assert len(pids) == 4, "both tasks must have started a child before the kill"
    assert left == [], f"workers or their children still running {ORPHAN_EXIT_TIMEOUT} s after the supervisor died: {left}"


@pytest.mark.timeout(90)
def test_resume_notices_change_of_interrupted_task(make_config, tmp_path):
    # The task's only record is its first attempt, cut short by the kill:
    # the journal has no task row for it, only the attempt's start.
    log = tmp_path / "records.jsonl"
    text = f"""
        [run]
        name = "interrupted-change"
        max_concurrent = 1

        [[tasks]]
        id = "long"
        call = "tests.probe:record"
        kwargs = {{ log = {json.dumps(str(log))}, sleep = SLEEP }}
        """
    config = make_config(text.replace("SLEEP", "5.0"))
    process = subprocess.Popen([sys.executable, "-m", "batchrun", "run", str(config), "-q"], cwd=ROOT)
    journal = tmp_path / ".batchrun" / "interrupted-change.sqlite"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _attempt_started(journal):
        time.sleep(0.05)
    process.kill()
    process.wait(10)

    make_config(text.replace("SLEEP", "0.1"))
    resumed = subprocess.run([sys.executable, "-m", "batchrun", "run", str(config), "--resume", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=60)

    assert resumed.returncode == 2, resumed.stderr
    assert "task 'long' changed since the journal recorded it" in resumed.stderr


def _attempt_started(journal) -> bool:
    if not journal.exists():
        return False
    try:
        connection = sqlite3.connect(f"{journal.resolve().as_uri()}?mode=ro", uri=True)
        try:
            return connection.execute("SELECT COUNT(*) FROM events WHERE event = 'attempt-started'").fetchone()[0] > 0
        finally:
            connection.close()
    except sqlite3.Error:
        return False
