"""A thin, typed wrapper over paho-mqtt: connection upkeep, manual acks, publish acks.

Paho's callbacks run on its network thread; here they only hand work over —
incoming messages and publish acknowledgements go to ``events``, a queue the
daemon drains on its own thread.  Paho's return codes never leave this module.

Guarantees it gives the daemon:

* a persistent session (MQTT 5 clean start off + session expiry, or 3.1.1
  clean session off), so jobs published while the box is away wait for it;
* manual acknowledgement: a QoS 1 job is acknowledged only when the daemon
  calls ``ack`` after storing it, so a crash before that means redelivery;
* re-subscription and the ``on_connect`` hook on every (re)connect;
* reconnection with exponential backoff whose base is re-drawn at random on
  every disconnect, so a fleet does not reconnect in lock-step after a broker
  restart;
* a Last Will, so the broker announces the box offline when it vanishes.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .config import MQTTConfig
from .errors import LinkError

log = logging.getLogger(__name__)

# Reconnect backoff: the first retry comes after 0.5-1.5 s (random per
# disconnect), doubling up to a minute — quick after a blip, gentle on a broker
# that is coming back up under a whole fleet.
_BACKOFF_BASE = (0.5, 1.5)
_BACKOFF_MAX = 60


def no_delay(_client: paho.Client, _userdata: Any, sock: Any) -> None:
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


@dataclass(frozen=True)
class Published:
    """The broker acknowledged the QoS 1 publication ``mid``."""

    mid: int


@dataclass(frozen=True)
class Connected:
    """A (re)connection completed and the subscriptions were renewed."""

    session_present: bool


Event = Message | Published | Connected


class MQTTLink:
    """One broker connection, kept up until ``stop``."""

    def __init__(
        self,
        config: MQTTConfig,
        client_id: str,
        *,
        subscriptions: list[str],
        will: tuple[str, bytes] | None = None,
        max_packet_bytes: int | None = None,
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.mqtt5 = config.protocol == "5"
        self.events: queue.Queue[Event] = queue.Queue()
        self.connected = threading.Event()
        self._subscriptions = subscriptions
        self._on_connect_hook = on_connect
        self._generation = 0
        self._max_packet = max_packet_bytes
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self.mqtt5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self.mqtt5 else False,
        )
        client = self._client
        client.manual_ack_set(True)
        client.max_inflight_messages_set(64)
        client.max_queued_messages_set(0)  # unbounded: results wait for the broker
        client.reconnect_delay_set(min_delay=1, max_delay=_BACKOFF_MAX)
        if config.username:
            password = config.password.get_secret_value() if config.password else None
            client.username_pw_set(config.username, password)
        if config.tls is not None:
            tls = config.tls
            client.tls_set(
                ca_certs=str(tls.ca) if tls.ca else None,
                certfile=str(tls.cert) if tls.cert else None,
                keyfile=str(tls.key) if tls.key else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.on_socket_open = no_delay
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; reconnects by itself until ``stop``."""
        props = None
        if self.mqtt5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.config.session_expiry_s
            if self._max_packet:
                props.MaximumPacketSize = self._max_packet
        try:
            self._client.connect_async(
                self.config.host,
                self.config.port,
                keepalive=self.config.keepalive,
                clean_start=False if self.mqtt5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
                properties=props,
            )
        except (OSError, ValueError) as exc:
            raise LinkError(
                f"cannot start connecting to {self.config.host}:{self.config.port}: {exc}"
            ) from exc
        self._client.loop_start()

    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        """Publish ``final`` (retained) if connected, then disconnect cleanly."""
        if final is not None and self.connected.is_set():
            info = self._client.publish(final[0], final[1], qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout)
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def alive(self) -> bool:
        """Whether paho's network thread is running (the watchdog stops when it dies)."""
        # paho exposes no public accessor for its loop thread; this is the one
        # place that looks inside it.
        thread = getattr(self._client, "_thread", None)
        return thread is not None and thread.is_alive()

    # -- traffic ---------------------------------------------------------------

    def subscribe_topics(self) -> None:
        """(Re)subscribe to every topic at QoS 1."""
        for topic in self._subscriptions:
            self._client.subscribe(topic, qos=1)

    def ack(self, message: Message) -> None:
        """Acknowledge a received QoS 1 message (after it was stored)."""
        if message.qos == 0 or message.generation != self._generation:
            # The connection that delivered it is gone; the broker will redeliver it.
            return
        self._client.ack(message.mid, message.qos)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation: bytes | None = None,
    ) -> int:
        """Queue a publication; returns its message id (a ``Published`` event follows at QoS 1)."""
        props = None
        if correlation is not None and self.mqtt5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = correlation
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise LinkError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        return int(info.mid)

    # -- paho callbacks (network thread: hand over only) -------------------------

    def _handle_connect(self, client: paho.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason)
            return
        self._generation += 1
        self.subscribe_topics()
        self.connected.set()
        log.info("connected to %s:%s", self.config.host, self.config.port)
        self.events.put(Connected(session_present=bool(flags.session_present)))
        if self._on_connect_hook is not None:
            self._on_connect_hook()

    def _handle_disconnect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connected.clear()
        client.reconnect_delay_set(min_delay=random.uniform(*_BACKOFF_BASE), max_delay=_BACKOFF_MAX)  # type: ignore[arg-type]
        if reason.is_failure:
            log.warning("disconnected from broker: %s", reason)
        else:
            log.info("disconnected from broker")

    def _handle_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        self.events.put(
            Message(
                topic=msg.topic,
                payload=bytes(msg.payload),
                qos=msg.qos,
                mid=msg.mid,
                retain=bool(msg.retain),
                response_topic=response_topic if isinstance(response_topic, str) else None,
                correlation=bytes(correlation) if correlation is not None else None,
                generation=self._generation,
            )
        )

    def _handle_publish(self, _c: paho.Client, _u: Any, mid: int, _r: Any, _p: Any) -> None:
        self.events.put(Published(mid=mid))
