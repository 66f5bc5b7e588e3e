"""The daemon with ``[engine] max_batch = 4``: jobs decode together and keep every guarantee.

Each job's result is what the engine gives it alone (same machine, same kernels),
streamed in order; a canceled job leaves the batch while the others finish; kill -9
mid-batch then a restart gives exactly one result per job; telemetry reports the
batch's occupancy.
"""

from __future__ import annotations

import json

import pytest

from agent import Engine, SamplingParams
from agent.engine.engine import EngineOptions
from tests.support.models import fixture_path
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

JOBS = "edge/box-1/jobs"
BATCH = {"max_batch": 4}


@pytest.fixture()
def batch_agent(agents):  # type: ignore[no-untyped-def]
    agent = agents(fixture_path("llama-long"), jobs={"max_tokens_limit": 4000}, engine=BATCH)
    agent.start()
    return agent


def _settle(caller, ids: list[str], timeout: float = 90) -> dict[str, list[dict]]:  # type: ignore[no-untyped-def]
    return caller.settle(JOBS, ids, timeout=timeout)


def test_batched_jobs_get_their_solo_output_streamed(batch_agent, caller) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(fixture_path("llama-long"))
    prompts = ["hello", "The quick brown fox", "a", "Grüße aus Köln", "one two three", "x y"]
    ids = [f"b-{i}" for i in range(len(prompts))]
    for job_id, prompt in zip(ids, prompts, strict=True):
        caller.send(
            JOBS, {"id": job_id, "prompt": prompt, "max_tokens": 60 + 7 * len(prompt), "stream": True}
        )
    results = _settle(caller, ids)
    for job_id, prompt in zip(ids, prompts, strict=True):
        assert len(results[job_id]) == 1, f"{job_id}: {len(results[job_id])} results"
        result = results[job_id][0]
        solo = engine.generate(engine.prompt_ids(prompt), SamplingParams(max_tokens=60 + 7 * len(prompt)))
        assert result["status"] == "succeeded"
        assert result["text"] == solo.text
        assert result["usage"]["completion_tokens"] == solo.completion_tokens
        by_seq = {c["seq"]: c["text"] for c in caller.chunks(job_id)}
        assert "".join(by_seq[i] for i in sorted(by_seq)) == result["text"]
    assert "batching off" not in batch_agent.log_text()


def test_warm_jobs_in_a_batch_reuse_the_prefix_cache_and_answer_as_a_cold_solo_run(
    batch_agent, caller
) -> None:  # type: ignore[no-untyped-def]
    # Guarantees checked (docs/engine.md): batched = solo and prefix hit = cold, bit for bit,
    # on every CPU family CI runs; so each answer equals a cold solo run on this machine.
    instruction = "You are the till's assistant. Read the line below and answer in one line. " * 4
    inputs = ["hello", "The quick brown fox", "a", "one two three", "x y"]
    caller.send(JOBS, {"id": "w-0", "prompt": instruction + inputs[0], "max_tokens": 40})
    assert (
        caller.wait_result("w-0", timeout=60)["usage"]["cached_tokens"] == 0
    )  # the cold one fills the cache
    ids = [f"w-{i}" for i in range(1, len(inputs))]
    for job_id, text in zip(ids, inputs[1:], strict=True):
        caller.send(JOBS, {"id": job_id, "prompt": instruction + text, "max_tokens": 40})
    results = _settle(caller, ids)
    cold = Engine(fixture_path("llama-long"), EngineOptions(prefix_cache_mb=0))
    shared = len(cold.prompt_ids(instruction))
    for job_id, text in zip(ids, inputs[1:], strict=True):
        (result,) = results[job_id]
        want = cold.generate(cold.prompt_ids(instruction + text), SamplingParams(max_tokens=40))
        assert result["status"] == "succeeded"
        assert 0 < result["usage"]["cached_tokens"] <= shared, f"{job_id}: {result['usage']}"
        assert result["text"] == want.text and result["usage"]["completion_tokens"] == want.completion_tokens
    assert "batching off" not in batch_agent.log_text()


def test_a_canceled_job_leaves_the_batch_and_the_others_finish(batch_agent, caller) -> None:  # type: ignore[no-untyped-def]
    ids = ["c-0", "c-1", "c-2"]
    for job_id in ids:
        caller.send(JOBS, {"id": job_id, "prompt": "hello", "max_tokens": 3000, "stream": True})
    wait_until(lambda: len(caller.chunks("c-1")) >= 2, timeout=30, interval=0.01, what="c-1 streaming")
    assert caller.chunks("c-0") or caller.chunks("c-2"), (
        "the jobs must run together for this to mean anything"
    )
    caller.send("edge/box-1/jobs/cancel", {"id": "c-1"})
    results = _settle(caller, ids)
    assert results["c-1"][0]["status"] == "canceled"
    assert 0 < results["c-1"][0]["usage"]["completion_tokens"] < 3000
    for job_id in ("c-0", "c-2"):
        assert len(results[job_id]) == 1 and results[job_id][0]["status"] == "succeeded"
        assert results[job_id][0]["usage"]["completion_tokens"] == 3000


def test_kill_9_mid_batch_then_restart_gives_exactly_one_result_per_job(batch_agent, caller) -> None:  # type: ignore[no-untyped-def]
    ids = [f"k-{i}" for i in range(6)]
    for job_id in ids:
        caller.send(JOBS, {"id": job_id, "prompt": "hello", "max_tokens": 800, "stream": True})
    wait_until(
        lambda: sum(bool(caller.chunks(j)) for j in ids[:4]) >= 2,
        timeout=30,
        interval=0.01,
        what="two jobs streaming together",
    )
    batch_agent.kill()
    assert not any(caller.results(j) for j in ids), (
        "the kill must land mid-batch for this test to mean anything"
    )
    batch_agent.start()
    results = _settle(caller, ids)
    for job_id in ids:
        assert len(results[job_id]) == 1, f"{job_id}: {len(results[job_id])} results"
        assert results[job_id][0]["status"] == "succeeded"
        assert results[job_id][0]["usage"]["completion_tokens"] == 800


def test_telemetry_reports_batch_occupancy(batch_agent, caller) -> None:  # type: ignore[no-untyped-def]
    caller.subscribe("edge/box-1/telemetry")
    ids = [f"t-{i}" for i in range(4)]
    for job_id in ids:
        caller.send(JOBS, {"id": job_id, "prompt": "hello", "max_tokens": 400})
    _settle(caller, ids)

    def occupancy() -> float | None:
        for topic, payload, _ in list(caller.raw.queue):
            if topic == "edge/box-1/telemetry":
                value = json.loads(payload)["jobs"].get("batch_occupancy")
                if value:
                    return float(value)
        return None

    wait_until(
        lambda: occupancy() is not None, timeout=20, interval=0.1, what="telemetry with batch occupancy"
    )
    assert 0.25 < (occupancy() or 0.0) <= 1.0


@pytest.mark.parametrize("max_batch", [1, 4])
def test_a_speculating_agent_reports_drafted_accepted_and_cached_tokens(
    agents, caller, max_batch: int
) -> None:  # type: ignore[no-untyped-def]
    # Speculation, the prefix cache and batching compose: every job drafts, warm ones reuse the cache.
    agents(fixture_path("llama-long"), engine={"speculate": True, "max_batch": max_batch}).start()
    prompt = "a b a b a b a b a b"
    caller.send(JOBS, {"id": "s-0", "prompt": prompt, "max_tokens": 200})
    assert (
        caller.wait_result("s-0", timeout=60)["usage"]["cached_tokens"] == 0
    )  # the cold one fills the cache
    ids = ["s-1", "s-2", "s-3"]
    for job_id in ids:  # sent together: with max_batch = 4 they run at once
        caller.send(JOBS, {"id": job_id, "prompt": prompt + " a b", "max_tokens": 200})
    for job_id in ids:
        usage = caller.wait_result(job_id, timeout=90)["usage"]
        assert usage["completion_tokens"] >= 1
        assert usage["drafted_tokens"] >= 1 and 0 <= usage["accepted_tokens"] <= usage["drafted_tokens"]
        assert usage["cached_tokens"] > 0, f"{job_id}: {usage}"
