"""The durable job queue: SQLite in ``state_dir``, written before a job is acknowledged.

A job moves ``queued → running → done``; its terminal result is stored with the
job and stays until the broker has acknowledged its publication
(``delivered``).  The database runs in WAL mode with ``synchronous=FULL`` so a
committed transaction survives a power cut; every state change is one
transaction, so a ``kill -9`` at any moment leaves either the state before or
the state after it.

On start, ``recover`` puts jobs that were ``running`` back in the queue (at
most ``max_attempts`` times, so a job that kills the agent cannot loop
forever) and returns the results still waiting for delivery.

``open_store`` is how the daemon opens it: a database that is not one, is
malformed or lacks a column is moved aside (``jobs.sqlite3.corrupt-<time>``)
and replaced by an empty one, so a flipped bit on an SD card costs the queue,
not the box; a ``state_dir`` it cannot write is a ``StorageError`` naming the
path and the fix.
"""

from __future__ import annotations

import logging
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent.jobs.damage import (
    SCHEMA_COLUMNS,
    WAL_CHECKPOINT_PAGES,
    WAL_LIMIT_BYTES,
    CorruptStoreError,
    NewerStoreError,
    check_free_space,
    check_objects,
    corrupt_copies,
    fix_for,
    inspect_file,
    is_corruption,
    move_aside,
    not_a_file,
    stamp_version,
)
from edge_contract.errors import StorageError

__all__ = [
    "CorruptStoreError",
    "JobStore",
    "NewerStoreError",
    "StoredJob",
    "corrupt_copies",
    "inspect_file",
    "is_corruption",
    "open_store",
]

log = logging.getLogger(__name__)

JobState = Literal["queued", "running", "done"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    request     TEXT NOT NULL,
    reply_topic TEXT NOT NULL,
    correlation BLOB,
    received_at REAL NOT NULL,
    deadline    REAL,
    state       TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done')),
    attempts    INTEGER NOT NULL DEFAULT 0,
    result      TEXT,
    delivered   INTEGER NOT NULL DEFAULT 0,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_queued ON jobs (state, seq);
CREATE INDEX IF NOT EXISTS jobs_undelivered ON jobs (delivered, state);
"""


@dataclass(frozen=True)
class StoredJob:
    """One row of the queue."""

    id: str
    request: str
    reply_topic: str
    correlation: bytes | None
    received_at: float
    deadline: float | None
    state: JobState
    attempts: int
    result: str | None
    delivered: bool


class JobStore:
    """Thread-safe access to the queue database (one connection, one lock)."""

    def __init__(self, path: str | Path, *, max_attempts: int = 3) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_attempts = max_attempts
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            # A small state_dir must hold the WAL: checkpoint often, truncate it after (damage.py).
            self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
            self._db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
            check_objects(self._db)
            self._db.executescript(_SCHEMA)
            stamp_version(self._db, self.path)
        except (sqlite3.Error, StorageError):
            self._db.close()
            raise

    def check(self) -> None:
        """Raise ``CorruptStoreError`` unless the file is an intact queue database with every column."""
        with self._lock:
            try:
                columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
                problems = [str(r[0]) for r in self._db.execute("PRAGMA quick_check").fetchall()]
            except sqlite3.DatabaseError as exc:
                if is_corruption(exc):
                    raise CorruptStoreError(str(exc)) from exc
                raise
        missing = sorted(SCHEMA_COLUMNS - columns)
        if missing:
            raise CorruptStoreError(f"the jobs table lacks column(s) {', '.join(missing)}")
        if problems != ["ok"]:
            raise CorruptStoreError("integrity check: " + "; ".join(problems[:3]).replace("\n", " "))

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def _one(self, sql: str, args: tuple[object, ...] = ()) -> StoredJob | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs {sql}", args).fetchone()
        return _row(row) if row else None

    def get(self, job_id: str) -> StoredJob | None:
        """The job with this id, if known."""
        with self._lock:
            return self._one("WHERE id = ?", (job_id,))

    def accept(
        self,
        job_id: str,
        request: str,
        reply_topic: str,
        correlation: bytes | None,
        *,
        deadline: float | None,
        received_at: float | None = None,
    ) -> StoredJob | None:
        """Queue a new job durably. Returns the existing job instead when the id is known."""
        with self._lock:
            existing = self._one("WHERE id = ?", (job_id,))
            if existing is not None:
                return existing
            self._db.execute(
                "INSERT INTO jobs (id, request, reply_topic, correlation, received_at, deadline, state)"
                " VALUES (?, ?, ?, ?, ?, ?, 'queued')",
                (job_id, request, reply_topic, correlation, received_at or time.time(), deadline),
            )
            return None

    def record(self, job_id: str, reply_topic: str, correlation: bytes | None, result: str) -> None:
        """Store a terminal result for a job that never entered the queue (e.g. rejected)."""
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO jobs (id, request, reply_topic, correlation, received_at, state,"
                " result, finished_at) VALUES (?, '', ?, ?, ?, 'done', ?, ?)",
                (job_id, reply_topic, correlation, time.time(), result, time.time()),
            )

    def queued_count(self) -> int:
        """Jobs waiting or running."""
        with self._lock:
            (count,) = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')"
            ).fetchone()
            return int(count)

    def open_jobs(self) -> list[StoredJob]:
        """Jobs queued or running, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state IN ('queued', 'running') ORDER BY seq"
            ).fetchall()
            return [_row(r) for r in rows]

    def claim_next(self) -> StoredJob | None:
        """Mark the oldest queued job running and return it.

        This one commit skips the fsync: it lies between a job's arrival and its
        first token, where a flush costs milliseconds on an SD card.  WAL mode
        still makes it durable against a crash of the process (kill -9, the OOM
        killer: what the attempts counter is for); after a power cut it may be
        undone, and then the job simply runs again from the queue.
        """
        with self._lock:
            job = self._one("WHERE state = 'queued' ORDER BY seq LIMIT 1")
            if job is None:
                return None
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute(
                    "UPDATE jobs SET state = 'running', attempts = attempts + 1 WHERE id = ?", (job.id,)
                )
            finally:
                self._db.execute("PRAGMA synchronous=FULL")
            return self._one("WHERE id = ?", (job.id,))

    def finish(self, job_id: str, result: str, *, only_queued: bool = False) -> bool:
        """Store the terminal result; False if the job already had one (it keeps the first).

        ``only_queued``: only if the job has not started (a cancel racing the worker's claim).
        """
        states = "state = 'queued'" if only_queued else "state != 'done'"
        with self._lock:
            cur = self._db.execute(
                f"UPDATE jobs SET state = 'done', result = ?, finished_at = ? WHERE id = ? AND {states}",
                (result, time.time(), job_id),
            )
            return cur.rowcount == 1

    def requeue(self, job_id: str) -> None:
        """Put a running job back, as if it had not started (a checkpoint at shutdown)."""
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state = 'queued', attempts = MAX(attempts - 1, 0)"
                " WHERE id = ? AND state = 'running'",
                (job_id,),
            )

    def mark_delivered(self, job_id: str, *, durable: bool = True) -> None:
        """The broker acknowledged the result: it need not be sent again.

        ``durable`` False skips the fsync (as ``claim_next`` does): for a result handed over in
        memory (an HTTP job's), where a mark lost to a power cut costs nothing but a row kept.
        """
        with self._lock:
            if durable:
                self._db.execute("UPDATE jobs SET delivered = 1 WHERE id = ?", (job_id,))
                return
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("UPDATE jobs SET delivered = 1 WHERE id = ?", (job_id,))
            finally:
                self._db.execute("PRAGMA synchronous=FULL")

    def undelivered(self) -> list[StoredJob]:
        """Finished jobs whose result the broker has not acknowledged yet, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state = 'done' AND delivered = 0 ORDER BY seq"
            ).fetchall()
            return [_row(r) for r in rows]

    def recover(self) -> list[StoredJob]:
        """After a restart: requeue interrupted jobs, or give up on those tried too often.

        Returns the interrupted jobs that ran out of attempts; the caller stores a
        ``failed`` result for each.
        """
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state = 'running' ORDER BY seq"
            ).fetchall()
            jobs = [_row(r) for r in rows]
            self._db.execute(
                "UPDATE jobs SET state = 'queued' WHERE state = 'running' AND attempts < ?",
                (self.max_attempts,),
            )
            return [j for j in jobs if j.attempts >= self.max_attempts]

    def prune(self, *, keep_s: float, keep_max: int) -> int:
        """Forget delivered results older than ``keep_s`` or beyond the newest ``keep_max``."""
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM jobs WHERE state = 'done' AND delivered = 1 AND (finished_at < ? OR seq <"
                " (SELECT COALESCE(MIN(seq), 0) FROM (SELECT seq FROM jobs WHERE state = 'done'"
                " ORDER BY seq DESC LIMIT ?)))",
                (time.time() - keep_s, keep_max),
            )
            return cur.rowcount


_COLUMNS = "id, request, reply_topic, correlation, received_at, deadline, state, attempts, result, delivered"


def _row(row: tuple[object, ...]) -> StoredJob:
    (job_id, request, reply, corr, received, deadline, state, attempts, result, delivered) = row
    return StoredJob(
        id=str(job_id),
        request=str(request),
        reply_topic=str(reply),
        correlation=bytes(corr) if isinstance(corr, bytes | bytearray | memoryview) else None,
        received_at=float(received),  # type: ignore[arg-type]
        deadline=float(deadline) if deadline is not None else None,  # type: ignore[arg-type]
        state=state,  # type: ignore[arg-type]
        attempts=int(attempts),  # type: ignore[call-overload]
        result=str(result) if result is not None else None,
        delivered=bool(delivered),
    )


def open_store(path: str | Path, *, max_attempts: int = 3) -> tuple[JobStore, Path | None]:
    """Open the queue at ``path``; returns it and where a corrupt database was moved, if one was.

    Raises ``StorageError`` (one line: the path, the cause and the fix) when the
    directory or the file cannot be used at all.
    """
    path = Path(path)
    state_dir = path.parent
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=state_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise StorageError(
            f"state_dir {state_dir} is not writable ({exc.strerror or exc}): make it writable by the "
            "agent's user, or set state_dir to a writable directory"
        ) from None
    if path.is_dir():
        raise StorageError(
            f"{path} is a directory, not the job database: move it away (the agent creates the file)"
        )
    check_free_space(state_dir)
    moved: Path | None = None
    odd = not_a_file(path)
    if odd is not None:  # SQLite would fail on it with "disk I/O error": the wrong lead
        moved = move_aside(path, f"{odd}, not a database file")
    retried = False
    for _attempt in range(2):
        store: JobStore | None = None
        try:
            store = JobStore(path, max_attempts=max_attempts)
            store.check()
        except CorruptStoreError as exc:
            if store is not None:
                store.close()
            if retried:
                raise StorageError(f"job database {path}: {exc.message}: {fix_for(exc)}") from None
            moved, retried = move_aside(path, exc.message), True
            continue
        except sqlite3.Error as exc:
            if store is not None:
                store.close()
            if not is_corruption(exc) or retried:
                raise StorageError(f"job database {path}: {exc}: {fix_for(exc)}") from None
            moved, retried = move_aside(path, str(exc)), True
            continue
        return store, moved
    raise AssertionError("unreachable: a fresh database either opens or raises")
