"""The fleet's inventory: every provisioned device and every device ever seen.

``edge-fleet provision`` records a device's name, group and certificate (serial,
expiry); every command that reads the fleet from the broker records what it saw
(online or not, group, model and version, when).  A device that went offline
keeps its group here even if its last status says nothing of it, so rollouts
plan with it and views show it.

    edge-fleet devices [--group G] [--json] [--no-broker]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from .broker import FleetError, add_broker_args, options_from
from .fleet_view import Device, FleetFeed
from .output import ago, model_label, table
from .state import add_db_arg, open_db, transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, grp TEXT, provisioned REAL, cert_serial TEXT, cert_expires REAL,
    first_seen REAL, last_seen REAL, online INTEGER, offline_since REAL,
    model TEXT, version TEXT, agent_version TEXT, revoked INTEGER
);
"""
#: Columns added since the first schema: (name, type), added to an older state file on open.
_ADDED_COLUMNS = (("revoked", "INTEGER"),)
#: Waiting longer than this for the retained statuses means the broker is struggling: go on.
DISCOVERY_MAX_S = 10.0


@dataclass(frozen=True)
class InventoryRow:
    """One device of the inventory."""

    device: str
    group: str | None
    provisioned: float | None
    cert_serial: str | None
    cert_expires: float | None
    first_seen: float | None
    last_seen: float | None
    online: bool | None  # None: never seen
    offline_since: float | None
    model: str | None
    version: str | None
    revoked: bool = False  # `edge-fleet revoke`: its retained status says so

    def as_json(self) -> dict[str, Any]:
        """The row as a JSON-ready dict."""
        return asdict(self)


class Inventory:
    """The ``devices`` table of the state file."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.executescript(_SCHEMA)
        have = {str(r[1]) for r in db.execute("PRAGMA table_info(devices)")}
        for column, kind in _ADDED_COLUMNS:
            if column not in have:
                with transaction(db) as tx:
                    tx.execute(f"ALTER TABLE devices ADD COLUMN {column} {kind}")

    @classmethod
    def open(cls, path: Path | None = None) -> Inventory:
        """The inventory of the state file at ``path`` (default: the profile's)."""
        return cls(open_db(path))

    def record_provisioned(self, name: str, group: str | None, serial: str, expires: float) -> None:
        """A device certificate was issued (provisioning again replaces the certificate and group)."""
        now = time.time()
        with transaction(self.db) as db:
            db.execute(
                "INSERT INTO devices (id, grp, provisioned, cert_serial, cert_expires) VALUES (?,?,?,?,?) "
                "ON CONFLICT(id) DO UPDATE SET grp = COALESCE(excluded.grp, grp), "
                "provisioned = excluded.provisioned, cert_serial = excluded.cert_serial, "
                "cert_expires = excluded.cert_expires",
                (name, group, now, serial, expires),
            )

    def record_certificate(self, cert_path: Path, group: str | None) -> None:
        """Record the device certificate at ``cert_path`` (its CN is the device's name)."""
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        [cn] = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        self.record_provisioned(
            str(cn.value), group, format(cert.serial_number, "x"), cert.not_valid_after_utc.timestamp()
        )

    def observe(self, devices: Iterable[Device]) -> None:
        """Record what the broker's retained messages say of these devices (seen just now)."""
        now = time.time()
        rows = []
        for device in devices:
            status, state = device.status, device.model
            if status is None and state is None:
                continue
            active = state.active if state and state.active else (status.model if status else None)
            online = status.online if status is not None else None
            rows.append(
                (
                    device.device_id,
                    status.group if status else None,
                    now,
                    now if online else None,
                    None if online is None else int(online),
                    status.since if status is not None and not status.online else None,
                    active.name if active else None,
                    active.version if active else None,
                    status.agent_version if status else None,
                    None if status is None else int(status.revoked),
                )
            )
        with transaction(self.db) as db:
            db.executemany(
                "INSERT INTO devices (id, grp, first_seen, last_seen, online, offline_since, model, version, "
                "agent_version, revoked) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10) "
                "ON CONFLICT(id) DO UPDATE SET grp = COALESCE(excluded.grp, grp), "
                "first_seen = COALESCE(first_seen, excluded.first_seen), "
                # Offline when first seen: its status's time is the best guess of when it was last there.
                "last_seen = COALESCE(excluded.last_seen, last_seen, excluded.offline_since, excluded.first_seen), "
                "online = COALESCE(excluded.online, online), "
                "offline_since = CASE WHEN excluded.online = 1 THEN NULL "
                "  ELSE COALESCE(offline_since, excluded.offline_since) END, "
                "model = COALESCE(excluded.model, model), version = COALESCE(excluded.version, version), "
                "agent_version = COALESCE(excluded.agent_version, agent_version), "
                "revoked = COALESCE(excluded.revoked, revoked)",
                rows,
            )

    def rows(self, group: str | None = None, *, device: str | None = None) -> list[InventoryRow]:
        """Every device (of ``group``, or just ``device``), by name."""
        sql = (
            "SELECT id, grp, provisioned, cert_serial, cert_expires, first_seen, last_seen, online, "
            "offline_since, model, version, revoked FROM devices"
        )
        params: tuple[str, ...] = ()
        if group is not None:
            sql += " WHERE grp = ?"
            params = (group,)
        elif device is not None:
            sql += " WHERE id = ?"
            params = (device,)
        found = []
        for r in self.db.execute(sql + " ORDER BY id", params):
            found.append(
                InventoryRow(
                    device=r[0],
                    group=r[1],
                    provisioned=r[2],
                    cert_serial=r[3],
                    cert_expires=r[4],
                    first_seen=r[5],
                    last_seen=r[6],
                    online=None if r[7] is None else bool(r[7]),
                    offline_since=r[8],
                    model=r[9],
                    version=r[10],
                    revoked=bool(r[11]),
                )
            )
        return found

    def get(self, device: str) -> InventoryRow | None:
        """One device, or None."""
        found = self.rows(device=device)
        return found[0] if found else None

    def members(self, group: str) -> list[str]:
        """Names of the devices of ``group``."""
        return [r[0] for r in self.db.execute("SELECT id FROM devices WHERE grp = ? ORDER BY id", (group,))]

    def groups_of(self, devices: Iterable[str]) -> dict[str, str | None]:
        """Device -> group, for the devices known."""
        wanted = set(devices)
        return {d: g for d, g in self.db.execute("SELECT id, grp FROM devices") if d in wanted}


# -- command line -----------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``devices``."""
    devices = sub.add_parser(
        "devices", help="the inventory: every provisioned or seen device, online, offline or never seen"
    )
    devices.add_argument("--group", help="only devices of this group")
    devices.add_argument("--json", action="store_true", help="one JSON object per device")
    devices.add_argument(
        "--no-broker", action="store_true", help="list the state file only (do not refresh from the broker)"
    )
    devices.add_argument("--wait", type=float, default=3.0, help="seconds at most to collect retained state")
    add_db_arg(devices)
    add_broker_args(devices)
    devices.set_defaults(func=devices_command)


def refresh(inventory: Inventory, args: argparse.Namespace, wait: float) -> FleetFeed:
    """Read the broker's retained statuses into ``inventory``; returns the (closed) feed."""
    feed = FleetFeed(options_from(args), telemetry=False)
    try:
        feed.settle(wait)
    finally:
        feed.close()
    inventory.observe(feed.view.devices.values())
    return feed


def _when(value: float | None) -> str:
    if value is None:
        return "-"
    return datetime.datetime.fromtimestamp(value).strftime("%Y-%m-%d")


def devices_command(args: argparse.Namespace) -> int:
    """``edge-fleet devices`` (from the server when the profile names one)."""
    from . import server_cmd
    from .client import server_client

    client = server_client()
    if client is not None:
        return server_cmd.devices(client, args)
    inventory = Inventory.open(args.db)
    if not args.no_broker:
        refresh(inventory, args, args.wait)
    rows = inventory.rows(args.group)
    if args.json:
        for row in rows:
            print(json.dumps(row.as_json()))
        return 0
    if not rows:
        raise FleetError(
            "the inventory is empty"
            + (f" for group {args.group!r}" if args.group else "")
            + ": `edge-fleet provision NAME --group G …` records devices, and every device that connects is recorded"
        )
    now = time.time()
    body = []
    for r in rows:
        if r.revoked:
            state, seen = "revoked", ago(now, r.last_seen) if r.last_seen else "-"
        elif r.online is None:
            state, seen = "never seen", "-"
        elif r.online:
            state, seen = "online", ago(now, r.last_seen)
        else:
            state = "offline" + (f" {ago(now, r.offline_since)}" if r.offline_since else "")
            seen = ago(now, r.last_seen)
        body.append(
            [
                r.device,
                r.group or "-",
                state,
                seen,
                model_label(r.model, r.version),
                r.cert_serial[:16] if r.cert_serial else "-",
                _when(r.cert_expires),
            ]
        )
    print(table(["DEVICE", "GROUP", "STATE", "LAST SEEN", "MODEL", "CERT SERIAL", "CERT EXPIRES"], body))
    counts = {
        "devices": len(rows),
        "online": sum(1 for r in rows if r.online),
        "offline": sum(1 for r in rows if r.online is False),
        "never seen": sum(1 for r in rows if r.online is None),
    }
    revoked = sum(1 for r in rows if r.revoked)
    if revoked:
        counts["revoked"] = revoked
    print("  ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def record_certificate_file(cert: Path, group: str | None) -> None:
    """Record a device certificate in the operator's inventory (a warning if the state file cannot be written)."""
    try:
        Inventory.open().record_certificate(cert, group)
    except (OSError, sqlite3.Error) as exc:
        print(
            f"warning: not recorded in the inventory ({exc}); `edge-fleet devices` shows it once it connects"
        )
