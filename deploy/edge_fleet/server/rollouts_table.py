"""Rollouts, their targets and their events in the server's database, with the leases that
keep two servers off one rollout."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from ..domain.evaluate import RolloutState, RolloutView, TargetState, TargetView
from .db import Database

#: A server that stops renewing its lease (killed, cut off from the database) loses the
#: rollouts it drove after this long; another server, or itself restarted, takes them over.
LEASE_S = 15.0
ACTIVE: tuple[RolloutState, ...] = ("running", "waiting", "halted")


@dataclass(frozen=True)
class Rollout:
    """One rollout's row."""

    id: str
    release: str
    digest: str
    selector: str
    group: str | None
    waves: list[float]
    canary: int
    wave_timeout: float
    max_failure_rate: float
    max_parallel: int
    resume_on_recovery: bool
    state: RolloutState
    wave: int
    accepted_failures: int
    reason: str | None
    rollback_of: str | None
    created: float
    created_by: str
    updated: float
    leader: str | None
    defer_offline: bool = False

    @property
    def wave_count(self) -> int:
        """Waves including the canary set."""
        return len(self.waves) + (1 if self.canary else 0)

    def view(self) -> RolloutView:
        """What ``evaluate`` needs of it."""
        return RolloutView(
            id=self.id, state=self.state, wave=self.wave, waves=self.wave_count, canary=bool(self.canary),
            max_failure_rate=self.max_failure_rate, max_parallel=self.max_parallel, timeout=self.wave_timeout,
            accepted_failures=self.accepted_failures, resume_on_recovery=self.resume_on_recovery,
            reason=self.reason, defer_offline=self.defer_offline,
        )  # fmt: skip

    def as_json(self) -> dict[str, Any]:
        """The row as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class Target:
    """One device of a rollout."""

    device: str
    wave: int
    state: TargetState
    detail: str | None
    before: str | None  # NAME@VERSION it ran when the rollout was planned
    digest: str | None  # its own release (a rollback's), else the rollout's
    sent_at: float | None

    def view(self) -> TargetView:
        """What ``evaluate`` needs of it."""
        return TargetView(self.device, self.wave, self.state, self.sent_at, self.detail)


_COLUMNS = (
    "id, release, digest, selector, grp, waves, canary, wave_timeout, max_failure_rate, max_parallel, "
    "resume_on_recovery, state, wave, accepted_failures, reason, rollback_of, created, created_by, updated, leader, "
    "defer_offline"
)


def _rollout(r: tuple[Any, ...]) -> Rollout:
    return Rollout(
        r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), int(r[6]), float(r[7]), float(r[8]), int(r[9]),
        bool(r[10]), r[11], int(r[12]), int(r[13]), r[14], r[15], float(r[16]), r[17], float(r[18]), r[19], bool(r[20]),
    )  # fmt: skip


class RolloutsTable:
    """The ``rollouts``, ``targets`` and ``rollout_events`` tables."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, rollout: Rollout, plan: list[list[tuple[str, str | None, str | None]]]) -> None:
        """Record a rollout and its plan: per wave, (device, ran before, own digest); in the caller's
        transaction (so the audit entry commits with it)."""
        r = rollout
        self.db.execute(
            f"INSERT INTO rollouts ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (r.id, r.release, r.digest, r.selector, r.group, json.dumps(r.waves), r.canary, r.wave_timeout,
             r.max_failure_rate, r.max_parallel, int(r.resume_on_recovery), r.state, r.wave,
             r.accepted_failures, r.reason, r.rollback_of, r.created, r.created_by, r.updated, None, int(r.defer_offline)),
        )  # fmt: skip
        self.db.executemany(
            "INSERT INTO targets (rollout, device, wave, state, before, digest, updated) VALUES (?,?,?,?,?,?,?)",
            [
                (r.id, d, i, "pending", before, digest, r.created)
                for i, wave in enumerate(plan)
                for d, before, digest in wave
            ],
        )

    def get(self, rollout_id: str) -> Rollout | None:
        """One rollout, or None."""
        row = self.db.one(f"SELECT {_COLUMNS} FROM rollouts WHERE id = ?", (rollout_id,))
        return None if row is None else _rollout(row)

    def all(self, states: tuple[str, ...] = ()) -> list[Rollout]:
        """Every rollout (in ``states``), newest first."""
        rows = self.db.query(f"SELECT {_COLUMNS} FROM rollouts ORDER BY created DESC")
        return [r for r in map(_rollout, rows) if not states or r.state in states]

    def targets(self, rollout_id: str) -> dict[str, Target]:
        """Device -> target."""
        rows = self.db.query(
            "SELECT device, wave, state, detail, before, digest, sent_at FROM targets WHERE rollout = ?",
            (rollout_id,),
        )
        return {r[0]: Target(r[0], int(r[1]), r[2], r[3], r[4], r[5], r[6]) for r in rows}

    def counts(self, rollout_id: str) -> dict[str, int]:
        """Targets by state."""
        rows = self.db.query(
            "SELECT state, COUNT(*) FROM targets WHERE rollout = ? GROUP BY state", (rollout_id,)
        )
        return {r[0]: int(r[1]) for r in rows}

    def mark(
        self,
        rollout_id: str,
        changes: dict[str, tuple[TargetState, str | None]],
        *,
        sent_at: float | None = None,
    ) -> None:
        """Record new target states (``sent_at``: when they were sent)."""
        now = time.time()
        self.db.executemany(
            "UPDATE targets SET state = ?, detail = ?, sent_at = COALESCE(?, sent_at), updated = ? "
            "WHERE rollout = ? AND device = ?",
            [(s, detail, sent_at, now, rollout_id, d) for d, (s, detail) in changes.items()],
        )

    def join(self, rollout_id: str, devices: list[tuple[str, str | None]], wave: int) -> None:
        """Add devices to a wave: (device, ran before)."""
        now = time.time()
        self.db.executemany(
            "INSERT INTO targets (rollout, device, wave, state, before, updated) VALUES (?,?,?,'pending',?,?) "
            "ON CONFLICT (rollout, device) DO NOTHING",
            [(rollout_id, d, wave, before, now) for d, before in devices],
        )

    def update(self, rollout_id: str, *, only_if: tuple[RolloutState, ...] = (), **fields: Any) -> bool:
        """Change columns of a rollout (``only_if``: only in one of these states); whether it did."""
        sets = ", ".join(f"{name} = ?" for name in fields)
        condition = ""
        if only_if:
            condition = " AND state IN (" + ",".join("?" for _ in only_if) + ")"
        changed = self.db.execute(
            f"UPDATE rollouts SET {sets}, updated = ? WHERE id = ?{condition}",
            (*fields.values(), time.time(), rollout_id, *only_if),
        )
        return changed > 0

    def lease(self, rollout_id: str, server: str, now: float) -> bool:
        """Take or renew the lease on driving a rollout; False while another server holds it."""
        return (
            self.db.execute(
                "UPDATE rollouts SET leader = ?, lease_until = ? WHERE id = ? "
                "AND (leader IS NULL OR leader = ? OR lease_until < ?)",
                (server, now + LEASE_S, rollout_id, server, now),
            )
            > 0
        )

    def release_leases(self, server: str) -> None:
        """Give up every lease of ``server`` (a clean stop)."""
        self.db.execute("UPDATE rollouts SET leader = NULL, lease_until = NULL WHERE leader = ?", (server,))

    def event(self, rollout_id: str, text: str) -> None:
        """Append a line of progress."""
        self.db.execute(
            "INSERT INTO rollout_events (rollout, at, text) VALUES (?,?,?)", (rollout_id, time.time(), text)
        )

    def events(self, rollout_id: str, after: int = 0) -> list[dict[str, Any]]:
        """Lines of progress after ``after`` (seq), oldest first."""
        rows = self.db.query(
            "SELECT seq, at, text FROM rollout_events WHERE rollout = ? AND seq > ? ORDER BY seq",
            (rollout_id, after),
        )
        return [{"seq": int(r[0]), "at": r[1], "text": r[2]} for r in rows]
