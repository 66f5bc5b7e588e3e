"""``edge-fleet rollout``: start, follow, abort, resume and roll back rollouts (see ``rollout``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge_contract.manifest import Manifest

from . import server_cmd
from .assignments import Assignments
from .broker import BrokerOptions, FleetError, add_broker_args, options_from
from .client import server_client
from .releases import load_private_key, read_deployable, sign_rollback
from .rollout import Controller, controller_lock
from .rollout import __doc__ as _ROLLOUT_DOC
from .rollout_store import (
    FAILED,
    Rollout,
    RolloutState,
    RolloutStore,
    names,
    parse_waves,
    plan_waves,
    rollout_id_of,
    tally,
)
from .state import add_db_arg, default_db, open_db

_ACTIONS = ("status", "abort", "resume", "rollback")
#: Exit codes: 0 done, 2 halted or aborted, 3 waiting for deferred devices.
_CODES: dict[RolloutState, int] = {"done": 0, "halted": 2, "aborted": 2, "waiting": 3, "running": 2}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``rollout``."""
    roll = sub.add_parser(
        "rollout",
        help="roll a release out to a group in waves; or: rollout status [ID] | abort ID | resume ID | rollback ID",
        description=_ROLLOUT_DOC.split("\n\n")[0] if _ROLLOUT_DOC else None,
    )
    roll.add_argument(
        "target", metavar="MANIFEST|status|abort|resume|rollback", help="a manifest.json, or an action"
    )
    roll.add_argument("rollout_id", nargs="?", metavar="ID", help="for the actions: NAME@VERSION/GROUP")
    roll.add_argument("--group", help="the group to roll out to")
    roll.add_argument(
        "--waves", type=parse_waves, default=None, help="default 1%%,10%%,50%%,100%% (a rollback: 50%%,100%%)"
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
        "--defer-offline",
        action="store_true",
        help="do not wait for devices offline when their wave starts: send them the release, report them "
        "pending, and end `waiting` until they report (default: wait until the wave timeout, then count them failed)",
    )
    roll.add_argument(
        "--key", type=Path, metavar="PRIVATE_KEY", help="rollback: fleet.key, to sign the rollback"
    )
    roll.add_argument(
        "--manifest",
        type=Path,
        action="append",
        default=[],
        metavar="MANIFEST",
        help="rollback: manifest.json of a release devices ran before, if this state file has never deployed it",
    )
    roll.add_argument("--expires-days", type=float, default=7.0, help="rollback: boxes refuse it after this")
    roll.add_argument(
        "--no-broker",
        action="store_true",
        help="status: from the state file only (do not refresh from the broker)",
    )
    roll.add_argument("--json", action="store_true", help="status as JSON")
    roll.add_argument(
        "--select", help="server mode: the devices whose labels/group match, e.g. region=north,hw=pi5"
    )
    roll.add_argument(
        "--canary",
        type=int,
        default=0,
        help="server mode: a canary set of N devices first (any failure halts)",
    )
    roll.add_argument(
        "--max-parallel",
        type=int,
        default=0,
        help="server mode: devices updating at once at most (0: a wave)",
    )
    roll.add_argument(
        "--resume-on-recovery", action="store_true",
        help="server mode: a halted rollout continues by itself when its failing devices recover",
    )  # fmt: skip
    roll.add_argument(
        "--follow", action="store_true", help="server mode: print the rollout's progress until it ends"
    )
    add_db_arg(roll)
    add_broker_args(roll)
    roll.set_defaults(func=rollout_command)


def _store(args: argparse.Namespace) -> RolloutStore:
    path = args.db or default_db()
    return RolloutStore(open_db(path), path)


def rollout_command(args: argparse.Namespace) -> int:
    """Dispatch ``edge-fleet rollout …`` (to the server when the profile names one)."""
    client = server_client()
    if client is not None:
        return server_cmd.rollout(client, args)
    if args.select or args.canary or args.max_parallel or args.resume_on_recovery or args.follow:
        raise FleetError(
            "--select, --canary, --max-parallel, --resume-on-recovery and --follow need the fleet server "
            "(server in the profile or EDGE_FLEET_SERVER; see docs/fleet-server.md)"
        )
    store = _store(args)
    if args.target == "status":
        return _status(store, args)
    if args.target in _ACTIONS:
        if not args.rollout_id:
            raise FleetError(f"rollout {args.target} needs the rollout ID (see: edge-fleet rollout status)")
        rollout = store.get(args.rollout_id)
        if rollout is None:
            raise FleetError(
                f"no rollout {args.rollout_id!r} in {store.path} (see: edge-fleet rollout status)"
            )
        if args.target == "abort":
            return _abort(store, rollout, options_from(args))
        if args.target == "rollback":
            return _rollback(store, rollout, args)
        return _resume(store, rollout, options_from(args))
    return _start(store, args)


def _check_rate(args: argparse.Namespace) -> None:
    if not 0 <= args.max_failure_rate <= 1:
        raise FleetError("--max-failure-rate must lie in [0, 1]")


def _existing(store: RolloutStore, existing: Rollout, options: BrokerOptions) -> int:
    """The same rollout started again: continue it, or say how it ended."""
    if existing.state == "running":
        print(f"rollout {existing.id}: continuing")
        return _drive(store, existing, options)
    print(f"rollout {existing.id} is {existing.state}" + (f": {existing.reason}" if existing.reason else ""))
    return _CODES[existing.state]


def _start(store: RolloutStore, args: argparse.Namespace) -> int:
    if not args.group:
        raise FleetError("rollout MANIFEST needs --group")
    _check_rate(args)
    manifest = read_deployable(Path(args.target))
    options = options_from(args)
    existing = store.get(rollout_id_of(manifest, args.group))
    if existing is not None:
        if existing.manifest != manifest.model_dump_json().encode():
            raise FleetError(f"rollout {existing.id} exists with a different manifest; use a new version")
        return _existing(store, existing, options)
    controller = Controller(store, options)
    try:
        controller.discover()
        devices = controller.group_devices(args.group)
        if not devices:
            raise FleetError(
                f"no device of group {args.group!r} is in the inventory or on the broker "
                "(`edge-fleet devices` lists them; `edge-fleet provision NAME --group G` records one)"
            )
        waves = args.waves or parse_waves("1%,10%,50%,100%")
        plan = plan_waves(devices, waves, max(1, args.min_devices))
        rollout = store.create(
            rollout_id_of(manifest, args.group),
            manifest,
            args.group,
            waves,
            [[(d, controller.running(d), None) for d in wave] for wave in plan],
            args.wave_timeout,
            args.max_failure_rate,
            defer_offline=args.defer_offline,
        )
        offline = [d for d in devices if not controller.online(d)]
        print(
            f"rollout {rollout.id}: {len(devices)} devices in waves of {', '.join(str(len(w)) for w in plan)}"
            + (f"; offline now: {names(offline)}" if offline else "")
        )
        with controller_lock(store, rollout.id):
            state = controller.run(rollout.id)
    finally:
        controller.close()
    return _CODES[state]


def _drive(store: RolloutStore, rollout: Rollout, options: BrokerOptions) -> int:
    with controller_lock(store, rollout.id):
        controller = Controller(store, options)
        try:
            controller.discover()
            state = controller.run(rollout.id)
        finally:
            controller.close()
    return _CODES[state]


def _resume(store: RolloutStore, rollout: Rollout, options: BrokerOptions) -> int:
    if rollout.state == "aborted":
        raise FleetError(
            f"rollout {rollout.id} was aborted, and an abort is final: nothing was sent. To try again, sign a "
            "new version and roll that out; to undo what it changed: edge-fleet rollout rollback "
            f"{rollout.id} --key fleet.key"
        )
    if rollout.state in ("done", "waiting"):
        print(
            f"rollout {rollout.id} is already {rollout.state}"
            + (f": {rollout.reason}" if rollout.reason else "")
        )
        return _CODES[rollout.state]
    if rollout.state == "halted":
        failures = sum(
            1 for t in store.targets(rollout.id).values() if t.wave <= rollout.wave and t.state in FAILED
        )
        store.update(
            rollout.id, only_if=("halted",), state="running", reason=None, accepted_failures=failures
        )
        print(f"rollout {rollout.id}: resumed ({failures} failures so far accepted)")
    return _drive(store, rollout, options)


def _abort(store: RolloutStore, rollout: Rollout, options: BrokerOptions) -> int:
    if rollout.state in ("done", "aborted"):
        raise FleetError(f"rollout {rollout.id} is already {rollout.state}: there is nothing to abort")
    store.update(rollout.id, state="aborted", reason="aborted by the operator")
    controller = Controller(store, options)
    try:
        withdrawn = controller.withdraw(rollout.id)
    finally:
        controller.close()
    print(
        f"rollout {rollout.id}: aborted (final); desired state withdrawn from {len(withdrawn)} unfinished devices"
        + (f": {names(withdrawn)}" if withdrawn else "")
        + f"; updates that completed stay (undo them: edge-fleet rollout rollback {rollout.id} --key fleet.key)"
    )
    return 0


def _rollback(store: RolloutStore, rollout: Rollout, args: argparse.Namespace) -> int:
    """Return the devices ``rollout`` touched to what they ran before, in waves."""
    rollback_id = f"{rollout.id}/rollback"
    options = options_from(args)
    existing = store.get(rollback_id)
    if existing is not None:
        return _existing(store, existing, options)
    if rollout.state == "running":
        raise FleetError(
            f"rollout {rollout.id} is still running: abort it first (edge-fleet rollout abort {rollout.id})"
        )
    if args.key is None:
        raise FleetError("rollout rollback needs --key fleet.key: the rollback releases are signed")
    _check_rate(args)
    touched = {d: t for d, t in store.targets(rollout.id).items() if t.state != "pending"}
    if not touched:
        raise FleetError(f"rollout {rollout.id} sent its release to no device: there is nothing to roll back")
    unknown = sorted(d for d, t in touched.items() if t.before is None)
    if unknown:
        print(f"not rolled back (what they ran before is unknown): {names(unknown)}")
    wanted = {t.before for t in touched.values() if t.before is not None}
    assignments = Assignments(store.db)
    supplied = {m.release_id: m for m in (read_deployable(p) for p in args.manifest)}
    manifests: dict[str, Manifest] = {}
    missing = []
    for release in sorted(wanted):
        if release in supplied:
            manifests[release] = supplied[release]
        elif (payload := assignments.release_manifest(release)) is not None:
            manifests[release] = Manifest.parse(payload)
        else:
            missing.append(release)
    if missing:
        raise FleetError(
            f"this state file holds no manifest of {', '.join(missing)}, which devices ran before: give its "
            "manifest.json with --manifest PATH (the release folder is served still)"
        )
    key = load_private_key(args.key)
    digests = {}
    signed = {}
    # Going back may mean going back to another model: the boxes run the rollout's now.
    current = Manifest.parse(rollout.manifest).name
    for release, earlier in manifests.items():
        back = sign_rollback(earlier, key, args.expires_days, [current] if current != earlier.name else [])
        signed[release] = back
        digests[release] = assignments.remember(back.model_dump_json().encode())
    order = sorted((d for d in touched if d not in unknown), key=lambda d: (touched[d].wave, d))
    waves = args.waves or parse_waves("50%,100%")
    plan = plan_waves(order, waves, max(1, args.min_devices))
    first = signed[touched[order[0]].before or ""]
    controller = Controller(store, options)
    try:
        controller.discover()
        created = store.create(
            rollback_id,
            first,
            rollout.group,
            waves,
            [[(d, controller.running(d), digests[touched[d].before or ""]) for d in wave] for wave in plan],
            args.wave_timeout,
            args.max_failure_rate,
            defer_offline=args.defer_offline,
            rollback_of=rollout.id,
        )
        print(
            f"rollout {created.id}: {len(order)} devices back to "
            + ", ".join(f"{r} ({sum(1 for d in order if touched[d].before == r)})" for r in sorted(signed))
            + f" in waves of {', '.join(str(len(w)) for w in plan)}"
        )
        with controller_lock(store, created.id):
            state = controller.run(created.id)
    finally:
        controller.close()
    return _CODES[state]


def _status(store: RolloutStore, args: argparse.Namespace) -> int:
    rollouts = [r for r in store.all() if args.rollout_id in (None, r.id)]
    if args.rollout_id and not rollouts:
        raise FleetError(f"no rollout {args.rollout_id!r} in {store.path}")
    note = None
    if not args.no_broker and rollouts:
        try:
            controller = Controller(store, options_from(args))
        except FleetError as exc:
            note = f"not refreshed from the broker ({exc}); shown as last recorded"
        else:
            try:
                controller.discover()
                for r in rollouts:
                    controller.refresh(r)
            finally:
                controller.close()
    for stale in rollouts:
        r = store.get(stale.id) or stale
        targets = store.targets(r.id)
        counts = store.counts(r.id)
        open_devices = sorted(d for d, t in targets.items() if t.state in ("sent", "deferred"))
        problems = {d: f"{t.state}: {t.detail}" for d, t in sorted(targets.items()) if t.state in FAILED}
        row = {
            "id": r.id,
            "state": r.state,
            "wave": min(r.wave + 1, len(r.waves)),
            "waves": r.waves,
            "targets": counts,
            "reason": r.reason,
            "waiting_for": open_devices,
            "failures": problems,
            "rollback_of": r.rollback_of,
            "refreshed": note is None and not args.no_broker,
        }
        if args.json:
            print(json.dumps(row))
            continue
        print(
            f"{r.id}: {r.state}, wave {row['wave']}/{len(r.waves)} — {tally(counts)}"
            + (f" — {r.reason}" if r.reason else "")
        )
        if open_devices:
            print(f"  waiting for: {names(open_devices)}")
        for device, problem in problems.items():
            print(f"  {device}: {problem}")
    if note:
        print(f"edge-fleet: {note}", file=sys.stderr)
    if not rollouts:
        print(f"no rollouts in {store.path}")
    return 0
