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

import queue
from dataclasses import dataclass

from agent.link.mqtt import Client, ConnectionLost, Message, NoAnswer
from edge_contract.errors import LinkError
from edge_contract.protocol import GroupTopics, Topics

from .broker import BrokerOptions, FleetError, connect_client, open_client

#: How long the broker keeps a moved device's session (the agent's default ``session_expiry_s``).
KEPT_EXPIRY_S = 7 * 24 * 3600
ATTEMPTS = 5
#: An UNSUBACK or PUBACK takes milliseconds; 10 s covers a busy broker and a slow link.
TIMEOUT_S = 10.0


def group_filters(prefix: str, group: str) -> list[str]:
    """Every subscription a member of ``group`` may hold (the agent's and a plain one)."""
    topics = GroupTopics(prefix, group)
    return [topics.shared_jobs, topics.jobs, topics.model_desired]


#: A message taken from the session: its response topic, correlation and other properties are
#: kept when it is published again (``Message.extra``).
Held = Message


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
        with open_client(options, name="edge-fleet-requeue") as client:
            for held in requeue:
                _publish(client, held)
        result.requeued += len(requeue)
    return result


class _TakenBack(Exception):
    """The device connected again and took its session back."""


def _settle_once(
    options: BrokerOptions, name: str, left: list[str], *, end: bool, result: Settled, requeue: list[Held]
) -> None:
    client = options.client(
        client_id=name,
        keep_session=True,
        session_expiry_s=0 if end else KEPT_EXPIRY_S,
        manual_ack=True,
    )
    present = connect_client(options, client, timeout=TIMEOUT_S)
    try:
        result.present = result.present or present
        filters = [f for group in left for f in group_filters(options.prefix, group)]
        # Unsubscribing from a filter the session never held: a round trip that changes nothing.
        barrier = filters or [Topics(options.prefix, name).status]
        for _round in range(1000):
            _round_trip(client, barrier, name)
            fresh = _drain(client.messages)  # arrived before the UNSUBACK
            if not fresh:
                break
            for message in fresh:
                what = disposition(message.topic, options.prefix, left, end=end)
                if what == "group":
                    _publish(client, message)
                    result.handed_back += 1
                elif what == "own":
                    requeue.append(message)
                else:
                    result.dropped += 1
                client.ack(message)
    except ConnectionLost as exc:
        raise _TakenBack(name) from exc
    finally:
        # No session was there: leave none behind either.
        client.close(end_session=not end and not present)


def _drain(held: queue.SimpleQueue[Held]) -> list[Held]:
    taken = []
    while True:
        try:
            taken.append(held.get_nowait())
        except queue.Empty:
            return taken


def _round_trip(client: Client, filters: list[str], name: str) -> None:
    """UNSUBSCRIBE ``filters`` and wait for the UNSUBACK: every message the broker sent before it
    has arrived by then (one connection's packets keep their order)."""
    try:
        client.unsubscribe(filters).wait(TIMEOUT_S)
    except NoAnswer as exc:
        raise FleetError(f"the broker did not answer an UNSUBSCRIBE within {TIMEOUT_S:.0f} s") from exc


def _publish(client: Client, held: Held) -> None:
    try:
        client.publish(
            held.topic,
            held.payload,
            response_topic=held.response_topic,
            correlation=held.correlation,
            extra=held.extra,
        ).wait(TIMEOUT_S)
    except ConnectionLost:
        raise
    except LinkError as exc:
        raise FleetError(
            f"publishing a held message again to {held.topic} was not acknowledged ({exc.message})"
        ) from exc
