"""The server's schema, as numbered migrations run at start (each once, in a transaction).

A migration is a list of statements; ``{float}`` and ``{serial}`` become each database's
spelling (SQLite ``REAL``/``INTEGER PRIMARY KEY AUTOINCREMENT``, PostgreSQL ``DOUBLE
PRECISION``/``BIGSERIAL PRIMARY KEY``); a statement in ``_ONLY`` runs on one database only.
Never edit a released migration: add the next one.
"""

from __future__ import annotations

import time

from .db import Database

_V1 = [
    "CREATE TABLE tokens (name TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, role TEXT NOT NULL, "
    "created {float} NOT NULL, created_by TEXT NOT NULL, revoked {float})",
    "CREATE TABLE audit (seq {serial}, at {float} NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL, "
    "target TEXT NOT NULL, detail TEXT NOT NULL)",
    "CREATE TABLE devices (id TEXT PRIMARY KEY, grp TEXT, labels TEXT NOT NULL DEFAULT '{{}}', "
    "online INTEGER, last_seen {float}, offline_since {float}, model TEXT, version TEXT, health TEXT, "
    "agent_version TEXT, first_seen {float})",
    "CREATE TABLE releases (digest TEXT PRIMARY KEY, release TEXT NOT NULL, rollback INTEGER NOT NULL, "
    "manifest TEXT NOT NULL, added {float} NOT NULL)",
    "CREATE TABLE assignments (seq {serial}, kind TEXT NOT NULL, target TEXT NOT NULL, release TEXT, "
    "digest TEXT, origin TEXT NOT NULL, actor TEXT NOT NULL, at {float} NOT NULL)",
    "CREATE INDEX assignments_by_target ON assignments (kind, target, seq)",
    "CREATE TABLE rollouts (id TEXT PRIMARY KEY, release TEXT NOT NULL, digest TEXT NOT NULL, "
    "selector TEXT NOT NULL, grp TEXT, waves TEXT NOT NULL, canary INTEGER NOT NULL, "
    "wave_timeout {float} NOT NULL, max_failure_rate {float} NOT NULL, max_parallel INTEGER NOT NULL, "
    "resume_on_recovery INTEGER NOT NULL, state TEXT NOT NULL, wave INTEGER NOT NULL, "
    "accepted_failures INTEGER NOT NULL, reason TEXT, rollback_of TEXT, created {float} NOT NULL, "
    "created_by TEXT NOT NULL, updated {float} NOT NULL, leader TEXT, lease_until {float}, "
    "defer_offline INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE targets (rollout TEXT NOT NULL, device TEXT NOT NULL, wave INTEGER NOT NULL, "
    "state TEXT NOT NULL, detail TEXT, before TEXT, digest TEXT, sent_at {float}, updated {float} NOT NULL, "
    "PRIMARY KEY (rollout, device))",
    "CREATE TABLE rollout_events (seq {serial}, rollout TEXT NOT NULL, at {float} NOT NULL, "
    "text TEXT NOT NULL)",
    "CREATE INDEX rollout_events_by_rollout ON rollout_events (rollout, seq)",
    "CREATE TABLE jobs (id TEXT PRIMARY KEY, target TEXT NOT NULL, state TEXT NOT NULL, "
    "request TEXT NOT NULL, result TEXT, error TEXT, actor TEXT NOT NULL, created {float} NOT NULL, "
    "finished {float})",
]
# The audit log is append-only: the database itself refuses to change or delete a row.
_V1_SQLITE = [
    "CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit "
    "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
    "CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit "
    "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
]
_V1_POSTGRES = [
    "CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$",
    "CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit "
    "FOR EACH ROW EXECUTE FUNCTION audit_append_only()",
]

# The dashboard (issue 26): telemetry history (``res`` 0: as the box sent it; else the seconds
# of a downsampled bucket) and browser sessions (only hashes of the cookie are kept).
_V2 = [
    "CREATE TABLE telemetry_history (device TEXT NOT NULL, at {float} NOT NULL, span {float} NOT NULL, "
    "res INTEGER NOT NULL, tok_s {float}, temp_c {float}, mem_mb {float}, queue {float}, jobs {float}, "
    "cert_expires_at {float})",
    # Unique: two servers on one PostgreSQL both record every message; the second insert is dropped.
    "CREATE UNIQUE INDEX telemetry_history_by_device ON telemetry_history (device, at)",
    "CREATE INDEX telemetry_history_by_age ON telemetry_history (res, at)",
    "CREATE TABLE dashboard_sessions (id_hash TEXT PRIMARY KEY, token_hash TEXT NOT NULL, "
    "csrf TEXT NOT NULL, created {float} NOT NULL, expires {float} NOT NULL)",
]

#: version -> (statements for both, SQLite only, PostgreSQL only)
MIGRATIONS: dict[int, tuple[list[str], list[str], list[str]]] = {
    1: (_V1, _V1_SQLITE, _V1_POSTGRES),
    2: (_V2, [], []),
}
_TYPES = {
    "sqlite": {"float": "REAL", "serial": "INTEGER PRIMARY KEY AUTOINCREMENT"},
    "postgresql": {"float": "DOUBLE PRECISION", "serial": "BIGSERIAL PRIMARY KEY"},
}
# Any constant: two servers starting at once on one PostgreSQL migrate one after the other.
_PG_LOCK = 0x6564_6765


def current_version(db: Database) -> int:
    """The newest migration applied (0: an empty database)."""
    db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied {f})"
               .replace("{f}", _TYPES[db.dialect]["float"]))  # fmt: skip
    row = db.one("SELECT MAX(version) FROM schema_migrations")
    return int(row[0]) if row and row[0] is not None else 0


def migrate(db: Database) -> list[int]:
    """Apply the migrations not applied yet; returns their versions."""
    applied = []
    with db.transaction():
        if db.dialect == "postgresql":
            db.query("SELECT pg_advisory_xact_lock(?)", (_PG_LOCK,))
        have = current_version(db)
        for version in sorted(v for v in MIGRATIONS if v > have):
            both, sqlite_only, pg_only = MIGRATIONS[version]
            for statement in [*both, *(sqlite_only if db.dialect == "sqlite" else pg_only)]:
                db.execute(statement.format(**_TYPES[db.dialect]))
            db.execute(
                "INSERT INTO schema_migrations (version, applied) VALUES (?, ?)", (version, time.time())
            )
            applied.append(version)
    return applied
