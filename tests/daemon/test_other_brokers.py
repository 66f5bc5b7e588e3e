"""The same agent on another broker: nats-server's MQTT listener (MQTT 3.1.1, JetStream-backed).

Nothing in the protocol may depend on mosquitto.  NATS speaks MQTT 3.1.1 only,
so this runs the agent with ``protocol = "3.1.1"``: jobs, streamed results on
the default results topic, retained presence and a signed model update.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.agent import AgentProcess
from tests.support.broker import NatsBroker, running
from tests.support.models import fixture_path
from tests.support.mqtt_client import Caller
from tests.support.releases import payload

pytestmark = pytest.mark.e2e


@pytest.fixture()
def nats(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A nats-server with MQTT on a free port, stopped after the test."""
    yield from running(NatsBroker(tmp_path / "nats"))


def test_jobs_presence_and_a_model_update_over_nats_mqtt(nats, releases, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    caller = Caller(
        nats.host, nats.port, reply_filter=["edge/+/results/#", "edge/+/model/state"], mqtt5=False
    )
    agent = AgentProcess(
        nats,  # type: ignore[arg-type]  (the agent harness needs only host, port and the fleet fields)
        tmp_path / "agent",
        fixture_path("phi3-int4"),
        mqtt={"protocol": "3.1.1"},
        model_version="1.0.0",
        update={"trusted_keys": [releases.public_line]},
    )
    try:
        agent.start()  # returns once the retained status says online
        caller.send(
            "edge/box-1/jobs",
            {"id": "n1", "prompt": "The box", "max_tokens": 8, "stream": True},
            response_topic=None,
        )
        result = caller.wait_result("n1")
        assert result["status"] == "succeeded" and result["_topic"] == "edge/box-1/results/n1"
        assert "".join(c["text"] for c in caller.chunks("n1")) == result["text"]

        caller.publish_retained("edge/box-1/model/desired", payload(releases.make("2.0.0")))
        state = caller.wait_model_state(
            "box-1",
            lambda s: (s.get("active") or {}).get("version") == "2.0.0" and s["update"]["phase"] == "active",
        )
        assert state["previous"] is None
        caller.send(
            "edge/box-1/jobs", {"id": "n2", "prompt": "The box", "max_tokens": 4}, response_topic=None
        )
        assert caller.wait_result("n2")["model"] == {"name": "assistant", "version": "2.0.0"}
    finally:
        agent.stop()
        caller.close()
