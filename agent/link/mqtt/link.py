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
* reconnection with exponential backoff and jitter (``agent.backoff.Backoff``),
  reset only after a connection stayed up, so a fleet does not reconnect in
  lock-step after a broker restart and a broker that keeps dropping the box is
  not hammered; every refusal and disconnection is logged with its reason code
  in words and what to do about it;
* the client certificate and key are read again before a reconnection when
  their files changed (``edge-fleet renew``): a renewed certificate is used
  without a restart, and jobs wait in the session meanwhile;
* a Last Will, so the broker announces the box offline when it vanishes;
* failover: with several brokers configured, a failed connection (refused,
  unreachable, TLS rejected, or lost) moves the next attempt to the next
  broker in the list, round-robin, under the same backoff.  A new broker
  holds no session for the agent: the subscriptions are renewed on every
  connect, and the daemon re-publishes every stored result that no broker
  acknowledged (``Connected``), so accepted jobs are still answered;
* subscriptions the agent no longer wants (its group changed) are removed
  from its persistent session on connect (``subscriptions_file`` remembers
  the last set): a stale shared subscription would otherwise keep drawing
  the old group's jobs, which the broker then refuses to deliver — lost;
* a payload limit on every subscription: a message over the limit of the
  subscription it came through reaches the daemon cut to its first
  ``HEAD_BYTES`` bytes and flagged ``truncated``, never whole.

TLS settings come from ``agent.link.tls.client_context`` (TLS 1.2+, verified host
name); plain TCP only with ``allow_plaintext``, and a warning at start.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.backoff import Backoff
from agent.link.mqtt.messages import (
    DEFAULT_PAYLOAD_LIMIT,
    Connected,
    Event,
    Message,
    Published,
    matches,
    message_of,
    new_paho,
    without_share,
)
from agent.link.options import MQTTConfig
from agent.link.presence import LinkRecorder
from agent.link.reasons import explain
from agent.link.subscriptions import SubscriptionRecord
from agent.link.takeover import TakeoverDetector
from agent.link.tls import TLSFiles, client_context
from edge_contract.errors import LinkError

log = logging.getLogger(__name__)

# Reconnect backoff: the first retry comes after 0.5-1 s, doubling up to a minute —
# quick after a blip, gentle on a broker that is coming back up under a whole fleet.
_BACKOFF_MAX = 60


class MQTTLink:
    """One broker connection (to one of the configured brokers at a time), kept up until ``stop``.

    ``payload_limits`` maps a subscription (as given in ``subscriptions``) to
    its largest acceptable payload; the others get ``DEFAULT_PAYLOAD_LIMIT``.
    """

    def __init__(
        self,
        config: MQTTConfig,
        client_id: str,
        *,
        subscriptions: list[str],
        will: tuple[str, bytes] | None = None,
        max_packet_bytes: int | None = None,
        on_connect: Callable[[], None] | None = None,
        payload_limits: Mapping[str, int] | None = None,
        subscriptions_file: Path | None = None,
        recorder: LinkRecorder | None = None,
        optional: Mapping[str, str] | None = None,
    ) -> None:
        """``recorder``: where the link's state is written for ``doctor`` (``presence``);
        ``optional``: subscriptions the agent works without, each with what a refusal means."""
        self.config = config
        self._optional = dict(optional or {})
        self._recorder = recorder
        self._takeover = TakeoverDetector()
        self.mqtt5 = config.protocol == "5"
        self.endpoints = config.endpoints
        self._current = 0  # index in endpoints of the broker being (or last) tried
        self._failed = False  # the last attempt failed: the next one goes to the next broker
        self._limits = [
            (without_share(topic), (payload_limits or {}).get(topic, DEFAULT_PAYLOAD_LIMIT))
            for topic in subscriptions
        ]
        self.events: queue.Queue[Event] = queue.Queue()
        self.connected = threading.Event()
        self._subscriptions = subscriptions
        self._record = SubscriptionRecord(subscriptions_file) if subscriptions_file else None
        self._unsubscribing: set[int] = set()
        self._on_connect_hook = on_connect
        self._generation = 0
        self._max_packet = max_packet_bytes
        password = config.password.get_secret_value() if config.password else None
        tls = config.tls
        self._client = new_paho(
            client_id,
            mqtt5=self.mqtt5,
            keep_session=True,
            manual_ack=True,
            tls=client_context(tls.ca, tls.cert, tls.key) if tls is not None else None,
            login=(config.username, password) if config.username else None,
            will=will,
            on_connect=self._handle_connect,
            on_disconnect=self._handle_disconnect,
            on_connect_fail=self._handle_connect_fail,
            on_pre_connect=self._choose_endpoint,
            on_message=self._handle_message,
            on_publish=self._handle_publish,
            on_subscribe=self._handle_subscribe,
            on_unsubscribe=self._handle_unsubscribe,
        )
        self._client.max_inflight_messages_set(64)
        self.backoff = Backoff(max_s=_BACKOFF_MAX)
        self._client.reconnect_delay_set(min_delay=1, max_delay=_BACKOFF_MAX)
        self._tls_files = TLSFiles(tls.ca, tls.cert, tls.key) if tls is not None else None
        self._pending_subscriptions: dict[int, str] = {}

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; reconnects by itself until ``stop``."""
        if self.config.tls is None:
            log.warning(
                "connecting over plain TCP (allow_plaintext = true): the link is neither encrypted nor "
                "authenticated; use TLS outside a lab"
            )
        props = None
        if self.mqtt5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.config.session_expiry_s
            if self._max_packet:
                props.MaximumPacketSize = self._max_packet
        host, port = self.endpoints[0]
        try:
            self._client.connect_async(
                host,
                port,
                keepalive=self.config.keepalive,
                clean_start=False if self.mqtt5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
                properties=props,
            )
        except (OSError, ValueError) as exc:
            raise LinkError(f"cannot start connecting to {host}:{port}: {exc}") from exc
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
    def endpoint(self) -> tuple[str, int]:
        """The broker currently connected to (or being tried)."""
        return self.endpoints[self._current]

    @property
    def cert_expiry(self) -> datetime | None:
        """When the client certificate in use expires (a renewal loaded on reconnection updates it)."""
        return self._tls_files.cert_expiry if self._tls_files is not None else None

    @property
    def alive(self) -> bool:
        """Whether paho's network thread is running (the watchdog stops when it dies)."""
        # paho exposes no public accessor for its loop thread; this is the one
        # place that looks inside it.
        thread = getattr(self._client, "_thread", None)
        return thread is not None and thread.is_alive()

    # -- traffic ---------------------------------------------------------------

    def _drop_stale_subscriptions(self) -> None:
        """Unsubscribe from what an earlier configuration subscribed to; remember the current set
        once the broker confirmed (so a connection lost meanwhile retries next time)."""
        if self._record is None:
            return
        self._unsubscribing.clear()
        for topic in self._record.stale(self._subscriptions):
            log.info("leaving %s (no longer in the configuration)", topic)
            _rc, mid = self._client.unsubscribe(topic)
            if mid is not None:
                self._unsubscribing.add(mid)
        if not self._unsubscribing:
            self._record.save(self._subscriptions)

    def set_subscriptions(self, subscriptions: list[str], payload_limits: Mapping[str, int]) -> None:
        """Change what the agent subscribes to (its group changed): the new filters are taken and the
        dropped ones left now when connected, else at the next connection (``subscriptions_file``)."""
        old = list(self._subscriptions)
        self._limits = [
            (without_share(topic), payload_limits.get(topic, DEFAULT_PAYLOAD_LIMIT))
            for topic in subscriptions
        ]
        self._subscriptions = list(subscriptions)
        if not self.connected.is_set():
            return
        for topic in old:
            if topic not in subscriptions:
                log.info("leaving %s (the fleet changed this box's membership)", topic)
                _rc, mid = self._client.unsubscribe(topic)
                if mid is not None:
                    self._unsubscribing.add(mid)
        for topic in subscriptions:
            if topic not in old:
                _rc, mid = self._client.subscribe(topic, qos=1)
                if mid is not None:
                    self._pending_subscriptions[mid] = topic
        if not self._unsubscribing and self._record is not None:
            self._record.save(self._subscriptions)

    def subscribe_topics(self) -> None:
        """(Re)subscribe to every topic at QoS 1."""
        for topic in self._subscriptions:
            _rc, mid = self._client.subscribe(topic, qos=1)
            if mid is not None:
                self._pending_subscriptions[mid] = topic

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

    def _retry_later(self, client: paho.Client) -> None:
        """Set paho's wait before its next attempt to the backoff's next delay."""
        delay = self.backoff.next_delay()
        # Equal bounds: paho then waits exactly this long (its own doubling never starts).
        client.reconnect_delay_set(min_delay=delay, max_delay=delay)  # type: ignore[arg-type]
        log.info("next connection attempt in %.1f s", delay)

    def _choose_endpoint(self, client: paho.Client, _u: Any) -> None:
        """Before each (re)connection attempt: new TLS files if renewed; after a failure, the next broker."""
        if self._tls_files is not None:
            renewed = self._tls_files.reloaded()
            if renewed is not None:
                # paho offers no setter once TLS is configured; the context is read at each connect.
                client._ssl_context = renewed
        if self._failed and len(self.endpoints) > 1:
            self._current = (self._current + 1) % len(self.endpoints)
            host, port = self.endpoints[self._current]
            log.warning("failing over to broker %s:%s", host, port)
            # paho's host/port setters refuse while a (re)connection is in progress,
            # which is exactly when this hook runs; these are the fields they set.
            client._host, client._port = host, port
        self._failed = False

    def _report_state(self, **changes: Any) -> None:
        if self._recorder is not None:
            self._recorder.update(**changes)

    def _handle_connect_fail(self, client: paho.Client, _u: Any) -> None:
        self._takeover.attempt_failed()
        self._report_state(connected=False, problem="no TCP connection, or the TLS handshake failed")
        host, port = self.endpoint
        log.warning(
            "cannot connect to broker %s:%s (no TCP connection, or the TLS handshake failed: "
            "`edge-agent doctor` says which)",
            host,
            port,
        )
        self._failed = True
        self._retry_later(client)

    def _handle_connect(self, client: paho.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            why = explain(str(reason), "connack")
            log.warning("broker %s:%s refused the connection: %s", *self.endpoint, why)
            self._takeover.attempt_failed()
            self._report_state(connected=False, problem=f"connection refused: {why}")
            self._failed = True
            return
        taken = self._takeover.connected(time.monotonic())
        if taken is not None:
            log.warning("%s", taken)
        self._report_state(
            connected=True,
            endpoint=f"{self.endpoint[0]}:{self.endpoint[1]}",
            since=time.time(),
            granted=[],
            refused={},
            problem=taken,
        )
        self.backoff.connected(time.monotonic())
        self._generation += 1
        self._drop_stale_subscriptions()
        self.subscribe_topics()
        self.connected.set()
        log.info("connected to %s:%s", *self.endpoint)
        self.events.put(Connected(session_present=bool(flags.session_present)))
        if self._on_connect_hook is not None:
            self._on_connect_hook()

    def _handle_disconnect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        was_up = self.connected.is_set()
        self.connected.clear()
        self._failed = True
        self.backoff.disconnected(time.monotonic())
        silent = self._takeover.dropped(str(reason), was_up=was_up)
        if reason.is_failure:
            why = f"{reason}: {silent}" if silent else explain(str(reason), "disconnect")
            log.warning("disconnected from broker: %s", why)
            self._report_state(connected=False, problem=why)
        else:
            log.info("disconnected from broker")
            self._report_state(connected=False, problem=None)
        self._retry_later(client)

    def _limit(self, topic: str) -> int:
        for topic_filter, limit in self._limits:
            if matches(topic_filter, topic):
                return limit
        return DEFAULT_PAYLOAD_LIMIT

    def _handle_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        self.events.put(message_of(msg, generation=self._generation, limit=self._limit(msg.topic)))

    def _handle_subscribe(self, _c: paho.Client, _u: Any, mid: int, reasons: Any, _p: Any) -> None:
        topic = self._pending_subscriptions.pop(mid, "?")
        for reason in reasons:
            if getattr(reason, "is_failure", False) and topic in self._optional:
                log.warning("the broker refused the subscription to %s: %s", topic, self._optional[topic])
            elif getattr(reason, "is_failure", False):
                why = explain(str(reason), "suback")
                log.error("the broker refused the subscription to %s: %s", topic, why)
                if self._recorder is not None:
                    self._report_state(refused={**self._recorder.state.refused, topic: why})
            elif self._recorder is not None:
                self._report_state(granted=[*self._recorder.state.granted, topic])

    def _handle_unsubscribe(self, _c: paho.Client, _u: Any, mid: int, _r: Any, _p: Any) -> None:
        if mid in self._unsubscribing:
            self._unsubscribing.discard(mid)
            if not self._unsubscribing and self._record is not None:
                self._record.save(self._subscriptions)

    def _handle_publish(self, _c: paho.Client, _u: Any, mid: int, _r: Any, _p: Any) -> None:
        self.events.put(Published(mid=mid))
