"""The link's errors, and the one place paho's return codes, reason codes and socket errors
become them.  Each is a ``LinkError`` (``edge_contract.errors``), so a caller catches as broadly
as it needs; the attributes hold what a caller rewords for its own users (the fix differs
between an agent and an operator's tool).

    LinkError
    ├── Unreachable          no TCP connection (``detail``: the socket's words)
    ├── TLSFailed            the TLS handshake failed (``unverified``: why the broker's
    │                        certificate was not trusted, when that was it)
    ├── ClosedBeforeLogin    the broker hung up before its CONNACK: it rejected the client certificate
    ├── NoAnswer             no CONNACK/SUBACK/PUBACK within the time given
    ├── ConnectionLost       the connection dropped while an answer was awaited
    └── Refused              the broker answered no (``reason``: the MQTT reason code in words)
        ├── LoginRefused         CONNACK
        ├── SubscribeRefused     SUBACK (``topic``)
        └── PublishRefused       PUBACK (``topic``)
"""

from __future__ import annotations

import ssl
from typing import Any

import paho.mqtt.client as paho

from edge_contract.errors import LinkError


class Unreachable(LinkError):
    """No TCP connection to the broker."""

    def __init__(self, where: str, detail: str) -> None:
        super().__init__(f"cannot reach {where}: {detail}")
        self.where, self.detail = where, detail


class TLSFailed(LinkError):
    """The TLS handshake failed; ``unverified`` says why the broker's certificate was not trusted."""

    def __init__(self, where: str, detail: str, unverified: str | None = None) -> None:
        super().__init__(f"TLS with {where} failed: {unverified or detail}")
        self.where, self.detail, self.unverified = where, detail, unverified


class ClosedBeforeLogin(LinkError):
    """The broker closed the connection before answering the CONNECT (a rejected client certificate)."""

    def __init__(self, where: str) -> None:
        super().__init__(f"{where} closed the connection before accepting the login")
        self.where = where


class NoAnswer(LinkError):
    """The broker did not answer ``what`` within ``timeout`` seconds."""

    def __init__(self, where: str, what: str, timeout: float) -> None:
        super().__init__(f"{where} did not answer {what} within {timeout:g} s")
        self.where, self.what, self.timeout = where, what, timeout


class ConnectionLost(LinkError):
    """The connection dropped while an answer was awaited."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"the connection to {where} dropped ({reason})")
        self.where, self.reason = where, reason


class Refused(LinkError):
    """The broker refused; ``reason`` is the MQTT reason code in words ("Not authorized")."""

    packet = "?"

    def __init__(self, where: str, reason: str, topic: str | None = None) -> None:
        what = f" {topic}" if topic else ""
        super().__init__(f"{where} refused the {self.packet}{what}: {reason}")
        self.where, self.reason, self.topic = where, reason, topic


class LoginRefused(Refused):
    """CONNACK with a failure reason."""

    packet = "login"


class SubscribeRefused(Refused):
    """SUBACK with a failure reason for ``topic``."""

    packet = "subscription to"


class PublishRefused(Refused):
    """PUBACK with a failure reason for ``topic``, or a publication paho could not queue."""

    packet = "publication to"


def socket_error(where: str, exc: BaseException) -> LinkError:
    """What ``connect`` raised (TCP, TLS, a bad address), as a link error."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        unverified = getattr(exc, "verify_message", None) or str(exc)
        return TLSFailed(where, str(getattr(exc, "reason", None) or exc), unverified=unverified)
    if isinstance(exc, ssl.SSLError):
        return TLSFailed(where, str(getattr(exc, "reason", None) or exc))
    if isinstance(exc, OSError):
        return Unreachable(where, str(exc.strerror or exc))
    return Unreachable(where, str(exc))  # ValueError: paho refuses the host or port


def failure(reason: Any) -> str | None:
    """A reason code's words when it says failure (CONNACK, SUBACK, PUBACK), else None.

    paho hands over ``ReasonCode`` objects under MQTT 5 and plain integers (granted QoS, or
    0x80 for a refusal) under 3.1.1."""
    if isinstance(reason, int):
        return "Unspecified error" if reason >= 0x80 else None
    return str(reason) if getattr(reason, "is_failure", False) else None


def publish_error(where: str, topic: str, rc: int) -> LinkError | None:
    """paho's return code of ``publish`` as an error (None: queued, or waiting for a connection)."""
    if rc in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
        return None
    return PublishRefused(where, paho.error_string(rc), topic)
