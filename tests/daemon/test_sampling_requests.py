"""Requests cannot hurt the model: the issue's sampling parameters against a real agent, also on probation."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.releases import payload

pytestmark = pytest.mark.e2e

DESIRED = "edge/box-1/model/desired"
# The requests: each made Sampler raise IndexError (status failed/internal), and two of them
# during a probation rolled a good release back. The last one is a prompt Python's json accepts
# but no tokenizer does (a lone surrogate; the engine refuses it too, for callers of its API).
HURTFUL: list[tuple[bytes, str]] = [
    (b'{"id": "t-min", "prompt": "The box", "temperature": 5e-324}', "temperature"),
    (b'{"id": "t-sub", "prompt": "The box", "temperature": 1e-310}', "temperature"),
    (
        b'{"id": "rp", "prompt": "The box", "temperature": 1, "repetition_penalty": 1e-45}',
        "repetition_penalty",
    ),
    (b'{"id": "sur", "prompt": "lone \\ud800 surrogate"}', "prompt"),
]


def _active(version: str):  # type: ignore[no-untyped-def]
    return lambda s: (
        (s.get("active") or {}).get("version") == version and (s.get("update") or {}).get("phase") == "active"
    )


def test_hurtful_sampling_requests_are_refused_and_never_count_against_a_model_on_probation(  # type: ignore[no-untyped-def]
    broker, caller, agents, releases
) -> None:
    caller.subscribe("edge/+/model/state")
    agent = agents(
        model_version="1.0.0",
        update={"trusted_keys": [releases.public_line], "probation_jobs": 10, "max_failed_jobs": 2},
    )
    agent.start()
    caller.publish_retained(DESIRED, payload(releases.make("2.0.0")))
    caller.wait_model_state("box-1", _active("2.0.0"))  # on probation now
    for body, named in HURTFUL:
        job_id = body.split(b'"')[3].decode()
        caller.send("edge/box-1/jobs", body)
        answer: dict[str, Any] = caller.wait_result(job_id)
        assert answer["status"] == "rejected", answer
        assert answer["error"]["code"] == "invalid_request", answer
        assert named in answer["error"]["message"], answer
    # Four request errors later the release still serves: the worker would have rolled it back
    # before taking this job had they counted (2 failures of the first 10 jobs roll back).
    caller.send("edge/box-1/jobs", {"id": "good", "prompt": "The box", "max_tokens": 4, "temperature": 0.001})
    good = caller.wait_result("good")
    assert good["status"] == "succeeded", good
    assert good["model"] == {"name": "assistant", "version": "2.0.0"}
    states = [s for s in caller.model_states["box-1"] if s.get("update")]
    assert all(s["update"]["phase"] != "rolled_back" for s in states), states
    assert "Traceback" not in agent.log_text()
