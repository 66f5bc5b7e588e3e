"""The one wrapper over paho-mqtt: paho's return codes, reason codes and exceptions stop here.

* ``link.MQTTLink`` — the agent's persistent link (session, manual acks, failover, backoff);
* ``client.Client`` — a short-lived connection for tools (``edge-fleet``, ``doctor``): connect,
  subscribe, publish, each answered by a future per packet id and failing with an error of
  ``errors`` (a ``LinkError``) that says what the broker refused and why;
* ``messages`` — what both hand out (``Message``, ``Published``, ``Connected``).

Paho's callbacks run on its network thread; here they only hand work over (queues, futures).
"""

from agent.link.mqtt.ack import ANSWER_TIMEOUT_S, Ack
from agent.link.mqtt.client import Client
from agent.link.mqtt.errors import (
    ClosedBeforeLogin,
    ConnectionLost,
    LoginRefused,
    NoAnswer,
    PublishRefused,
    Refused,
    SubscribeRefused,
    TLSFailed,
    Unreachable,
)
from agent.link.mqtt.link import MQTTLink
from agent.link.mqtt.messages import (
    DEFAULT_PAYLOAD_LIMIT,
    HEAD_BYTES,
    Connected,
    Event,
    Message,
    Published,
    matches,
    no_delay,
)

__all__ = [
    "ANSWER_TIMEOUT_S",
    "DEFAULT_PAYLOAD_LIMIT",
    "HEAD_BYTES",
    "Ack",
    "Client",
    "ClosedBeforeLogin",
    "Connected",
    "ConnectionLost",
    "Event",
    "LoginRefused",
    "MQTTLink",
    "Message",
    "NoAnswer",
    "PublishRefused",
    "Published",
    "Refused",
    "SubscribeRefused",
    "TLSFailed",
    "Unreachable",
    "matches",
    "no_delay",
]
