"""The run journal: every event of a run in an embedded SQLite file.

The supervisor writes each event here, and commits it, before the hooks for
it fire, so what a plugin reports is always on disk first. Events of one
supervisor loop turn share one transaction, which keeps the cost per attempt
small. The file uses SQLite's write-ahead log, so a reader (``batchrun
status``) does not block the writer. A supervisor killed at any point leaves
every committed event intact. A power cut can lose the last commits, because
with ``synchronous=NORMAL`` a commit does not wait for the disk.

Tables:

- ``meta``: the schema version and the batchrun version that created the file.
- ``runs``: one row per run, with its resolved config as JSON and its status
  (``running``, ``finished`` or ``stopped``).
- ``sessions``: one row per supervisor process that worked on a run; a
  resumed run has several. Monotonic times compare only within a session.
- ``tasks``: one row per task and run, written when the task schedules a retry
  or ends: its definition hash, charged attempts, failures by kind, the wall
  time a scheduled retry is due, and once it ended, its state, result and last
  error. A task with no row has no charged attempt, so a resumed run starts it
  afresh.
- ``events``: the append-only event log, in the order the supervisor handled
  the events. ``batchrun verify`` replays it.

Results are stored as JSON when ``json.dumps`` accepts them and the text fits
``max_result_bytes``. Otherwise the row keeps the result's ``repr`` (format
``repr``), cut to that size, or only its type and size (format ``omitted``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from batchrun.errors import BatchrunError


if TYPE_CHECKING:
    from batchrun.models import ErrorInfo, Task


#: Version of the table layout. A file with a newer version is rejected.
SCHEMA_VERSION = 1

#: Default largest result text stored in the journal, in bytes.
DEFAULT_MAX_RESULT_BYTES = 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    config_path TEXT,
    config_json TEXT NOT NULL,
    max_concurrent INTEGER NOT NULL,
    status TEXT NOT NULL,
    stop_reason TEXT,
    created_wall REAL NOT NULL,
    ended_wall REAL,
    batchrun_version TEXT NOT NULL,
    platform TEXT NOT NULL,
    host TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    session_id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    pid INTEGER NOT NULL,
    max_concurrent INTEGER NOT NULL,
    started_wall REAL NOT NULL,
    ended_wall REAL
);
CREATE TABLE IF NOT EXISTS tasks (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    task_id TEXT NOT NULL,
    definition_hash TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    failures_json TEXT NOT NULL DEFAULT '{}',
    retry_due_wall REAL,
    state TEXT,
    result_format TEXT,
    result TEXT,
    error_json TEXT,
    duration REAL,
    finished_wall REAL,
    PRIMARY KEY (run_id, task_id)
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL,
    session_id INTEGER NOT NULL,
    event TEXT NOT NULL,
    task_id TEXT,
    attempt INTEGER,
    attempt_id INTEGER,
    slot INTEGER,
    pid INTEGER,
    mono REAL,
    wall REAL NOT NULL,
    data TEXT
);
"""


class JournalError(BatchrunError):
    """Raised when a journal cannot be opened, is locked, corrupt, or of a newer schema."""

    __module__ = "batchrun"


@dataclass(slots=True)
class TaskRecord:
    """The journal's record of one task of a run."""

    task_id: str
    definition_hash: str
    attempts: int
    failures: dict[str, int]
    retry_due_wall: float | None
    state: str | None
    result_format: str | None = None
    result: str | None = None
    error: dict[str, Any] | None = None
    duration: float | None = None


@dataclass(slots=True)
class RunRecord:
    """One run as the journal stores it."""

    run_id: int
    name: str
    config_path: str | None
    config: dict[str, Any]
    max_concurrent: int
    status: str
    stop_reason: str | None
    created_wall: float
    ended_wall: float | None
    batchrun_version: str = ""
    platform: str = ""
    host: str = ""


def default_journal_path(config_path: str | os.PathLike[str] | None, run_name: str) -> Path:
    """Return ``.batchrun/<run name>.sqlite`` next to the config file (or in the current folder)."""
    folder = Path(config_path).resolve().parent if config_path is not None else Path.cwd()
    return folder / ".batchrun" / f"{run_name}.sqlite"


def definition_hash(task: Task) -> str:
    """Return a stable hash of what a task does: its call, arguments, timeout and retry settings.

    It hashes the ``repr`` of those values, which is stable across runs for
    the values a batch file or a source produces (strings, numbers,
    booleans, lists and tables with their keys in order).
    """
    text = repr((task.call, task.args, sorted(task.kwargs.items()), task.timeout, task.retry))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def encode_result(value: Any, max_bytes: int) -> tuple[str, str]:
    """Return ``(format, text)`` for storing a task result; see the module docstring."""
    if isinstance(value, (bytes, bytearray, str)) and len(value) > max_bytes:
        # Neither JSON nor a repr of it could fit, and building either would copy it.
        return "omitted", json.dumps({"type": type(value).__qualname__, "length": len(value), "max_result_bytes": max_bytes})
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        text = None
    if text is not None and len(text.encode()) <= max_bytes:
        return "json", text
    try:
        described = repr(value)
    except Exception as error:  # noqa: BLE001 - a broken __repr__ must not lose the record
        described = f"<{type(value).__name__} with a failing repr: {error}>"
    if len(described.encode()) <= max_bytes:
        return "repr", described
    size = len(text) if text is not None else len(described)
    return "omitted", json.dumps({"type": type(value).__qualname__, "text_length": size, "max_result_bytes": max_bytes})


def error_to_json(error: ErrorInfo | None) -> str | None:
    if error is None:
        return None
    return json.dumps(
        {"kind": error.kind, "type": error.type_name, "message": error.message, "traceback": error.traceback}
    )


class Journal:
    """A run journal opened for writing by one supervisor at a time."""

    def __init__(self, path: str | os.PathLike[str], *, max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES, events_file: TextIO | None = None, synchronous: str = "NORMAL") -> None:
        self.path = Path(path)
        self.max_result_bytes = max_result_bytes
        self.events_file = events_file
        self.run_id = 0
        self.session_id = 0
        self._events: list[tuple] = []
        self._task_rows: dict[str, tuple] = {}
        self._task_deletes: list[tuple[int, str]] = []
        #: Definition hashes of the tasks with an attempt started and no terminal state yet.
        self._digests: dict[str, str] = {}
        self._lock_file = _acquire_lock(self.path)
        try:
            self.connection = open_database(self.path, create=True)
            self.connection.execute(f"PRAGMA synchronous={synchronous}")
        except BaseException:
            self._lock_file.close()
            raise

    # -- runs ------------------------------------------------------------------------

    def unfinished_run(self, name: str) -> RunRecord | None:
        """Return the latest run of this name if it did not finish, or ``None``."""
        run = self.latest_run(name)
        return run if run is not None and run.status != "finished" else None

    def latest_run(self, name: str) -> RunRecord | None:
        """Return the latest run of this name, finished or not, or ``None``."""
        row = self.connection.execute("SELECT * FROM runs WHERE name = ? ORDER BY run_id DESC LIMIT 1", (name,)).fetchone()
        return None if row is None else _run_from_row(row)

    def start_run(self, name: str, config_path: str | None, config: dict[str, Any], max_concurrent: int) -> int:
        """Record a new run and return its id."""
        from batchrun import __version__

        cursor = self.connection.execute(
            "INSERT INTO runs (name, config_path, config_json, max_concurrent, status, created_wall,"
            " batchrun_version, platform, host) VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?)",
            (
                name,
                config_path,
                json.dumps(config, default=repr, sort_keys=True),
                max_concurrent,
                time.time(),
                __version__,
                platform.platform(),
                socket.gethostname(),
            ),
        )
        self.run_id = int(cursor.lastrowid)
        self._start_session(max_concurrent)
        self.record("run-started", data={"name": name, "config_path": config_path, "journal_version": SCHEMA_VERSION, "batchrun_version": __version__, "host": socket.gethostname(), "platform": platform.platform()})
        self.commit()
        return self.run_id

    def resume_run(self, run: RunRecord, max_concurrent: int) -> None:
        """Continue a run in a new session, closing the attempts it left open as interrupted."""
        self.run_id = run.run_id
        self.connection.execute("UPDATE runs SET status = 'running', stop_reason = NULL, ended_wall = NULL WHERE run_id = ?", (run.run_id,))
        self._start_session(max_concurrent)
        for session_id, task_id, attempt, attempt_id, _, _ in open_attempts(self.connection, run.run_id):
            reason = "the supervisor stopped while the attempt ran; it is not charged"
            self.record("attempt-interrupted", task_id, attempt=attempt, attempt_id=attempt_id, data={"session_id": session_id, "reason": reason})
        self.record("run-resumed", data={"session_id": self.session_id})
        self.commit()

    def _start_session(self, max_concurrent: int) -> None:
        cursor = self.connection.execute(
            "INSERT INTO sessions (run_id, pid, max_concurrent, started_wall) VALUES (?, ?, ?, ?)",
            (self.run_id, os.getpid(), max_concurrent, time.time()),
        )
        self.session_id = int(cursor.lastrowid)

    def end_run(self, status: str, stop_reason: str | None) -> None:
        """Record the end of the run (``finished`` or ``stopped``) and of this session."""
        self.record("run-ended", data={"status": status, "stop_reason": stop_reason})
        now = time.time()
        self.flush()
        self.connection.execute("UPDATE runs SET status = ?, stop_reason = ?, ended_wall = ? WHERE run_id = ?", (status, stop_reason, now, self.run_id))
        self.connection.execute("UPDATE sessions SET ended_wall = ? WHERE session_id = ?", (now, self.session_id))
        self.connection.commit()

    # -- events ----------------------------------------------------------------------

    def record(self, event: str, task_id: str | None = None, *, attempt: int | None = None, attempt_id: int | None = None, slot: int | None = None, pid: int | None = None, mono: float | None = None, data: dict[str, Any] | str | None = None) -> None:
        """Queue an event; it is written at the next :meth:`commit`.

        ``data`` is a dict, or text that is already JSON.
        """
        text = data if data is None or isinstance(data, str) else json.dumps(data, default=repr)
        self._events.append((self.run_id, self.session_id, event, task_id, attempt, attempt_id, slot, pid, mono, time.time(), text))

    def task_changed(self, task: Task, attempts: int, failures: dict[str, int], retry_due_wall: float | None) -> None:
        """Queue the attempt count, failures and retry due time of a task that will run again."""
        row = (self.run_id, task.id, self.digest_of(task), attempts, json.dumps(failures), retry_due_wall, None, None, None, None, None, None)
        self._task_rows[task.id] = row

    def task_finished(self, task: Task, state: str, attempts: int, failures: dict[str, int], result: Any, error: ErrorInfo | None, duration: float, retry_due_wall: float | None = None) -> None:
        """Queue the terminal state of a task with its result or last error.

        ``retry_due_wall`` keeps the due time of a retry that a stop cancelled.
        """
        result_format, text = (None, None)
        if state == "succeeded":
            result_format, text = encode_result(result, self.max_result_bytes)
        failures_text = json.dumps(failures) if failures else "{}"
        digest = self._digests.pop(task.id, None) or definition_hash(task)
        row = (self.run_id, task.id, digest, attempts, failures_text, retry_due_wall, state, result_format, text, error_to_json(error), duration, time.time())
        self._task_rows[task.id] = row

    def digest_of(self, task: Task) -> str:
        """Return the task's definition hash, computed once while the task is unfinished."""
        digest = self._digests.get(task.id)
        if digest is None:
            digest = self._digests[task.id] = definition_hash(task)
        return digest

    def task_reset(self, task: Task) -> None:
        """Forget a task's progress so it runs again from its first attempt."""
        self._task_rows.pop(task.id, None)
        self._digests.pop(task.id, None)
        self._task_deletes.append((self.run_id, task.id))

    def flush(self) -> None:
        """Write the queued rows inside the current transaction."""
        connection = self.connection
        if self._task_deletes:
            connection.executemany("DELETE FROM tasks WHERE run_id = ? AND task_id = ?", self._task_deletes)
            self._task_deletes = []
        if self._task_rows:
            connection.executemany(
                "INSERT OR REPLACE INTO tasks (run_id, task_id, definition_hash, attempts, failures_json, retry_due_wall,"
                " state, result_format, result, error_json, duration, finished_wall) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                self._task_rows.values(),
            )
            self._task_rows = {}
        if self._events:
            connection.executemany(
                "INSERT INTO events (run_id, session_id, event, task_id, attempt, attempt_id, slot, pid, mono, wall, data)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                self._events,
            )
            if self.events_file is not None:
                self._export(self._events)
            self._events = []

    def has_pending(self) -> bool:
        """Return whether rows are queued and not yet committed."""
        return bool(self._events or self._task_rows or self._task_deletes)

    def commit(self) -> None:
        """Write and commit every queued row; after this returns the events are durable."""
        if not self.has_pending():
            return
        self.flush()
        self.connection.commit()
        if self.events_file is not None:
            self.events_file.flush()

    def _export(self, events: list[tuple]) -> None:
        for run_id, session_id, event, task_id, attempt, attempt_id, slot, pid, mono, wall, data in events:
            record = {"event": event, "run_id": run_id, "session_id": session_id, "wall": wall}
            for key, value in (("task", task_id), ("attempt", attempt), ("attempt_id", attempt_id), ("slot", slot), ("pid", pid), ("mono", mono)):
                if value is not None:
                    record[key] = value
            if data is not None:
                record["data"] = json.loads(data)
            self.events_file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        """Commit what is queued and release the file and its lock."""
        try:
            self.commit()
        finally:
            self.connection.close()
            self._lock_file.close()


# -- reading -------------------------------------------------------------------------


def open_database(path: Path, *, create: bool = False) -> sqlite3.Connection:
    """Open a journal file and check its schema version.

    Readers (``create=False``) open the file read-only, so reading never
    changes it. A writer creates the file when it does not exist, but never
    adopts an existing SQLite file that is not a batchrun journal.

    :raises JournalError: when the file is missing (and ``create`` is false),
        is not a SQLite database, is corrupt, is another program's database,
        or has a newer schema version.
    """
    exists = path.is_file() and path.stat().st_size > 0
    if not create and not path.is_file():
        raise JournalError(f"journal not found: {path}; run the batch first, or pass the journal's path")
    if not create and not exists:
        # A supervisor killed between creating the file and writing its schema leaves it empty.
        raise JournalError(f"the journal {path} is empty, so no run was recorded in it; run the batch to start one")
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(str(path), isolation_level="DEFERRED", check_same_thread=False)
        else:
            connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        connection.row_factory = sqlite3.Row
        if exists:
            _check_schema(connection, path)
        if create:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(_SCHEMA)
            connection.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            connection.commit()
    except sqlite3.DatabaseError as error:
        raise JournalError(f"{path} is not a readable batchrun journal: {error}; move it aside to start afresh") from error
    return connection


def _check_schema(connection: sqlite3.Connection, path: Path) -> None:
    has_meta = connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
    version = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() if has_meta else None
    if version is None:
        connection.close()
        raise JournalError(
            f"{path} is an SQLite database but not a batchrun journal (it has no schema version);"
            " pass another --journal path, or move the file aside"
        )
    if int(version[0]) > SCHEMA_VERSION:
        connection.close()
        raise JournalError(
            f"{path} has journal schema version {version[0]}, newer than the {SCHEMA_VERSION} this batchrun reads;"
            " upgrade batchrun to read it"
        )


def _acquire_lock(path: Path) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    stream = open(lock_path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the journal's lifetime
    try:
        fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        stream.seek(0)
        holder = stream.read().strip() or "another process"
        stream.close()
        raise JournalError(
            f"the journal {path} is in use by {holder}; two runs cannot write one journal,"
            " so wait for it to end or pass another --journal"
        ) from None
    stream.seek(0)
    stream.truncate()
    stream.write(f"batchrun pid {os.getpid()}")
    stream.flush()
    return stream


def is_in_use(path: Path) -> bool:
    """Return whether a live supervisor holds the journal's lock."""
    lock_path = path.with_name(path.name + ".lock")
    if not lock_path.exists():
        return False
    with open(lock_path, "a+", encoding="utf-8") as stream:
        try:
            fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(stream.fileno(), fcntl.LOCK_UN)
    return False


def _run_from_row(row: sqlite3.Row) -> RunRecord:
    try:
        config = json.loads(row["config_json"])
    except (TypeError, ValueError):
        config = {}
    return RunRecord(
        run_id=row["run_id"],
        name=row["name"],
        config_path=row["config_path"],
        config=config,
        max_concurrent=row["max_concurrent"],
        status=row["status"],
        stop_reason=row["stop_reason"],
        created_wall=row["created_wall"],
        ended_wall=row["ended_wall"],
        batchrun_version=row["batchrun_version"],
        platform=row["platform"],
        host=row["host"],
    )


def list_runs(connection: sqlite3.Connection) -> list[RunRecord]:
    """Return every run in the journal, oldest first."""
    return [_run_from_row(row) for row in connection.execute("SELECT * FROM runs ORDER BY run_id")]


def load_tasks(connection: sqlite3.Connection, run_id: int) -> dict[str, TaskRecord]:
    """Return every task row of a run, by task id."""
    tasks = {}
    for row in connection.execute("SELECT * FROM tasks WHERE run_id = ?", (run_id,)):
        tasks[row["task_id"]] = TaskRecord(
            task_id=row["task_id"],
            definition_hash=row["definition_hash"],
            attempts=row["attempts"],
            failures=json.loads(row["failures_json"] or "{}"),
            retry_due_wall=row["retry_due_wall"],
            state=row["state"],
            result_format=row["result_format"],
            result=row["result"],
            error=json.loads(row["error_json"]) if row["error_json"] else None,
            duration=row["duration"],
        )
    return tasks


def open_attempts(connection: sqlite3.Connection, run_id: int) -> list[tuple[int, str, int, int, int | None, str | None]]:
    """Return every attempt of a run that started and never closed.

    Each is ``(session_id, task_id, attempt, attempt_id, pid, definition_hash)``;
    the hash is the task's definition when the attempt started.
    """
    open_by_key: dict[tuple[int, int], tuple[int, str, int, int, int | None, str | None]] = {}
    rows = connection.execute(
        "SELECT session_id, event, task_id, attempt, attempt_id, pid, data FROM events WHERE run_id = ?"
        " AND event IN ('attempt-started', 'attempt-ended', 'attempt-interrupted') ORDER BY seq",
        (run_id,),
    )
    for row in rows:
        key = (row["session_id"], row["attempt_id"])
        if row["event"] == "attempt-started":
            digest = json.loads(row["data"]).get("definition") if row["data"] else None
            open_by_key[key] = (row["session_id"], row["task_id"], row["attempt"], row["attempt_id"], row["pid"], digest)
        elif row["event"] == "attempt-interrupted":
            # The interrupting session names the session the attempt ran in.
            started_in = json.loads(row["data"]).get("session_id")
            open_by_key.pop((started_in, row["attempt_id"]), None)
        else:
            open_by_key.pop(key, None)
    return list(open_by_key.values())


@dataclass
class JournalView:
    """A journal opened read-only for ``status``, ``results`` and ``verify``."""

    path: Path
    connection: sqlite3.Connection = field(repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> JournalView:
        return cls(Path(path), open_database(Path(path)))

    def latest_run(self, name: str | None = None) -> RunRecord:
        runs = list_runs(self.connection)
        if name is not None:
            runs = [run for run in runs if run.name == name]
        if not runs:
            raise JournalError(f"the journal {self.path} contains no run{f' named {name!r}' if name else ''}")
        return runs[-1]

    def close(self) -> None:
        self.connection.close()
