"""TLS for the broker link: one way to build the client context, and certificate expiry.

Every MQTT client of the project (the agent, ``edge-fleet``, the tests) gets
its ``ssl.SSLContext`` from ``client_context``: TLS 1.2 or newer, the broker's
certificate verified against the CA file (or the system's CAs) and its host
name checked.  Nothing here can turn verification off.
"""

from __future__ import annotations

import ssl
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from agent.errors import LinkError

#: A certificate expiring within this many days is warned about (doctor, agent start): time to provision anew.
CERT_WARN_DAYS = 30


def client_context(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """A verifying client context; ``cert``/``key`` add a client certificate (the identity)."""
    for path in (ca, cert, key):
        if path is not None and not path.is_file():
            raise LinkError(f"{path}: TLS file not found")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # create_default_context already sets both; stated again because nothing may weaken them.
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        if cert is not None:
            context.load_cert_chain(str(cert), str(key) if key else None)
    except (OSError, ssl.SSLError) as exc:
        # The message names the file at most, never its content.
        raise LinkError(f"cannot load the TLS files (ca {ca}, cert {cert}, key {key}): {exc}") from exc
    return context


def certificate_expiry(path: Path) -> datetime:
    """When the (first) certificate in the PEM file ``path`` expires, in UTC."""
    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise LinkError(f"{path}: unreadable: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise LinkError(f"{path}: not a PEM certificate") from exc
    return certificate.not_valid_after_utc


def days_left(expiry: datetime, now: datetime | None = None) -> float:
    """Days from ``now`` (default: this moment) until ``expiry``; negative once expired."""
    now = now or datetime.now(UTC)
    return (expiry - now).total_seconds() / 86400
