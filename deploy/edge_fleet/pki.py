"""The fleet's certificates: ``ca init`` and ``provision``.

One private CA (``ca.crt``) signs the devices and the broker; a second one
(``operator-ca.crt``, made beside it) signs the operators, so the broker's
operators' listener can refuse every device certificate during the handshake.
A certificate's CN is its identity: the broker (``use_identity_as_username``)
takes it as the MQTT user name — and, on the devices' listener, as the client
id — and the dynamic-security plugin's roles for that name say what it may do
(see ``setup`` and ``dynsec``).  ``--operator`` makes an operator identity;
``--broker HOSTNAME`` makes the broker's server certificate, valid for each
HOSTNAME given (``edge-fleet broker init`` makes it for you).

Keys are ECDSA P-256: small, fast on a Pi, accepted by OpenSSL (mosquitto) and
Python's ``ssl``.  Private keys are written mode 0600 from the start.
"""

from __future__ import annotations

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

from edge_contract.names import RESERVED_NAMES

from .broker import FleetError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
#: The operators' CA: the broker's operator listener trusts it alone, so a device certificate
#: cannot reach it (nor any session through it).
OPERATOR_CA_CERT, OPERATOR_CA_KEY = "operator-ca.crt", "operator-ca.key"
#: Names of the operator identities issued by this CA (a device may not take one).
OPERATORS_FILE = "operators.txt"
#: The devices issued by the CA: one name space with the operators, checked in both orders.
DEVICES_FILE = "devices.txt"
#: The default operator identity (`edge-fleet broker init` registers it as an administrator).
OPERATOR = "operator"
# Same rule as the agent's device_id: the name becomes a topic level and an ACL user.
# Matched with fullmatch: ``re.match(...$)`` takes "box\n", whose ACL line stops mosquitto starting.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Ten years for the CA (replacing it means re-provisioning the fleet), about one for identities
# (a stolen box's certificate stops working by itself; the doctor warns 30 days ahead).
CA_DAYS, IDENTITY_DAYS = 3650, 397
# Certificates are valid from a little before now: a box whose clock lags does not refuse them.
_BACKDATE = datetime.timedelta(minutes=5)


# -- the library ----------------------------------------------------------------------------------


def create_ca(
    out: Path,
    *,
    name: str = "edge fleet CA",
    days: int = CA_DAYS,
    force: bool = False,
    files: tuple[str, str] = (CA_CERT, CA_KEY),
) -> tuple[Path, Path]:
    """Create ``out/ca.crt`` and ``out/ca.key`` (0600), or the ``files`` named; returns their paths."""
    cert_path, key_path = out / files[0], out / files[1]
    refuse_overwrite([cert_path, key_path], force)
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
    check_name(name)
    if kind in ("device", "operator") and name.startswith("claim-"):
        raise FleetError(
            f"{name!r}: names starting with claim- are enrollment claims (edge-fleet claim create)"
        )
    if kind == "device" and name in RESERVED_NAMES:
        raise FleetError(f"{name!r} cannot be a device: it is reserved ({', '.join(sorted(RESERVED_NAMES))})")
    if kind == "device" and name in operator_names(ca_dir):
        raise FleetError(
            f"{name!r} is an operator of this CA ({ca_dir / OPERATORS_FILE}); choose another name"
        )
    if kind == "operator" and name in device_names(ca_dir):
        raise FleetError(
            f"{name!r} is a device of this CA ({ca_dir / DEVICES_FILE}); operators and devices share one "
            "name space (an operator certificate named like a device would take its session) — choose "
            "another name"
        )
    if kind == "broker" and not hosts:
        raise FleetError("a broker certificate needs at least one --broker HOSTNAME")
    if days < 1:
        raise FleetError("--days must be at least 1")
    # Operators' certificates come from the operator CA (the only one the operators' listener
    # trusts); every other identity, and the copy of the CA that verifies the broker, from the fleet CA.
    fleet_ca, _ = _load_ca(ca_dir)
    if kind == "operator":
        ensure_operator_ca(ca_dir)
        ca_cert, ca_key = _load_ca(ca_dir, OPERATOR_CA_CERT, OPERATOR_CA_KEY)
        _add_name(ca_dir / OPERATORS_FILE, name)
    else:
        ca_cert, ca_key = _load_ca(ca_dir)
    if kind == "device":
        _add_name(ca_dir / DEVICES_FILE, name)
    cert_path, key_path, ca_copy = out / f"{name}.crt", out / f"{name}.key", out / CA_CERT
    refuse_overwrite([cert_path, key_path], force)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(
        name, kind, key.public_key(), ca_cert, ca_key, days=days, hosts=hosts, not_before=not_before
    )
    out.mkdir(parents=True, exist_ok=True)
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca_copy.write_bytes(fleet_ca.public_bytes(serialization.Encoding.PEM))
    return [cert_path, key_path, ca_copy]


def _certificate(
    name: str,
    kind: str,
    public_key: ec.EllipticCurvePublicKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    days: int,
    hosts: list[str] | None,
    not_before: datetime.datetime | None,
) -> x509.Certificate:
    """A certificate for ``public_key`` named ``name`` (CN, and OU ``kind``), signed by the CA."""
    start = (not_before or datetime.datetime.now(datetime.UTC)) - _BACKDATE
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
    # The OU says what the identity is for; mosquitto uses the CN only.
    attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if kind == "broker":
        builder = builder.add_extension(x509.SubjectAlternativeName(_alt_names(hosts or [])), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert


def issue_for_key(
    name: str,
    ca_dir: Path,
    public_key: ec.EllipticCurvePublicKey,
    *,
    days: int = IDENTITY_DAYS,
    renewal: bool = False,
) -> bytes:
    """A device certificate (PEM) for a key made elsewhere (a CSR's: enrollment), recorded as a device.

    ``renewal``: for a device of this CA that asked for itself (the name must be a device's).
    """
    check_name(name)
    if renewal and name not in device_names(ca_dir):
        raise FleetError(f"{name!r} is not a device of this CA: nothing to renew")
    taken = name in RESERVED_NAMES or name in operator_names(ca_dir) or name in device_names(ca_dir)
    if not renewal and taken:
        raise FleetError(f"{name!r} is taken (a device, an operator or a reserved name of this CA)")
    ca_cert, ca_key = _load_ca(ca_dir)
    _add_name(ca_dir / DEVICES_FILE, name)
    cert = _certificate(name, "device", public_key, ca_cert, ca_key, days=days, hosts=None, not_before=None)
    return cert.public_bytes(serialization.Encoding.PEM)


def check_name(name: str, what: str = "a name") -> None:
    """Refuse a name that cannot be a topic level and an MQTT user name."""
    if not _NAME.fullmatch(name):
        raise FleetError(f"{name!r}: {what} is 1-64 of A-Z a-z 0-9 _ . - starting with a letter or digit")


def device_names(ca_dir: Path) -> set[str]:
    """The device identities issued by the CA in ``ca_dir`` (recorded since issue 24)."""
    path = ca_dir / DEVICES_FILE
    return set(path.read_text().split()) if path.exists() else set()


def _add_name(path: Path, name: str) -> None:
    names = set(path.read_text().split()) if path.exists() else set()
    if name not in names:
        path.write_text("".join(f"{n}\n" for n in sorted({*names, name})))


def operator_names(ca_dir: Path) -> set[str]:
    """The operator identities issued by the CA in ``ca_dir``."""
    path = ca_dir / OPERATORS_FILE
    return set(path.read_text().split()) if path.exists() else set()


def ensure_operator_ca(ca_dir: Path, force: bool = False) -> Path:
    """The operator CA of ``ca_dir`` (created beside a fleet CA made before it existed)."""
    cert = ca_dir / OPERATOR_CA_CERT
    if force or not cert.exists():
        _load_ca(ca_dir)  # a fleet CA must be there
        create_ca(
            ca_dir, name="edge fleet operators CA", force=force, files=(OPERATOR_CA_CERT, OPERATOR_CA_KEY)
        )
    return cert


def read_public_key(path: Path) -> str:
    """The ``ssh-ed25519`` line of a ``fleet.pub``, checked."""
    from edge_contract.errors import AgentError
    from edge_contract.signing import PublicKey

    try:
        line = path.read_text().strip()
        PublicKey.from_line(line)
    except OSError as exc:
        raise FleetError(f"--trusted-key {path}: {exc.strerror or exc}") from exc
    except AgentError as exc:
        raise FleetError(f"--trusted-key {path}: {exc} (give the fleet.pub of `edge-fleet keygen`)") from exc
    return line


def agent_toml(
    name: str,
    *,
    group: str | None,
    endpoints: list[str],
    install_dir: str,
    model: str,
    state_dir: str = "/var/lib/edge-agent",
    trusted_keys: list[str] | None = None,
    login: str | None = None,
) -> str:
    """A ready configuration for device ``name`` using the files ``provision`` wrote
    (``login``: its password on a broker whose devices log in, instead of its certificate)."""
    # JSON strings are TOML basic strings: quotes and backslashes in a path stay escaped.
    lines = [
        "# Written by `edge-fleet provision`. Every key: agent/config.py (and README.md).",
        f"device_id = {json.dumps(name)}",
    ]
    if group:
        lines.append(f"group = {json.dumps(group)}")
    lines += [
        f"state_dir = {json.dumps(state_dir)}",
        "",
        "[model]",
        f"path = {json.dumps(model)}",
        "",
        "[mqtt]",
        "# Tried in order; when one fails the agent moves to the next.",
        f"brokers = {json.dumps(endpoints)}",
    ]
    if login:
        lines += [f"username = {json.dumps(name)}", f"password = {json.dumps(login)}"]
    lines += ["", "[mqtt.tls]", f"ca = {json.dumps(f'{install_dir}/{CA_CERT}')}"]
    if not login:
        lines += [
            f"cert = {json.dumps(f'{install_dir}/{name}.crt')}",
            f"key = {json.dumps(f'{install_dir}/{name}.key')}",
        ]
    lines += [
        "",
        "[update]",
        "# Releases signed by these keys (edge-fleet keygen's fleet.pub) are installed.",
        f"trusted_keys = {json.dumps(trusted_keys or [])}",
    ]
    return "\n".join(lines) + "\n"


# -- helpers ------------------------------------------------------------------------------------------


def _alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _load_ca(
    ca_dir: Path, cert_name: str = CA_CERT, key_name: str = CA_KEY
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / cert_name).read_bytes())
        key = serialization.load_pem_private_key((ca_dir / key_name).read_bytes(), password=None)
    except OSError as exc:
        raise FleetError(
            f"{ca_dir}: no usable CA ({exc.strerror or exc}); create one with `edge-fleet ca init`"
        ) from exc
    except (ValueError, TypeError) as exc:
        raise FleetError(
            f"{ca_dir}: {cert_name} or {key_name} is not a PEM certificate / unencrypted key"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FleetError(f"{ca_dir / key_name}: not an EC key made by `edge-fleet ca init`")
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


def refuse_overwrite(paths: list[Path], force: bool) -> None:
    existing = [str(path) for path in paths if path.exists()]
    if existing and not force:
        raise FleetError(f"{', '.join(existing)} exist; pass --force to replace them")
