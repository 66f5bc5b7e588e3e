"""The operator's state file: one SQLite database for the inventory, the desired-state
assignments with their history, and the rollouts.

It is the fleet's source of truth on the operator's side: the broker's retained
messages are a copy of it that ``edge-fleet reconcile`` can always rebuild.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from .profile import load_profile


def default_db() -> Path:
    """``$EDGE_FLEET_DB``, else the profile's ``db``, else ``$XDG_STATE_HOME/edge-fleet/rollouts.sqlite3``."""
    profile = load_profile()  # (EDGE_FLEET_DB is the profile's db from the environment)
    if profile.db is not None:
        return profile.db
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state / "edge-fleet" / "rollouts.sqlite3"


def add_db_arg(parser: argparse.ArgumentParser) -> None:
    """``--db``: where the state file is."""
    parser.add_argument(
        "--db",
        type=Path,
        default=None,
        help="state file (default: $EDGE_FLEET_DB, the profile's db, or ~/.local/state/edge-fleet/rollouts.sqlite3)",
    )


def open_db(path: Path | None = None) -> sqlite3.Connection:
    """The state file (created when missing), in autocommit mode with WAL."""
    path = path or default_db()
    path.parent.mkdir(parents=True, exist_ok=True)
    # 30 s: a rollout controller and an operator's command may write at the same moment.
    db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    return db


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One atomic change."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
