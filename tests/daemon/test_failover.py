"""Failover between two real mosquitto processes, both set up by ``edge-fleet broker init``.

The agent is configured with both brokers; the first one is killed (``kill -9``:
it saves nothing) while a job streams.  A caller that listens on both brokers,
as one would behind bridged brokers, must get every accepted job's result
exactly once, and the stream must go on through the second broker.  Chunks the
dead broker had acknowledged but not yet forwarded die with it (QoS 1 is
hop by hop): the stream is complete from the switch on, not before it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import Broker
from tests.support.models import fixture_path
from tests.support.mqtt_client import Caller
from tests.support.pki import Fleet

pytestmark = pytest.mark.e2e

JOBS = "edge/box-1/jobs"
REPLIES = "edge/replies/failover"


def _accepted(state_dir: Path) -> set[str]:
    """Ids of the jobs the agent has stored (and so acknowledged or is about to)."""
    db = sqlite3.connect(f"file:{state_dir / 'jobs.sqlite3'}?mode=ro", uri=True)
    try:
        return {row[0] for row in db.execute("SELECT id FROM jobs")}
    except sqlite3.OperationalError:  # the agent has not created the table yet
        return set()
    finally:
        db.close()


def _results(callers: list[Caller], job_id: str) -> list[dict[str, Any]]:
    return [r for c in callers for r in c.results(job_id)]


def test_killing_the_current_broker_mid_stream_loses_no_job(tmp_path: Path, fleet: Fleet, agents) -> None:  # type: ignore[no-untyped-def]
    first, second = Broker(tmp_path / "first", fleet), Broker(tmp_path / "second", fleet)
    first.start()
    second.start()
    callers: list[Caller] = []
    try:
        agent = agents(
            fixture_path("llama-long"),
            on=first,
            jobs={"max_tokens_limit": 4000},
            mqtt={"brokers": [f"{b.host}:{b.port}" for b in (first, second)]},
        )
        agent.start()  # online on the first broker
        callers = [Caller(b.host, b.operator_port, REPLIES, identity=fleet.operator) for b in (first, second)]
        jobs = {"fo-0": 2500, "fo-1": 40, "fo-2": 40, "fo-3": 40}
        for job_id, max_tokens in jobs.items():
            callers[0].send(
                JOBS,
                {"id": job_id, "prompt": "hello", "max_tokens": max_tokens, "stream": job_id == "fo-0"},
                response_topic=REPLIES,
            )
        end = time.monotonic() + 30
        while _accepted(agent.state_dir) != set(jobs) or len(callers[0].chunks("fo-0")) < 5:
            assert time.monotonic() < end, "the agent did not accept the jobs and start streaming"
            time.sleep(0.02)
        first.kill()
        assert not _results(callers, "fo-0"), "the kill must land mid-stream for this test to mean anything"

        # A job sent after the switch goes to the second broker, once the agent is there: its
        # session on that broker begins with its first connection to it (see README, Failover).
        callers[1].subscribe("edge/box-1/status")
        while True:
            topic, payload, _corr = callers[1].raw.get(timeout=30)
            if topic == "edge/box-1/status" and json.loads(payload)["online"]:
                break
        callers[1].send(JOBS, {"id": "fo-4", "prompt": "hi", "max_tokens": 5}, response_topic=REPLIES)
        jobs["fo-4"] = 5
        end = time.monotonic() + 90
        while not all(_results(callers, job_id) for job_id in jobs):
            assert time.monotonic() < end, {j: len(_results(callers, j)) for j in jobs}
            time.sleep(0.05)
        # A job sent after them is answered after any duplicate of theirs would have been.
        callers[1].send(JOBS, {"id": "fo-marker", "prompt": "hi", "max_tokens": 1}, response_topic=REPLIES)
        end = time.monotonic() + 90
        while not _results(callers, "fo-marker"):
            assert time.monotonic() < end, "the marker job was not answered"
            time.sleep(0.05)
        for job_id, max_tokens in jobs.items():
            results = _results(callers, job_id)
            assert len(results) == 1, f"{job_id}: {len(results)} results"
            assert (
                results[0]["status"] == "succeeded" and results[0]["usage"]["completion_tokens"] == max_tokens
            )
        text = _results(callers, "fo-0")[0]["text"]
        after = sorted((c["seq"], c["text"]) for c in callers[1].chunks("fo-0"))
        assert after, "the stream went on through the second broker"
        seqs = [seq for seq, _ in dict(after).items()]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a chunk is missing after the switch"
        assert text.endswith("".join(dict(after).values())), "the chunks after the switch end the text"
        assert f"failing over to broker {second.host}:{second.port}" in agent.log_text()
    finally:
        for caller in callers:
            caller.close()
        first.cleanup()
        second.cleanup()
