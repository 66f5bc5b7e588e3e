"""One real MQTT login with the box's identity, for ``edge-agent doctor``.

A TLS handshake says the broker is there; only an MQTT CONNECT says it accepts
this certificate, and only a SUBSCRIBE says its rules grant the topics the agent
needs.  The login uses the agent's own client id and keeps its session (clean
start off, the configured expiry) and never acknowledges a message, so jobs
queued for the box stay queued for the agent.
"""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.link.options import MQTTConfig
from agent.link.reasons import explain
from agent.link.tls import client_context
from edge_contract.errors import LinkError

#: Seconds paho waits before reconnecting after a drop (the check stops it long before).
_NO_RECONNECT_S = 0.05


@dataclass
class LoginReport:
    """What the broker answered: a refusal (``problem``) or the SUBACK reason of each subscription."""

    problem: str | None = None
    granted: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


def try_login(
    mqtt: MQTTConfig,
    client_id: str,
    endpoint: tuple[str, int],
    subscriptions: list[str],
    *,
    timeout_s: float = 5.0,
) -> LoginReport:
    """CONNECT to ``endpoint`` as the configured identity and SUBSCRIBE to ``subscriptions``."""
    mqtt5 = mqtt.protocol == "5"
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5 if mqtt5 else MQTTProtocolVersion.MQTTv311,
        clean_session=None if mqtt5 else False,
    )
    client.manual_ack_set(True)  # nothing delivered here is acknowledged: the agent gets it again
    if mqtt.username:
        client.username_pw_set(mqtt.username, mqtt.password.get_secret_value() if mqtt.password else None)
    try:
        if mqtt.tls is not None:
            client.tls_set_context(client_context(mqtt.tls.ca, mqtt.tls.cert, mqtt.tls.key))
    except LinkError as exc:
        return LoginReport(problem=exc.message)
    answered, subscribed = threading.Event(), threading.Event()
    report = LoginReport()
    connack: list[str] = []
    suback: list[str] = []

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        connack.append(str(reason) if reason.is_failure else "")
        answered.set()

    def on_disconnect(_c: Any, _u: Any, _f: Any, _reason: Any, _p: Any) -> None:
        answered.set()
        subscribed.set()

    def on_subscribe(_c: Any, _u: Any, _mid: int, reasons: list[Any], _p: Any) -> None:
        suback.extend(str(r) if r.is_failure else "" for r in reasons)
        subscribed.set()

    client.on_connect, client.on_disconnect, client.on_subscribe = on_connect, on_disconnect, on_subscribe
    props = None
    if mqtt5:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = mqtt.session_expiry_s
    host, port = endpoint
    try:
        client.connect(host, port, keepalive=mqtt.keepalive, clean_start=False, properties=props)
    except ssl.SSLError as exc:  # before OSError: it is one
        return LoginReport(problem=f"TLS handshake failed: {exc.reason or exc}")
    except OSError as exc:
        return LoginReport(problem=f"unreachable: {exc.strerror or exc}")
    # One login, never a second: paho's network thread would otherwise sleep out a 1 s
    # reconnection delay after a broker hangs up, and stopping it would wait for that sleep.
    client.reconnect_delay_set(min_delay=_NO_RECONNECT_S, max_delay=_NO_RECONNECT_S)  # type: ignore[arg-type]
    client.loop_start()
    try:
        if not answered.wait(timeout_s):
            report.problem = f"no CONNACK within {timeout_s:.0f} s (is this an MQTT broker?)"
        elif not connack:
            report.problem = (
                "the broker closed the connection before accepting the login: it rejected this "
                "client certificate (not signed by the fleet CA, expired, or for another broker) — "
                "check [mqtt.tls] cert and key"
            )
        elif connack[0]:
            report.problem = f"login refused: {explain(connack[0], 'connack')}"
        else:
            client.subscribe([(topic, 1) for topic in subscriptions])
            if not subscribed.wait(timeout_s) or len(suback) != len(subscriptions):
                report.problem = "the broker did not answer the SUBSCRIBE"
            else:
                for topic, reason in zip(subscriptions, suback, strict=True):
                    if reason:
                        report.refused[topic] = explain(reason, "suback")
                    else:
                        report.granted.append(topic)
    finally:
        client.disconnect()
        client.loop_stop()
        sock = client.socket()
        if sock is not None:  # a connection the broker dropped is otherwise left open
            sock.close()
    return report
