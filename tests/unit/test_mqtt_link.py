"""MQTTLink without a broker: payload limits per subscription and the failover order."""

from __future__ import annotations

import logging

import paho.mqtt.client as paho
import pytest

from agent.config import MQTTConfig
from agent.link.mqtt import DEFAULT_PAYLOAD_LIMIT, HEAD_BYTES, Message, MQTTLink


def _link(**mqtt: object) -> MQTTLink:
    config = MQTTConfig.model_validate({"allow_plaintext": True, **mqtt})
    return MQTTLink(
        config,
        "box-1",
        subscriptions=[
            "edge/box-1/jobs",
            "edge/box-1/jobs/cancel",
            "$share/g/edge/groups/g/jobs",
            "edge/x/#",
        ],
        payload_limits={
            "edge/box-1/jobs": 10_000,
            "edge/box-1/jobs/cancel": 100,
            "$share/g/edge/groups/g/jobs": 10_000,
        },
    )


def _deliver(link: MQTTLink, topic: str, size: int) -> Message:
    msg = paho.MQTTMessage(mid=1, topic=topic.encode())
    msg.payload = b"x" * size
    link._handle_message(link._client, None, msg)
    event = link.events.get_nowait()
    assert isinstance(event, Message)
    return event


@pytest.mark.parametrize(
    "topic,limit",
    [
        ("edge/box-1/jobs", 10_000),
        ("edge/box-1/jobs/cancel", 100),
        ("edge/groups/g/jobs", 10_000),
        ("edge/x/model/desired", DEFAULT_PAYLOAD_LIMIT),
    ],
)
def test_every_subscription_has_a_payload_limit(topic: str, limit: int) -> None:
    link = _link()
    within = _deliver(link, topic, limit)
    assert not within.truncated and within.size == limit and len(within.payload) == limit
    over = _deliver(link, topic, limit + 1)
    assert over.truncated and over.size == limit + 1 and len(over.payload) == min(HEAD_BYTES, limit + 1)


def test_a_failed_broker_hands_over_to_the_next_round_robin(caplog: pytest.LogCaptureFixture) -> None:
    link = _link(brokers=["a:1", "b:2", "c:3"])
    client = link._client
    client._host, client._port = link.endpoints[0]  # as connect_async sets them
    link._choose_endpoint(client, None)
    assert (client.host, client.port) == ("a", 1), "the first attempt goes to the first broker"
    seen = []
    for _ in range(4):
        link._handle_connect_fail(client, None)
        link._choose_endpoint(client, None)
        seen.append((client.host, client.port))
    assert seen == [("b", 2), ("c", 3), ("a", 1), ("b", 2)]
    link._choose_endpoint(client, None)
    assert (client.host, client.port) == ("b", 2), "no failure, no move"
    assert "failing over to broker c:3" in caplog.text


def test_plain_tcp_is_announced_at_start(caplog: pytest.LogCaptureFixture) -> None:
    link = _link(host="127.0.0.1", port=1)
    with caplog.at_level(logging.WARNING):
        link.start()
    link.stop()
    assert "plain TCP" in caplog.text
