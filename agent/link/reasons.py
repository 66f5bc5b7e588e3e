"""MQTT reason codes in words, with what to do about them.

paho already names each code ("Not authorized"); this adds the cause as seen
from an edge-agent box and the fix, for the agent's log, ``doctor`` and
``edge-fleet``.  Unknown reasons pass through as paho names them.
"""

from __future__ import annotations

from typing import Literal

Stage = Literal["connack", "disconnect", "suback", "puback"]

_HINTS: dict[tuple[Stage, str], str] = {
    ("connack", "Not authorized"): (
        "the broker does not accept this identity (revoked or not registered): "
        "ask the operator (edge-fleet provision NAME --live)"
    ),
    ("connack", "Bad user name or password"): "the broker rejected the login: check [mqtt] username/password",
    ("connack", "Client identifier not valid"): "the broker refused the client id: check device_id",
    ("connack", "Server unavailable"): "the broker is starting or overloaded: retrying",
    ("connack", "Server busy"): "the broker is overloaded: retrying",
    ("connack", "Banned"): "the broker banned this client: ask the operator",
    ("disconnect", "Session taken over"): (
        "another connection with this identity took over the session: is a second agent, or a copy "
        "of this certificate, running?"
    ),
    ("disconnect", "Not authorized"): "the broker revoked this identity's rights (edge-fleet revoke?)",
    ("disconnect", "Administrative action"): "an operator disconnected this identity (revoked or moved)",
    ("disconnect", "Unspecified error"): (
        "the connection was lost, or the broker closed it without a reason: a certificate it does not "
        "accept (another CA, expired) before the login, a session takeover after it (mosquitto 2.0 "
        "sends no DISCONNECT then); `edge-agent doctor` says which"
    ),
    ("disconnect", "Keep alive timeout"): "the broker heard nothing within the keepalive: network trouble",
    ("disconnect", "Server shutting down"): "the broker is restarting",
    ("suback", "Not authorized"): (
        "the broker's rules do not grant this subscription to this identity: "
        "register the device and its group on the broker (edge-fleet provision NAME --group G --live, "
        "or edge-fleet move NAME --group G)"
    ),
    ("puback", "Not authorized"): "the broker's rules do not let this identity publish there",
}


def explain(reason: str, stage: Stage) -> str:
    """``reason`` (paho's name of a reason code) followed by its cause and fix, when known."""
    hint = _HINTS.get((stage, reason))
    return f"{reason}: {hint}" if hint else reason
