"""Desired state with a durable source of truth: every assignment, with its history.

An assignment says what a device or a group should run: a signed release, or
nothing (cleared).  Each is recorded in the state file *before* it is published
as the retained ``…/model/desired`` message the boxes converge to, so the
broker's retained messages are a copy that can always be rebuilt::

    edge-fleet reconcile            # publish every current assignment again (after a broker lost its data)
    edge-fleet history DEVICE|GROUP # every assignment of a device (and of its group), oldest first
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from agent.link.mqtt import Client
from edge_contract.manifest import Manifest
from edge_contract.protocol import FleetTopics

from .broker import BrokerOptions, FleetError, add_broker_args, open_client, options_from, publish_retained
from .output import table
from .state import add_db_arg, default_db, open_db, transaction

Kind = Literal["device", "group"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS releases (
    digest TEXT PRIMARY KEY, release TEXT NOT NULL, rollback INTEGER NOT NULL, manifest BLOB NOT NULL,
    added REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, target TEXT NOT NULL,
    release TEXT, digest TEXT, origin TEXT NOT NULL, at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS assignments_by_target ON assignments (kind, target, seq);
"""


@dataclass(frozen=True)
class Assignment:
    """One recorded assignment."""

    seq: int
    kind: Kind
    target: str
    release: str | None  # NAME@VERSION, None: cleared
    digest: str | None
    origin: str  # deploy, rollout ID, rollback ID, clear, override …
    at: float

    def as_json(self) -> dict[str, Any]:
        """The row as a JSON-ready dict."""
        return asdict(self)


def desired_topic(prefix: str, kind: Kind, target: str) -> str:
    """The retained desired-state topic of a device or a group."""
    fleet = FleetTopics(prefix)
    return fleet.device(target).model_desired if kind == "device" else fleet.group(target).model_desired


class Assignments:
    """The ``releases`` and ``assignments`` tables of the state file."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.executescript(_SCHEMA)

    @classmethod
    def open(cls, path: Path | None = None) -> Assignments:
        """The assignments of the state file at ``path`` (default: the profile's)."""
        return cls(open_db(path))

    def remember(self, payload: bytes) -> str:
        """Keep a signed manifest (by its digest); returns the digest."""
        manifest = Manifest.parse(payload)
        digest = hashlib.sha256(payload).hexdigest()
        with transaction(self.db) as db:
            db.execute(
                "INSERT OR IGNORE INTO releases VALUES (?,?,?,?,?)",
                (digest, manifest.release_id, int(manifest.rollback), payload, time.time()),
            )
        return digest

    def manifest(self, digest: str) -> bytes | None:
        """A kept manifest."""
        row = self.db.execute("SELECT manifest FROM releases WHERE digest = ?", (digest,)).fetchone()
        return None if row is None else bytes(row[0])

    def release_manifest(self, release_id: str) -> bytes | None:
        """The newest kept manifest of ``NAME@VERSION`` (a forward release rather than a rollback)."""
        row = self.db.execute(
            "SELECT manifest FROM releases WHERE release = ? ORDER BY rollback, added DESC LIMIT 1",
            (release_id,),
        ).fetchone()
        return None if row is None else bytes(row[0])

    def record(self, kind: Kind, targets: Iterable[str], payload: bytes | None, origin: str) -> None:
        """Record that ``targets`` should run ``payload`` (None or empty: cleared)."""
        digest = release = None
        if payload:
            digest = self.remember(payload)
            release = Manifest.parse(payload).release_id
        now = time.time()
        with transaction(self.db) as db:
            db.executemany(
                "INSERT INTO assignments (kind, target, release, digest, origin, at) VALUES (?,?,?,?,?,?)",
                [(kind, t, release, digest, origin, now) for t in targets],
            )

    def current(self, kind: Kind | None = None) -> list[Assignment]:
        """The latest assignment of every target (cleared ones included), by kind and target."""
        rows = self.db.execute(
            "SELECT a.* FROM assignments a JOIN (SELECT kind, target, MAX(seq) AS seq FROM assignments "
            "GROUP BY kind, target) last ON a.seq = last.seq ORDER BY a.kind, a.target"
        )
        found = [_assignment(r) for r in rows]
        return [a for a in found if kind is None or a.kind == kind]

    def current_of(self, kind: Kind, target: str) -> Assignment | None:
        """The latest assignment of one target."""
        row = self.db.execute(
            "SELECT * FROM assignments WHERE kind = ? AND target = ? ORDER BY seq DESC LIMIT 1",
            (kind, target),
        ).fetchone()
        return None if row is None else _assignment(row)

    def history(self, target: str, group: str | None = None) -> list[Assignment]:
        """Every assignment of ``target`` (as a device or a group) and of ``group``, oldest first."""
        rows = self.db.execute(
            "SELECT * FROM assignments WHERE target = ? OR (kind = 'group' AND target = ?) ORDER BY seq",
            (target, group or target),
        )
        return [_assignment(r) for r in rows]


def _assignment(row: tuple[Any, ...]) -> Assignment:
    return Assignment(
        seq=row[0], kind=row[1], target=row[2], release=row[3], digest=row[4], origin=row[5], at=row[6]
    )


def assign(
    store: Assignments,
    client: Client,
    prefix: str,
    kind: Kind,
    targets: list[str],
    payload: bytes | None,
    origin: str,
) -> None:
    """Record, then publish, the desired state of ``targets``."""
    store.record(kind, targets, payload, origin)
    publish_retained(client, [(desired_topic(prefix, kind, t), payload or b"") for t in targets])


def reconcile(store: Assignments, options: BrokerOptions) -> dict[str, int]:
    """Publish every current assignment again; returns counts by kind and ``cleared``."""
    current = store.current()
    messages = []
    counts = {"device": 0, "group": 0, "cleared": 0}
    for a in current:
        payload = store.manifest(a.digest) if a.digest else b""
        if payload is None:
            raise FleetError(f"the state file lost the manifest of {a.release} (digest {a.digest})")
        messages.append((desired_topic(options.prefix, a.kind, a.target), payload))
        counts[a.kind if payload else "cleared"] += 1
    with open_client(options) as client:
        publish_retained(client, messages)
    return counts


# -- command line -----------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``reconcile`` and ``history``."""
    rec = sub.add_parser(
        "reconcile",
        help="publish every recorded desired state again (after the broker lost its retained messages)",
    )
    rec.add_argument("--json", action="store_true", help="the counts as JSON")
    add_db_arg(rec)
    add_broker_args(rec)
    rec.set_defaults(func=reconcile_command)

    hist = sub.add_parser("history", help="every assignment of a device (and its group) or of a group")
    hist.add_argument("target", metavar="DEVICE|GROUP")
    hist.add_argument("--json", action="store_true", help="one JSON object per assignment")
    add_db_arg(hist)
    hist.set_defaults(func=history_command)


def reconcile_command(args: argparse.Namespace) -> int:
    """``edge-fleet reconcile`` (by the server when the profile names one)."""
    from . import server_cmd
    from .client import server_client

    client = server_client()
    if client is not None:
        return server_cmd.reconcile(client, args.json)
    store = Assignments.open(args.db)
    if not store.current():
        raise FleetError(
            f"no assignment is recorded in {args.db or default_db()}: nothing to publish "
            "(is this the state file deploy and rollout wrote? see --db and the profile's db)"
        )
    counts = reconcile(store, options_from(args))
    if args.json:
        print(json.dumps(counts))
    else:
        print(
            f"published again: {counts['device']} device and {counts['group']} group desired states, "
            f"{counts['cleared']} cleared (acknowledged by the broker)"
        )
    return 0


def history_command(args: argparse.Namespace) -> int:
    """``edge-fleet history DEVICE|GROUP``."""
    from . import server_cmd
    from .client import server_client
    from .inventory import Inventory  # (the inventory knows a device's group)

    client = server_client()
    if client is not None:
        return server_cmd.history(client, args.target, args.json)
    db = open_db(args.db)
    store = Assignments(db)
    known = Inventory(db).get(args.target)
    rows = store.history(args.target, known.group if known else None)
    if not rows:
        raise FleetError(f"no assignment of {args.target!r} is recorded in this state file")
    if args.json:
        for row in rows:
            print(json.dumps(row.as_json()))
        return 0
    body = [
        [
            datetime.datetime.fromtimestamp(r.at).strftime("%Y-%m-%d %H:%M:%S"),
            f"{r.kind} {r.target}",
            r.release or "(cleared)",
            r.origin,
        ]
        for r in rows
    ]
    print(table(["WHEN", "TARGET", "RELEASE", "BY"], body))
    return 0
