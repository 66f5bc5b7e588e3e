"""How ``edge-fleet`` commands reach the broker: shared flags and one connect function."""

from __future__ import annotations

import argparse
import ssl
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.mqtt_link import no_delay


class FleetError(Exception):
    """An operator command cannot do what was asked (the message says why)."""


@dataclass(frozen=True)
class BrokerOptions:
    """Where the broker is and how to authenticate to it."""

    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = "edge"
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    username: str | None = None
    password: str | None = None


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``HOST``, port 1883) as a pair."""
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, 1883
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the port must be a number") from None
    if not host or not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host.strip("[]"), number


def add_broker_args(parser: argparse.ArgumentParser) -> None:
    """The flags every command that talks to the broker takes."""
    parser.add_argument(
        "--broker", type=parse_address, default=("127.0.0.1", 1883), metavar="HOST:PORT", help="MQTT broker"
    )
    parser.add_argument("--topic-prefix", default="edge", help="first level of every topic (default: edge)")
    # --tls-* rather than --key: release and rollback take --key for the signing key.
    parser.add_argument(
        "--tls-ca", type=Path, help="CA file: connect with TLS and verify the broker against it"
    )
    parser.add_argument("--tls-cert", type=Path, help="client certificate (operator identity)")
    parser.add_argument("--tls-key", type=Path, help="private key of --tls-cert")
    parser.add_argument("--username")
    parser.add_argument("--password")


def options_from(args: argparse.Namespace) -> BrokerOptions:
    """The ``BrokerOptions`` given on the command line."""
    host, port = args.broker
    return BrokerOptions(
        host=host,
        port=port,
        prefix=args.topic_prefix,
        ca=args.tls_ca,
        cert=args.tls_cert,
        key=args.tls_key,
        username=args.username,
        password=args.password,
    )


def connect(options: BrokerOptions, *, name: str = "edge-fleet", timeout: float = 10.0) -> paho.Client:
    """A connected MQTT 5 client with its network loop running."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"{name}-{uuid.uuid4().hex[:12]}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.on_socket_open = no_delay
    if options.username:
        client.username_pw_set(options.username, options.password)
    if options.ca or options.cert:
        client.tls_set(
            ca_certs=str(options.ca) if options.ca else None,
            certfile=str(options.cert) if options.cert else None,
            keyfile=str(options.key) if options.key else None,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    connected = threading.Event()
    refused: list[str] = []

    def on_connect(_c: paho.Client, _u: object, _f: object, reason: ReasonCode, _p: object) -> None:
        if reason.is_failure:
            refused.append(str(reason))
        connected.set()

    client.on_connect = on_connect
    try:
        client.connect(options.host, options.port)
    except (OSError, ssl.SSLError) as exc:
        raise FleetError(f"cannot reach the broker at {options.host}:{options.port}: {exc}") from exc
    client.loop_start()
    if not connected.wait(timeout) or refused:
        client.loop_stop()
        why = refused[0] if refused else f"no answer within {timeout:.0f} s"
        raise FleetError(f"the broker at {options.host}:{options.port} refused the connection: {why}")
    return client
