"""``Client``: one broker connection for a tool — ``edge-fleet``'s commands and server, ``doctor``.

Typed, in the manner of aiomqtt over paho: ``connect`` returns or raises a ``LinkError`` of
``errors``; ``subscribe`` and ``publish`` return an ``Ack``, a future per packet id that
``wait`` turns into the broker's answer or an error.  Paho's callbacks only hand work over:
they settle futures, put messages on ``messages`` (or hand them to the handler ``route``
registered for their filter) and call the ``on_connect``/``on_drop`` hooks, which must be as
brief (a handler or hook runs on paho's network thread and must not wait for the broker).
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as _Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.link.mqtt.ack import ANSWER_TIMEOUT_S, Ack, answer
from agent.link.mqtt.errors import (
    ClosedBeforeLogin,
    ConnectionLost,
    LoginRefused,
    NoAnswer,
    PublishRefused,
    SubscribeRefused,
    failure,
    publish_error,
    socket_error,
)
from agent.link.mqtt.messages import Message, matches, message_of, new_paho
from edge_contract.errors import LinkError

log = logging.getLogger(__name__)

Handler = Callable[[Message], None]

#: The longest wait between reconnections after repeated drops (paho doubles the wait up to it):
#: a server that outlives a broker restart is back within a minute, without hammering it.
_MAX_RECONNECT_S = 60.0


#: Answers kept for packet ids not registered yet: one is registered microseconds after paho
#: sent it, so a few hundred cover any burst.
_EARLY_KEPT = 256
#: Seconds between pings on an idle connection (paho's default): a tool's connection lives seconds
#: to minutes, and a broker gone silent is noticed within 1.5 times this.
KEEPALIVE_S = 60


class Client:
    """One MQTT connection (5, or 3.1.1 for brokers without it); see the module.

    ``keep_session``: resume the session of ``client_id`` (clean start off) and keep it
    ``session_expiry_s`` after the connection ends.  ``manual_ack``: received QoS 1 messages
    are acknowledged only by ``ack``.  ``reconnect_delay_s``: the wait before paho connects again
    after a drop (a one-shot check sets it short, so ``close`` never waits out a long delay).
    """

    def __init__(
        self,
        client_id: str | None = None,
        *,
        name: str = "edge-fleet",
        protocol: Literal["5", "3.1.1"] = "5",
        tls: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
        keep_session: bool = False,
        session_expiry_s: int | None = None,
        manual_ack: bool = False,
        will: tuple[str, bytes | str] | None = None,
        reconnect_delay_s: float = 1.0,
        on_connect: Callable[[bool], None] | None = None,
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        self.client_id = client_id or f"{name}-{uuid.uuid4().hex[:12]}"
        self.mqtt5 = protocol == "5"
        self.where = "the broker"
        self._keep_session = keep_session
        self._session_expiry_s = session_expiry_s
        self._on_connect, self._on_drop = on_connect, on_drop
        self.messages: queue.SimpleQueue[Message] = queue.SimpleQueue()  # those no route took
        self.connected = threading.Event()
        self._lock = threading.Lock()
        self._routes: dict[str, Handler] = {}
        self._pending: dict[int, tuple[Ack, list[str], type[LinkError] | None]] = {}
        self._early: dict[int, list[str | None]] = {}  # answers that came before their packet id was known
        self._drops = 0  # connections lost so far: an answer awaited across one never comes
        self._first: Future[bool] = Future()  # the first CONNACK: session present, or the error
        self._paho = new_paho(
            self.client_id,
            mqtt5=self.mqtt5,
            keep_session=keep_session,
            manual_ack=manual_ack,
            tls=tls,
            login=(username, password) if username else None,
            will=will,
            on_connect=self._handle_connect,
            on_disconnect=self._handle_disconnect,
            on_message=self._handle_message,
            on_publish=self._handle_ack,
            on_subscribe=self._handle_ack,
            on_unsubscribe=self._handle_ack,
        )
        self._paho.reconnect_delay_set(
            min_delay=reconnect_delay_s,  # type: ignore[arg-type]
            max_delay=max(reconnect_delay_s, _MAX_RECONNECT_S),  # type: ignore[arg-type]
        )

    # -- connection ----------------------------------------------------------------------------

    def connect(
        self, host: str, port: int, *, keepalive: int = KEEPALIVE_S, timeout: float = ANSWER_TIMEOUT_S
    ) -> bool:
        """Connect and wait for the CONNACK; returns whether the broker kept a session.

        Raises ``Unreachable``/``TLSFailed`` (the socket), ``LoginRefused``, ``ClosedBeforeLogin``
        or ``NoAnswer``; the client is closed then."""
        try:
            self._dial(host, port, keepalive, background=False)
        except LinkError:
            self.close()
            raise
        self._paho.loop_start()
        try:
            return self._first.result(timeout)
        except FutureTimeout:
            self.close()
            raise NoAnswer(self.where, "the CONNECT", timeout) from None
        except LinkError:
            self.close()
            raise

    def start(self, host: str, port: int, *, keepalive: int = KEEPALIVE_S) -> None:
        """Connect in the background, again after every drop, until ``close`` (``connected`` says when)."""
        self._dial(host, port, keepalive, background=True)
        self._paho.loop_start()

    def close(self, *, end_session: bool = False) -> None:
        """Disconnect (``end_session``: the broker drops the session now), stop the network thread and
        close the socket (one the broker refused or dropped stays open otherwise)."""
        props = None
        if end_session and self.mqtt5:
            props = _Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0
        self._paho.disconnect(properties=props)
        self._paho.loop_stop()
        sock = self._paho.socket()
        if sock is not None:
            sock.close()
        self._fail_pending("closed")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _dial(self, host: str, port: int, keepalive: int, *, background: bool) -> None:
        """paho's connect (TCP and TLS now) or connect_async (on the network thread), errors translated."""
        self.where = f"the broker at {host}:{port}"
        how = self._paho.connect_async if background else self._paho.connect
        try:
            how(host, port, keepalive, clean_start=self._clean_start(), properties=self._props())
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise socket_error(self.where, exc) from exc

    def _clean_start(self) -> bool | Literal[3]:
        # Under 3.1.1 the session is kept by clean_session (set at construction); paho refuses any
        # other clean_start there.
        if self._keep_session and self.mqtt5:
            return False
        return paho.MQTT_CLEAN_START_FIRST_ONLY

    def _props(self) -> Any:
        if not self.mqtt5 or self._session_expiry_s is None:
            return None
        props = _Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._session_expiry_s
        return props

    # -- traffic -------------------------------------------------------------------------------

    def route(self, topic_filter: str, handler: Handler) -> None:
        """Hand messages matching ``topic_filter`` to ``handler`` (on paho's thread: hand over only)."""
        with self._lock:
            self._routes[topic_filter] = handler

    def unroute(self, topic_filter: str) -> None:
        """Messages matching ``topic_filter`` go to ``messages`` again."""
        with self._lock:
            self._routes.pop(topic_filter, None)

    def subscribe(
        self,
        filters: str | Sequence[str | tuple[str, int]],
        *,
        qos: int = 1,
        retain_as_published: bool = False,
    ) -> Ack:
        """SUBSCRIBE to ``filters`` (each at ``qos``, or at the QoS paired with it); ``Ack.wait`` gives
        one refusal (or None) per filter."""
        pairs = _pairs(filters, qos)
        topics = [topic for topic, _qos in pairs]
        drops = self._drops
        if retain_as_published and self.mqtt5:
            rap = [(t, SubscribeOptions(qos=q, retainAsPublished=True)) for t, q in pairs]
            rc, mid = self._paho.subscribe(rap)
        else:
            rc, mid = self._paho.subscribe(pairs)
        return self._register(rc, mid, f"the SUBSCRIBE to {', '.join(topics)}", topics, None, drops)

    def subscribed(
        self,
        filters: str | Sequence[str | tuple[str, int]],
        *,
        timeout: float = ANSWER_TIMEOUT_S,
        **options: Any,
    ) -> None:
        """SUBSCRIBE and wait: raises ``SubscribeRefused`` for the first filter refused."""
        ack = self.subscribe(filters, **options)
        topics = [topic for topic, _qos in _pairs(filters, 1)]
        for topic, refused in zip(topics, ack.wait(timeout), strict=False):
            if refused is not None:
                raise SubscribeRefused(self.where, refused, topic)

    def unsubscribe(self, filters: str | Sequence[str]) -> Ack:
        """UNSUBSCRIBE ``filters``; every message sent before the UNSUBACK has arrived when it does."""
        topics = [filters] if isinstance(filters, str) else list(filters)
        drops = self._drops
        rc, mid = self._paho.unsubscribe(topics)
        return self._register(rc, mid, "the UNSUBSCRIBE", topics, None, drops)

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        expiry_s: int | None = None,
        extra: Iterable[tuple[str, Any]] = (),
    ) -> Ack:
        """PUBLISH; ``Ack.wait`` returns once the broker took it (QoS 1) or it was sent (QoS 0), and
        raises ``PublishRefused`` when the broker refused it.  MQTT 5 properties are dropped under 3.1.1."""
        props = None
        given = [
            (name, value)
            for name, value in (
                ("ResponseTopic", response_topic),
                ("CorrelationData", correlation),
                ("MessageExpiryInterval", expiry_s),
                *extra,
            )
            if value is not None
        ]
        if given and self.mqtt5:  # none given: no Properties to build and pack for each message
            props = _Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            for name, value in given:
                setattr(props, name, value)
        drops = self._drops
        info = self._paho.publish(topic, payload, qos=qos, retain=retain, properties=props)
        return self._register(info.rc, info.mid, f"the PUBLISH to {topic}", [topic], PublishRefused, drops)

    def publish_all(
        self, messages: Sequence[tuple[str, bytes]], *, retain: bool = True, timeout: float = ANSWER_TIMEOUT_S
    ) -> None:
        """Publish every message (QoS 1) at once, then wait for all the acknowledgements."""
        acks = [self.publish(topic, payload, retain=retain) for topic, payload in messages]
        for ack in acks:
            ack.wait(timeout)

    def ack(self, message: Message) -> None:
        """Acknowledge a QoS 1 message (``manual_ack``)."""
        if message.qos:
            self._paho.ack(message.mid, message.qos)

    def _register(
        self,
        rc: int,
        mid: int | None,
        what: str,
        topics: list[str],
        refusal: type[LinkError] | None,
        drops: int,
    ) -> Ack:
        ack = Ack(self.where, what)
        error: LinkError | None = publish_error(self.where, topics[0], rc)
        if isinstance(error, PublishRefused) and refusal is None:  # not a PUBLISH: say what it was
            error = LinkError(f"{what} failed: {error.reason}")
        if error is not None or mid is None:
            ack.settle(error or ConnectionLost(self.where, "not connected"))
            return ack
        with self._lock:
            early = self._early.pop(mid, None)
            lost = early is None and self._drops != drops  # dropped before it could be registered
            if early is None and not lost:
                self._pending[mid] = (ack, topics, refusal)
        if lost:
            ack.settle(ConnectionLost(self.where, "dropped"))
        elif early is not None:
            ack.settle(answer(self.where, early, topics, refusal))
        return ack

    def _fail_pending(self, reason: str) -> None:
        with self._lock:
            self._drops += 1
            pending, self._pending = self._pending, {}
        for ack, _topics, _refusal in pending.values():
            ack.settle(ConnectionLost(self.where, reason))

    # -- paho's callbacks (network thread: hand over only) --------------------------------------

    def _handle_connect(self, _c: Any, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        refused = failure(reason)
        if refused is not None:
            if not self._first.done():
                self._first.set_exception(LoginRefused(self.where, refused))
            log.warning("%s refused the connection: %s", self.where, refused)
            return
        self.connected.set()
        present = bool(flags.session_present)
        if self._on_connect is not None:  # first: what it sends is under way when ``connect`` returns
            self._on_connect(present)
        if not self._first.done():
            self._first.set_result(present)

    def _handle_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connected.clear()
        if not self._first.done():
            self._first.set_exception(ClosedBeforeLogin(self.where))
        self._fail_pending(str(reason))
        if self._on_drop is not None:
            self._on_drop(str(reason))

    def _handle_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        message = message_of(msg)
        with self._lock:
            handlers = [h for f, h in self._routes.items() if matches(f, message.topic)]
        if not handlers:
            self.messages.put(message)
        for handler in handlers:
            try:
                handler(message)
            except Exception:  # a bad message must not end paho's thread
                log.exception("cannot take a message on %s", message.topic)

    def _handle_ack(self, _c: Any, _u: Any, mid: int, reasons: Any, _p: Any) -> None:
        words = [failure(r) for r in (reasons if isinstance(reasons, list) else [reasons])]
        with self._lock:
            found = self._pending.pop(mid, None)
            if found is None:
                self._early[mid] = words
                if len(self._early) > _EARLY_KEPT:  # never expected: bounded all the same
                    del self._early[next(iter(self._early))]
        if found is None:
            return
        ack, topics, refusal = found
        ack.settle(answer(self.where, words, topics, refusal))


def _pairs(filters: str | Sequence[str | tuple[str, int]], qos: int) -> list[tuple[str, int]]:
    """``filters`` as (filter, QoS) pairs, ``qos`` where none is given."""
    return [
        (f, qos) if isinstance(f, str) else f for f in ([filters] if isinstance(filters, str) else filters)
    ]
