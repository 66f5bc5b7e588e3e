"""The server's state: tokens, the audit log, the inventory with labels, releases and assignments.

Rollouts and their targets are in ``rollouts_table``.  Everything here is plain SQL over
``Database`` (SQLite or PostgreSQL alike).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from edge_contract.manifest import Manifest

from ..errors import FleetError
from .db import Database
from .migrations import migrate

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = get_args(Role)
TOKEN_PREFIX = "efs_"


def hash_token(token: str) -> str:
    """What is stored of a token: its SHA-256 (tokens are 256-bit random, so no salt is needed)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who makes a request: a token's name and role."""

    name: str
    role: Role


@dataclass(frozen=True)
class AuditEntry:
    """One row of the audit log."""

    seq: int
    at: float
    actor: str
    action: str
    target: str
    detail: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        """The row as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class DeviceRecord:
    """One device of the inventory (what was last seen of it, and its operator-set labels)."""

    device_id: str
    group: str | None
    labels: dict[str, str] = field(default_factory=dict)
    online: bool | None = None
    last_seen: float | None = None
    offline_since: float | None = None
    model: str | None = None
    version: str | None = None
    health: str | None = None
    agent_version: str | None = None


@dataclass(frozen=True)
class Seen:
    """What the broker said of a device just now (for ``Store.observe``)."""

    device_id: str
    group: str | None
    online: bool | None
    since: float | None
    model: str | None
    version: str | None
    health: str | None
    agent_version: str | None


class Store:
    """The server's tables (migrated to the newest schema when opened)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        migrate(db)

    # -- tokens --------------------------------------------------------------------------------

    def create_token(self, name: str, role: Role, actor: str) -> str:
        """A new token for ``name`` (printed once; only its hash is kept)."""
        if role not in ROLES:
            raise FleetError(f"role {role!r}: give one of {', '.join(ROLES)}")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.db.transaction():
            if self.db.one("SELECT name FROM tokens WHERE name = ? AND revoked IS NULL", (name,)):
                raise FleetError(
                    f"a token named {name!r} exists: revoke it first (edge-fleet server token revoke {name})"
                )
            self.db.execute("DELETE FROM tokens WHERE name = ?", (name,))
            self.db.execute(
                "INSERT INTO tokens (name, hash, role, created, created_by) VALUES (?,?,?,?,?)",
                (name, hash_token(token), role, time.time(), actor),
            )
            self.audit(actor, "token.create", name, {"role": role})
        return token

    def revoke_token(self, name: str, actor: str) -> None:
        """Revoke ``name``'s token."""
        with self.db.transaction():
            if not self.db.execute(
                "UPDATE tokens SET revoked = ? WHERE name = ? AND revoked IS NULL", (time.time(), name)
            ):
                raise FleetError(f"no live token named {name!r} (edge-fleet server token list)")
            self.audit(actor, "token.revoke", name, {})

    def tokens(self) -> list[dict[str, Any]]:
        """Every token (never the secret): name, role, created, by, revoked."""
        rows = self.db.query("SELECT name, role, created, created_by, revoked FROM tokens ORDER BY name")
        return [dict(zip(("name", "role", "created", "created_by", "revoked"), r, strict=True)) for r in rows]

    def principal(self, token: str) -> Principal | None:
        """Whose token this is, or None (unknown or revoked)."""
        row = self.db.one(
            "SELECT name, role FROM tokens WHERE hash = ? AND revoked IS NULL", (hash_token(token),)
        )
        return None if row is None else Principal(row[0], row[1])

    # -- audit ---------------------------------------------------------------------------------

    def audit(self, actor: str, action: str, target: str, detail: dict[str, Any]) -> None:
        """Append one change to the audit log (in the caller's transaction, if any)."""
        self.db.execute(
            "INSERT INTO audit (at, actor, action, target, detail) VALUES (?,?,?,?,?)",
            (time.time(), actor, action, target, json.dumps(detail, sort_keys=True)),
        )

    def audit_log(self, *, after: int = 0, limit: int = 1000) -> list[AuditEntry]:
        """Entries after ``after``, oldest first."""
        rows = self.db.query(
            "SELECT seq, at, actor, action, target, detail FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit),
        )
        return [AuditEntry(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows]

    # -- inventory -----------------------------------------------------------------------------

    def observe(self, seen: list[Seen]) -> None:
        """Record what the broker says of these devices."""
        now = time.time()
        self.db.executemany(
            "INSERT INTO devices (id, grp, online, last_seen, offline_since, model, version, health, "
            "agent_version, first_seen) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET "
            "grp = COALESCE(excluded.grp, devices.grp), online = COALESCE(excluded.online, devices.online), "
            "last_seen = COALESCE(excluded.last_seen, devices.last_seen), "
            "offline_since = CASE WHEN excluded.online = 1 THEN NULL "
            "  ELSE COALESCE(devices.offline_since, excluded.offline_since) END, "
            "model = COALESCE(excluded.model, devices.model), "
            "version = COALESCE(excluded.version, devices.version), health = excluded.health, "
            "agent_version = COALESCE(excluded.agent_version, devices.agent_version)",
            [
                (
                    s.device_id,
                    s.group,
                    None if s.online is None else int(s.online),
                    now if s.online else None,
                    s.since if s.online is False else None,
                    s.model,
                    s.version,
                    s.health,
                    s.agent_version,
                    now,
                )
                for s in seen
            ],
        )

    _DEVICE_COLUMNS = (
        "id, grp, labels, online, last_seen, offline_since, model, version, health, agent_version"
    )

    def devices(self) -> list[DeviceRecord]:
        """Every device, by id."""
        return [_device(r) for r in self.db.query(f"SELECT {self._DEVICE_COLUMNS} FROM devices ORDER BY id")]

    def device(self, device_id: str) -> DeviceRecord | None:
        """One device, or None."""
        row = self.db.one(f"SELECT {self._DEVICE_COLUMNS} FROM devices WHERE id = ?", (device_id,))
        return None if row is None else _device(row)

    def set_labels(
        self, device_id: str, labels: dict[str, str | None], actor: str, *, merge: bool
    ) -> dict[str, str]:
        """Replace (or, with ``merge``, update; a None value removes the key) a device's labels."""
        with self.db.transaction():
            found = self.device(device_id)
            if found is None:
                raise KeyError(device_id)
            new = dict(found.labels) if merge else {}
            for key, value in labels.items():
                if value is None:
                    new.pop(key, None)
                else:
                    new[key] = value
            self.db.execute(
                "UPDATE devices SET labels = ? WHERE id = ?", (json.dumps(new, sort_keys=True), device_id)
            )
            self.audit(actor, "device.labels", device_id, {"labels": new, "merge": merge})
        return new

    def add_device(self, device_id: str, group: str | None, labels: dict[str, str], actor: str) -> None:
        """Record a device before it is seen (an operator registers it)."""
        with self.db.transaction():
            self.db.execute(
                "INSERT INTO devices (id, grp, labels) VALUES (?,?,?) ON CONFLICT (id) DO UPDATE SET "
                "grp = COALESCE(excluded.grp, devices.grp), labels = excluded.labels",
                (device_id, group, json.dumps(labels, sort_keys=True)),
            )
            self.audit(actor, "device.register", device_id, {"group": group, "labels": labels})

    # -- releases and assignments --------------------------------------------------------------

    def remember(self, payload: bytes) -> str:
        """Keep a signed manifest by its digest; returns the digest."""
        manifest = Manifest.parse(payload)
        digest = hashlib.sha256(payload).hexdigest()
        self.db.execute(
            "INSERT INTO releases (digest, release, rollback, manifest, added) VALUES (?,?,?,?,?) "
            "ON CONFLICT (digest) DO NOTHING",
            (digest, manifest.release_id, int(manifest.rollback), payload.decode(), time.time()),
        )
        return digest

    def manifest(self, digest: str) -> bytes | None:
        """A kept manifest."""
        row = self.db.one("SELECT manifest FROM releases WHERE digest = ?", (digest,))
        return None if row is None else str(row[0]).encode()

    def release_manifest(self, release_id: str) -> bytes | None:
        """The newest kept forward manifest of ``NAME@VERSION``."""
        row = self.db.one(
            "SELECT manifest FROM releases WHERE release = ? ORDER BY rollback, added DESC LIMIT 1",
            (release_id,),
        )
        return None if row is None else str(row[0]).encode()

    def record_assignment(
        self, kind: str, targets: list[str], digest: str | None, origin: str, actor: str
    ) -> None:
        """Record that ``targets`` should run the release ``digest`` (None: cleared)."""
        release = None
        if digest is not None:
            row = self.db.one("SELECT release FROM releases WHERE digest = ?", (digest,))
            release = row[0] if row else None
        now = time.time()
        self.db.executemany(
            "INSERT INTO assignments (kind, target, release, digest, origin, actor, at) VALUES (?,?,?,?,?,?,?)",
            [(kind, t, release, digest, origin, actor, now) for t in targets],
        )

    def current_assignments(self) -> list[dict[str, Any]]:
        """The latest assignment of every target: kind, target, release, digest."""
        rows = self.db.query(
            "SELECT a.kind, a.target, a.release, a.digest FROM assignments a JOIN (SELECT kind, target, "
            "MAX(seq) AS seq FROM assignments GROUP BY kind, target) last ON a.seq = last.seq "
            "ORDER BY a.kind, a.target"
        )
        return [dict(zip(("kind", "target", "release", "digest"), r, strict=True)) for r in rows]

    def history(self, target: str, devices: list[str] | None = None) -> list[dict[str, Any]]:
        """Every assignment of a device (and of its group), or of a group, oldest first; with
        ``devices`` (a selector's matches), of those devices and their groups."""
        if devices is None:
            found = self.device(target)
            devices, groups = [target], [found.group if found and found.group else target]
        else:
            records = [self.device(d) for d in devices]
            groups = sorted({r.group for r in records if r is not None and r.group})
        marks = ",".join("?" for _ in devices) or "NULL"
        group_marks = ",".join("?" for _ in groups) or "NULL"
        rows = self.db.query(
            "SELECT seq, kind, target, release, digest, origin, actor, at FROM assignments "
            f"WHERE (kind = 'device' AND target IN ({marks})) OR (kind = 'group' AND target IN ({group_marks})) "
            "ORDER BY seq",
            (*devices, *groups),
        )
        keys = ("seq", "kind", "target", "release", "digest", "origin", "actor", "at")
        return [dict(zip(keys, r, strict=True)) for r in rows]


def _device(row: tuple[Any, ...]) -> DeviceRecord:
    return DeviceRecord(
        device_id=row[0],
        group=row[1],
        labels=json.loads(row[2] or "{}"),
        online=None if row[3] is None else bool(row[3]),
        last_seen=row[4],
        offline_since=row[5],
        model=row[6],
        version=row[7],
        health=row[8],
        agent_version=row[9],
    )
