"""The ``rollout``, ``devices`` and ``history`` commands in server mode: clients of the server's API.

``rollout MANIFEST`` returns the rollout's id at once (the server drives it); ``--follow``
prints its progress until it ends, with the lab mode's exit codes (0 done, 2 halted or
aborted).  Killing the command never stops the rollout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from edge_contract.manifest import Manifest

from .client import ServerClient
from .errors import FleetError
from .fleet_view import DeviceRow
from .releases import load_private_key, read_deployable, sign_rollback
from .rollout_store import names, parse_waves

_CODES = {"done": 0, "halted": 2, "aborted": 2, "running": 2, "waiting": 3}
_FOLLOW_POLL_S = 0.5


def _path(rollout_id: str, action: str = "") -> str:
    return f"/api/v1/rollouts/{rollout_id}" + (f"/{action}" if action else "")


def _tally(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def rollout(client: ServerClient, args: argparse.Namespace) -> int:
    """``edge-fleet rollout …`` against the server."""
    if args.target == "status":
        return _status(client, args)
    if args.target in ("abort", "resume", "rollback"):
        if not args.rollout_id:
            raise FleetError(f"rollout {args.target} needs the rollout ID (see: edge-fleet rollout status)")
        if args.target == "rollback":
            return _rollback(client, args)
        row = client.call("POST", _path(args.rollout_id, args.target))
        print(f"rollout {row['id']}: {row['state']}" + (f" — {row['reason']}" if row["reason"] else ""))
        return _follow(client, row["id"]) if args.follow else 0
    if bool(args.group) == bool(args.select):
        raise FleetError("rollout MANIFEST needs --group G or --select 'KEY=VALUE,…'")
    manifest = read_deployable(Path(args.target))
    body = {
        "manifest": json.loads(manifest.model_dump_json()),
        "group": args.group,
        "select": args.select,
        "waves": args.waves or parse_waves("1%,10%,50%,100%"),
        "canary": args.canary,
        "wave_timeout": args.wave_timeout,
        "max_failure_rate": args.max_failure_rate,
        "max_parallel": args.max_parallel,
        "min_devices": args.min_devices,
        "resume_on_recovery": args.resume_on_recovery,
        "defer_offline": args.defer_offline,
    }
    row = client.call("POST", "/api/v1/rollouts", body)
    print(row["id"])
    print(f"rollout {row['id']}: {row['state']} — {_tally(row['targets'])} in {row['waves']} waves"
          + (" (the first is the canary)" if row["canary"] else "") + f"; driven by the server at {client.base}")  # fmt: skip
    return _follow(client, row["id"]) if args.follow else 0


def _follow(client: ServerClient, rollout_id: str) -> int:
    after = 0
    while True:
        answer = client.call("GET", _path(rollout_id, "events"), after=after)
        for event in answer["events"]:
            print(f"  {event['text']}", flush=True)
            after = event["seq"]
        if answer["state"] != "running" and not answer["events"]:
            row = client.call("GET", _path(rollout_id))
            print(f"rollout {rollout_id}: {row['state']} — {_tally(row['targets'])}"
                  + (f" — {row['reason']}" if row["reason"] else ""))  # fmt: skip
            return _CODES.get(row["state"], 2)
        time.sleep(_FOLLOW_POLL_S)


def _status(client: ServerClient, args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = (
        [client.call("GET", _path(args.rollout_id))]
        if args.rollout_id
        else client.call("GET", "/api/v1/rollouts")
    )
    for row in rows:
        if args.json:
            print(json.dumps(row))
            continue
        print(f"{row['id']}: {row['state']}, wave {row['wave']}/{row['waves']} — {_tally(row['targets'])}"
              + (f" — {row['reason']}" if row["reason"] else ""))  # fmt: skip
        if row["waiting_for"]:
            print(f"  waiting for: {names(row['waiting_for'])}")
        for device, problem in row["failures"].items():
            print(f"  {device}: {problem}")
    if not rows:
        print(f"no rollouts on the server at {client.base}")
    return 0


def _rollback(client: ServerClient, args: argparse.Namespace) -> int:
    """Sign, here with the fleet key, a rollback to each release the touched devices ran before;
    the server rolls them out in waves."""
    row = client.call("GET", _path(args.rollout_id))
    if args.key is None:
        raise FleetError("rollout rollback needs --key fleet.key: the rollback releases are signed")
    key = load_private_key(args.key)
    supplied = {m.release_id: m for m in (read_deployable(p) for p in args.manifest)}
    current = row["release"].split("@", 1)[0]
    signed = []
    for release in sorted(row["befores"]):
        earlier = supplied.get(release) or Manifest.model_validate(
            client.call("GET", f"/api/v1/releases/{release}")
        )
        back = sign_rollback(earlier, key, args.expires_days, [current] if current != earlier.name else [])
        signed.append(json.loads(back.model_dump_json()))
    if not signed:
        raise FleetError(
            f"rollout {args.rollout_id} sent its release to no device: there is nothing to roll back"
        )
    answer = client.call("POST", _path(args.rollout_id, "rollback"),
                         {"manifests": signed, "waves": args.waves or parse_waves("50%,100%")})  # fmt: skip
    print(answer["id"])
    print(f"rollout {answer['id']}: {answer['state']} — {_tally(answer['targets'])}")
    return _follow(client, answer["id"]) if args.follow else 0


def status_rows(client: ServerClient, group: str | None) -> list[DeviceRow]:
    """The devices as ``status`` shows them (the lab mode's ``DeviceRow`` fields), from the server."""
    fields = set(DeviceRow.__dataclass_fields__)
    rows = []
    for found in client.call("GET", "/api/v1/devices", group=group):
        values = {k: v for k, v in found.items() if k in fields}
        values["device"] = found["device_id"]
        values["last_seen"] = found["last_seen"] or 0.0
        rows.append(DeviceRow(**values))
    return rows


def devices(client: ServerClient, args: argparse.Namespace) -> int:
    """``edge-fleet devices`` against the server (``--json``: one object per device)."""
    rows = client.call("GET", "/api/v1/devices", group=args.group)
    for row in rows:
        # The lab mode's fields first (what the server does not keep is null), then the server's.
        lab = dict.fromkeys(("provisioned", "cert_serial", "cert_expires", "first_seen"))
        row.update({"device": row["device_id"], **lab, **row})
        if args.json:
            print(json.dumps(row))
    if not args.json:
        for row in rows:
            labels = ",".join(f"{k}={v}" for k, v in sorted(row["labels"].items())) or "-"
            state = "never seen" if row["online"] is None else "online" if row["online"] else "offline"
            model = f"{row['model']}@{row['version']}" if row["model"] else "-"
            print(f"{row['device_id']:<24} {row['group'] or '-':<12} {state:<10} {model:<20} {labels}")
    return 0


def deploy(client: ServerClient, args: argparse.Namespace, manifest: Manifest | None, what: str) -> int:
    """``deploy``/``rollback`` to a device or group through the server; ``--wait`` follows the devices."""
    body = {
        "device": args.device,
        "group": args.group,
        "manifest": None if manifest is None else json.loads(manifest.model_dump_json()),
        "override": bool(args.override),
    }
    answer = client.call("POST", "/api/v1/deployments", body)
    scope = args.device if args.device else f"group {args.group}"
    if answer["cleared"]:
        print(f"cleared the own desired state of {names(answer['cleared'])}: they follow {scope}")
    release = f": {answer['release']}" if answer["release"] else ""
    print(f"{what} of {scope}{release} (recorded by the server, and retained by the broker)")
    followers: list[str] = answer["followers"]
    if args.group:
        print(f"  {len(followers)} devices follow it" + (f": {names(followers)}" if followers else ""))
    if manifest is None or not args.wait:
        return 0
    outcome: dict[str, str] = {}
    end = time.monotonic() + args.wait_timeout
    while len(outcome) < len(followers) and time.monotonic() < end:
        for row in client.call("GET", "/api/v1/devices"):
            device = row["device_id"]
            if device not in followers or device in outcome:
                continue
            if (row["model"], row["version"]) == (manifest.name, manifest.version):
                outcome[device] = "active"
            elif row["update_version"] == manifest.version and row["update_phase"] in (
                "failed",
                "rolled_back",
            ):
                outcome[device] = f"failed — {row['update_error']}"
            else:
                continue
            print(f"  {device}: {outcome[device]}", flush=True)
        time.sleep(_FOLLOW_POLL_S)
    active = [d for d, o in outcome.items() if o == "active"]
    unfinished = sorted(set(followers) - set(outcome))
    print(f"{len(active)} of {len(followers)} devices active on {manifest.release_id}"
          + (f"; not finished within {args.wait_timeout:g} s: {names(unfinished)}" if unfinished else ""))  # fmt: skip
    return 0 if len(active) == len(followers) else 1


def reconcile(client: ServerClient, as_json: bool) -> int:
    """``reconcile`` through the server."""
    counts = client.call("POST", "/api/v1/reconcile")
    if as_json:
        print(json.dumps(counts))
    else:
        print(f"published again by the server: {counts['device']} device and {counts['group']} group desired "
              f"states, {counts['cleared']} cleared (acknowledged by the broker)")  # fmt: skip
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``label`` (server mode)."""
    label = sub.add_parser("label", help="server mode: set a device's labels (KEY=VALUE), remove one (KEY-)")
    label.add_argument("device")
    label.add_argument("labels", nargs="+", metavar="KEY=VALUE|KEY-")
    label.add_argument("--replace", action="store_true", help="replace every label (default: change these)")
    label.set_defaults(func=label_command)


def label_command(args: argparse.Namespace) -> int:
    """``edge-fleet label DEVICE KEY=VALUE… [KEY-]…``."""
    from .client import server_client

    client = server_client()
    if client is None:
        raise FleetError("labels live on the fleet server: set server in the profile or EDGE_FLEET_SERVER")
    labels: dict[str, str | None] = {}
    for item in args.labels:
        if item.endswith("-") and "=" not in item:
            labels[item[:-1]] = None
        elif "=" in item:
            key, value = item.split("=", 1)
            labels[key] = value
        else:
            raise FleetError(f"{item!r}: give KEY=VALUE to set a label or KEY- to remove it")
    row = client.call(
        "PUT" if args.replace else "PATCH", f"/api/v1/devices/{args.device}/labels", {"labels": labels}
    )
    shown = ",".join(f"{k}={v}" for k, v in sorted(row["labels"].items())) or "(none)"
    print(f"{row['device_id']}: {shown}")
    return 0


def history(client: ServerClient, target: str, as_json: bool) -> int:
    """``edge-fleet history DEVICE|GROUP`` from the server."""
    for row in client.call("GET", f"/api/v1/history/{target}"):
        if as_json:
            print(json.dumps(row))
        else:
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(row['at']))}  {row['kind']} {row['target']}  "
                  f"{row['release'] or '(cleared)'}  {row['origin']} ({row['actor']})")  # fmt: skip
    return 0
