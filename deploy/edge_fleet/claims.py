"""What a claim allows: the checks of an enrollment or renewal request and the certificate it gets.

The decisions of ``edge-fleet enroll serve`` and ``approve`` (``enroll``), on the CA folder's
files only: the claim's policy (``claims/NAME.json``), the one name space, the certificates
issued from claims (``claims/issued/``, so a repeated request gets the same one).  No broker.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from edge_contract.names import RESERVED_NAMES
from edge_contract.protocol import EnrollAnswer, EnrollRequest

from . import pki
from .dynsec import device_role
from .errors import FleetError

CLAIM_PREFIX = "claim-"
CLAIMS_DIR = "claims"
#: Certificates issued from claims, by name (public): a repeated request gets the same one.
ISSUED_DIR = "issued"


def claim_record(ca_dir: Path, claim: str) -> dict[str, Any] | None:
    if not claim.startswith(CLAIM_PREFIX):
        return None
    path = ca_dir / CLAIMS_DIR / f"{claim.removeprefix(CLAIM_PREFIX)}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def renew(ca_dir: Path, device: str, payload: bytes, client: dict[str, Any] | None) -> EnrollAnswer:
    """A device asking, over its own identity, for a certificate for a new key of its own: granted
    when it is a device of this CA, registered, enabled and holding its role (not revoked)."""
    try:
        request = EnrollRequest.model_validate_json(payload)
    except ValidationError as exc:
        return EnrollAnswer(name=device, error=f"not a renewal request: {exc.errors()[0]['msg']}")
    roles = [r.get("rolename") for r in (client or {}).get("roles", [])]
    if client is None or client.get("disabled") or device_role(device) not in roles:
        return EnrollAnswer(name=device, error=f"{device} is revoked or not registered on this broker")
    if request.name != device:
        return EnrollAnswer(name=device, error="a device renews its own certificate only")
    key, problem = _csr_key(request)
    if key is None:
        return EnrollAnswer(name=device, error=problem)
    try:
        cert = pki.issue_for_key(device, ca_dir, key, renewal=True)
    except FleetError as exc:
        return EnrollAnswer(name=device, error=str(exc))
    _record(cert)
    return EnrollAnswer(name=device, cert=cert.decode(), ca=(ca_dir / pki.CA_CERT).read_text())


def _record(cert_pem: bytes) -> None:
    """The new serial and expiry in the operator's inventory (``devices``); a warning if it fails."""
    from .inventory import Inventory

    cert = x509.load_pem_x509_certificate(cert_pem)
    [cn] = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    try:
        Inventory.open().record_provisioned(
            str(cn.value), None, format(cert.serial_number, "x"), cert.not_valid_after_utc.timestamp()
        )
    except (OSError, sqlite3.Error) as exc:
        print(f"warning: not recorded in the inventory ({exc})")


def _csr_key(request: EnrollRequest) -> tuple[ec.EllipticCurvePublicKey | None, str]:
    """The CSR's public key when its signature is sound, its CN the request's name and its key ECDSA."""
    try:
        csr = x509.load_pem_x509_csr(request.csr.encode())
    except ValueError:
        return None, "the CSR is not a PEM certificate request"
    names = [a.value for a in csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    if not csr.is_signature_valid or names != [request.name]:
        return None, "the CSR's signature or common name is wrong"
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return None, "the key must be ECDSA (P-256)"
    return key, ""


def decide(ca_dir: Path, claim: str, payload: bytes) -> EnrollAnswer:
    """Check one request under ``claim`` and issue its certificate, or say why not (the claim's
    count is spent only by a certificate issued)."""
    checked = check(ca_dir, claim, payload)
    if isinstance(checked, EnrollAnswer):
        return checked
    return issue(ca_dir, claim, *checked)


def check(
    ca_dir: Path, claim: str, payload: bytes
) -> tuple[EnrollRequest, ec.EllipticCurvePublicKey, dict[str, Any]] | EnrollAnswer:
    """The request, its key and its claim's record when every check passes; else the refusal."""
    try:
        request = EnrollRequest.model_validate_json(payload)
    except ValidationError as exc:
        return EnrollAnswer(name="?", error=f"not an enrollment request: {exc.errors()[0]['msg']}")
    record = claim_record(ca_dir, claim)
    if record is None:
        return EnrollAnswer(name=request.name, error=f"{claim} is not a claim of this CA")
    again = _issued_before(ca_dir, claim, request)
    if again is not None:
        return again
    if record.get("left", 0) < 1:
        return EnrollAnswer(name=request.name, error=f"{claim} is used up: ask for a new claim")
    if time.time() > float(record.get("expires", 0)):
        return EnrollAnswer(name=request.name, error=f"{claim} expired: ask for a new claim")
    if request.name.startswith(CLAIM_PREFIX):
        return EnrollAnswer(name=request.name, error="a device name cannot start with claim-")
    if request.name in RESERVED_NAMES | pki.operator_names(ca_dir) | pki.device_names(ca_dir):
        return EnrollAnswer(
            name=request.name,
            error=f"{request.name!r} is taken (a device, an operator or a reserved name): enroll under another name",
        )
    key, problem = _csr_key(request)
    if key is None:
        return EnrollAnswer(name=request.name, error=problem)
    return request, key, record


def _issued_before(ca_dir: Path, claim: str, request: EnrollRequest) -> EnrollAnswer | None:
    """The certificate this claim already issued for this name and this very key: a box whose
    connection was taken before it read its answer asks again, and gets the same answer."""
    try:
        kept = json.loads((ca_dir / CLAIMS_DIR / ISSUED_DIR / f"{request.name}.json").read_text())
        cert = x509.load_pem_x509_certificate(str(kept["cert"]).encode())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    key, _problem = _csr_key(request)
    if kept.get("claim") != claim or key is None or cert.public_key() != key:
        return None
    return EnrollAnswer(name=request.name, cert=kept["cert"], ca=(ca_dir / pki.CA_CERT).read_text())


def issue(
    ca_dir: Path, claim: str, request: EnrollRequest, key: ec.EllipticCurvePublicKey, record: dict[str, Any]
) -> EnrollAnswer:
    """Sign ``request``'s key under ``claim`` and spend one of the claim's boxes."""
    try:
        cert = pki.issue_for_key(request.name, ca_dir, key)
    except FleetError as exc:
        return EnrollAnswer(name=request.name, error=str(exc))
    _record(cert)
    issued = ca_dir / CLAIMS_DIR / ISSUED_DIR
    issued.mkdir(exist_ok=True)
    (issued / f"{request.name}.json").write_text(json.dumps({"claim": claim, "cert": cert.decode()}))
    record["left"] = int(record["left"]) - 1
    (ca_dir / CLAIMS_DIR / f"{claim.removeprefix(CLAIM_PREFIX)}.json").write_text(json.dumps(record))
    ca = (ca_dir / pki.CA_CERT).read_text()
    return EnrollAnswer(name=request.name, cert=cert.decode(), ca=ca)
