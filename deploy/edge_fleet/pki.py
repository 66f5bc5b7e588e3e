"""The fleet's certificates: ``ca init`` and ``provision``.

One private CA signs every identity of the fleet.  A device's certificate has
its device id as CN: the broker (``use_identity_as_username``) takes the CN as
the MQTT user name, and the ACL's ``%u`` patterns confine the device to its own
topics.  ``--operator`` makes an operator identity (the shipped ACL gives
operator rights to the user ``operator``); ``--broker HOSTNAME`` makes the
broker's server certificate, valid for each HOSTNAME given.

Keys are ECDSA P-256: small, fast on a Pi, accepted by OpenSSL (mosquitto) and
Python's ``ssl``.  Private keys are written mode 0600 from the start.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.config import RESERVED_NAMES, TLS_PORT, parse_endpoint

from .broker import FleetError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
#: The name the shipped ACL (deploy/mosquitto/edge.acl) gives operator rights to.
OPERATOR = "operator"
# Same rule as the agent's device_id: the name becomes a topic level and an ACL user.
# Matched with fullmatch: ``re.match(...$)`` takes "box\n", whose ACL line stops mosquitto starting.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Ten years for the CA (replacing it means re-provisioning the fleet), about one for identities
# (a stolen box's certificate stops working by itself; the doctor warns 30 days ahead).
CA_DAYS, IDENTITY_DAYS = 3650, 397
# Certificates are valid from a little before now: a box whose clock lags does not refuse them.
_BACKDATE = datetime.timedelta(minutes=5)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``ca init`` and ``provision``."""
    ca = sub.add_parser("ca", help="the fleet's certificate authority")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)
    init = ca_sub.add_parser("init", help="create the fleet CA: DIR/ca.crt and DIR/ca.key")
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
    device.add_argument("--group", help="the device's group (its group-jobs lines go into --acl)")
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
        "--acl", type=Path, metavar="FILE", help="add (or replace) the device's group lines in this ACL file"
    )
    prov.add_argument("--force", action="store_true", help="overwrite existing files in OUT")
    prov.set_defaults(func=provision_command)


# -- the commands ---------------------------------------------------------------------------


def ca_init_command(args: argparse.Namespace) -> int:
    """``edge-fleet ca init --out DIR``."""
    cert_path, key_path = create_ca(args.out, name=args.name, days=args.days, force=args.force)
    print(f"wrote {cert_path} (give it to every device and broker) and {key_path} (keep it offline)")
    return 0


def provision_command(args: argparse.Namespace) -> int:
    """``edge-fleet provision NAME --ca DIR --out OUT [--operator | --broker HOSTNAME]``."""
    name: str = args.name
    device_only = [flag for flag in ("group", "endpoint", "acl") if getattr(args, flag)]
    if (args.broker or args.operator) and device_only:
        raise FleetError(f"--{', --'.join(device_only)}: only for a device")
    if args.group and not _NAME.fullmatch(args.group):
        raise FleetError(
            f"{args.group!r}: a group is 1-64 of A-Z a-z 0-9 _ . - starting with a letter or digit"
        )
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
                f"note: the shipped ACL grants operator rights to '{OPERATOR}' only; add 'user {name}' lines"
            )
    else:
        toml = args.out / "agent.toml"
        _refuse_overwrite([toml], args.force)
        written = provision(name, args.ca, args.out, kind="device", days=args.days, force=args.force)
        toml.write_text(
            agent_toml(
                name,
                group=args.group,
                endpoints=args.endpoint or ["broker.lan:8883"],
                install_dir=args.install_dir,
                model=args.model,
            )
        )
        written.append(toml)
        if args.group:
            if args.acl is not None:
                set_group_lines(args.acl, name, args.group)
                print(f"{args.acl}: {name} may take group {args.group}'s jobs (reload mosquitto: SIGHUP)")
            else:
                print(
                    f"note: until these lines are in the broker's ACL, {name} gets no group jobs:\n"
                    + acl_lines(name, args.group)
                )
    for path in written:
        print(f"wrote {path}")
    if args.operator:
        out = args.out
        print(
            f"edge-fleet flags: --tls-ca {out / 'ca.crt'} --tls-cert {out / f'{name}.crt'} --tls-key {out / f'{name}.key'}"
        )
    return 0


# -- the library ----------------------------------------------------------------------------------


def create_ca(
    out: Path, *, name: str = "edge fleet CA", days: int = CA_DAYS, force: bool = False
) -> tuple[Path, Path]:
    """Create ``out/ca.crt`` and ``out/ca.key`` (0600); returns their paths."""
    cert_path, key_path = out / CA_CERT, out / CA_KEY
    _refuse_overwrite([cert_path, key_path], force)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def provision(
    name: str,
    ca_dir: Path,
    out: Path,
    *,
    kind: str = "device",
    hosts: list[str] | None = None,
    days: int = IDENTITY_DAYS,
    not_before: datetime.datetime | None = None,
    force: bool = False,
) -> list[Path]:
    """Issue ``out/NAME.crt`` and ``out/NAME.key`` (0600), signed by the CA in ``ca_dir``, and copy
    ``out/ca.crt``.  ``kind`` is ``device``, ``operator`` or ``broker`` (server certificate for
    ``hosts``).  ``not_before`` (default: now) lets tests make certificates that already expired.
    """
    if not _NAME.fullmatch(name):
        raise FleetError(f"{name!r}: a name is 1-64 of A-Z a-z 0-9 _ . - starting with a letter or digit")
    if kind == "device" and name in RESERVED_NAMES:
        raise FleetError(f"{name!r} cannot be a device: it is reserved ({', '.join(sorted(RESERVED_NAMES))})")
    if kind == "broker" and not hosts:
        raise FleetError("a broker certificate needs at least one --broker HOSTNAME")
    if days < 1:
        raise FleetError("--days must be at least 1")
    ca_cert, ca_key = _load_ca(ca_dir)
    cert_path, key_path, ca_copy = out / f"{name}.crt", out / f"{name}.key", out / CA_CERT
    _refuse_overwrite([cert_path, key_path], force)
    key = ec.generate_private_key(ec.SECP256R1())
    start = (not_before or datetime.datetime.now(datetime.UTC)) - _BACKDATE
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
    # The OU says what the identity is for; mosquitto uses the CN only.
    attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + _BACKDATE + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if kind == "broker" else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if kind == "broker":
        builder = builder.add_extension(x509.SubjectAlternativeName(_alt_names(hosts or [])), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    out.mkdir(parents=True, exist_ok=True)
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca_copy.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return [cert_path, key_path, ca_copy]


def agent_toml(name: str, *, group: str | None, endpoints: list[str], install_dir: str, model: str) -> str:
    """A ready configuration for device ``name`` using the files ``provision`` wrote."""
    # JSON strings are TOML basic strings: quotes and backslashes in a path stay escaped.
    lines = [
        "# Written by `edge-fleet provision`. Every key: agent/config.py (and README.md).",
        f"device_id = {json.dumps(name)}",
    ]
    if group:
        lines.append(f"group = {json.dumps(group)}")
    lines += [
        'state_dir = "/var/lib/edge-agent"',
        "",
        "[model]",
        f"path = {json.dumps(model)}",
        "",
        "[mqtt]",
        "# Tried in order; when one fails the agent moves to the next.",
        f"brokers = {json.dumps(endpoints)}",
        "",
        "[mqtt.tls]",
        f"ca = {json.dumps(f'{install_dir}/{CA_CERT}')}",
        f"cert = {json.dumps(f'{install_dir}/{name}.crt')}",
        f"key = {json.dumps(f'{install_dir}/{name}.key')}",
    ]
    return "\n".join(lines) + "\n"


def acl_lines(name: str, group: str, prefix: str = "edge") -> str:
    """The ACL block that lets device ``name`` take its group's jobs and desired model."""
    return (
        f"user {name}\n"
        f"topic read {prefix}/groups/{group}/jobs\n"
        f"topic read {prefix}/groups/{group}/model/desired\n"
    )


def set_group_lines(acl: Path, name: str, group: str) -> None:
    """Add device ``name``'s block to the ACL file ``acl``, replacing any earlier block of it.

    The block sits between marker comments, so provisioning again (a new group) replaces it.
    """
    begin, end = f"# >>> device {name}", f"# <<< device {name}"
    text = acl.read_text() if acl.exists() else ""
    kept: list[str] = []
    inside = False
    for line in text.splitlines():
        if line == begin:
            inside = True
        elif line == end:
            inside = False
        elif not inside:
            kept.append(line)
    block = f"{begin}\n{acl_lines(name, group)}{end}"
    acl.write_text("\n".join([*kept, block]) + "\n")


# -- helpers ------------------------------------------------------------------------------------------


def _alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    except OSError as exc:
        raise FleetError(
            f"{ca_dir}: no usable CA ({exc.strerror or exc}); create one with `edge-fleet ca init`"
        ) from exc
    except (ValueError, TypeError) as exc:
        raise FleetError(
            f"{ca_dir}: {CA_CERT} or {CA_KEY} is not a PEM certificate / unencrypted key"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FleetError(f"{ca_dir / CA_KEY}: not an EC key made by `edge-fleet ca init`")
    return cert, key


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write ``key`` as PEM, created 0600 from the start: never readable by others, even briefly."""
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # an existing file (--force) keeps its old mode through os.open


def _refuse_overwrite(paths: list[Path], force: bool) -> None:
    existing = [str(path) for path in paths if path.exists()]
    if existing and not force:
        raise FleetError(f"{', '.join(existing)} exist; pass --force to replace them")
