"""Certificate renewal without an operator: a new key made on the box, its CSR over the box's own link.

When the client certificate has less than ``CERT_WARN_DAYS`` left, the agent
makes a new key (``KEY.renew``, 0600, never sent), publishes a CSR for its own
name on ``PREFIX/{device}/renew/csr`` (retained, so it waits for the approver)
through its running connection — no second connection that would take its
session — and takes the answer from ``PREFIX/{device}/renew/answer``: a
certificate for that key, signed by ``edge-fleet enroll serve`` because the
request came from this device's own, still valid and not revoked identity.  The
key file is replaced first, then the certificate (each by rename); the link
loads them before its next connection ("loaded the renewed TLS files").  A
request unanswered is sent again after ``RETRY_S``.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from agent.config import AgentConfig
from agent.enroll import csr_for, make_key
from agent.link.mqtt import MQTTLink
from agent.link.tls import CERT_WARN_DAYS, certificate_expiry
from edge_contract.protocol import EnrollAnswer, EnrollRequest, Topics

log = logging.getLogger(__name__)

RETRY_S = 3600.0


class Renewal:
    """Renews the box's certificate when it nears expiry (intake thread)."""

    def __init__(self, config: AgentConfig, topics: Topics, link: MQTTLink) -> None:
        tls = config.mqtt.tls
        self.cert = tls.cert if tls is not None else None
        self.key = tls.key if tls is not None else None
        self.device_id = config.device_id
        self.topics = topics
        self.link = link
        self._asked_at: float | None = None

    @property
    def pending_key(self) -> Path | None:
        """Where the new key waits for its certificate."""
        return self.key.with_name(self.key.name + ".renew") if self.key is not None else None

    def tick(self, now: float | None = None) -> None:
        """Ask for a certificate when the current one nears expiry (and no answer is awaited)."""
        if self.cert is None or self.pending_key is None or not self.link.connected.is_set():
            return
        now = time.monotonic() if now is None else now
        if self._asked_at is not None and now - self._asked_at < RETRY_S:
            return
        try:
            left = (certificate_expiry(self.cert) - datetime.now(UTC)).total_seconds() / 86400
        except (OSError, ValueError):
            return
        if left >= CERT_WARN_DAYS:
            return
        self._asked_at = now
        try:
            key = self._new_key(self.pending_key)
        except OSError as exc:
            log.error(
                "cannot renew the certificate: %s: %s (make its folder writable by the agent)",
                self.pending_key,
                exc,
            )
            return
        request = EnrollRequest(name=self.device_id, csr=csr_for(self.device_id, key))
        self.link.publish(self.topics.renew_csr, request.model_dump_json().encode(), retain=True)
        log.warning(
            "the certificate expires in %.0f days: asked the fleet for a new one (key made here)", left
        )

    @staticmethod
    def _new_key(path: Path) -> ec.EllipticCurvePrivateKey:
        if path.exists():  # an earlier request's key: ask again for the same one
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if isinstance(loaded, ec.EllipticCurvePrivateKey):
                return loaded
            path.unlink()
        return make_key(path)

    def answer(self, payload: bytes) -> None:
        """The approver's answer: swap the files in (key first), or log why not."""
        if not payload or self.pending_key is None or self.key is None or self.cert is None:
            return
        try:
            answer = EnrollAnswer.model_validate_json(payload)
        except ValidationError:
            log.warning("ignoring a renewal answer that does not parse")
            return
        if answer.error or not answer.cert:
            log.error("certificate renewal refused: %s", answer.error or "an empty answer")
            return
        try:
            key = serialization.load_pem_private_key(self.pending_key.read_bytes(), password=None)
        except (OSError, ValueError):
            return  # answered already (the retained answer again after a reconnection)
        cert = x509.load_pem_x509_certificate(answer.cert.encode())
        if cert.public_key() != key.public_key():
            log.warning("ignoring a renewal answer for another key")
            return
        tmp = self.cert.with_name(f".{self.cert.name}.renew")
        try:
            tmp.write_text(answer.cert)
            os.replace(self.pending_key, self.key)
            os.replace(tmp, self.cert)
        except OSError as exc:
            log.error("cannot install the renewed certificate in %s: %s", self.cert.parent, exc)
            return
        self._asked_at = None
        log.warning(
            "renewed the certificate (valid until %s, key made here); used from the next connection",
            cert.not_valid_after_utc.strftime("%Y-%m-%d"),
        )
