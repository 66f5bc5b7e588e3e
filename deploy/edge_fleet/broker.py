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
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.link.mqtt import no_delay
from agent.link.tls import client_context
from edge_contract.errors import LinkError
from edge_contract.names import PLAIN_PORT

from .errors import FleetError
from .flags import topic_level
from .profile import Protocol, load_profile

#: The operators' listener of `edge-fleet broker init` (devices use 8883).
TLS_PORT = 8884

__all__ = ["BrokerOptions", "FleetError", "add_broker_args", "connect", "options_from"]


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


def connection_error(options: BrokerOptions, exc: BaseException | None) -> FleetError:
    """A failed TLS/TCP connection (or one closed before CONNACK, ``exc`` None) with its fix."""
    host, port = options.address
    where = f"the broker at {host}:{port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return FleetError(
            f"cannot verify the certificate of {where} ({exc.verify_message}): give the fleet CA "
            "with --tls-ca (ca.crt of `edge-fleet ca init`, copied by `provision --operator`)"
        )
    if isinstance(exc, ssl.SSLError):
        return FleetError(
            f"TLS with {where} failed ({exc.reason or exc}); is it a TLS port? (--plaintext for 1883)"
        )
    if isinstance(exc, OSError):
        return FleetError(f"cannot reach {where}: {exc.strerror or exc}")
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

    def configure(self, client: paho.Client) -> None:
        """Set TLS (or warn about plain TCP) and the login on an unconnected ``client``."""
        if self.plaintext:
            if self.ca or self.cert:
                raise FleetError("--plaintext excludes --tls-ca/--tls-cert/--tls-key")
            print(
                "edge-fleet: warning: plain TCP (--plaintext): the link is neither encrypted nor authenticated",
                file=sys.stderr,
            )
        else:
            if (self.cert is None) != (self.key is None):
                raise FleetError("give both --tls-cert and --tls-key, or neither")
            try:
                client.tls_set_context(client_context(self.ca, self.cert, self.key))
            except LinkError as exc:
                raise FleetError(exc.message) from exc
        if self.username:
            client.username_pw_set(self.username, self.password)


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


def connect(options: BrokerOptions, *, name: str = "edge-fleet", timeout: float = 10.0) -> paho.Client:
    """A connected MQTT 5 client with its network loop running."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"{name}-{uuid.uuid4().hex[:12]}",
        protocol=MQTTProtocolVersion.MQTTv311 if options.protocol == "3.1.1" else MQTTProtocolVersion.MQTTv5,
    )
    client.on_socket_open = no_delay
    options.configure(client)
    host, port = options.address
    connected = threading.Event()
    refused: list[str] = []
    dropped: list[bool] = []

    def on_connect(_c: paho.Client, _u: object, _f: object, reason: ReasonCode, _p: object) -> None:
        if reason.is_failure:
            refused.append(str(reason))
        connected.set()

    def on_disconnect(*_a: object) -> None:
        if not connected.is_set():
            dropped.append(True)
            connected.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    try:
        client.connect(host, port)
    except (OSError, ssl.SSLError) as exc:
        raise connection_error(options, exc) from exc
    client.loop_start()
    answered = connected.wait(timeout)
    if dropped:
        release(client)
        raise connection_error(options, None)
    if not answered or refused:
        release(client)
        why = refused[0] if refused else f"no answer within {timeout:.0f} s"
        who = f" {identity_of(options)}" if refused else ""
        raise FleetError(f"the broker at {host}:{port} refused the connection{who}: {why}")
    client.on_disconnect = None
    _report_refusals(client, options)
    return client


def release(client: paho.Client) -> None:
    """Disconnect, stop the network loop and close the socket (a refused or dropped connection
    leaves it open to paho otherwise)."""
    client.disconnect()
    client.loop_stop()
    sock = client.socket()
    if sock is not None:
        sock.close()


def _report_refusals(client: paho.Client, options: BrokerOptions) -> None:
    """Say at once, on stderr, when the broker refuses a subscription or a publication.

    A command that installs its own ``on_subscribe``/``on_publish`` replaces these; the others
    would otherwise wait for messages the broker will never send.
    """

    def on_subscribe(_c: object, _u: object, mid: int, reasons: list[ReasonCode], _p: object) -> None:
        for reason in reasons:
            if reason.is_failure:
                print(
                    f"edge-fleet: {refusal(options, f'subscription {mid}', reason)}",
                    file=sys.stderr,
                )

    def on_publish(_c: object, _u: object, _mid: int, reason: ReasonCode, _p: object) -> None:
        if reason.is_failure:
            print(f"edge-fleet: {refusal(options, 'publishing', reason)}", file=sys.stderr)

    client.on_subscribe = on_subscribe
    client.on_publish = on_publish
