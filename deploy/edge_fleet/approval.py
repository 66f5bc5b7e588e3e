"""Enrollments waiting for an operator: claims made with ``--approve manual`` (``docs/identity.md``).

A request under such a claim that passes every check of ``enroll.decide`` is not
signed: ``edge-fleet enroll serve`` files it here (``fleet-ca/claims/pending/NAME.json``:
the claim, the request's nonce, the request itself and the key's fingerprint) and
answers the box ``pending``.  ``edge-fleet approve NAME`` signs it exactly as an
automatic claim would (the checks run again: the claim may have expired meanwhile);
``edge-fleet reject NAME`` answers the box with a refusal that names the identity
and the fix.  Either replaces the retained ``pending`` answer the box is waiting on.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, ValidationError

from edge_contract.protocol import EnrollAnswer, EnrollRequest

from .errors import FleetError

PENDING_DIR = "pending"


class Pending(BaseModel):
    """One enrollment waiting for ``approve`` or ``reject``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    claim: str
    nonce: str
    request: str  # the EnrollRequest as the box sent it
    fingerprint: str  # of the box's public key: the operator may compare it with what the box printed
    since: float


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """``SHA256:`` and the first 32 hex digits of the key's DER encoding (the box prints the same)."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "SHA256:" + hashlib.sha256(der).hexdigest()[:32]


def _folder(ca_dir: Path) -> Path:
    return ca_dir / "claims" / PENDING_DIR


def _path(ca_dir: Path, name: str) -> Path:
    # ``name`` was checked by EnrollRequest's pattern (a topic level, no '/').
    return _folder(ca_dir) / f"{name}.json"


def file_request(
    ca_dir: Path, claim: str, nonce: str, request: EnrollRequest, key: ec.EllipticCurvePublicKey
) -> str:
    """File ``request`` as pending; returns the answer's error text, empty when filed.  The same box
    asking again (same key, new nonce) replaces its entry; another key for a waiting name is refused."""
    print_ = fingerprint(key)
    existing = load(ca_dir, request.name)
    if existing is not None and existing.fingerprint != print_:
        return (
            f"{request.name} is already waiting for approval with another key: choose another name, or an "
            f"operator runs `edge-fleet reject {request.name}` first"
        )
    entry = Pending(
        name=request.name,
        claim=claim,
        nonce=nonce,
        request=request.model_dump_json(),
        fingerprint=print_,
        since=existing.since if existing is not None else time.time(),
    )
    _folder(ca_dir).mkdir(parents=True, exist_ok=True)
    path = _path(ca_dir, request.name)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(entry.model_dump_json())
    tmp.replace(path)
    return ""


def load(ca_dir: Path, name: str) -> Pending | None:
    """The pending entry of ``name``, or None."""
    try:
        return Pending.model_validate_json(_path(ca_dir, name).read_bytes())
    except (OSError, ValidationError):
        return None


def take(ca_dir: Path, name: str) -> Pending:
    """The pending entry of ``name``, removed from the queue (``approve``/``reject``)."""
    entry = load(ca_dir, name)
    if entry is None:
        waiting = ", ".join(p.name for p in listing(ca_dir)) or "none"
        raise FleetError(
            f"no enrollment of {name!r} is waiting for approval (waiting: {waiting}; `edge-fleet enroll pending`)"
        )
    _path(ca_dir, name).unlink()
    return entry


def listing(ca_dir: Path) -> list[Pending]:
    """Every pending enrollment, oldest first."""
    entries = []
    for path in sorted(_folder(ca_dir).glob("*.json")) if _folder(ca_dir).is_dir() else []:
        try:
            entries.append(Pending.model_validate_json(path.read_bytes()))
        except ValidationError:
            continue
    return sorted(entries, key=lambda p: p.since)


def rejected(name: str, claim: str, reason: str | None) -> EnrollAnswer:
    """What a box told ``reject`` reads: its identity, who refused, and what to do."""
    why = f" ({reason})" if reason else ""
    return EnrollAnswer(
        name=name,
        error=(
            f"an operator rejected the enrollment of {name} under {claim}{why}: ask the fleet's operator to "
            "approve it (`edge-fleet approve NAME`), or enroll under another name or claim"
        ),
    )


def rows(ca_dir: Path) -> list[dict[str, Any]]:
    """The queue as plain rows (the CLI's table and ``--json``)."""
    return [
        {"name": p.name, "claim": p.claim, "fingerprint": p.fingerprint, "since": p.since}
        for p in listing(ca_dir)
    ]


def dumps(ca_dir: Path) -> str:
    """The queue as JSON, on one line."""
    return json.dumps(rows(ca_dir))
