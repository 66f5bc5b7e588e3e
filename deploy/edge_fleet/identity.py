"""Live fleet identity: ``move``, ``revoke`` and ``renew`` (and ``provision --live``).

``move`` and ``revoke`` change the running broker's authorization state through
the dynamic-security API (``dynsec.DynSec``): they take effect within a second,
with no restart, no SIGHUP, no file edited by hand.  They go to the devices'
listener (``--admin-port``, default 8883: where the plugin runs) on the host of
``--broker``, as the operator certificate given by ``--tls-cert``/``--tls-key``.

``renew`` is offline: a new key and certificate for the same name, written
atomically over the old pair; the agent loads them on its next (re)connection.
The broker needs no change (the name, and so every right, stays the same), and a
revoked device stays revoked: renewing gives it a certificate, not its rights.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path

from agent.link.tls import certificate_expiry

from . import pki
from .broker import BrokerOptions, FleetError, add_broker_args, options_from, parse_address
from .dynsec import ADMIN_ROLE, DynSec
from .setup import DEVICE_PORT


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
        default=DEVICE_PORT,
        help=f"the devices' listener, where identities are managed (default {DEVICE_PORT}; "
        "the port of --broker is not used)",
    )


def admin_options(args: argparse.Namespace) -> BrokerOptions:
    """The broker flags, aimed at the devices' listener."""
    return replace(options_from(args), port=args.admin_port)


def move_command(args: argparse.Namespace) -> int:
    """``edge-fleet move NAME --group G``."""
    group = None if args.no_group else args.group
    if group is not None:
        pki.check_name(group, "a group")
    with DynSec(admin_options(args)) as api:
        left = api.set_group(args.name, group, args.topic_prefix)
    was = f" (left {', '.join(left)}; disconnected so that it subscribes again)" if left else ""
    now = f"group {group}" if group else "no group"
    edit = f'group = "{group}"' if group else "no group line"
    print(f"{args.name}: {now}{was}; its agent.toml needs {edit} too (then restart the agent)")
    return 0


def revoke_command(args: argparse.Namespace) -> int:
    """``edge-fleet revoke NAME``."""
    with DynSec(admin_options(args)) as api:
        api.revoke(args.name)
    print(
        f"revoked {args.name}: disconnected, and every subscription and publication of its certificate "
        "is refused from now on"
    )
    return 0


def identities_command(args: argparse.Namespace) -> int:
    """``edge-fleet identities``: every client of the broker's authorization state."""
    with DynSec(admin_options(args)) as api:
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
