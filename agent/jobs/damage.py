"""What can be wrong with the job database besides SQLite's own corruption, and the size rules.

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

import os
import shutil
import sqlite3
import stat
from pathlib import Path

from edge_contract.errors import StorageError

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
