"""One real MQTT login with the box's identity, for ``edge-agent doctor``.

A TLS handshake says the broker is there; only an MQTT CONNECT says it accepts
this certificate, and only a SUBSCRIBE says its rules grant the topics the agent
needs.  The login uses the agent's own client id and keeps its session (clean
start off, the configured expiry) and never acknowledges a message, so jobs
queued for the box stay queued for the agent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.link.mqtt.client import Client
from agent.link.mqtt.errors import (
    ClosedBeforeLogin,
    ConnectionLost,
    LoginRefused,
    NoAnswer,
    TLSFailed,
    Unreachable,
)
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
    try:
        tls = client_context(mqtt.tls.ca, mqtt.tls.cert, mqtt.tls.key) if mqtt.tls is not None else None
    except LinkError as exc:
        return LoginReport(problem=exc.message)
    client = Client(
        client_id,
        protocol=mqtt.protocol,
        tls=tls,
        username=mqtt.username,
        password=mqtt.password.get_secret_value() if mqtt.password else None,
        keep_session=True,
        session_expiry_s=mqtt.session_expiry_s,
        manual_ack=True,  # nothing delivered here is acknowledged: the agent gets it again
        # One login, never a second: paho's network thread would otherwise sleep out a 1 s
        # reconnection delay after a broker hangs up, and closing would wait for that sleep.
        reconnect_delay_s=_NO_RECONNECT_S,
    )
    report = LoginReport()
    try:
        client.connect(*endpoint, keepalive=mqtt.keepalive, timeout=timeout_s)
        try:
            suback = client.subscribe(subscriptions).wait(timeout_s)
        except (NoAnswer, ConnectionLost):
            suback = []
        if len(suback) != len(subscriptions):
            report.problem = "the broker did not answer the SUBSCRIBE"
        else:
            for topic, reason in zip(subscriptions, suback, strict=True):
                if reason:
                    report.refused[topic] = explain(reason, "suback")
                else:
                    report.granted.append(topic)
    except TLSFailed as exc:
        report.problem = f"TLS handshake failed: {exc.detail}"
    except Unreachable as exc:
        report.problem = f"unreachable: {exc.detail}"
    except NoAnswer:
        report.problem = f"no CONNACK within {timeout_s:.0f} s (is this an MQTT broker?)"
    except ClosedBeforeLogin:
        report.problem = (
            "the broker closed the connection before accepting the login: it rejected this "
            "client certificate (not signed by the fleet CA, expired, or for another broker) — "
            "check [mqtt.tls] cert and key"
        )
    except LoginRefused as exc:
        report.problem = f"login refused: {explain(exc.reason, 'connack')}"
    finally:
        client.close()
    return report
