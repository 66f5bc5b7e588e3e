"""``edge-fleet ca init`` and ``edge-fleet provision``: the commands over the fleet's CA (``pki``).

The certificates themselves are made by ``pki``; a ``--live`` provision registers the
device on the broker with ``identity``, and the inventory records it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_contract.names import TLS_PORT, parse_endpoint

from . import flags, inventory
from .broker import FleetError
from .identity import add_live_args, register_device
from .pki import (
    CA_DAYS,
    IDENTITY_DAYS,
    OPERATOR,
    agent_toml,
    check_name,
    create_ca,
    ensure_operator_ca,
    provision,
    read_public_key,
    refuse_overwrite,
)
from .setup import new_password


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``ca init`` and ``provision``."""
    ca = sub.add_parser("ca", help="the fleet's certificate authority")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)
    init = ca_sub.add_parser(
        "init", help="create the fleet CA (DIR/ca.crt, DIR/ca.key) and the operator CA (DIR/operator-ca.*)"
    )
    init.add_argument("--out", type=Path, required=True, metavar="DIR")
    init.add_argument("--name", default="edge fleet CA", help="the CA's common name")
    init.add_argument("--days", type=int, default=CA_DAYS, help=f"validity (default {CA_DAYS})")
    init.add_argument("--force", action="store_true", help="replace an existing CA (every identity with it)")
    init.set_defaults(func=ca_init_command)

    prov = sub.add_parser(
        "provision", help="issue a device, operator (--operator) or broker (--broker) certificate"
    )
    prov.add_argument("name", metavar="NAME", help="device id, operator name or broker name: the CN")
    prov.add_argument("--ca", type=Path, required=True, metavar="DIR", help="the CA folder of `ca init`")
    prov.add_argument("--out", type=Path, required=True, metavar="OUT")
    kind = prov.add_mutually_exclusive_group()
    kind.add_argument("--operator", action="store_true", help="an operator identity (edge-fleet)")
    kind.add_argument(
        "--broker",
        action="append",
        metavar="HOSTNAME",
        help="the broker's server certificate for HOSTNAME (a name or an IP; repeat for several)",
    )
    prov.add_argument("--days", type=int, default=IDENTITY_DAYS, help=f"validity (default {IDENTITY_DAYS})")
    device = prov.add_argument_group("device options (written into OUT/agent.toml)")
    device.add_argument("--group", help="the device's group (registered on the broker with --live)")
    device.add_argument(
        "--endpoint",
        action="append",
        metavar="HOST:PORT",
        help="a broker the device connects to, in failover order (repeatable; default broker.lan:8883)",
    )
    device.add_argument(
        "--install-dir",
        default="/etc/edge-agent",
        metavar="DIR",
        help="where the files will be on the device (default /etc/edge-agent)",
    )
    device.add_argument("--model", default="/opt/edge-agent/models/demo", help="[model] path on the device")
    device.add_argument(
        "--state-dir", default="/var/lib/edge-agent", metavar="DIR", help="state_dir on the device"
    )
    device.add_argument(
        "--trusted-key",
        type=Path,
        action="append",
        metavar="FLEET_PUB",
        help="fleet.pub of `edge-fleet keygen`: releases signed by it are installed (repeatable)",
    )
    add_live_args(prov)
    prov.add_argument("--force", action="store_true", help="overwrite existing files in OUT")
    prov.set_defaults(func=provision_command)


# -- the commands ---------------------------------------------------------------------------


def ca_init_command(args: argparse.Namespace) -> int:
    """``edge-fleet ca init --out DIR``."""
    cert_path, key_path = create_ca(args.out, name=args.name, days=args.days, force=args.force)
    operator_cert = ensure_operator_ca(args.out, force=args.force)
    print(f"wrote {cert_path} (give it to every device and broker) and {key_path} (keep it offline)")
    print(f"wrote {operator_cert} and its key: the CA of operator identities (`provision --operator`)")
    return 0


def provision_command(args: argparse.Namespace) -> int:
    """``edge-fleet provision NAME --ca DIR --out OUT [--operator | --broker HOSTNAME]``."""
    name: str = args.name
    device_only = [
        flag for flag in ("group", "endpoint", "live", "trusted_key", "login") if getattr(args, flag)
    ]
    if (args.broker or args.operator) and device_only:
        raise FleetError(f"--{', --'.join(device_only)}: only for a device")
    if args.group:
        check_name(args.group, "a group")
    flags.topic_level(args.topic_prefix, "--topic-prefix")
    for flag in ("install_dir", "model", "state_dir"):
        flags.file_text(getattr(args, flag), f"--{flag.replace('_', '-')}")
    for endpoint in args.endpoint or []:
        try:
            parse_endpoint(endpoint, TLS_PORT)
        except ValueError as exc:
            raise FleetError(f"--endpoint {exc}") from None
    if args.broker:
        written = provision(
            name, args.ca, args.out, kind="broker", hosts=args.broker, days=args.days, force=args.force
        )
    elif args.operator:
        written = provision(name, args.ca, args.out, kind="operator", days=args.days, force=args.force)
        if name != OPERATOR:
            print(
                f"note: to manage identities, {name} must be registered on the broker: "
                f"`edge-fleet broker init --operator {name}` (or its dynamic-security state)"
            )
    else:
        toml = args.out / "agent.toml"
        refuse_overwrite([toml], args.force)
        keys = [read_public_key(path) for path in args.trusted_key or []]
        if args.login and not args.live:
            raise FleetError("--login needs --live: the password is registered on the running broker")
        login = new_password() if args.login else None
        written = provision(name, args.ca, args.out, kind="device", days=args.days, force=args.force)
        # With a login the file holds a secret: readable by its owner only, from the start.
        toml.touch(mode=0o600 if login else 0o644)
        toml.chmod(0o600 if login else 0o644)
        toml.write_text(
            agent_toml(
                name,
                group=args.group,
                endpoints=args.endpoint or ["broker.lan:8883"],
                install_dir=args.install_dir,
                model=args.model,
                state_dir=args.state_dir,
                trusted_keys=keys,
                login=login,
            )
        )
        written.append(toml)
        inventory.record_certificate_file(
            written[0], args.group
        )  # the inventory (edge-fleet devices) knows it from now
        if not keys:
            print(
                "note: no --trusted-key: this box refuses every model release until [update] trusted_keys is set"
            )
        if args.live:
            register_device(args, name, args.group, password=login)
        else:
            print(
                f"note: the broker does not know {name} yet: run `edge-fleet provision {name} ... --live` "
                "with the broker flags, or `edge-fleet move` (its certificate gets no topic until then)"
            )
    for path in written:
        print(f"wrote {path}")
    if args.operator:
        out = args.out
        print(
            f"edge-fleet flags: --tls-ca {out / 'ca.crt'} --tls-cert {out / f'{name}.crt'} --tls-key {out / f'{name}.key'}"
        )
    return 0
