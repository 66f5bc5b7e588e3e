"""Nothing accepted is lost: cancel, kill -9, broker restarts, offline queues, shared load.

These use the ``llama-long`` fixture, whose greedy output never hits eos, so a
job runs exactly ``max_tokens`` tokens (4,000 take about two seconds here):
long enough to be interrupted mid-stream on purpose.
"""

from __future__ import annotations

import collections

import pytest

from tests.support.models import fixture_path
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

JOBS = "edge/box-1/jobs"
LONG_LIMITS = {"max_tokens_limit": 4000}


@pytest.fixture()
def long_agent(agents):  # type: ignore[no-untyped-def]
    agent = agents(fixture_path("llama-long"), jobs=LONG_LIMITS)
    agent.start()
    return agent


def _wait_chunks(caller, job_id: str, n: int = 1, timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
    wait_until(
        lambda: len(caller.chunks(job_id)) >= n,
        timeout=timeout,
        interval=0.01,
        what=f"{n} chunks of {job_id}",
    )


def _settle(caller, ids: list[str], timeout: float = 60, topic: str = JOBS) -> dict[str, list[dict]]:  # type: ignore[no-untyped-def]
    return caller.settle(topic, ids, timeout=timeout)


def _assert_stream_complete(caller, job_id: str, result: dict) -> None:  # type: ignore[no-untyped-def]
    by_seq = {c["seq"]: c["text"] for c in caller.chunks(job_id)}  # QoS 1 may repeat a chunk
    assert sorted(by_seq) == list(range(len(by_seq))), "a chunk is missing"
    assert "".join(by_seq[i] for i in range(len(by_seq))) == result["text"]


def test_cancel_a_running_job(long_agent, caller) -> None:  # type: ignore[no-untyped-def]
    caller.send(JOBS, {"id": "run-1", "prompt": "hello", "max_tokens": 4000, "stream": True})
    _wait_chunks(caller, "run-1")
    caller.send("edge/box-1/jobs/cancel", {"id": "run-1"})
    result = caller.wait_result("run-1")
    assert result["status"] == "canceled" and result["finish_reason"] == "canceled"
    assert result["error"]["code"] == "canceled"
    assert 0 < result["usage"]["completion_tokens"] < 4000


def test_cancel_a_queued_job(long_agent, caller) -> None:  # type: ignore[no-untyped-def]
    caller.send(JOBS, {"id": "first", "prompt": "hello", "max_tokens": 2000, "stream": True})
    caller.send(JOBS, {"id": "second", "prompt": "hello", "max_tokens": 2000})
    _wait_chunks(caller, "first")
    caller.send("edge/box-1/jobs/cancel", {"id": "second"})
    second = caller.wait_result("second")
    assert second["status"] == "canceled" and "before it started" in second["error"]["message"]
    assert caller.wait_result("first")["status"] == "succeeded"


def test_kill_9_mid_job_then_restart_gives_exactly_one_result_per_job(long_agent, caller) -> None:  # type: ignore[no-untyped-def]
    ids = [f"k-{i}" for i in range(4)]
    for job_id in ids:
        caller.send(JOBS, {"id": job_id, "prompt": "hello", "max_tokens": 600, "stream": True})
    _wait_chunks(caller, "k-0", n=3)
    long_agent.kill()
    assert not caller.results("k-0"), "the kill must land mid-job for this test to mean anything"
    long_agent.start()
    results = _settle(caller, ids)
    for job_id in ids:
        assert len(results[job_id]) == 1, f"{job_id}: {len(results[job_id])} results"
        assert results[job_id][0]["status"] == "succeeded"
        assert results[job_id][0]["usage"]["completion_tokens"] == 600


def test_broker_restart_mid_stream_loses_nothing(broker, long_agent, caller) -> None:  # type: ignore[no-untyped-def]
    caller.send(JOBS, {"id": "br-1", "prompt": "hello", "max_tokens": 3000, "stream": True})
    _wait_chunks(caller, "br-1", n=5)
    # Down until the agent has seen it go (it keeps generating meanwhile, chunks held for later).
    broker.restart(until=lambda: "disconnected from broker" in long_agent.log_text())
    caller.send(JOBS, {"id": "br-2", "prompt": "hello", "max_tokens": 50, "stream": True})
    results = _settle(caller, ["br-1", "br-2"])
    for job_id, max_tokens in (("br-1", 3000), ("br-2", 50)):
        assert len(results[job_id]) == 1
        result = results[job_id][0]
        assert result["status"] == "succeeded" and result["usage"]["completion_tokens"] == max_tokens
        _assert_stream_complete(caller, job_id, result)


def test_jobs_sent_while_the_agent_is_down_are_served_when_it_returns(agents, caller) -> None:  # type: ignore[no-untyped-def]
    agent = agents()
    agent.start()  # the first connection creates the persistent session
    assert agent.terminate() == 0
    ids = [f"off-{i}" for i in range(3)]
    for job_id in ids:
        caller.send(JOBS, {"id": job_id, "prompt": "hi", "max_tokens": 5})
    # The agent has exited, so nothing answers yet; the results after it starts are the positive control.
    assert not any(caller.results(j) for j in ids)
    agent.start()
    results = _settle(caller, ids)
    assert all(len(r) == 1 and r[0]["status"] == "succeeded" for r in results.values())


def test_sigterm_finishes_the_running_job_before_exit(long_agent, caller) -> None:  # type: ignore[no-untyped-def]
    caller.send(JOBS, {"id": "term-1", "prompt": "hello", "max_tokens": 1500, "stream": True})
    _wait_chunks(caller, "term-1")
    assert long_agent.terminate() == 0
    result = caller.wait_result("term-1", timeout=5)
    assert result["status"] == "succeeded" and result["usage"]["completion_tokens"] == 1500


def test_group_jobs_spread_over_two_agents_by_shared_subscription(agents, caller) -> None:  # type: ignore[no-untyped-def]
    for name in ("box-a", "box-b"):
        agents(fixture_path("llama-long"), device_id=name, group="pool", jobs=LONG_LIMITS).start()
    ids = [f"g-{i}" for i in range(16)]
    for job_id in ids:
        caller.send(
            "edge/groups/pool/jobs", {"id": job_id, "prompt": "hi", "max_tokens": 100}, response_topic=None
        )
    results = _settle(caller, ids, topic="edge/groups/pool/jobs")
    served_by = collections.Counter()
    for job_id in ids:
        assert len(results[job_id]) == 1, f"{job_id} answered {len(results[job_id])} times"
        served_by[results[job_id][0]["_topic"].split("/")[1]] += 1
    assert set(served_by) == {"box-a", "box-b"}, served_by


def test_a_job_that_expires_while_queued_is_answered_expired(long_agent, caller) -> None:  # type: ignore[no-untyped-def]
    caller.send(JOBS, {"id": "busy-1", "prompt": "hello", "max_tokens": 2000, "stream": True})
    _wait_chunks(caller, "busy-1")
    caller.send(JOBS, {"id": "short-ttl", "prompt": "hello", "max_tokens": 5, "ttl_s": 0.2})
    result = caller.wait_result("short-ttl")
    assert result["status"] == "expired" and "while it waited" in result["error"]["message"]
    assert caller.wait_result("busy-1")["status"] == "succeeded"


def test_sigterm_past_the_grace_checkpoints_the_job_and_it_runs_after_restart(agents, caller) -> None:  # type: ignore[no-untyped-def]
    agent = agents(fixture_path("llama-long"), jobs={**LONG_LIMITS, "shutdown_grace_s": 0.2})
    agent.start()
    caller.send(JOBS, {"id": "ckpt-1", "prompt": "hello", "max_tokens": 4000, "stream": True})
    _wait_chunks(caller, "ckpt-1")
    assert agent.terminate(timeout=15) == 0
    # A result the agent published before it exited would arrive before the one after the restart
    # (the broker delivers one subscriber's messages in order): the single result after it rules it out.
    assert caller.results("ckpt-1") == [], "a checkpointed job has no result yet"
    agent.start()
    results = _settle(caller, ["ckpt-1"])
    assert len(results["ckpt-1"]) == 1
    assert results["ckpt-1"][0]["status"] == "succeeded"
    assert results["ckpt-1"][0]["usage"]["completion_tokens"] == 4000
