"""A device's broker session, settled from the operators' listener: what ``revoke`` and ``move`` need.

mosquitto 2.0 keeps a persistent session — its subscriptions and the messages
queued in it — whatever the authorization state says: disabling a client only
disconnects it.  A revoked or moved box's session therefore kept its
``$share/G/…`` subscription, which went on drawing the group's jobs that the
broker then refused to deliver: lost (20/30 answered after a revoke, 7/20 after
a move while offline).

The one way mosquitto offers to change a session from outside is to take it
over: the operators' listener accepts any client id, so an operator connects
*as the device's client id* (clean start off: the session is resumed, not
discarded).  Then:

* the subscriptions of the groups the device left are removed (UNSUBSCRIBE);
* every message the session held is taken: a job of a group the device left is
  published again to that group (its other members answer it, response topic and
  correlation kept); a message for the device itself is put back in its session
  (``move``) or dropped (``revoke``: nobody can answer it);
* ``end``: the connection asked for a session expiry of 0, so the session ends
  when it disconnects; otherwise the session stays (with the agent's default
  expiry until the agent connects again and sets its own).

A running agent is disconnected by the takeover and comes back within a second
(its backoff); if it takes the session back before the work is done, the work is
done again (up to ``ATTEMPTS`` times).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.link.mqtt import no_delay
from edge_contract.protocol import GroupTopics, Topics

from .broker import BrokerOptions, FleetError, connect, connection_error, release

#: How long the broker keeps a moved device's session (the agent's default ``session_expiry_s``).
KEPT_EXPIRY_S = 7 * 24 * 3600
ATTEMPTS = 5
TIMEOUT_S = 10.0
#: Properties of a job that must survive being published again.
_KEPT_PROPERTIES = (
    "ResponseTopic",
    "CorrelationData",
    "UserProperty",
    "ContentType",
    "PayloadFormatIndicator",
    "MessageExpiryInterval",
)


def group_filters(prefix: str, group: str) -> list[str]:
    """Every subscription a member of ``group`` may hold (the agent's and a plain one)."""
    topics = GroupTopics(prefix, group)
    return [topics.shared_jobs, topics.jobs, topics.model_desired]


@dataclass(frozen=True)
class Held:
    """A message taken from the session."""

    topic: str
    payload: bytes
    properties: Any


@dataclass
class Settled:
    """What settling a session did."""

    present: bool = False  # the broker held a session for the device
    handed_back: int = 0  # jobs of a group it left, published again to that group
    requeued: int = 0  # its own messages, put back into its session
    dropped: int = 0  # messages nobody can answer any more (a revoked device's own, old desired state)


def disposition(topic: str, prefix: str, left: list[str], *, end: bool) -> str:
    """What becomes of a message the session held: ``group`` (to its group again), ``own``
    (back into the session) or ``drop``."""
    for group in left:
        of_group = GroupTopics(prefix, group)
        if topic == of_group.jobs:
            return "group"
        if topic == of_group.model_desired:
            return "drop"  # the old group's desired model: no longer this box's
    return "drop" if end else "own"


@dataclass
class _Connection:
    """The takeover connection's state, filled by paho's thread."""

    ready: threading.Condition = field(default_factory=threading.Condition)
    connack: str | None = None
    present: bool = False
    dropped: bool = False
    unacked: dict[int, int] = field(default_factory=dict)  # barrier mid -> answered
    held: list[tuple[int, Held]] = field(default_factory=list)


def settle(options: BrokerOptions, name: str, left: list[str], *, end: bool) -> Settled:
    """Settle device ``name``'s session (see the module); ``left``: the groups it left."""
    result = Settled()
    requeue: list[Held] = []
    for _attempt in range(ATTEMPTS):
        try:
            _settle_once(options, name, left, end=end, result=result, requeue=requeue)
            break
        except _TakenBack:
            continue
    else:
        raise FleetError(
            f"{name}'s agent kept taking its session back while it was being settled ({ATTEMPTS} times): "
            "run the command again"
        )
    if requeue:
        client = connect(options, name="edge-fleet-requeue")
        try:
            for held in requeue:
                _publish(client, held)
        finally:
            release(client)
        result.requeued += len(requeue)
    return result


class _TakenBack(Exception):
    """The device connected again and took its session back."""


def _settle_once(
    options: BrokerOptions, name: str, left: list[str], *, end: bool, result: Settled, requeue: list[Held]
) -> None:
    state = _Connection()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=MQTTProtocolVersion.MQTTv5)
    client.on_socket_open = no_delay
    client.manual_ack_set(True)
    options.configure(client)

    def on_connect(_c: Any, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        with state.ready:
            state.connack = str(reason) if reason.is_failure else "ok"
            state.present = bool(flags.session_present)
            state.ready.notify_all()

    def on_disconnect(*_a: Any) -> None:
        with state.ready:
            state.dropped = True
            state.ready.notify_all()

    def on_unsubscribe(_c: Any, _u: Any, mid: int, _r: Any, _p: Any) -> None:
        with state.ready:
            state.unacked[mid] = 1
            state.ready.notify_all()

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        held = Held(msg.topic, bytes(msg.payload), getattr(msg, "properties", None))
        with state.ready:
            state.held.append((msg.mid, held))

    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    client.on_unsubscribe, client.on_message = on_unsubscribe, on_message
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0 if end else KEPT_EXPIRY_S
    host, port = options.address
    try:
        client.connect(host, port, clean_start=False, properties=props)
    except OSError as exc:
        raise connection_error(options, exc) from exc
    client.loop_start()
    try:
        with state.ready:
            if not state.ready.wait_for(lambda: state.connack is not None or state.dropped, TIMEOUT_S):
                raise FleetError(f"the broker at {host}:{port} did not answer within {TIMEOUT_S:.0f} s")
            if state.connack is None:
                raise connection_error(options, None)
            if state.connack != "ok":
                raise FleetError(
                    f"the broker at {host}:{port} refused to settle {name}'s session: {state.connack}"
                )
            result.present = result.present or state.present
        filters = [f for group in left for f in group_filters(options.prefix, group)]
        # Unsubscribing from a filter the session never held: a round trip that changes nothing.
        barrier = filters or [Topics(options.prefix, name).status]
        taken = 0
        for _round in range(1000):
            _round_trip(client, state, barrier, name)
            with state.ready:
                fresh = state.held[taken:]
                taken = len(state.held)
            if not fresh:
                break
            for mid, held in fresh:
                what = disposition(held.topic, options.prefix, left, end=end)
                if what == "group":
                    _publish(client, held)
                    result.handed_back += 1
                elif what == "own":
                    requeue.append(held)
                else:
                    result.dropped += 1
                client.ack(mid, 1)
        if not end and not state.present:
            # No session was there: leave none behind either.
            gone = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            gone.SessionExpiryInterval = 0
            client.disconnect(properties=gone)
        else:
            client.disconnect()
    finally:
        client.loop_stop()
        sock = client.socket()
        if sock is not None:
            sock.close()


def _round_trip(client: paho.Client, state: _Connection, filters: list[str], name: str) -> None:
    """UNSUBSCRIBE ``filters`` and wait for the UNSUBACK: every message the broker sent before it
    has arrived by then (one connection's packets keep their order)."""
    _rc, mid = client.unsubscribe(filters)
    with state.ready:
        state.ready.wait_for(lambda: mid in state.unacked or state.dropped, TIMEOUT_S)
        if state.dropped:
            raise _TakenBack(name)
        if mid not in state.unacked:
            raise FleetError(f"the broker did not answer an UNSUBSCRIBE within {TIMEOUT_S:.0f} s")


def _publish(client: paho.Client, held: Held) -> None:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for name in _KEPT_PROPERTIES:
        value = getattr(held.properties, name, None) if held.properties is not None else None
        if value is not None:
            setattr(props, name, value)
    info = client.publish(held.topic, held.payload, qos=1, properties=props)
    info.wait_for_publish(TIMEOUT_S)
    if not info.is_published():
        raise FleetError(f"publishing a held message again to {held.topic} was not acknowledged")
