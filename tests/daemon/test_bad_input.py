"""Bad input gets a precise answer, and the agent keeps serving."""

from __future__ import annotations

import json
import os
import signal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.models import fixture_path

pytestmark = pytest.mark.e2e

JOBS = "edge/box-1/jobs"


@pytest.fixture()
def served(agents, caller):  # type: ignore[no-untyped-def]
    agent = agents(jobs={"max_payload_bytes": 4096})
    agent.start()
    return agent, caller


def _error(caller, job_id: str) -> dict:  # type: ignore[no-untyped-def]
    result = caller.wait_result(job_id)
    assert result["status"] == "rejected", result
    assert result["error"]["message"]
    return result["error"]


@pytest.mark.parametrize(
    "payload,code,field",
    [
        ({"id": "u-1", "prompt": "hi", "temprature": 1}, "invalid_request", "temprature"),
        ({"id": "u-2", "prompt": "hi", "temperature": -1}, "invalid_request", "temperature"),
        ({"id": "u-3", "prompt": "hi", "max_tokens": "lots"}, "invalid_request", "max_tokens"),
        ({"id": "u-4"}, "invalid_request", "prompt or messages"),
        (
            {"id": "u-5", "prompt": "a", "messages": [{"role": "user", "content": "b"}]},
            "invalid_request",
            "exactly one",
        ),
        ({"id": "u-6", "messages": [{"role": "wizard", "content": "b"}]}, "invalid_request", "role"),
        ({"id": "u-7", "prompt": "hi", "stop": "x"}, "invalid_request", "stop"),
        ({"id": "u-8", "prompt": "hi", "max_tokens": 100000}, "invalid_request", "max_tokens"),
    ],
)
def test_schema_violations_are_rejected_with_the_field_named(served, payload, code, field) -> None:  # type: ignore[no-untyped-def]
    _, caller = served
    caller.send(JOBS, payload)
    error = _error(caller, payload["id"])
    assert error["code"] == code
    assert field in error["message"]


def test_invalid_json_with_a_readable_id_is_answered(served) -> None:  # type: ignore[no-untyped-def]
    _, caller = served
    caller.send(JOBS, b'{"id": "j-1", "prompt": "unterminated')
    assert _error(caller, "j-1")["code"] == "invalid_json"


def test_oversized_payload_is_rejected_unparsed(served) -> None:  # type: ignore[no-untyped-def]
    _, caller = served
    caller.send(JOBS, {"id": "big-1", "prompt": "x" * 10_000})
    error = _error(caller, "big-1")
    assert error["code"] == "payload_too_large" and "4096" in error["message"]


def test_prompt_longer_than_the_context(served) -> None:  # type: ignore[no-untyped-def]
    _, caller = served
    caller.send(JOBS, {"id": "long-1", "prompt": " ".join(str(i) for i in range(300))})
    error = _error(caller, "long-1")
    assert error["code"] == "context_overflow" and "context holds 256" in error["message"]


def test_messages_without_id_are_dropped_and_service_goes_on(served) -> None:  # type: ignore[no-untyped-def]
    agent, caller = served
    for junk in [
        b"",
        b"\xff\xfe\x00",
        b"[1,2,3]",
        b'{"prompt": "no id"}',
        b'{"id": 5}',
        b'{"id": "a/b#"}',
        b"null",
    ]:
        caller.send(JOBS, junk)
    caller.send("edge/box-1/jobs/cancel", b"not json")
    caller.send("edge/box-1/jobs/cancel", b'{"id": "after-1", "pad": "' + b"x" * 5000 + b'"}')
    caller.send(JOBS, {"id": "after-1", "prompt": "hi", "max_tokens": 3})
    assert caller.wait_result("after-1")["status"] == "succeeded"
    assert set(caller.replies) == {"after-1"}, "junk without an id must not be answered"
    assert agent.proc.poll() is None


@pytest.mark.parametrize("topic", ["test/replies/+", "test/#", "$SYS/x", "r" * 2000])
def test_a_response_topic_that_is_no_topic_name_is_answered_on_the_results_topic(served, topic) -> None:  # type: ignore[no-untyped-def]
    agent, caller = served
    caller.send(JOBS, {"id": "rt-1", "prompt": "hi", "max_tokens": 3}, response_topic=topic)
    error = _error(caller, "rt-1")
    assert error["code"] == "invalid_request" and "response topic" in error["message"]
    assert caller.wait_result("rt-1")["_topic"] == "edge/box-1/results/rt-1"
    assert agent.proc.poll() is None


def test_deeply_nested_json_is_answered_invalid_json_and_service_goes_on(agents, caller) -> None:  # type: ignore[no-untyped-def]
    agent = agents()  # the default 64 KiB limit: 30,000 levels fit under it
    agent.start()
    caller.send(JOBS, b'{"id": "deep", "prompt": "x", "z": ' + b"[" * 30000 + b"]" * 30000 + b"}")
    error = _error(caller, "deep")
    assert error["code"] == "invalid_json" and "nested" in error["message"]
    caller.send(JOBS, {"id": "after-deep", "prompt": "hi", "max_tokens": 2})
    assert caller.wait_result("after-deep")["status"] == "succeeded"
    assert agent.proc.poll() is None and "RecursionError" not in agent.log_text()


@pytest.mark.parametrize(
    "topic", ["edge/box-1/model/desired", "edge/box-2/jobs", "edge/box-1/status", "test/replies/x"]
)
def test_a_response_topic_outside_the_replies_subtree_is_refused(served, topic) -> None:  # type: ignore[no-untyped-def]
    agent, caller = served
    caller.subscribe(topic)
    caller.send(JOBS, {"id": "out-1", "prompt": "hi", "max_tokens": 3}, response_topic=topic)
    error = _error(caller, "out-1")
    assert error["code"] == "invalid_request" and "edge/replies/" in error["message"]
    assert caller.wait_result("out-1")["_topic"] == "edge/box-1/results/out-1"
    # Positive control: a reply topic under edge/replies/ is used; then nothing went to ``topic``.
    caller.send(JOBS, {"id": "in-1", "prompt": "hi", "max_tokens": 3}, response_topic="edge/replies/ok")
    assert caller.wait_result("in-1")["_topic"] == "edge/replies/ok"
    assert not [p for t, p, _c in list(caller.raw.queue) if t == topic and b"out-1" in p]
    assert agent.proc.poll() is None


def test_large_correlation_data_is_refused_and_never_echoed(served) -> None:  # type: ignore[no-untyped-def]
    agent, caller = served
    big = b"c" * 65535
    for i in range(5):
        caller.send(
            JOBS, {"id": f"corr-{i}", "prompt": "hi", "max_tokens": 40, "stream": True}, correlation=big
        )
    for i in range(5):
        error = _error(caller, f"corr-{i}")
        assert error["code"] == "invalid_request" and "correlation data is 65535 bytes" in error["message"]
        assert caller.results(f"corr-{i}")[0]["_correlation"] is None
    # Positive control: 256 bytes are echoed on every chunk and the result.
    small = b"k" * 256
    caller.send(JOBS, {"id": "corr-ok", "prompt": "hi", "max_tokens": 40, "stream": True}, correlation=small)
    assert caller.wait_result("corr-ok")["status"] == "succeeded"
    assert all(r["_correlation"] == small for r in caller.replies["corr-ok"])
    received = sum(len(p) + len(c or b"") for _t, p, c in list(caller.raw.queue))
    assert received < 100_000, f"{received} bytes came back"
    assert agent.proc.poll() is None


def test_full_queue_answers_busy(agents, caller) -> None:  # type: ignore[no-untyped-def]
    # llama-long runs every job to max_tokens (~0.6 s for 1,000 here), so the first job is
    # certainly still running while the intake sees the other seven.
    agent = agents(fixture_path("llama-long"), jobs={"max_queue": 2})
    agent.start()

    # Freeze the agent so all jobs are waiting for it at once when it resumes.
    os.kill(agent.proc.pid, signal.SIGSTOP)
    try:
        for i in range(8):
            caller.send(JOBS, {"id": f"q-{i}", "prompt": "The quick brown fox", "max_tokens": 1000})
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)
    results = {f"q-{i}": caller.wait_result(f"q-{i}", timeout=60) for i in range(8)}
    busy = [r for r in results.values() if r["status"] == "rejected"]
    assert busy and all(r["error"]["code"] == "busy" for r in busy)
    assert results["q-0"]["status"] == "succeeded"
    assert sum(r["status"] == "succeeded" for r in results.values()) >= 2


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=12,
)
_fields = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(alphabet="abc-_.:@/#+ ", min_size=0, max_size=8) | _json_values,
        "prompt": st.text(max_size=30) | _json_values,
        "messages": _json_values,
        "max_tokens": st.integers(-5, 300000) | _json_values,
        "temperature": st.floats(-1, 10) | _json_values,
        "top_p": st.floats(-1, 2),
        "top_k": st.integers(-10, 10**7),
        "stop": _json_values,
        "stream": _json_values,
        "ttl_s": _json_values,
        "junk": _json_values,
    },
)


def test_fuzzed_payloads_never_stop_the_agent(served) -> None:  # type: ignore[no-untyped-def]
    agent, caller = served
    sent = 0

    @settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.one_of(_fields.map(lambda d: json.dumps(d).encode()), st.binary(max_size=200)))
    def publish(payload: bytes) -> None:
        nonlocal sent
        # QoS 0 for the flood: the point is the agent's handling, not the broker's.
        caller.client.publish(JOBS, payload, qos=0)
        sent += 1

    publish()
    caller.send(JOBS, {"id": "sane-after-fuzz", "prompt": "hi", "max_tokens": 3})
    assert caller.wait_result("sane-after-fuzz", timeout=120)["status"] == "succeeded"
    assert agent.proc.poll() is None
    assert sent >= 1500
    assert "Traceback" not in agent.log_text()
