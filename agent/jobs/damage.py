"""What can be wrong with the job database, what is done about it, and the size rules.

SQLite's own verdicts (``is_corruption``), moving a damaged database aside
(``move_aside``, ``corrupt_copies``), doctor's read-only look (``inspect_file``),
the fix named for an error (``_fix``) — and, since issue 24:

A ``jobs.sqlite3`` that is a FIFO, a socket or a device, a database where ``jobs``
is a view (or has triggers), or one stamped with a schema version this agent
does not know, used to end in "make state_dir writable" — the wrong fix — and a
restart loop.  Here each is named:

* not a regular file (a FIFO, a socket, a device): moved aside like a corrupt
  database (``open_store``); a directory is reported (it may hold someone's data);
* a schema object that is not the agent's (``jobs`` a view, a trigger, a view):
  ``CorruptStoreError``, moved aside;
* ``PRAGMA user_version``: 0 (a new file, or one from an agent before issue 24)
  is stamped ``SCHEMA_VERSION``; a newer version is ``NewerStoreError`` (run
  the newer agent, or move the file aside); a negative one is corrupt.

The WAL is checkpointed every ``WAL_CHECKPOINT_PAGES`` pages and truncated to
``WAL_LIMIT_BYTES`` after a checkpoint (SQLite's defaults, 1000 pages and no
limit, let it grow to megabytes and stay there), and the agent refuses to start
with less than ``MIN_FREE_BYTES`` free in ``state_dir``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import stat
import time
from pathlib import Path

from edge_contract.errors import StorageError

log = logging.getLogger("agent.jobs.store")  # the store's messages, under the store's name

SCHEMA_VERSION = 1
#: Checkpoint the WAL into the database every this many pages (4 KiB each: 256 KiB).
WAL_CHECKPOINT_PAGES = 64
#: After a checkpoint the WAL file is truncated to at most this size.
WAL_LIMIT_BYTES = 256 * 1024
#: Below this much free space in state_dir the agent does not start: the WAL between two
#: checkpoints, the database's growth and the results kept for delivery need room.
MIN_FREE_BYTES = 2 * 1024 * 1024
_OWN_OBJECTS = {("table", "jobs"), ("index", "jobs_queued"), ("index", "jobs_undelivered")}


class CorruptStoreError(StorageError):
    """The job database is not one, is malformed, or lacks part of its schema."""

    code = "storage_corrupt"


class NewerStoreError(StorageError):
    """The job database was written by a newer agent (a schema version this one does not know)."""


def not_a_file(path: Path) -> str | None:
    """What ``path`` is when it exists and is no regular file (``"a FIFO"``, ...), else None."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError:
        return None  # unreadable: opening it says why
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device file"


def check_objects(db: sqlite3.Connection) -> None:
    """Raise ``CorruptStoreError`` when the schema holds an object the agent did not make under
    one of its names, or any view or trigger (``jobs`` as a view, say)."""
    foreign = [
        f"{kind} {name}"
        for kind, name in db.execute("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
        if (kind in ("view", "trigger"))
        or (name in {n for _k, n in _OWN_OBJECTS} and (kind, name) not in _OWN_OBJECTS)
    ]
    if foreign:
        raise CorruptStoreError(f"not the agent's schema: {', '.join(foreign)}")


def stamp_version(db: sqlite3.Connection, path: Path) -> None:
    """Check ``user_version`` and stamp a new (or older agent's) database with ``SCHEMA_VERSION``."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version == SCHEMA_VERSION:
        return
    if version == 0:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return
    if version < 0:
        raise CorruptStoreError(f"schema version {version}")
    raise NewerStoreError(
        f"job database {path} has schema version {version}, newer than this agent's ({SCHEMA_VERSION}): "
        f"run the newer edge-agent again, or move {path} aside to start with an empty queue"
    )


def check_free_space(state_dir: Path) -> None:
    """Raise ``StorageError`` when ``state_dir`` has less than ``MIN_FREE_BYTES`` free."""
    try:
        free = shutil.disk_usage(state_dir).free
    except OSError:
        return  # opening the database says what is wrong
    if free < MIN_FREE_BYTES:
        raise StorageError(
            f"state_dir {state_dir} has {free // 1024} KiB free, below the {MIN_FREE_BYTES // 1024} KiB the job "
            "database needs to run: free space there, or point state_dir at a larger file system"
        )


SCHEMA_COLUMNS = frozenset(
    {"seq", "id", "request", "reply_topic", "correlation", "received_at", "deadline", "state", "attempts"}
    | {"result", "delivered", "finished_at"}
)


# SQLite's own verdicts on a file that is not (or no longer) a database; a schema that
# lacks a column shows as a plain SQL error naming it while the schema is set up.
_CORRUPT = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_CORRUPT_INDEX", "SQLITE_CORRUPT_SEQUENCE"})


def is_corruption(exc: BaseException) -> bool:
    """Whether SQLite says the database file itself is damaged (not full, locked or unwritable)."""
    return isinstance(exc, sqlite3.Error) and _is_corruption(exc)


def _is_corruption(exc: sqlite3.Error) -> bool:
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name in _CORRUPT or name.startswith("SQLITE_CORRUPT"):
        return True
    text = str(exc)
    return "malformed" in text or "not a database" in text or text.startswith("no such column")


def fix_for(exc: BaseException) -> str:
    """What an operator should do about an error opening the job database."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    if name.startswith("SQLITE_FULL") or "disk is full" in text:
        return "free space on that file system"
    if name.startswith("SQLITE_BUSY") or "locked" in text:
        return "another process holds it: is a second edge-agent running with this state_dir?"
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")) or "readonly" in text:
        return "make state_dir writable by the agent's user, or point state_dir at a writable directory"
    if name.startswith("SQLITE_IOERR") or "I/O error" in text:
        return "the storage failed to read or write it: check the disk or SD card (dmesg), then move the file aside"
    return "it is not a usable job database: move it aside (the agent then starts with an empty queue)"


def move_aside(path: Path, why: str) -> Path:
    """Rename a corrupt database (and its WAL and shared-memory files) to ``<name>.corrupt-<UTC time>``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    try:
        path.rename(target)
        for suffix in ("-wal", "-shm"):
            side = path.with_name(path.name + suffix)
            if side.exists():
                side.rename(target.with_name(target.name + suffix))
        with contextlib.suppress(OSError):  # make the renames durable where the file system allows it
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as exc:
        raise StorageError(
            f"job database {path} is corrupt ({why}) and cannot be moved aside ({exc.strerror}): "
            "move or delete it by hand"
        ) from None
    log.critical(
        "JOB DATABASE CORRUPT: %s (%s). It was moved to %s and the agent starts with an EMPTY queue: "
        "jobs stored there are not answered. Keep the file for inspection, delete it to clear this warning.",
        path,
        why,
        target,
    )
    return target


def corrupt_copies(path: str | Path) -> list[Path]:
    """Corrupt databases moved aside next to ``path`` and not yet deleted, oldest first."""
    path = Path(path)
    try:
        found = [
            p for p in path.parent.glob(f"{path.name}.corrupt-*") if not p.name.endswith(("-wal", "-shm"))
        ]
    except OSError:
        return []
    return sorted(found)


def inspect_file(path: str | Path) -> tuple[int, int]:
    """Read-only look at a job database: (jobs queued or running, results kept).

    Raises ``CorruptStoreError`` when the agent would move it aside at start,
    ``NewerStoreError`` when a newer agent wrote it, and ``sqlite3.Error`` when it
    cannot be read at all.  Writes nothing.
    """
    odd = not_a_file(Path(path))
    if odd is not None:  # opening a FIFO to read would wait for a writer
        raise CorruptStoreError(f"{odd}, not a database file")
    db = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
    try:
        check_objects(db)
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version < 0:
            raise CorruptStoreError(f"schema version {version}")
        if version > SCHEMA_VERSION:
            raise NewerStoreError(
                f"schema version {version}, newer than this agent's ({SCHEMA_VERSION}): run the newer "
                "edge-agent, or move the file aside to start with an empty queue"
            )
        columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
        missing = sorted(SCHEMA_COLUMNS - columns)
        if missing:
            raise CorruptStoreError(f"the jobs table lacks column(s) {', '.join(missing)}")
        problems = [str(r[0]) for r in db.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise CorruptStoreError("integrity check: " + "; ".join(problems[:3]).replace("\n", " "))
        (waiting,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()
        (done,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'done'").fetchone()
        return int(waiting), int(done)
    except sqlite3.DatabaseError as exc:
        if _is_corruption(exc):
            raise CorruptStoreError(str(exc)) from exc
        raise
    finally:
        db.close()
