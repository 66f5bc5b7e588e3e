"""How ``edge-fleet`` commands reach the broker: shared flags and one connect function.

TLS is the default: the broker's certificate is verified against ``--tls-ca``
(or the system's CAs) and its host name checked; ``--tls-cert``/``--tls-key``
present the operator identity.  Plain TCP only with ``--plaintext``, and a warning.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.link.mqtt import (
    ANSWER_TIMEOUT_S,
    Client,
    ClosedBeforeLogin,
    LoginRefused,
    NoAnswer,
    PublishRefused,
    TLSFailed,
    Unreachable,
)
from agent.link.tls import client_context
from edge_contract.errors import LinkError
from edge_contract.names import PLAIN_PORT

from .errors import FleetError
from .flags import topic_level
from .profile import Protocol, load_profile

# How long a publication may wait for the broker's acknowledgement: generous, a broker
# taking in thousands of retained messages at once is slow but not gone.
_ACK_TIMEOUT_S = 30.0
#: The operators' listener of `edge-fleet broker init` (devices use 8883).
TLS_PORT = 8884

__all__ = ["BrokerOptions", "FleetError", "add_broker_args", "open_client", "options_from"]


class _Configurable(typing.Protocol):
    """What ``BrokerOptions.configure`` sets up: an MQTT client of the tests' own."""

    def tls_set_context(self, context: ssl.SSLContext) -> None: ...
    def username_pw_set(self, username: str, password: str | None) -> None: ...


def identity_of(options: BrokerOptions) -> str:
    """Who the broker sees: the CN of ``--tls-cert``, the ``--username``, or anonymous."""
    if options.cert is not None:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        try:
            cert = x509.load_pem_x509_certificate(options.cert.read_bytes())
            return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
        except (OSError, ValueError, IndexError):
            return options.cert.stem
    return options.username or "anonymous"


def refusal(options: BrokerOptions, what: str, reason: object) -> FleetError:
    """A PUBACK/SUBACK refusal as the operator should read it: who was refused, and the fix."""
    return FleetError(
        f"{what}: {reason}: not authorized as {identity_of(options)} — operators' tools need an operator "
        "certificate (edge-fleet provision NAME --operator) on the operators' port "
        f"(--broker HOST:{TLS_PORT})"
    )


def connection_error(options: BrokerOptions, exc: LinkError | None) -> FleetError:
    """A failed connection (``None``: closed before its CONNACK) as the operator should read it: the fix."""
    host, port = options.address
    where = f"the broker at {host}:{port}"
    if isinstance(exc, TLSFailed) and exc.unverified is not None:
        return FleetError(
            f"cannot verify the certificate of {where} ({exc.unverified}): give the fleet CA "
            "with --tls-ca (ca.crt of `edge-fleet ca init`, copied by `provision --operator`)"
        )
    if isinstance(exc, TLSFailed):
        return FleetError(f"TLS with {where} failed ({exc.detail}); is it a TLS port? (--plaintext for 1883)")
    if isinstance(exc, Unreachable):
        return FleetError(f"cannot reach {where}: {exc.detail}")
    if isinstance(exc, LoginRefused):
        return FleetError(f"{where} refused the connection {identity_of(options)}: {exc.reason}")
    if isinstance(exc, NoAnswer):
        return FleetError(f"{where} refused the connection: no answer within {exc.timeout:.0f} s")
    if exc is not None and not isinstance(exc, ClosedBeforeLogin):
        return FleetError(exc.message)
    if options.cert is None and not options.plaintext:
        return FleetError(
            f"{where} closed the connection: it wants a client certificate — give --tls-cert and --tls-key "
            "(an operator identity: edge-fleet provision NAME --operator)"
        )
    return FleetError(
        f"{where} closed the connection before accepting the login: it rejected the certificate of "
        f"{identity_of(options)} (operators' certificates come from the operator CA and use the "
        f"operators' port, {TLS_PORT})"
    )


@dataclass(frozen=True)
class BrokerOptions:
    """Where the broker is and how to authenticate to it."""

    host: str = "127.0.0.1"
    port: int | None = None  # None: 8884 (the operators' listener) with TLS, 1883 with plaintext
    prefix: str = "edge"
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    username: str | None = None
    password: str | None = None
    plaintext: bool = False  # explicitly plain TCP: no TLS at all
    protocol: Protocol = "5"  # "3.1.1" for brokers without MQTT 5 (NATS)

    @property
    def address(self) -> tuple[str, int]:
        """(host, port), the port defaulted for the transport."""
        return self.host, self.port or (PLAIN_PORT if self.plaintext else TLS_PORT)

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS settings (None, and a warning, with ``--plaintext``)."""
        if self.plaintext:
            if self.ca or self.cert:
                raise FleetError("--plaintext excludes --tls-ca/--tls-cert/--tls-key")
            print(
                "edge-fleet: warning: plain TCP (--plaintext): the link is neither encrypted nor authenticated",
                file=sys.stderr,
            )
            return None
        if (self.cert is None) != (self.key is None):
            raise FleetError("give both --tls-cert and --tls-key, or neither")
        try:
            return client_context(self.ca, self.cert, self.key)
        except LinkError as exc:
            raise FleetError(exc.message) from exc

    def configure(self, client: _Configurable) -> None:
        """Set TLS (or warn about plain TCP) and the login on an unconnected ``client`` (tests' own)."""
        context = self.tls_context()
        if context is not None:
            client.tls_set_context(context)
        if self.username:
            client.username_pw_set(self.username, self.password)

    def client(self, name: str = "edge-fleet", **options: Any) -> Client:
        """An unconnected ``Client`` with these settings (``options``: those of ``Client``)."""
        settings: dict[str, Any] = {
            "protocol": self.protocol,
            "username": self.username,
            "password": self.password,
        }
        return Client(name=name, tls=self.tls_context(), **{**settings, **options})


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``HOST``: port 0, meaning 8884 with TLS, 1883 with ``--plaintext``) as a pair."""
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, 0
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the port must be a number") from None
    if not host or not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host.strip("[]"), number


def add_broker_args(parser: argparse.ArgumentParser) -> None:
    """The flags every command that talks to the broker takes (defaults: the profile, see ``profile``)."""
    parser.add_argument(
        "--broker",
        type=parse_address,
        default=None,
        metavar="HOST:PORT",
        help="MQTT broker: the operators' listener (default: the profile's, else 127.0.0.1, port 8884, "
        "or 1883 with --plaintext)",
    )
    parser.add_argument("--topic-prefix", default=None, help="first level of every topic (default: edge)")
    # --tls-* rather than --key: release and rollback take --key for the signing key.
    parser.add_argument(
        "--tls-ca",
        type=Path,
        help="CA file to verify the broker's certificate against (default: the system's CAs)",
    )
    parser.add_argument("--tls-cert", type=Path, help="client certificate (operator identity)")
    parser.add_argument("--tls-key", type=Path, help="private key of --tls-cert")
    parser.add_argument("--username")
    parser.add_argument(
        "--password",
        default=None,
        help="with --username: login over TLS (default: $EDGE_FLEET_PASSWORD, which `ps` does not show)",
    )
    parser.add_argument(
        "--plaintext",
        action="store_true",
        default=None,
        help="plain TCP, no TLS: only for a broker on this machine or a lab",
    )
    parser.add_argument(
        "--protocol",
        choices=("5", "3.1.1"),
        default=None,
        help="MQTT version (default 5; 3.1.1 for NATS: no submit, no group jobs)",
    )


def options_from(args: argparse.Namespace) -> BrokerOptions:
    """The ``BrokerOptions`` given on the command line, completed from the profile and
    ``EDGE_FLEET_*`` variables (a flag wins over a variable, a variable over the profile file)."""
    profile = load_profile()
    address = args.broker
    if address is None and profile.broker:
        try:
            address = parse_address(profile.broker)
        except argparse.ArgumentTypeError as exc:
            raise FleetError(f"the profile's broker: {exc}") from None
    host, port = address or ("127.0.0.1", 0)
    plaintext = args.plaintext if args.plaintext is not None else bool(profile.plaintext)
    explicit_tls = any(getattr(args, name) is not None for name in ("tls_ca", "tls_cert", "tls_key"))
    if args.plaintext is None and explicit_tls:
        plaintext = False  # TLS flags on the command line win over a plain-TCP profile
    prefix = args.topic_prefix or profile.topic_prefix or "edge"
    topic_level(prefix, "--topic-prefix" if args.topic_prefix else "the profile's topic_prefix")
    return BrokerOptions(
        host=host,
        port=port or None,
        prefix=prefix,
        ca=None if plaintext else (args.tls_ca or profile.tls_ca),
        cert=None if plaintext else (args.tls_cert or profile.tls_cert),
        key=None if plaintext else (args.tls_key or profile.tls_key),
        username=args.username or profile.username,
        password=args.password or os.environ.get("EDGE_FLEET_PASSWORD"),
        plaintext=plaintext,
        protocol=args.protocol or profile.protocol or "5",
    )


def open_client(
    options: BrokerOptions,
    *,
    name: str = "edge-fleet",
    timeout: float = ANSWER_TIMEOUT_S,
    **client_options: Any,
) -> Client:
    """A connected ``Client``; a failure raises ``FleetError`` naming the fix."""
    client = options.client(name, **client_options)
    connect_client(options, client, timeout=timeout)
    return client


def connect_client(options: BrokerOptions, client: Client, *, timeout: float = ANSWER_TIMEOUT_S) -> bool:
    """Connect ``client`` (made by ``options.client``) to the broker of ``options``; returns whether the
    broker kept a session.  A failure raises ``FleetError`` naming the fix."""
    host, port = options.address
    try:
        return client.connect(host, port, timeout=timeout)
    except LinkError as exc:
        raise connection_error(options, exc) from exc


def publish_retained(
    client: Client, messages: list[tuple[str, bytes]], *, timeout: float = _ACK_TIMEOUT_S
) -> None:
    """Publish every message (retained, QoS 1) at once, then wait for all the acknowledgements."""
    try:
        client.publish_all(messages, timeout=timeout)
    except PublishRefused as exc:
        raise FleetError(
            f"the broker refused {exc.topic} ({exc.reason}): is this identity allowed to publish there?"
        ) from exc
    except NoAnswer as exc:
        raise FleetError(
            f"the broker did not acknowledge {exc.what} within {timeout:.0f} s (is this identity allowed "
            "to publish there?); `edge-fleet reconcile` publishes it again"
        ) from exc
    except LinkError as exc:
        raise FleetError(f"{exc.message}; `edge-fleet reconcile` publishes it again") from exc
