"""Beyond one broker, proven: a 3-node NATS cluster (MQTT listeners, JetStream with three replicas).

An agent configured with all three nodes loses the node it is connected to (``kill -9``) while a
job streams; every job is answered exactly once, the retained desired state survives, and the
operator's tools (over MQTT 3.1.1: NATS has no MQTT 5) deploy, reconcile and read the fleet through
another node.  What NATS's MQTT cannot do (MQTT 5, shared subscriptions, hence group jobs and
``edge-fleet submit``) is said in the README.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.agent import AgentProcess
from tests.support.broker import running
from tests.support.models import fixture_path
from tests.support.mqtt_client import Caller
from tests.support.nats_cluster import NatsCluster

pytestmark = pytest.mark.e2e


@pytest.fixture()
def cluster(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Three nats-server nodes on free ports, stopped after the test."""
    yield from running(NatsCluster(tmp_path / "nats"))


def _fleet(node, *args: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    """edge-fleet against ``node``: the profile's variables say where and how (3.1.1, plain TCP)."""
    env = {
        **os.environ,
        "EDGE_FLEET_BROKER": f"{node.host}:{node.port}",
        "EDGE_FLEET_PLAINTEXT": "1",
        "EDGE_FLEET_PROTOCOL": "3.1.1",
    }
    return subprocess.run(
        [sys.executable, "-m", "edge_fleet.cli", *args], capture_output=True, text=True, env=env, timeout=180
    )


def _retained(node, topic: str, within: float = 2.0) -> bytes | None:  # type: ignore[no-untyped-def]
    """The retained message on ``topic`` if one arrives ``within`` seconds of subscribing (a poll:
    NATS sends retained messages from JetStream, in no order relative to other traffic)."""
    caller = Caller(node.host, node.port, reply_filter="test/nothing/#", mqtt5=False)
    try:
        caller.subscribe(topic)
        end = time.monotonic() + within
        while True:
            found = [body for t, body, _c in list(caller.raw.queue) if t == topic and body]
            if found or time.monotonic() >= end:
                return found[-1] if found else None
            time.sleep(0.05)
    finally:
        caller.close()


def _wait(probe, what: str, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while (found := probe()) is None:
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)
    return found


def _eventually_retained(node, topic: str, expected: bytes, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    """Each node serves retained messages from its own copy of JetStream's retained-message stream,
    which lags the stream by a moment (and by a leader election after a node was lost)."""
    deadline = time.monotonic() + timeout
    while (found := _retained(node, topic)) != expected:
        assert time.monotonic() < deadline, f"{topic} on {node.name}: {found!r}"


def test_an_agent_survives_losing_its_node_and_the_operator_tools_work_on_the_cluster(
    cluster, releases, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    agent = AgentProcess(
        cluster.nodes[0],  # type: ignore[arg-type]  (the harness needs host, port and the fleet fields only)
        tmp_path / "agent",
        fixture_path("phi3-int4"),
        device_id="box-1",
        group="shop",
        mqtt={"protocol": "3.1.1", "brokers": [f"{n.host}:{n.port}" for n in cluster.nodes]},
        model_version="1.0.0",
        update={"trusted_keys": [releases.public_line]},
    )
    caller: Caller | None = None
    try:
        agent.start()
        # Usually the first node; another one if the first's MQTT was not ready yet.
        home = _wait(lambda: cluster.node_of("box-1"), "the agent's node")
        second, third = [n for n in cluster.nodes if n is not home]
        caller = Caller(third.host, third.port, reply_filter=["edge/+/results/#"], mqtt5=False)
        manifest = releases.make("2.0.0", fixture="phi3-int4", name="phi3-int4")
        path = tmp_path / "manifest.json"
        path.write_text(manifest.model_dump_json())
        deployed = _fleet(second, "deploy", str(path), "--device", "box-1", "--wait", "--wait-timeout", "120")
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        assert "box-1: active phi3-int4@2.0.0" in deployed.stdout

        desired = manifest.model_dump_json().encode()
        _eventually_retained(third, "edge/box-1/model/desired", desired)  # on every node, before the loss
        jobs = [f"j{i}" for i in range(5)]
        for job in jobs:
            # Sampled with a seed that runs long (this random-weight model's greedy answer ends at once).
            request = {"id": job, "prompt": "The box reports", "max_tokens": 1000, "stream": True}
            caller.send("edge/box-1/jobs", {**request, "temperature": 1.0, "seed": 4}, response_topic=None)
        deadline = time.monotonic() + 60
        while not caller.chunks("j0"):
            assert time.monotonic() < deadline, (
                f"no chunk of the first job; caller got {[b[:200] for _t, b, _c in list(caller.raw.queue)]}; "
                f"agent log:\n{agent.log_text()[-3000:]}"
            )
            time.sleep(0.01)
        home.kill()  # mid-stream: the node the agent is connected to
        for job in jobs:
            result = caller.wait_result(job, timeout=180)
            assert result["status"] == "succeeded", result
        assert caller.results("j0")[0]["usage"]["completion_tokens"] > len(caller.chunks("j0")) // 2 > 0
        # A job sent after them is answered after any late duplicate of theirs would have been
        # delivered (the agent takes its jobs in order, and a redelivery comes before new messages).
        caller.send("edge/box-1/jobs", {"id": "marker", "prompt": "hi", "max_tokens": 2}, response_topic=None)
        assert caller.wait_result("marker", timeout=120)["status"] == "succeeded"
        for job in jobs:
            distinct = {r["text"] for r in caller.results(job)}
            assert len(distinct) == 1, (job, caller.results(job))  # answered exactly once
        moved = cluster.node_of("box-1")
        assert moved in (second, third), "the agent did not move to another node"

        # The retained desired state survived the node (once JetStream has elected new stream leaders,
        # which takes some seconds after losing one); reconcile and status work through the cluster.
        _eventually_retained(second, "edge/box-1/model/desired", desired)
        reconciled = _fleet(third, "reconcile")
        assert reconciled.returncode == 0 and "1 device" in reconciled.stdout, (
            reconciled.stdout + reconciled.stderr
        )
        _eventually_retained(third, "edge/box-1/model/desired", desired)
        deadline = time.monotonic() + 60
        while True:
            status = _fleet(second, "status", "--json")
            if '"online": true' in status.stdout and '"version": "2.0.0"' in status.stdout:
                break
            assert time.monotonic() < deadline, status.stdout
            time.sleep(2)
    finally:
        if caller is not None:
            caller.close()
        agent.stop()
