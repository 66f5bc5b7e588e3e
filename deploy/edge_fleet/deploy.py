"""``edge-fleet deploy`` and ``edge-fleet rollback``: one release as the desired state of a device
or a group, recorded in the state file and published retained; ``--wait`` follows the devices.

A device's own desired state wins over its group's.  So a group-level deploy or rollback that
devices' own assignments would shadow is refused, naming them, unless ``--override`` clears theirs
first (they then follow the group).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_contract.manifest import Manifest

from .assignments import Assignments, Kind, assign
from .broker import FleetError, add_broker_args, options_from
from .fleet_view import FleetFeed
from .follow import follow
from .inventory import DISCOVERY_MAX_S, Inventory
from .releases import add_replace_model, load_private_key, read_deployable, read_manifest, sign_rollback
from .rollout_store import names
from .state import add_db_arg, open_db


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``deploy`` and ``rollback``."""
    deploy = sub.add_parser("deploy", help="make a release the desired model of a device or group")
    deploy.add_argument("manifest", type=Path, nargs="?", metavar="MANIFEST", help="manifest.json")
    _add_target(deploy)
    deploy.add_argument(
        "--clear",
        action="store_true",
        help="remove the desired state instead (a device then follows its group)",
    )
    _add_common(deploy)
    deploy.set_defaults(func=deploy_command)

    rollback = sub.add_parser("rollback", help="sign and deploy an explicit rollback to an earlier release")
    rollback.add_argument(
        "manifest", type=Path, metavar="MANIFEST", help="manifest.json of the release to go back to"
    )
    rollback.add_argument("--key", type=Path, required=True, metavar="PRIVATE_KEY", help="fleet.key")
    rollback.add_argument("--expires-days", type=float, default=7.0, help="boxes refuse it after this")
    rollback.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="write the signed rollback manifest here instead of deploying it (to roll it out in waves)",
    )
    add_replace_model(rollback)
    _add_target(rollback, required=False)
    _add_common(rollback)
    rollback.set_defaults(func=rollback_command)


def _add_target(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    target = parser.add_mutually_exclusive_group(required=required)
    target.add_argument("--device", help="one device id")
    target.add_argument("--group", help="every device of a group (a device's own desired state wins)")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--override",
        action="store_true",
        help="with --group: clear the own desired state of the group's devices that have one, so they follow the group",
    )
    parser.add_argument(
        "--wait", action="store_true", help="follow the devices until each is active or failed"
    )
    parser.add_argument(
        "--wait-timeout", type=float, default=600.0, help="seconds --wait follows them at most (default 600)"
    )
    add_db_arg(parser)
    add_broker_args(parser)


def deploy_command(args: argparse.Namespace) -> int:
    """``edge-fleet deploy MANIFEST (--device ID | --group G) [--override] [--wait]``."""
    if args.clear:
        return _publish(args, None, what="cleared the desired model")
    if args.manifest is None:
        raise FleetError("give a MANIFEST to deploy (or --clear)")
    return _publish(args, read_deployable(args.manifest), what="desired model")


def rollback_command(args: argparse.Namespace) -> int:
    """``edge-fleet rollback MANIFEST --key KEY (--device ID | --group G | --out FILE)``: an explicit,
    signed rollback, deployed at once or written for ``edge-fleet rollout``."""
    manifest = sign_rollback(
        read_manifest(args.manifest), load_private_key(args.key), args.expires_days, args.replace_model
    )
    if args.out is not None:
        args.out.write_text(manifest.model_dump_json(indent=2) + "\n")
        print(f"rollback release to {manifest.release_id} written to {args.out}")
        if not (args.device or args.group):
            return 0
    elif not (args.device or args.group):
        raise FleetError("give --device or --group to deploy the rollback, or --out to write it")
    return _publish(args, manifest, what="rollback")


def _publish(args: argparse.Namespace, manifest: Manifest | None, *, what: str) -> int:
    from . import server_cmd
    from .client import server_client

    client = server_client()
    if client is not None:
        return server_cmd.deploy(client, args, manifest, what)
    kind: Kind = "device" if args.device else "group"
    target: str = args.device or args.group
    options = options_from(args)
    db = open_db(args.db)
    assignments, inventory = Assignments(db), Inventory(db)
    feed = FleetFeed(options, telemetry=False, desired=True)
    try:
        feed.settle(DISCOVERY_MAX_S)
        inventory.observe(feed.view.devices.values())
        followers = [target]
        if kind == "device" and inventory.get(target) is None:
            print(
                f"note: device {target} is unknown (not in the inventory, no retained status on the broker): "
                "it gets this desired state when it first connects; check the name (`edge-fleet devices`)"
            )
        if kind == "group":
            members = set(inventory.members(target)) | {
                d.device_id
                for d in feed.view.devices.values()
                if d.status is not None and d.status.group == target
            }
            shadowed = _shadowed(assignments, feed, sorted(members))
            if shadowed and not args.override:
                listed = ", ".join(f"{d} ({r})" for d, r in sorted(shadowed.items()))
                raise FleetError(
                    f"{what} of group {target} refused: {len(shadowed)} of its devices have their own desired "
                    f"state, which wins over the group's: {listed}. Pass --override to clear theirs (they then "
                    "follow the group), deploy to them with --device, or undo their rollout with "
                    "`edge-fleet rollout rollback ID`"
                )
            if shadowed:
                assign(
                    assignments, feed.client, options.prefix, "device", sorted(shadowed), None,
                    f"override by {what} of group {target}",
                )  # fmt: skip
                print(
                    f"cleared the own desired state of {names(sorted(shadowed))}: they follow group {target}"
                )
            followers = sorted(members)
        payload = manifest.model_dump_json().encode() if manifest else None
        assign(
            assignments,
            feed.client,
            options.prefix,
            kind,
            [target],
            payload,
            "rollback" if what == "rollback" else "deploy",
        )
        scope = f"{target}" if kind == "device" else f"group {target}"
        release = f": {manifest.release_id}" if manifest else ""
        print(f"{what} of {scope}{release} (recorded, and retained by the broker)")
        if kind == "group":
            print(f"  {len(followers)} devices follow it" + (f": {names(followers)}" if followers else ""))
        if manifest is None or not args.wait:
            return 0
        results = follow(
            feed,
            followers,
            manifest.name,
            manifest.version,
            args.wait_timeout,
            lambda t: print(t, flush=True),
        )
    finally:
        feed.close()
    active = sorted(d for d, r in results.items() if r and r[0] == "active")
    failed = sorted(d for d, r in results.items() if r and r[0] == "failed")
    unfinished = sorted(d for d, r in results.items() if r is None)
    print(
        f"{len(active)} of {len(results)} devices active on {manifest.release_id}"
        + (f"; failed: {names(failed)}" if failed else "")
        + (f"; not finished within {args.wait_timeout:g} s: {names(unfinished)}" if unfinished else "")
    )
    return 0 if len(active) == len(results) else 1


def _shadowed(assignments: Assignments, feed: FleetFeed, members: list[str]) -> dict[str, str]:
    """Members with their own desired state (recorded here or retained on the broker) -> its release."""
    found = {}
    for device in members:
        own = assignments.current_of("device", device)
        if own is not None and own.release is not None:
            found[device] = f"{own.release}, by {own.origin}"
        seen = feed.view.devices.get(device)
        if device not in found and seen is not None and seen.desired:
            found[device] = f"{seen.desired}, on the broker"
    return found
