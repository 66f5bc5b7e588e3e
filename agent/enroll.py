"""``edge-agent enroll``: the box makes its own key and gets its certificate from a claim.

The box holds a claim identity (``claim-NAME.crt``/``.key`` and ``ca.crt`` from
``edge-fleet claim create``) and the broker's address.  It generates an ECDSA
P-256 key in ``--out`` (0600, never sent anywhere), publishes a CSR for its name
on the claim's enrollment topic over the devices' listener, and waits for the
answer of ``edge-fleet enroll serve``: the certificate (written beside the key,
with the fleet CA) or the reason of a refusal.  Its group comes afterwards, as
the membership the approver pushes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from agent.link.mqtt import Message, MQTTLink
from agent.link.options import MQTTConfig, TLSConfig
from edge_contract.errors import LinkError
from edge_contract.protocol import EnrollAnswer, EnrollRequest, enroll_topics

log = logging.getLogger(__name__)


class EnrollError(LinkError):
    """Enrollment did not give this box a certificate (the message says why and what to do)."""


def make_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A new private key at ``path``, created 0600."""
    key = ec.generate_private_key(ec.SECP256R1())
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return key


def csr_for(name: str, key: ec.EllipticCurvePrivateKey) -> str:
    """A PEM certificate request for ``name`` (CN) signed by ``key``."""
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM).decode()


def enroll(
    name: str,
    claim_dir: Path,
    broker: tuple[str, int],
    out: Path,
    *,
    prefix: str = "edge",
    timeout_s: float = 120.0,
    approval_timeout_s: float = 24 * 3600.0,
    notify: Callable[[str], None] | None = None,
) -> Path:
    """Enroll as ``name``; returns the certificate written to ``out/NAME.crt`` (key ``out/NAME.key``)."""
    claims = sorted(claim_dir.glob("claim-*.crt"))
    if len(claims) != 1:
        raise EnrollError(
            f"{claim_dir}: expected one claim-NAME.crt (edge-fleet claim create), found {len(claims)}"
        )
    claim_cert = claims[0]
    claim = claim_cert.stem
    out.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = out / f"{name}.key", out / f"{name}.crt"
    if cert_path.exists():
        raise EnrollError(f"{cert_path} exists: this box is enrolled already")
    if key_path.exists():  # an earlier attempt: keep its key, ask again
        loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise EnrollError(f"{key_path} is not an EC key: move it away")
        key = loaded
    else:
        key = make_key(key_path)
    nonce = uuid.uuid4().hex
    payload = EnrollRequest(name=name, csr=csr_for(name, key)).model_dump_json().encode()
    answer = _ask(
        claim_dir,
        claim_cert,
        broker,
        enroll_topics(prefix, claim, nonce),
        payload,
        timeout_s,
        approval_timeout_s,
        notify or log.warning,
    )
    if answer.error or not answer.cert or not answer.ca:
        raise EnrollError(f"enrollment as {name} refused: {answer.error or 'an empty answer'}")
    cert = x509.load_pem_x509_certificate(answer.cert.encode())
    if cert.public_key() != key.public_key():
        raise EnrollError("the answer's certificate is not for this box's key: enrollment again")
    (out / "ca.crt").write_text(answer.ca)
    cert_path.write_text(answer.cert)
    return cert_path


def _ask(
    claim_dir: Path,
    claim_cert: Path,
    broker: tuple[str, int],
    topics: tuple[str, str],
    payload: bytes,
    timeout_s: float,
    approval_timeout_s: float,
    notify: Callable[[str], None],
) -> EnrollAnswer:
    """Publish the request and wait for the (retained) answer, through ``agent.link``.

    Boxes of one batch share the claim's client id, so they take the connection from each other:
    the link reconnects with jittered exponential backoff, the request is sent again on each
    connection until answered, and the answer is retained, so each box finds its
    own whenever it is connected.  A ``pending`` answer (a claim that needs an operator) extends the
    wait to ``approval_timeout_s``.
    """
    request_topic, answer_topic = topics
    tls = TLSConfig(ca=claim_dir / "ca.crt", cert=claim_cert, key=claim_cert.with_suffix(".key"))
    # Session expiry 0: a claim's session (shared by its boxes) keeps nothing once a box leaves.
    config = MQTTConfig(host=broker[0], port=broker[1], tls=tls, session_expiry_s=0)
    answered = threading.Event()

    def send() -> None:
        # Retained: it waits for an approver that is not running yet (who clears it once answered).
        # Sent on every connection until answered, not until acknowledged: the boxes of a batch
        # share one session, so a PUBACK may be for another box's message with the same packet
        # id.  A repeat is harmless: `enroll serve` answers a (claim, nonce) once, and the same
        # key asking again for its name gets the same certificate.
        if not answered.is_set():
            link.publish(request_topic, payload, retain=True)

    link = MQTTLink(config, "", subscriptions=[answer_topic], on_connect=send)
    try:
        link.start()
    except LinkError as exc:
        raise EnrollError(f"cannot reach the broker at {broker[0]}:{broker[1]}: {exc}") from exc
    deadline = time.monotonic() + timeout_s
    told_pending = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                if told_pending:
                    raise EnrollError(
                        f"still waiting for an operator to approve {_name(payload)} after "
                        f"{approval_timeout_s:.0f} s: ask for `edge-fleet approve {_name(payload)}`, then run "
                        "`edge-agent enroll` again (the key made here is kept)"
                    )
                raise EnrollError(
                    f"no answer within {timeout_s:.0f} s: is `edge-fleet enroll serve` running, and the claim "
                    "registered on this broker?"
                )
            try:
                event = link.events.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if not isinstance(event, Message) or event.topic != answer_topic:
                continue  # another box's answer, left in the shared session
            link.ack(event)
            try:
                answer = EnrollAnswer.model_validate_json(event.payload)
            except ValidationError:
                continue
            if not answer.pending:
                answered.set()
                return answer
            if not told_pending:
                told_pending = True
                deadline = time.monotonic() + approval_timeout_s
                notify(
                    f"waiting for an operator to approve {answer.name} (key {_fingerprint(payload)}): "
                    f"`edge-fleet approve {answer.name}` on the operator's machine"
                )
    finally:
        link.stop()


def _name(payload: bytes) -> str:
    return EnrollRequest.model_validate_json(payload).name


def _fingerprint(payload: bytes) -> str:
    """The fingerprint ``edge-fleet enroll pending`` shows for this box's key."""
    csr = x509.load_pem_x509_csr(EnrollRequest.model_validate_json(payload).csr.encode())
    der = csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "SHA256:" + hashlib.sha256(der).hexdigest()[:32]
