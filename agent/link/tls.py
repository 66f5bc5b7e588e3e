"""TLS for the broker link: one way to build the client context, and certificate expiry.

Every MQTT client of the project (the agent, ``edge-fleet``, the tests) gets
its ``ssl.SSLContext`` from ``client_context``: TLS 1.2 or newer, the broker's
certificate verified against the CA file (or the system's CAs) and its host
name checked.  Nothing here can turn verification off.
"""

from __future__ import annotations

import logging
import ssl
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from edge_contract.errors import LinkError

log = logging.getLogger(__name__)

#: A certificate expiring within this many days is warned about (doctor, agent start): time to provision anew.
CERT_WARN_DAYS = 30


class _ClosingSSLSocket(ssl.SSLSocket):
    """An SSL socket that closes itself when its handshake fails.

    paho wraps the TCP socket and runs the handshake without closing the socket when that
    fails (a foreign CA, a refused client certificate): every retry would leak a descriptor
    until the garbage collector found it.
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


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
        context.sslsocket_class = _ClosingSSLSocket
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


class TLSFiles:
    """The TLS files of a link, watched: ``reloaded`` gives a new context once they changed.

    ``edge-fleet renew`` replaces the certificate and key by rename; the link asks before each
    connection attempt, so a renewal is used from the next (re)connection on.
    """

    def __init__(self, ca: Path | None, cert: Path | None, key: Path | None) -> None:
        self.ca, self.cert, self.key = ca, cert, key
        self._stamp = self._files_stamp()
        #: When the client certificate in use expires (None: no client certificate).
        self.cert_expiry = certificate_expiry(cert) if cert is not None else None

    def _files_stamp(self) -> tuple[int, ...]:
        try:
            return tuple(p.stat().st_mtime_ns for p in (self.ca, self.cert, self.key) if p is not None)
        except OSError:
            return ()

    def reloaded(self) -> ssl.SSLContext | None:
        """A context from the files if they changed since last loaded and load well; else None."""
        stamp = self._files_stamp()
        if not stamp or stamp == self._stamp:
            return None
        try:
            context = client_context(self.ca, self.cert, self.key)
        except LinkError as exc:
            # Half-copied files, or a key that does not match: keep the identity that worked.
            log.warning("the TLS files changed but do not load (%s); still using the previous ones", exc)
            return None
        self._stamp = stamp
        if self.cert is not None:
            self.cert_expiry = certificate_expiry(self.cert)
        until = f", valid until {self.cert_expiry:%Y-%m-%d}" if self.cert_expiry else ""
        log.info("loaded the renewed TLS files (%s%s)", self.cert or self.ca, until)
        return context
