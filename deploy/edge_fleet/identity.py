"""Live fleet identity: ``move``, ``revoke`` and ``renew`` (and ``provision --live``).

``move`` and ``revoke`` change the running broker's authorization state through
the dynamic-security API (``dynsec.DynSec``): they take effect within a second,
with no restart, no SIGHUP, no file edited by hand.  Both also settle the device's
persistent session from the operators' listener (``sessions``: its old group's
subscriptions and jobs leave it, so none is lost), ``move`` pushes the new group as
the box's retained membership, and ``revoke`` publishes its status as revoked
(``docs/identity.md``).  They go to the devices'
listener (``--admin-port``, default 8883: where the plugin runs) on the host of
``--broker``, as the operator certificate given by ``--tls-cert``/``--tls-key``.

``renew`` is offline: a new key and certificate for the same name, written
atomically over the old pair; the agent loads them on its next (re)connection.
The broker needs no change (the name, and so every right, stays the same), and a
revoked device stays revoked: renewing gives it a certificate, not its rights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError

from agent.link.tls import certificate_expiry
from edge_contract.names import TLS_PORT as DEVICE_PORT
from edge_contract.protocol import Membership, Status, Topics

from . import broker, pki
from .broker import BrokerOptions, FleetError, add_broker_args, open_client, options_from, parse_address
from .dynsec import ADMIN_ROLE, DynSec
from .inventory import record_certificate_file
from .sessions import Settled, settle

T = TypeVar("T")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``move``, ``revoke`` and ``renew``."""
    move = sub.add_parser("move", help="put a device into another group (or none), on the running broker")
    move.add_argument("name", metavar="NAME")
    target = move.add_mutually_exclusive_group(required=True)
    target.add_argument("--group", help="the device's new group")
    target.add_argument("--no-group", action="store_true", help="take the device out of its group")
    _admin_args(move)
    move.set_defaults(func=move_command)

    revoke = sub.add_parser("revoke", help="cut a device off now: no topic left, disconnected")
    revoke.add_argument("name", metavar="NAME")
    _admin_args(revoke)
    revoke.set_defaults(func=revoke_command)

    listing = sub.add_parser("identities", help="who the running broker knows: devices, groups, operators")
    listing.add_argument("--json", action="store_true", help="one JSON object per identity")
    _admin_args(listing)
    listing.set_defaults(func=identities_command)

    renew = sub.add_parser(
        "renew", help="a new certificate (and key) for a device before the old one expires"
    )
    renew.add_argument("name", metavar="NAME")
    renew.add_argument("--ca", type=Path, required=True, metavar="DIR", help="the CA folder of `ca init`")
    renew.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="the folder holding NAME.crt and NAME.key"
    )
    renew.add_argument("--days", type=int, default=pki.IDENTITY_DAYS)
    renew.set_defaults(func=renew_command)


def _admin_args(parser: argparse.ArgumentParser) -> None:
    add_broker_args(parser)
    parser.add_argument(
        "--admin-port",
        type=int,
        default=None,
        help=f"the devices' listener, where identities are managed (default {DEVICE_PORT}; for "
        "`identities`, the port of --broker HOST:PORT when given; move and revoke also use --broker's "
        "operators' listener, 8884, to settle the device's session)",
    )


def admin_options(args: argparse.Namespace, *, broker_port: bool = False) -> BrokerOptions:
    """The broker flags, aimed at the devices' listener (``broker_port``: a port given with
    ``--broker`` on the command line counts as that listener's, for commands that need no other)."""
    options = options_from(args)
    port = args.admin_port
    if port is None and broker_port and args.broker is not None and args.broker[1]:
        port = args.broker[1]
    return replace(options, port=port or DEVICE_PORT)


def operators_options(args: argparse.Namespace) -> BrokerOptions:
    """The operators' listener of ``--broker`` (where any client id, so the device's, is allowed)."""
    options = options_from(args)
    admin = admin_options(args)
    if options.address == admin.address:
        raise FleetError(
            f"--broker {options.host}:{options.address[1]} is the devices' listener (--admin-port): give the "
            f"operators' listener as --broker HOST:PORT (default port 8884); the device's session is "
            "settled there, where a connection may take the device's client id"
        )
    return options


def move_command(args: argparse.Namespace) -> int:
    """``edge-fleet move NAME --group G``: the rules changed, and the session made to follow.

    Its session is settled before and after the rules change (``sessions``): the old group's
    subscriptions leave it and the old group's jobs it held go back to that group, so none is
    lost whether the box is online or not (the second pass catches an agent that subscribed
    again in between).
    """
    group = None if args.no_group else args.group
    if group is not None:
        pki.check_name(group, "a group")
    options = admin_options(args)  # the prefix too: flag, else profile, else "edge"
    data = operators_options(args)
    with DynSec(options) as api:
        client = api.get_client(args.name)
        if client is None:
            raise FleetError(f"{args.name!r} is not a device on this broker; provision it first")
        current = [str(g.get("groupname", "")).removeprefix("group-") for g in client.get("groups", [])]
        leaving = [g for g in current if g != group]
        before = (
            _operators_side(lambda: settle(data, args.name, leaving, end=False)) if leaving else Settled()
        )
        left = api.set_group(args.name, group, options.prefix)
    after = _operators_side(lambda: settle(data, args.name, left, end=False)) if left else Settled()
    # The labels pushed before (a claim's) stay: a move changes the group only.
    _operators_side(lambda: publish_membership(data, args.name, group, pushed_labels(data, args.name)))
    was = f" (left {', '.join(left)}{_handed(before, after)})" if left else ""
    now = f"group {group}" if group else "no group"
    print(
        f"{args.name}: {now}{was}; pushed to the box as its membership (retained): its agent switches "
        "without a restart (agents older than edge-agent's membership support need the group in "
        "agent.toml and a restart)"
    )
    return 0


def _operators_side(step: Callable[[], T]) -> T | Settled:
    """A step on the operators' listener after (or before) the rules changed: when it cannot be
    done (no operator certificate given, say), the rules still changed — warn, naming what is
    missing and the fix, and go on."""
    try:
        return step()
    except FleetError as exc:
        print(
            f"edge-fleet: warning: on the operators' listener: {exc} — the device's rules changed, but its "
            "session, status or membership were not updated: run the command again with an operator "
            "certificate (--tls-cert/--tls-key) and --broker HOST:8884 (it is safe to repeat)",
            file=sys.stderr,
        )
        return Settled()


def _handed(*results: Settled) -> str:
    handed = sum(r.handed_back for r in results)
    return f"; {handed} of its jobs went back to the group" if handed else ""


def revoke_command(args: argparse.Namespace) -> int:
    """``edge-fleet revoke NAME``: no right left, no session left, and a retained ``revoked`` status."""
    data = operators_options(args)
    with DynSec(admin_options(args)) as api:
        client = api.get_client(args.name)
        groups = [
            str(g.get("groupname", "")).removeprefix("group-") for g in (client or {}).get("groups", [])
        ]
        before = _operators_side(lambda: settle(data, args.name, groups, end=True)) if client else Settled()
        api.revoke(args.name)
    # Its agent may have connected again in between, under the old rules: end that session too.
    after = _operators_side(lambda: settle(data, args.name, groups, end=True))
    _operators_side(lambda: announce_revoked(data, args.name))
    print(
        f"revoked {args.name}: disconnected, its session ended{_handed(before, after)}, every subscription "
        "and publication of its certificate refused from now on; `status` shows it revoked"
    )
    return 0


def announce_revoked(options: BrokerOptions, name: str) -> None:
    """Publish ``name``'s retained status as revoked (the box itself can no longer publish it),
    and clear its membership."""
    topics = Topics(options.prefix, name, None)
    payload = Status(online=False, revoked=True, device_id=name).model_dump_json().encode()
    publish_retained(options, [(topics.status, payload), (topics.membership, b"")])


def publish_membership(
    options: BrokerOptions, name: str, group: str | None, labels: dict[str, str] | None = None
) -> None:
    """The box's group (and labels), pushed as retained desired state: its agent applies it without
    a restart."""
    publish_retained(options, [membership_message(options.prefix, name, group, labels)])


def membership_message(
    prefix: str, name: str, group: str | None, labels: dict[str, str] | None = None
) -> tuple[str, bytes]:
    """The retained ``(topic, payload)`` that pushes a box's group and labels."""
    payload = Membership(device_id=name, group=group, labels=labels or {}).model_dump_json().encode()
    return Topics(prefix, name, None).membership, payload


def pushed_labels(options: BrokerOptions, name: str, wait_s: float = 1.0) -> dict[str, str]:
    """The labels of the box's retained membership (none when there is none)."""
    with open_client(options, name="edge-fleet-identity") as client:
        client.subscribed(Topics(options.prefix, name, None).membership)
        # A retained message follows the SUBACK at once; none within wait_s: there is none.
        try:
            message = client.messages.get(timeout=wait_s)
        except queue.Empty:
            return {}
    with contextlib.suppress(ValidationError):
        return dict(Membership.model_validate_json(message.payload).labels) if message.payload else {}
    return {}


def publish_retained(options: BrokerOptions, messages: list[tuple[str, bytes]]) -> None:
    """Publish retained ``(topic, payload)`` pairs on the operators' listener, each acknowledged."""
    with open_client(options, name="edge-fleet-identity") as client:
        broker.publish_retained(client, messages, timeout=DynSec.TIMEOUT_S)


def identities_command(args: argparse.Namespace) -> int:
    """``edge-fleet identities``: every client of the broker's authorization state."""
    with DynSec(admin_options(args, broker_port=True)) as api:
        clients = api.list_clients()
    rows = []
    for client in sorted(clients, key=lambda c: str(c.get("username", ""))):
        roles = [r.get("rolename", "") for r in client.get("roles", [])]
        groups = [g.get("groupname", "").removeprefix("group-") for g in client.get("groups", [])]
        kind = "operator" if ADMIN_ROLE in roles else "device"
        state = "revoked" if client.get("disabled") or not roles else "active"
        rows.append({"name": client.get("username"), "kind": kind, "group": ",".join(groups), "state": state})
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'NAME':<24} {'KIND':<9} {'GROUP':<16} STATE")
    for row in rows:
        print(f"{row['name']:<24} {row['kind']:<9} {row['group'] or '-':<16} {row['state']}")
    return 0


def register_device(
    args: argparse.Namespace, name: str, group: str | None, *, password: str | None = None
) -> None:
    """``provision NAME --live HOST[:PORT]``: make the new certificate (or login) work on the
    running broker."""
    for host, port in args.live:
        options = BrokerOptions(
            host=host,
            port=port or DEVICE_PORT,
            prefix=args.topic_prefix,
            ca=args.tls_ca,
            cert=args.tls_cert,
            key=args.tls_key,
            username=args.username,
            password=args.password,
        )
        with DynSec(options) as api:
            api.add_device(name, group, args.topic_prefix, password=password)
        where = f" and group {group}" if group else ""
        print(f"registered {name}{where} on the broker at {host}:{options.address[1]}")


def add_live_args(parser: argparse.ArgumentParser) -> None:
    """``provision``'s flags for registering a device on the running broker."""
    live = parser.add_argument_group("registering the device on the running broker")
    live.add_argument(
        "--live",
        type=parse_address,
        action="append",
        metavar="HOST[:PORT]",
        help=f"the broker's devices' listener (port default {DEVICE_PORT}): register the device there "
        "(repeat for each broker of a bridged pair)",
    )
    live.add_argument("--tls-ca", type=Path, help="with --live: the CA to verify the broker against")
    live.add_argument("--tls-cert", type=Path, help="with --live: an operator certificate")
    live.add_argument("--tls-key", type=Path, help="with --live: its key")
    live.add_argument("--topic-prefix", default="edge", help="first level of every topic (default: edge)")
    live.add_argument(
        "--login",
        action="store_true",
        help="with --live, on a broker set up with `broker init --device-logins`: the device logs in "
        "with a new random password (written into its agent.toml, mode 0600)",
    )
    live.add_argument("--username", help="with --live: the operator's login (`--device-logins` brokers)")
    live.add_argument(
        "--password",
        default=os.environ.get("EDGE_FLEET_PASSWORD"),
        help="with --username (default: $EDGE_FLEET_PASSWORD; broker init wrote it to operator-NAME.password)",
    )


def renew_command(args: argparse.Namespace) -> int:
    """``edge-fleet renew NAME --ca DIR --out DIR``."""
    name: str = args.name
    cert, key = args.out / f"{name}.crt", args.out / f"{name}.key"
    if not cert.exists():
        raise FleetError(f"{cert}: no certificate to renew (issue one with `edge-fleet provision {name}`)")
    before = certificate_expiry(cert)
    renew(name, args.ca, args.out, days=args.days)
    record_certificate_file(cert, None)  # `devices` shows the new serial (the group stays)
    after = certificate_expiry(cert)
    print(
        f"renewed {cert} and {key} (valid until {after:%Y-%m-%d}, was {before:%Y-%m-%d}): copy them over the "
        "box's files; the agent uses them from its next connection (restart it to use them now)"
    )
    return 0


def renew(name: str, ca_dir: Path, out: Path, *, days: int = pki.IDENTITY_DAYS) -> None:
    """Issue a new key and certificate for ``name`` and swap them in for ``out/NAME.*``.

    The key goes first, then the certificate, each by rename: a reader sees the old pair, the
    new pair, or (for an instant) the new key with the old certificate — which fails to load,
    and the agent then keeps the pair it had.
    """
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".renew-") as tmp:
        pki.provision(name, ca_dir, Path(tmp), kind="device", days=days)
        for suffix in (".key", ".crt"):
            os.replace(Path(tmp) / f"{name}{suffix}", out / f"{name}{suffix}")
