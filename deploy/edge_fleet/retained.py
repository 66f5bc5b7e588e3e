"""``edge-fleet broker sweep``: the retained-message limit for device identities.

mosquitto 2.0 has no per-client quota of retained messages, its dynamic-security
rules cannot tell a retained publication from another, and ``retain_available``
is global (boxes need their retained status and model state, operators their
retained desired state).  So the limit is enforced from the operators' side:
boxes have no reason to retain anything on the topics below, and the sweep clears
every retained message it finds there (an empty retained publication deletes it):

* ``PREFIX/replies/#`` — answers to callers;
* ``PREFIX/+/results/#`` — answers with no response topic;
* ``PREFIX/+/telemetry`` — a stream, never state.

It subscribes with *retain as published*, so a retained message published while
it runs is seen as such and cleared at once (``--follow``, e.g. as a service
beside the broker); without ``--follow`` it clears what is stored and exits.
What stays retained is what boxes need: ``PREFIX/D/status`` and
``PREFIX/D/model/state`` (one message each per device name, bounded by the
broker's ``max_packet_size``).
"""

from __future__ import annotations

import argparse
import queue
import time

from agent.link.mqtt import Message, PublishRefused, SubscribeRefused
from edge_contract.errors import LinkError
from edge_contract.protocol import FleetTopics

from .broker import BrokerOptions, FleetError, add_broker_args, open_client, options_from, refusal

#: A sweep without --follow ends after this long without a retained message to clear.
QUIET_S = 1.0


def swept_filters(prefix: str) -> list[str]:
    """The topics where devices may publish but have no reason to retain."""
    fleet = FleetTopics(prefix)
    return [fleet.replies, fleet.any_results, fleet.any_telemetry]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``broker sweep`` (under ``broker``)."""
    sweep = sub.add_parser(
        "sweep",
        help="clear retained messages where devices have no reason to retain (replies, results, telemetry)",
    )
    sweep.add_argument("--follow", action="store_true", help="keep clearing as they come (a service)")
    add_broker_args(sweep)
    sweep.set_defaults(func=sweep_command)


def sweep_command(args: argparse.Namespace) -> int:
    """``edge-fleet broker sweep [--follow]``."""
    cleared = sweep(options_from(args), follow=args.follow)
    print(
        f"cleared {cleared} retained message(s) under {', '.join(swept_filters(options_from(args).prefix))}"
    )
    return 0


def sweep(options: BrokerOptions, *, follow: bool = False, quiet_s: float = QUIET_S) -> int:
    """Clear the retained messages under ``swept_filters``; returns how many."""
    found: queue.SimpleQueue[str] = queue.SimpleQueue()

    def take(msg: Message) -> None:
        if msg.retain and msg.payload:
            found.put(msg.topic)

    client = open_client(options, name="edge-fleet-sweep")
    cleared = 0
    try:
        client.route("#", take)
        try:
            client.subscribed(swept_filters(options.prefix), retain_as_published=True)
        except SubscribeRefused as exc:
            raise refusal(options, f"subscribing to {exc.topic}", exc.reason) from exc
        last = time.monotonic()
        while follow or time.monotonic() - last < quiet_s:
            try:
                topic = found.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                client.publish(topic, b"", retain=True).wait()
            except PublishRefused as exc:
                raise refusal(options, f"clearing {topic}", exc.reason) from exc
            except LinkError as exc:
                raise FleetError(f"clearing {topic}: {exc.message}") from exc
            cleared += 1
            last = time.monotonic()
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
    return cleared
