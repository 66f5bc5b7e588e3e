"""Jobs over a real mosquitto, answered by a real ``edge-agent run`` process."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.support.models import fixture_path
from tests.support.reference import greedy
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

JOBS = "edge/box-1/jobs"
PROBE = "test/probe/cli"


def _mosquitto_pub(broker, *args: str) -> None:  # type: ignore[no-untyped-def]
    """``mosquitto_pub`` (MQTT 5, QoS 1) to the test broker with ``args``."""
    command = ["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-V", "mqttv5", "-q", "1"]
    subprocess.run([*command, *args], check=True, timeout=10)


def test_mosquitto_pub_v5_job_answers_on_response_topic_with_correlation(broker, agents) -> None:  # type: ignore[no-untyped-def]
    agents().start()
    _mosquitto_pub(broker, "-r", "-t", PROBE, "-m", "probe")
    sub = subprocess.Popen(
        [
            "mosquitto_sub",
            "-h",
            broker.host,
            "-p",
            str(broker.port),
            "-V",
            "mqttv5",
            "-t",
            PROBE,
            "-t",
            "edge/replies/cli",
            "-C",
            "2",
            "-W",
            "30",
            "-F",
            "%D|%p",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    # The retained probe is sent on subscribing: once it is printed, the reply cannot be missed.
    assert sub.stdout is not None and sub.stdout.readline() == "|probe\n"
    _mosquitto_pub(
        broker,
        *("-t", JOBS, "-m", json.dumps({"id": "cli-1", "prompt": "The quick brown fox", "max_tokens": 12})),
        *("-D", "publish", "response-topic", "edge/replies/cli"),
        *("-D", "publish", "correlation-data", "corr-42"),
    )
    out, _ = sub.communicate(timeout=40)
    correlation, _, payload = out.strip().partition("|")
    assert correlation == "corr-42"
    result = json.loads(payload)
    # Computed by the agent's own interpreter: greedy int4 tokens differ between instruction sets.
    expected = greedy(fixture_path("phi3-int4"), prompt="The quick brown fox", max_tokens=12)
    assert result["type"] == "result" and result["id"] == "cli-1"
    assert result["status"] == "succeeded"
    assert result["text"] == expected.text
    assert result["finish_reason"] == expected.finish_reason
    assert result["usage"] == {
        "prompt_tokens": expected.prompt_tokens,
        "completion_tokens": expected.completion_tokens,
        "cached_tokens": 0,  # the daemon's first job: nothing cached yet
    }
    assert result["model"]["name"] == "phi3-int4"
    assert result["timings"]["prefill_ms"] > 0


def test_streamed_chunks_arrive_in_order_before_the_result(agents, caller) -> None:  # type: ignore[no-untyped-def]
    agents().start()
    caller.send(
        JOBS, {"id": "s-1", "prompt": "Grüße aus Köln", "max_tokens": 60, "stream": True}, correlation=b"c1"
    )
    result = caller.wait_result("s-1")
    replies = caller.replies["s-1"]
    chunks = [r for r in replies if r["type"] == "chunk"]
    assert replies[-1]["type"] == "result", "the result must come last"
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert len(chunks) >= 2
    assert "".join(c["text"] for c in chunks) == result["text"]
    assert all(r["_correlation"] == b"c1" for r in replies)


def test_chat_messages_job(agents, caller) -> None:  # type: ignore[no-untyped-def]
    agents().start()
    messages = [{"role": "user", "content": "hello"}]
    caller.send(JOBS, {"id": "chat-1", "messages": messages, "max_tokens": 10})
    result = caller.wait_result("chat-1")
    expected = greedy(fixture_path("phi3-int4"), messages=messages, max_tokens=10)
    assert result["status"] == "succeeded" and result["text"] == expected.text


def test_without_response_topic_replies_go_to_the_results_topic(agents, caller) -> None:  # type: ignore[no-untyped-def]
    agents().start()
    caller.send(JOBS, {"id": "plain-1", "prompt": "hi", "max_tokens": 4}, response_topic=None)
    result = caller.wait_result("plain-1")
    assert result["_topic"] == "edge/box-1/results/plain-1"


def test_a_repeated_job_is_not_run_again_and_gets_the_stored_result_on_its_own_reply_topic(
    agents, caller
) -> None:  # type: ignore[no-untyped-def]
    agent = agents()
    agent.start()
    job = {"id": "dup-1", "prompt": "The quick brown fox", "max_tokens": 8}
    caller.send(JOBS, job, response_topic="edge/replies/first")
    first = caller.wait_result("dup-1")
    caller.send(JOBS, job, response_topic="edge/replies/second", correlation=b"again")
    wait_until(lambda: len(caller.results("dup-1")) >= 2, what="the stored result again")
    again = caller.results("dup-1")[1]
    assert again["_topic"] == "edge/replies/second" and again["_correlation"] == b"again"
    assert again["text"] == first["text"] and again["usage"] == first["usage"]
    assert "duplicate of finished job dup-1" in agent.log_text()


def test_a_job_id_reused_for_another_request_gets_duplicate_id_on_its_own_reply_topic(agents, caller) -> None:  # type: ignore[no-untyped-def]
    agents().start()
    caller.send(
        JOBS,
        {"id": "dup-2", "prompt": "The quick brown fox", "max_tokens": 8},
        response_topic="edge/replies/a",
    )
    first = caller.wait_result("dup-2")
    assert first["status"] == "succeeded" and first["_topic"] == "edge/replies/a"
    caller.send(
        JOBS, {"id": "dup-2", "prompt": "something else", "max_tokens": 30}, response_topic="edge/replies/b"
    )
    second = wait_until(
        lambda: [r for r in caller.results("dup-2") if r["_topic"] == "edge/replies/b"], what="an answer on b"
    )[0]
    assert second["status"] == "rejected" and second["error"]["code"] == "duplicate_id"
    # Positive control for "the first caller got nothing new": a later job's result arrives on a
    # first, and still only the one result for dup-2 is there.
    caller.send(JOBS, {"id": "after-dup", "prompt": "hi", "max_tokens": 2}, response_topic="edge/replies/a")
    caller.wait_result("after-dup")
    assert [r["status"] for r in caller.results("dup-2") if r["_topic"] == "edge/replies/a"] == ["succeeded"]


def test_expired_jobs(agents, caller) -> None:  # type: ignore[no-untyped-def]
    agents().start()
    caller.send(JOBS, {"id": "old-1", "prompt": "hi", "expires_at": time.time() - 5})
    result = caller.wait_result("old-1")
    assert result["status"] == "expired" and result["error"]["code"] == "expired"
    caller.send(JOBS, {"id": "fresh-1", "prompt": "hi", "max_tokens": 3, "ttl_s": 60})
    assert caller.wait_result("fresh-1")["status"] == "succeeded"


def test_mqtt_311_mode_serves_jobs(agents, caller) -> None:  # type: ignore[no-untyped-def]
    agents(mqtt={"protocol": "3.1.1"}).start()
    from tests.support.mqtt_client import Caller

    old = Caller(caller.client.host, caller.client.port, reply_filter="edge/box-1/results/#", mqtt5=False)
    try:
        old.send(JOBS, {"id": "v311-1", "prompt": "hi", "max_tokens": 5, "stream": True}, response_topic=None)
        result = old.wait_result("v311-1")
        assert result["status"] == "succeeded"
        assert result["_topic"] == "edge/box-1/results/v311-1"
    finally:
        old.close()


def test_sigterm_exits_cleanly_and_announces_offline_with_its_group(broker, agents, caller) -> None:  # type: ignore[no-untyped-def]
    agent = agents(group="shop-3")
    agent.start()
    caller.subscribe("edge/box-1/status")
    caller.send(JOBS, {"id": "t-1", "prompt": "hi", "max_tokens": 5})
    result = caller.wait_result("t-1")
    assert result["device_id"] == "box-1"
    assert agent.terminate() == 0

    def offline() -> dict | None:  # type: ignore[type-arg]
        statuses = [json.loads(p) for t, p, _ in list(caller.raw.queue) if t == "edge/box-1/status"]
        return statuses[-1] if statuses and statuses[-1]["online"] is False else None

    status = wait_until(offline, what="the offline status")
    assert status["device_id"] == "box-1" and status["group"] == "shop-3"
    log = agent.log_text()
    assert "starting: device box-1, group shop-3, model phi3-int4@unversioned, broker(s) 127.0.0.1:" in log
    assert "job t-1 succeeded: " in log and " ms" in log


def test_the_last_will_names_the_device_and_its_group(broker, agents, caller) -> None:  # type: ignore[no-untyped-def]
    agent = agents(group="shop-3")
    agent.start()
    caller.subscribe("edge/box-1/status")
    wait_until(lambda: any(t == "edge/box-1/status" for t, _p, _c in list(caller.raw.queue)), what="online")
    agent.kill()  # no clean shutdown: the broker sees the socket close and publishes the will

    def will() -> dict | None:  # type: ignore[type-arg]
        statuses = [json.loads(p) for t, p, _ in list(caller.raw.queue) if t == "edge/box-1/status"]
        return statuses[-1] if statuses and statuses[-1]["online"] is False else None

    status = wait_until(will, timeout=30, what="the Last Will")
    assert status == {**status, "online": False, "device_id": "box-1", "group": "shop-3"}
