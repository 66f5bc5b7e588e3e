"""Rollouts and their targets in the state file, and the pure rules of planning them."""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, get_args

from edge_contract.manifest import Manifest

from .domain.evaluate import FAILED, FINISHED, RolloutState, TargetState
from .state import transaction

__all__ = ["FAILED", "FINISHED", "OPEN", "RolloutState", "TargetState"]

# The states are the domain's (``edge_fleet.domain.evaluate``, shared with the server):
# a rollout is ``running`` until every wave is through; then ``done``, or ``waiting`` while deferred
# (offline) devices have yet to report; ``halted`` by too many failures; ``aborted`` by the operator.
# A target goes pending -> sent -> active | failed | timed_out; sent -> canceled (abort); with
# --defer-offline an offline device goes pending -> deferred (not waited for) -> active | failed.
#: Targets whose outcome the broker can still change (``rollout status`` reads them again).
OPEN: tuple[TargetState, ...] = ("sent", "deferred", "timed_out")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, release TEXT NOT NULL, grp TEXT NOT NULL, manifest BLOB NOT NULL,
    waves TEXT NOT NULL, wave_timeout REAL NOT NULL, max_failure_rate REAL NOT NULL,
    state TEXT NOT NULL, wave INTEGER NOT NULL, wave_started REAL, accepted_failures INTEGER NOT NULL,
    reason TEXT, created REAL NOT NULL, updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS targets (
    rollout TEXT NOT NULL, device TEXT NOT NULL, wave INTEGER NOT NULL, state TEXT NOT NULL,
    detail TEXT, updated REAL NOT NULL, PRIMARY KEY (rollout, device)
);
"""
# Columns added since the first state files: (table, column, declaration).
_ADDED = (
    ("rollouts", "defer_offline", "INTEGER NOT NULL DEFAULT 0"),
    ("rollouts", "rollback_of", "TEXT"),
    ("targets", "before", "TEXT"),
    ("targets", "digest", "TEXT"),
)


@dataclass(frozen=True)
class Rollout:
    """One rollout's row."""

    id: str
    release: str
    group: str
    manifest: bytes
    waves: list[float]
    wave_timeout: float
    max_failure_rate: float
    state: RolloutState
    wave: int
    wave_started: float | None
    accepted_failures: int
    reason: str | None
    defer_offline: bool
    rollback_of: str | None


@dataclass(frozen=True)
class Target:
    """One device of a rollout."""

    device: str
    wave: int
    state: TargetState
    detail: str | None
    before: str | None  # NAME@VERSION the device ran when the rollout was planned
    digest: str | None  # its own manifest (a rollback's), else the rollout's


def rollout_id_of(manifest: Manifest, group: str) -> str:
    """``NAME@VERSION/GROUP``; a rollback release adds ``/rollback-SIGNED_AT`` (going back to a
    version is a rollout of its own, apart from the one that once brought that version)."""
    suffix = f"/rollback-{manifest.created_at}" if manifest.rollback else ""
    return f"{manifest.release_id}/{group}{suffix}"


def plan_waves(devices: list[str], percents: list[float], min_devices: int) -> list[list[str]]:
    """Split ``devices`` (in order) into waves reaching ``percents`` of them cumulatively,
    each wave at least ``min_devices`` strong (while devices remain)."""
    waves: list[list[str]] = []
    done = 0
    for percent in percents:
        reach = min(len(devices), max(math.ceil(percent / 100 * len(devices)), done + min_devices))
        waves.append(devices[done:reach])
        done = reach
    return waves


def parse_waves(text: str) -> list[float]:
    """``1%,10%,50%,100%`` as ``[1, 10, 50, 100]`` (rising, each in (0, 100])."""
    try:
        values = [float(part.strip().rstrip("%")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected percentages like 1%,10%,50%,100%") from None
    if not values or any(not 0 < v <= 100 for v in values) or values != sorted(set(values)):
        raise argparse.ArgumentTypeError(f"{text!r}: waves must rise, each within (0%, 100%]")
    return values


def names(devices: list[str], limit: int = 12) -> str:
    """``a, b, c`` — or the first ``limit`` and ``… and N more``."""
    shown = ", ".join(devices[:limit])
    return shown + (f" … and {len(devices) - limit} more" if len(devices) > limit else "")


class RolloutStore:
    """Rollouts and their targets (tables of the state file)."""

    def __init__(self, db: sqlite3.Connection, path: Any = None) -> None:
        self.db = db
        self.path = path
        db.executescript(_SCHEMA)
        for table, column, declaration in _ADDED:
            present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def create(
        self,
        rollout_id: str,
        manifest: Manifest,
        group: str,
        waves: list[float],
        plan: list[list[tuple[str, str | None, str | None]]],
        wave_timeout: float,
        rate: float,
        *,
        defer_offline: bool = False,
        rollback_of: str | None = None,
    ) -> Rollout:
        """Record a new rollout and its wave plan: per wave, (device, ran before, own manifest digest)."""
        now = time.time()
        with transaction(self.db) as db:
            db.execute(
                "INSERT INTO rollouts (id, release, grp, manifest, waves, wave_timeout, max_failure_rate, "
                "state, wave, wave_started, accepted_failures, reason, created, updated, defer_offline, "
                "rollback_of) VALUES (?,?,?,?,?,?,?,'running',0,NULL,0,NULL,?,?,?,?)",
                (
                    rollout_id,
                    manifest.release_id,
                    group,
                    manifest.model_dump_json().encode(),
                    json.dumps(waves),
                    wave_timeout,
                    rate,
                    now,
                    now,
                    int(defer_offline),
                    rollback_of,
                ),
            )
            db.executemany(
                "INSERT INTO targets (rollout, device, wave, state, detail, updated, before, digest) "
                "VALUES (?,?,?,'pending',NULL,?,?,?)",
                [
                    (rollout_id, device, index, now, before, digest)
                    for index, wave in enumerate(plan)
                    for device, before, digest in wave
                ],
            )
        found = self.get(rollout_id)
        assert found is not None
        return found

    _COLUMNS = (
        "id, release, grp, manifest, waves, wave_timeout, max_failure_rate, state, wave, wave_started, "
        "accepted_failures, reason, defer_offline, rollback_of"
    )

    def get(self, rollout_id: str) -> Rollout | None:
        """One rollout, or None."""
        row = self.db.execute(f"SELECT {self._COLUMNS} FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
        return None if row is None else _rollout(row)

    def all(self) -> list[Rollout]:
        """Every rollout, newest first."""
        return [
            _rollout(r)
            for r in self.db.execute(f"SELECT {self._COLUMNS} FROM rollouts ORDER BY created DESC")
        ]

    def targets(self, rollout_id: str) -> dict[str, Target]:
        """Device -> its target row."""
        rows = self.db.execute(
            "SELECT device, wave, state, detail, before, digest FROM targets WHERE rollout = ?", (rollout_id,)
        )
        return {r[0]: Target(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows}

    def set_targets(
        self,
        rollout_id: str,
        changes: dict[str, tuple[TargetState, str | None]],
        *,
        only_from: tuple[TargetState, ...] = ("pending", "sent", "deferred"),
    ) -> None:
        """Record new target states; a target that finished meanwhile (e.g. canceled by an abort from
        another process) keeps its state."""
        if not changes:
            return
        now = time.time()
        allowed = ",".join(f"'{s}'" for s in only_from)
        with transaction(self.db) as db:
            db.executemany(
                "UPDATE targets SET state = ?, detail = ?, updated = ? "
                f"WHERE rollout = ? AND device = ? AND state IN ({allowed})",
                [(state, detail, now, rollout_id, device) for device, (state, detail) in changes.items()],
            )

    def update(self, rollout_id: str, *, only_if: tuple[RolloutState, ...] = (), **fields: Any) -> None:
        """Change columns of a rollout (``only_if``: only while it is in one of these states)."""
        names_ = ", ".join(f"{name} = ?" for name in fields)
        condition = ""
        if only_if:
            condition = " AND state IN (" + ",".join(f"'{s}'" for s in only_if) + ")"
        with transaction(self.db) as db:
            db.execute(
                f"UPDATE rollouts SET {names_}, updated = ? WHERE id = ?{condition}",
                (*fields.values(), time.time(), rollout_id),
            )

    def add_targets(self, rollout_id: str, devices: list[tuple[str, str | None]], wave: int) -> None:
        """Add devices (that joined the group during the rollout) to a wave: (device, ran before)."""
        now = time.time()
        with transaction(self.db) as db:
            db.executemany(
                "INSERT OR IGNORE INTO targets (rollout, device, wave, state, detail, updated, before) "
                "VALUES (?,?,?,'pending',NULL,?,?)",
                [(rollout_id, device, wave, now, before) for device, before in devices],
            )

    def counts(self, rollout_id: str) -> dict[str, int]:
        """Targets by state."""
        rows = self.db.execute(
            "SELECT state, COUNT(*) FROM targets WHERE rollout = ? GROUP BY state", (rollout_id,)
        )
        return dict(rows.fetchall())


def _rollout(row: tuple[Any, ...]) -> Rollout:
    state = row[7]
    assert state in get_args(RolloutState), state
    return Rollout(
        id=row[0],
        release=row[1],
        group=row[2],
        manifest=bytes(row[3]),
        waves=json.loads(row[4]),
        wave_timeout=row[5],
        max_failure_rate=row[6],
        state=state,
        wave=row[8],
        wave_started=row[9],
        accepted_failures=row[10],
        reason=row[11],
        defer_offline=bool(row[12]),
        rollback_of=row[13],
    )


def tally(counts: dict[str, int]) -> str:
    """``3 active, 1 failed`` in a fixed order."""
    order = [*get_args(TargetState)]
    return ", ".join(f"{counts[s]} {s}" for s in sorted(counts, key=order.index))
