"""What the wrapper hands out: received messages, publish acks, (re)connections — and the
paho-facing helpers that build them (the one place a paho message is read)."""

from __future__ import annotations

import contextlib
import socket
import ssl
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

#: Limit of a subscription given no limit of its own: a job or a manifest fits, a flood does not.
DEFAULT_PAYLOAD_LIMIT = 64 * 1024
#: What the daemon still sees of an oversized message: enough to find its id and answer it.
HEAD_BYTES = 4096


def no_delay(_client: Any, _userdata: Any, sock: Any) -> None:
    """Send small packets at once: with Nagle's algorithm a PUBACK or a chunk can wait
    for the peer's delayed ACK (40 ms on Linux) — measured here as 45 ms per hop."""
    with contextlib.suppress(OSError, AttributeError):  # not TCP (a Unix or WebSocket transport)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(frozen=True)
class Message:
    """A message received on a subscription."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    retain: bool
    response_topic: str | None
    correlation: bytes | None
    generation: int  # which connection delivered it: acks go to that one only
    size: int = 0  # the payload's size as received (payload may be cut: see truncated)
    truncated: bool = False  # over its subscription's limit: payload holds only the first HEAD_BYTES
    #: Other MQTT 5 properties a forwarder keeps (``FORWARDED``), by their spec names.
    extra: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Published:
    """The broker acknowledged the QoS 1 publication ``mid``."""

    mid: int


@dataclass(frozen=True)
class Connected:
    """A (re)connection completed and the subscriptions were renewed."""

    session_present: bool


Event = Message | Published | Connected

#: Properties a message keeps when published again (besides response topic and correlation).
FORWARDED = ("UserProperty", "ContentType", "PayloadFormatIndicator", "MessageExpiryInterval")


def message_of(msg: paho.MQTTMessage, *, generation: int = 0, limit: int | None = None) -> Message:
    """paho's message as a ``Message``: cut to ``HEAD_BYTES`` when over ``limit``."""
    size = len(msg.payload)
    truncated = limit is not None and size > limit
    props = getattr(msg, "properties", None)
    response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
    correlation = getattr(props, "CorrelationData", None) if props is not None else None
    return Message(
        topic=msg.topic,
        payload=bytes(msg.payload[:HEAD_BYTES] if truncated else msg.payload),
        qos=msg.qos,
        mid=msg.mid,
        retain=bool(msg.retain),
        response_topic=response_topic if isinstance(response_topic, str) else None,
        correlation=bytes(correlation) if correlation is not None else None,
        generation=generation,
        size=size,
        truncated=truncated,
        extra=tuple(
            (name, getattr(props, name)) for name in FORWARDED if getattr(props, name, None) is not None
        ),
    )


def matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` (``+``, ``#``; ``$share/NAME/`` removed)."""
    return bool(paho.topic_matches_sub(without_share(topic_filter), topic))


def without_share(topic_filter: str) -> str:
    """The filter messages of a subscription match: ``$share/NAME/`` removed."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


def new_paho(
    client_id: str,
    *,
    mqtt5: bool,
    keep_session: bool,
    manual_ack: bool,
    tls: ssl.SSLContext | None,
    login: tuple[str, str | None] | None,
    will: tuple[str, bytes | str] | None,
    **callbacks: Any,
) -> paho.Client:
    """A paho client as both wrappers use it: no delay on small packets, publications queued
    without bound while disconnected, a retained QoS 1 ``will``; ``callbacks``: ``on_*`` hooks."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5 if mqtt5 else MQTTProtocolVersion.MQTTv311,
        clean_session=None if mqtt5 else not keep_session,
    )
    client.manual_ack_set(manual_ack)
    client.max_queued_messages_set(0)  # unbounded: publications (results) wait for the broker
    if tls is not None:
        client.tls_set_context(tls)
    if login is not None:
        client.username_pw_set(*login)
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    client.on_socket_open = no_delay
    for name, callback in callbacks.items():
        setattr(client, name, callback)
    return client
