"""The real daemon serves a repeated instruction from the prefix cache, also after a restart."""

from __future__ import annotations

import json
import time

import pytest

from agent import Engine, SamplingParams
from agent.engine.engine import EngineOptions
from tests.support.models import fixture_path

pytestmark = pytest.mark.e2e

JOBS = "edge/box-1/jobs"
INSTRUCTION = (
    "You are the maintenance assistant of a pumping station. Read the sensor log line below, "
    "classify it as normal, warning or fault, and answer with one short sentence. Log line: "
)


def _shared(prompt: str, *earlier: str) -> int:
    """Positions a token-exact cache can reuse for ``prompt`` after ``earlier`` prompts (all but two)."""
    engine = Engine(fixture_path("phi3-int4"), EngineOptions(prefix_cache_mb=0))
    ids = engine.prompt_ids(prompt)
    best = 0
    for other in map(engine.prompt_ids, earlier):
        n = 0
        while n < min(len(ids), len(other)) and ids[n] == other[n]:
            n += 1
        best = max(best, n)
    return min(best, len(ids) - 2)


def _expected(prompt: str, max_tokens: int) -> tuple[str, int]:
    """The text a cold engine gives (cache off), and the prompt's length in tokens."""
    engine = Engine(fixture_path("phi3-int4"), EngineOptions(prefix_cache_mb=0))
    ids = engine.prompt_ids(prompt)
    return engine.generate(ids, SamplingParams(max_tokens=max_tokens)).text, len(ids)


def test_warm_job_is_served_from_the_cache_across_a_restart(agents, caller) -> None:  # type: ignore[no-untyped-def]
    agent = agents()
    agent.start()
    caller.subscribe("edge/box-1/telemetry")
    first_prompt = INSTRUCTION + "pressure 4.1 bar, flow 12 l/s"
    caller.send(JOBS, {"id": "pc-1", "prompt": first_prompt, "max_tokens": 8})
    first = caller.wait_result("pc-1", timeout=60)
    assert first["status"] == "succeeded" and first["usage"]["cached_tokens"] == 0

    second_prompt = INSTRUCTION + "pressure 0.2 bar, flow 0 l/s"
    caller.send(JOBS, {"id": "pc-2", "prompt": second_prompt, "max_tokens": 8})
    second = caller.wait_result("pc-2", timeout=60)
    text, n_prompt = _expected(second_prompt, 8)
    assert second["text"] == text
    assert 0 < second["usage"]["cached_tokens"] == _shared(second_prompt, first_prompt) < n_prompt
    # Telemetry carries the cache's figures.
    deadline = time.monotonic() + 30
    cache = None
    while time.monotonic() < deadline and not (cache and cache["hits"] >= 1):
        found = [json.loads(p) for t, p, _ in list(caller.raw.queue) if t == "edge/box-1/telemetry"]
        cache = found[-1]["model"]["prefix_cache"] if found and found[-1].get("model") else None
        time.sleep(0.1)
    assert cache is not None and cache["hits"] >= 1 and cache["entries"] >= 1 and cache["bytes"] > 0
    assert cache["hit_rate"] == cache["hits"] / cache["lookups"]

    assert agent.terminate() == 0
    assert list((agent.state_dir / "prefix_cache").glob("*/*.kv")), "nothing was saved to disk"
    agent.start()
    third_prompt = INSTRUCTION + "pressure 9.9 bar, flow 40 l/s"
    caller.send(JOBS, {"id": "pc-3", "prompt": third_prompt, "max_tokens": 8})
    third = caller.wait_result("pc-3", timeout=60)
    text, n_prompt = _expected(third_prompt, 8)
    assert third["status"] == "succeeded" and third["text"] == text
    # From disk, token-exact: to the last token it shares with either earlier prompt.
    assert third["usage"]["cached_tokens"] == _shared(third_prompt, first_prompt, second_prompt) > 0
