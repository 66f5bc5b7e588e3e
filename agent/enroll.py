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

import os
import ssl
import threading
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from pydantic import ValidationError

from agent.link.tls import client_context
from edge_contract.errors import LinkError
from edge_contract.protocol import EnrollAnswer, EnrollRequest, enroll_topics


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
    request_topic, answer_topic = enroll_topics(prefix, claim, nonce)
    payload = EnrollRequest(name=name, csr=csr_for(name, key)).model_dump_json().encode()
    answer = _ask(claim_dir, claim_cert, broker, request_topic, answer_topic, payload, timeout_s)
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
    request_topic: str,
    answer_topic: str,
    payload: bytes,
    timeout_s: float,
) -> EnrollAnswer:
    """Publish the request and wait for the (retained) answer, reconnecting when dropped."""
    answers: list[EnrollAnswer] = []
    done = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="", protocol=MQTTProtocolVersion.MQTTv5)
    client.tls_set_context(client_context(claim_dir / "ca.crt", claim_cert, claim_cert.with_suffix(".key")))
    sent: list[bool] = []

    def on_connect(c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            return
        c.subscribe(answer_topic, qos=1)
        if not sent:
            sent.append(True)
            # Retained: it waits for an approver that is not running yet (who clears it once answered).
            c.publish(request_topic, payload, qos=1, retain=True)

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            answers.append(EnrollAnswer.model_validate_json(msg.payload))
        except ValidationError:
            return
        done.set()

    client.on_connect, client.on_message = on_connect, on_message
    try:
        client.connect(*broker)
    except (OSError, ssl.SSLError) as exc:
        raise EnrollError(f"cannot reach the broker at {broker[0]}:{broker[1]}: {exc}") from exc
    client.loop_start()
    try:
        if not done.wait(timeout_s):
            raise EnrollError(
                f"no answer within {timeout_s:.0f} s: is `edge-fleet enroll serve` running, and the claim "
                "registered on this broker?"
            )
    finally:
        client.disconnect()
        client.loop_stop()
    return answers[0]
