"""Staged rollouts: a release goes to a group in waves, and stops by itself when too many fail.

    edge-fleet rollout MANIFEST --group G --waves 1%,10%,50%,100% [--wave-timeout S]
                       [--max-failure-rate R] [--min-devices N]
    edge-fleet rollout status [ID] | abort ID | resume ID

The group's devices (from their retained status) are split into waves when
the rollout starts (online devices first); devices that join the group later
are added to the next wave (or, during the last one, sent the release at once).  A wave publishes the
manifest as each of its devices' own retained desired state; the next wave
starts when every device of the current one reports the release ``active`` or
``failed``, or when the wave timeout ends (devices silent by then count as
failures).  When failures exceed ``max_failure_rate`` of the devices in the
waves so far — a rate that more answers can no longer bring back under — the
rollout halts.  ``abort`` stops it and withdraws the desired state of devices
that had not finished; ``resume`` continues an aborted or halted one (the
failures seen so far are then accepted).

Everything lives in SQLite (``--db``), so the controller can be stopped and
started again at any point: a rollout's id is ``NAME@VERSION/GROUP``, and
running the same command again continues it (a lock file keeps two
controllers off one rollout).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.updates.manifest import Manifest

from .broker import BrokerOptions, FleetError, add_broker_args, options_from
from .fleet_view import FleetFeed
from .releases import read_deployable

# Targets move pending -> sent -> active | failed | timed_out (| canceled by abort).
_FINISHED = ("active", "failed", "timed_out", "canceled")
_FAILED = ("failed", "timed_out")
# Waiting longer than this for the retained statuses means the broker is struggling: go on.
_DISCOVERY_MAX_S = 10.0

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
    state: str  # running | halted | aborted | done
    wave: int
    wave_started: float | None
    accepted_failures: int
    reason: str | None


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


class RolloutStore:
    """Rollouts and their targets in one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic change."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def create(
        self,
        manifest: Manifest,
        group: str,
        waves: list[float],
        plan: list[list[str]],
        wave_timeout: float,
        rate: float,
    ) -> Rollout:
        """Record a new rollout and its wave plan."""
        rollout_id = rollout_id_of(manifest, group)
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO rollouts VALUES (?,?,?,?,?,?,?,'running',0,NULL,0,NULL,?,?)",
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
                ),
            )
            db.executemany(
                "INSERT INTO targets VALUES (?,?,?,'pending',NULL,?)",
                [(rollout_id, device, index, now) for index, wave in enumerate(plan) for device in wave],
            )
        found = self.get(rollout_id)
        assert found is not None
        return found

    def get(self, rollout_id: str) -> Rollout | None:
        """One rollout, or None."""
        row = self.db.execute("SELECT * FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
        if row is None:
            return None
        return Rollout(
            id=row[0],
            release=row[1],
            group=row[2],
            manifest=bytes(row[3]),
            waves=json.loads(row[4]),
            wave_timeout=row[5],
            max_failure_rate=row[6],
            state=row[7],
            wave=row[8],
            wave_started=row[9],
            accepted_failures=row[10],
            reason=row[11],
        )

    def all(self) -> list[Rollout]:
        """Every rollout, newest first."""
        ids = [r[0] for r in self.db.execute("SELECT id FROM rollouts ORDER BY created DESC")]
        return [r for r in (self.get(i) for i in ids) if r is not None]

    def targets(self, rollout_id: str) -> dict[str, tuple[int, str, str | None]]:
        """Device -> (wave, state, detail)."""
        rows = self.db.execute(
            "SELECT device, wave, state, detail FROM targets WHERE rollout = ?", (rollout_id,)
        )
        return {device: (wave, state, detail) for device, wave, state, detail in rows}

    def set_targets(self, rollout_id: str, changes: dict[str, tuple[str, str | None]]) -> None:
        """Record new target states; a target that finished meanwhile (e.g. canceled by an abort from
        another process) keeps its state."""
        if not changes:
            return
        now = time.time()
        with self.transaction() as db:
            db.executemany(
                "UPDATE targets SET state = ?, detail = ?, updated = ? "
                "WHERE rollout = ? AND device = ? AND state IN ('pending', 'sent')",
                [(state, detail, now, rollout_id, device) for device, (state, detail) in changes.items()],
            )

    def update(self, rollout_id: str, *, while_running: bool = False, **fields: Any) -> None:
        """Change columns of a rollout (``while_running``: only if no one stopped it meanwhile)."""
        names = ", ".join(f"{name} = ?" for name in fields)
        condition = " AND state = 'running'" if while_running else ""
        with self.transaction() as db:
            db.execute(
                f"UPDATE rollouts SET {names}, updated = ? WHERE id = ?{condition}",
                (*fields.values(), time.time(), rollout_id),
            )

    def add_targets(self, rollout_id: str, devices: list[str], wave: int) -> None:
        """Add devices (that joined the group during the rollout) to a wave."""
        now = time.time()
        with self.transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO targets VALUES (?,?,?,'pending',NULL,?)",
                [(rollout_id, device, wave, now) for device in devices],
            )

    def counts(self, rollout_id: str) -> dict[str, int]:
        """Targets by state."""
        rows = self.db.execute(
            "SELECT state, COUNT(*) FROM targets WHERE rollout = ? GROUP BY state", (rollout_id,)
        )
        return dict(rows.fetchall())


@contextlib.contextmanager
def controller_lock(store: RolloutStore, rollout_id: str) -> Iterator[None]:
    """Only one controller drives a rollout; a crashed one leaves no stale lock (flock dies with it)."""
    name = rollout_id.replace("/", "_").replace("@", "_")
    path = store.path.with_name(f"{store.path.name}.{name}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FleetError(f"rollout {rollout_id} is being driven by another edge-fleet process") from None
        yield
    finally:
        os.close(fd)


class Controller:
    """Drives one rollout until it is done, halted or aborted."""

    def __init__(self, store: RolloutStore, options: BrokerOptions, *, out: Any = sys.stdout) -> None:
        self.store = store
        self.options = options
        self.out = out
        self.feed = FleetFeed(options, telemetry=False)
        self.view = self.feed.view

    def close(self) -> None:
        """Disconnect."""
        self.feed.close()

    def say(self, text: str) -> None:
        """Progress for the operator."""
        print(text, file=self.out, flush=True)

    def discover(self) -> None:
        """Take in the retained burst of statuses and model states."""
        self.feed.settle(_DISCOVERY_MAX_S)

    def group_devices(self, group: str) -> list[str]:
        """Devices of ``group``: online ones first, then by id."""
        members = [d for d in self.view.devices.values() if d.status is not None and d.status.group == group]
        members.sort(key=lambda d: (not (d.status and d.status.online), d.device_id))
        return [d.device_id for d in members]

    def _publish_desired(self, devices: list[str], payload: bytes) -> None:
        """Publish (retained) to every device at once, then wait for all the acknowledgements."""
        prefix = self.options.prefix
        sent = [
            (d, self.feed.client.publish(f"{prefix}/{d}/model/desired", payload, qos=1, retain=True))
            for d in devices
        ]
        for device, info in sent:
            info.wait_for_publish(timeout=30)
            if not info.is_published():
                raise FleetError(f"the broker did not acknowledge the desired state of {device}")

    def _outcome(self, device: str, manifest: Manifest) -> tuple[str, str | None] | None:
        found = self.view.devices.get(device)
        state = found.model if found else None
        if state is None:
            return None
        if state.active and (state.active.name, state.active.version) == (manifest.name, manifest.version):
            return "active", None
        update = state.update
        if (
            update is not None
            and (update.name, update.version) == (manifest.name, manifest.version)
            and update.phase in ("failed", "rolled_back")
        ):
            return "failed", f"{update.phase}: {update.error.code if update.error else '?'}"
        return None

    def run(self, rollout_id: str, poll_s: float = 0.2) -> str:
        """Drive the rollout; returns its final state (``done``, ``halted`` or ``aborted``)."""
        rollout = self.store.get(rollout_id)
        assert rollout is not None
        manifest = Manifest.parse(rollout.manifest)
        payload = rollout.manifest
        waves = len(rollout.waves)
        while True:
            rollout = self.store.get(rollout_id)
            assert rollout is not None
            if rollout.state != "running":
                return rollout.state
            targets = self.store.targets(rollout_id)
            wave = rollout.wave
            if wave >= waves:
                self.store.update(rollout_id, while_running=True, state="done", reason=None)
                self.say(f"rollout {rollout_id}: done — {self._tally(rollout_id)}")
                return "done"
            members = [d for d, (w, _s, _x) in targets.items() if w == wave]
            if rollout.wave_started is None:
                self.say(
                    f"rollout {rollout_id}: wave {wave + 1}/{waves} ({rollout.waves[wave]:g}%): {len(members)} devices"
                )
                pending = [d for d in members if targets[d][1] == "pending"]
                self._publish_desired(pending, payload)
                # Marked after the broker has them all: a crash in between publishes them again,
                # which is harmless (the same retained message).
                self.store.set_targets(rollout_id, dict.fromkeys(pending, ("sent", None)))
                self.store.update(rollout_id, while_running=True, wave_started=time.time())
                continue
            self.feed.pump(poll_s)
            joined = [d for d in self.group_devices(rollout.group) if d not in targets]
            if joined:
                # Devices that joined the group meanwhile get the release too: with the next
                # wave, or at once during the last one.
                into = min(wave + 1, waves - 1)
                self.store.add_targets(rollout_id, joined, into)
                if into == wave:
                    self._publish_desired(joined, payload)
                    self.store.set_targets(rollout_id, dict.fromkeys(joined, ("sent", None)))
                self.say(f"  {', '.join(joined)} joined {rollout.group}: added to wave {into + 1}")
                continue
            changes: dict[str, tuple[str, str | None]] = {}
            for device, (w, state, _detail) in targets.items():
                if w <= wave and state == "sent":
                    outcome = self._outcome(device, manifest)
                    if outcome is not None:
                        changes[device] = outcome
            timed_out = time.time() > rollout.wave_started + rollout.wave_timeout
            if timed_out:
                for device in members:
                    if targets[device][1] == "sent" and device not in changes:
                        changes[device] = ("timed_out", f"no answer within {rollout.wave_timeout:g} s")
            self.store.set_targets(rollout_id, changes)
            for device, (state, detail) in changes.items():
                if state != "active":
                    self.say(f"  {device}: {state} ({detail})")
            targets = self.store.targets(rollout_id)
            in_play = [s for (w, s, _d) in targets.values() if w <= wave]
            failures = sum(1 for s in in_play if s in _FAILED) - rollout.accepted_failures
            if failures > rollout.max_failure_rate * len(in_play):
                reason = (
                    f"{failures} of {len(in_play)} devices in waves 1-{wave + 1} failed "
                    f"(limit {rollout.max_failure_rate:.0%})"
                )
                self.store.update(rollout_id, while_running=True, state="halted", reason=reason)
                self.say(f"rollout {rollout_id}: HALTED — {reason}")
                return "halted"
            if all(targets[d][1] in _FINISHED for d in members):
                self.say(f"rollout {rollout_id}: wave {wave + 1} finished — {self._tally(rollout_id)}")
                self.store.update(rollout_id, while_running=True, wave=wave + 1, wave_started=None)

    def withdraw(self, rollout_id: str) -> int:
        """Clear the desired state of targets that had not finished; returns how many."""
        targets = self.store.targets(rollout_id)
        unfinished = [d for d, (_w, s, _x) in targets.items() if s == "sent"]
        self._publish_desired(unfinished, b"")
        self.store.set_targets(rollout_id, {d: ("canceled", "rollout aborted") for d in unfinished})
        return len(unfinished)

    def _tally(self, rollout_id: str) -> str:
        counts = self.store.counts(rollout_id)
        return ", ".join(f"{counts[s]} {s}" for s in sorted(counts))


# -- command line ---------------------------------------------------------------------------------------


def default_db() -> Path:
    """``$EDGE_FLEET_DB``, else ``$XDG_STATE_HOME/edge-fleet/rollouts.sqlite3``."""
    if os.environ.get("EDGE_FLEET_DB"):
        return Path(os.environ["EDGE_FLEET_DB"])
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state / "edge-fleet" / "rollouts.sqlite3"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``rollout``."""
    roll = sub.add_parser(
        "rollout",
        help="roll a release out to a group in waves; or: rollout status [ID] | abort ID | resume ID",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    roll.add_argument("target", metavar="MANIFEST|status|abort|resume", help="a manifest.json, or an action")
    roll.add_argument(
        "rollout_id", nargs="?", metavar="ID", help="for status, abort and resume: NAME@VERSION/GROUP"
    )
    roll.add_argument("--group", help="the group to roll out to")
    roll.add_argument(
        "--waves",
        type=parse_waves,
        default=parse_waves("1%,10%,50%,100%"),
        help="default 1%%,10%%,50%%,100%%",
    )
    roll.add_argument(
        "--wave-timeout", type=float, default=600.0, help="seconds a wave may take (default 600)"
    )
    roll.add_argument(
        "--max-failure-rate", type=float, default=0.1, help="halt above this share of failures (default 0.1)"
    )
    roll.add_argument(
        "--min-devices", type=int, default=1, help="at least this many devices per wave (default 1)"
    )
    roll.add_argument(
        "--db",
        type=Path,
        default=None,
        help="state file (default: $EDGE_FLEET_DB or ~/.local/state/edge-fleet/rollouts.sqlite3)",
    )
    roll.add_argument("--json", action="store_true", help="status as JSON")
    add_broker_args(roll)
    roll.set_defaults(func=rollout_command)


def rollout_command(args: argparse.Namespace) -> int:
    """Dispatch ``edge-fleet rollout …``."""
    store = RolloutStore(args.db or default_db())
    if args.target == "status":
        return _status(store, args.rollout_id, args.json)
    if args.target in ("abort", "resume"):
        if not args.rollout_id:
            raise FleetError(f"rollout {args.target} needs the rollout ID (see: edge-fleet rollout status)")
        rollout = store.get(args.rollout_id)
        if rollout is None:
            raise FleetError(f"no rollout {args.rollout_id!r} in {store.path}")
        if args.target == "abort":
            return _abort(store, rollout, options_from(args))
        return _drive(store, rollout, options_from(args), resume=True)
    return _start(store, args)


def _start(store: RolloutStore, args: argparse.Namespace) -> int:
    if not args.group:
        raise FleetError("rollout MANIFEST needs --group")
    if not 0 <= args.max_failure_rate <= 1:
        raise FleetError("--max-failure-rate must lie in [0, 1]")
    manifest = read_deployable(Path(args.target))
    existing = store.get(rollout_id_of(manifest, args.group))
    if existing is not None:
        if existing.manifest != manifest.model_dump_json().encode():
            raise FleetError(f"rollout {existing.id} exists with a different manifest; use a new version")
        if existing.state != "running":
            print(
                f"rollout {existing.id} is {existing.state}"
                + (f": {existing.reason}" if existing.reason else "")
            )
            return 0 if existing.state == "done" else 2
        print(f"rollout {existing.id}: continuing")
        return _drive(store, existing, options_from(args), resume=False)
    controller = Controller(store, options_from(args))
    try:
        controller.discover()
        devices = controller.group_devices(args.group)
        if not devices:
            raise FleetError(f"no device of group {args.group!r} has announced itself on the broker")
        plan = plan_waves(devices, args.waves, max(1, args.min_devices))
        rollout = store.create(
            manifest, args.group, args.waves, plan, args.wave_timeout, args.max_failure_rate
        )
        print(
            f"rollout {rollout.id}: {len(devices)} devices in waves of "
            + ", ".join(str(len(w)) for w in plan)
        )
        with controller_lock(store, rollout.id):
            state = controller.run(rollout.id)
    finally:
        controller.close()
    return 0 if state == "done" else 2


def _drive(store: RolloutStore, rollout: Rollout, options: BrokerOptions, *, resume: bool) -> int:
    with controller_lock(store, rollout.id):
        if resume and rollout.state in ("halted", "aborted"):
            failures = sum(
                1 for (w, s, _d) in store.targets(rollout.id).values() if w <= rollout.wave and s in _FAILED
            )
            store.update(rollout.id, state="running", reason=None, accepted_failures=failures)
            print(f"rollout {rollout.id}: resumed ({failures} failures so far accepted)")
        elif resume and rollout.state == "done":
            print(f"rollout {rollout.id} is already done")
            return 0
        controller = Controller(store, options)
        try:
            controller.discover()
            state = controller.run(rollout.id)
        finally:
            controller.close()
    return 0 if state == "done" else 2


def _abort(store: RolloutStore, rollout: Rollout, options: BrokerOptions) -> int:
    store.update(rollout.id, state="aborted", reason="aborted by the operator")
    controller = Controller(store, options)
    try:
        withdrawn = controller.withdraw(rollout.id)
    finally:
        controller.close()
    print(f"rollout {rollout.id}: aborted; desired state withdrawn from {withdrawn} unfinished devices")
    return 0


def _status(store: RolloutStore, rollout_id: str | None, as_json: bool) -> int:
    rollouts = [r for r in store.all() if rollout_id in (None, r.id)]
    if rollout_id and not rollouts:
        raise FleetError(f"no rollout {rollout_id!r} in {store.path}")
    for r in rollouts:
        counts = store.counts(r.id)
        row = {
            "id": r.id,
            "state": r.state,
            "wave": min(r.wave + 1, len(r.waves)),
            "waves": r.waves,
            "targets": counts,
            "reason": r.reason,
        }
        if as_json:
            print(json.dumps(row))
        else:
            tally = ", ".join(f"{counts[s]} {s}" for s in sorted(counts))
            print(
                f"{r.id}: {r.state}, wave {row['wave']}/{len(r.waves)} — {tally}"
                + (f" — {r.reason}" if r.reason else "")
            )
    return 0
