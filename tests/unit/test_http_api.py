"""The HTTP dialects mapped onto the job contract, and the seam's pieces: pure, in-process."""

from __future__ import annotations

import sqlite3
from concurrent.futures import Future
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.config import HTTPConfig
from agent.daemon import intake
from agent.daemon.faults import StorageFaults
from agent.daemon.intake import Accept, Reply, Rules, Submission
from agent.daemon.outbox import Outbox
from agent.daemon.replies import Replies, cancel_local_orphans, local_address
from agent.health.telemetry import JobStats
from agent.jobs.store import JobStore
from edge_contract import openai_compat as api
from edge_contract.openai_compat import ApiError
from edge_contract.protocol import JobRequest, Result, Timings, Topics, Usage
from tests.unit.test_intake import NOW, RULES, View, msg

# -- requests --------------------------------------------------------------------------------------


def _bad(call: object) -> ApiError:
    with pytest.raises(ApiError) as info:
        call()  # type: ignore[operator]
    assert info.value.status == 400
    return info.value


def test_openai_chat_maps_onto_a_job_request() -> None:
    call = api.openai_chat(
        {
            "model": "demo",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Is it "}, {"type": "text", "text": "hot?"}],
                },
                {"role": "assistant", "content": None, "name": "ignored"},
            ],
            "max_completion_tokens": 12,
            "max_tokens": 99,
            "temperature": 0,
            "top_p": 0.9,
            "seed": 7,
            "stop": "\n",
            "n": 1,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "someone",  # unknown to the contract, harmless: ignored
        }
    )
    assert call.kind == "chat" and call.model == "demo" and call.stream and call.include_usage
    assert call.job == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Is it hot?"},
            {"role": "assistant", "content": ""},
        ],
        "max_tokens": 12,
        "temperature": 0,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["\n"],
        "stream": True,
    }
    JobRequest.model_validate({**call.job, "id": "x"})  # the contract takes it as is


def test_openai_chat_refuses_what_the_contract_cannot_do_naming_the_field() -> None:
    base = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    assert _bad(lambda: api.openai_chat({**base, "n": 2})).param == "n"
    assert _bad(lambda: api.openai_chat({**base, "tools": [{"type": "function"}]})).param == "tools"
    assert _bad(lambda: api.openai_chat({**base, "logprobs": True})).param == "logprobs"
    assert _bad(lambda: api.openai_chat({**base, "stream": "yes"})).param == "stream"
    assert _bad(lambda: api.openai_chat({"messages": base["messages"]})).param == "model"
    assert _bad(lambda: api.openai_chat({"model": "demo", "messages": []})).param == "messages"
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert _bad(lambda: api.openai_chat({"model": "demo", "messages": image})).param == "messages.0.content.0"
    assert _bad(lambda: api.openai_chat([1, 2])).param is None
    # positive control: the defaults that mean nothing pass
    assert api.openai_chat({**base, "n": 1, "tools": [], "logprobs": False, "presence_penalty": 0}).job


def test_openai_completion_takes_one_prompt_as_is() -> None:
    call = api.openai_completion({"model": "demo", "prompt": ["The device"], "max_tokens": 5})
    assert call.kind == "completion" and call.job == {
        "prompt": "The device",
        "max_tokens": 5,
        "stream": False,
    }
    assert _bad(lambda: api.openai_completion({"model": "demo", "prompt": ["a", "b"]})).param == "prompt"
    assert _bad(lambda: api.openai_completion({"model": "demo", "prompt": "a", "echo": True})).param == "echo"


def test_ollama_chat_streams_by_default_and_maps_its_options() -> None:
    call = api.ollama_chat(
        {
            "model": "demo:latest",
            "messages": [{"role": "user", "content": "hi"}],
            "options": {
                "num_predict": -1,
                "temperature": 0.5,
                "repeat_penalty": 1.1,
                "stop": ["x"],
                "num_ctx": 9,
            },
        },
        max_tokens_limit=2048,
    )
    assert call.stream and call.dialect == "ollama"
    assert call.job == {
        "max_tokens": 2048,
        "temperature": 0.5,
        "repetition_penalty": 1.1,
        "stop": ["x"],
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
    }
    assert not api.ollama_chat({**call.job, "model": "demo", "stream": False}, 10).stream
    assert (
        _bad(lambda: api.ollama_chat({"model": "m", "messages": [], "format": "json"}, 10)).param == "format"
    )


def test_ollama_generate_uses_the_chat_template_unless_raw() -> None:
    templated = api.ollama_generate({"model": "demo", "prompt": "hi", "system": "Be brief."}, 10)
    assert templated.job["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    raw = api.ollama_generate({"model": "demo", "prompt": "hi", "raw": True}, 10)
    assert raw.job["prompt"] == "hi" and "messages" not in raw.job
    assert api.ollama_generate({"model": "demo"}, 10).load_only
    assert not templated.load_only


def test_model_names() -> None:
    assert api.serves("demo", "demo") and api.serves("demo:latest", "demo")
    assert not api.serves("gpt-4o", "demo") and not api.serves("demo:7b", "demo")


# -- answers -----------------------------------------------------------------------------------------

RESULT = Result(
    id="http-1",
    status="succeeded",
    text="It is cool.",
    finish_reason="stop",
    usage=Usage(prompt_tokens=10, completion_tokens=4, cached_tokens=8),
    timings=Timings(
        prefill_ms=2.0, decode_ms=3.0, total_ms=5.0, prefill_tokens_per_s=1.0, decode_tokens_per_s=1.0
    ),
)


def test_openai_answers_carry_usage_with_cached_tokens() -> None:
    call = api.openai_chat({"model": "demo", "messages": [{"role": "user", "content": "hi"}]})
    body = api.openai_response(call, "http-1", RESULT, 1)
    assert body["object"] == "chat.completion" and body["id"] == "chatcmpl-http-1"
    assert body["choices"] == [
        {
            "index": 0,
            "finish_reason": "stop",
            "logprobs": None,
            "message": {"role": "assistant", "content": "It is cool."},
        }
    ]
    assert body["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 4,
        "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 8},
    }
    first = api.openai_chunk(call, "http-1", 1, "It", first=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "It"}
    last = api.openai_chunk(call, "http-1", 1, "", finish="stop")
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    usage = api.openai_usage_chunk(call, "http-1", 1, RESULT)
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens_details"]["cached_tokens"] == 8


def test_ollama_final_line_reports_durations_in_nanoseconds() -> None:
    call = api.ollama_generate({"model": "demo", "prompt": "hi", "stream": False}, 10)
    line = api.ollama_final(call, RESULT, text=RESULT.text)
    assert line["response"] == "It is cool." and line["done"] is True and line["done_reason"] == "stop"
    assert line["total_duration"] == 5_000_000 and line["eval_count"] == 4 and line["prompt_eval_count"] == 10


def test_job_errors_become_http_statuses_naming_the_dialects_field() -> None:
    ollama = api.ollama_chat({"model": "m", "messages": [{"role": "user", "content": "x"}]}, 10)
    error = api.error_for(ollama, "invalid_request", "max_tokens: must be at least 1", overloaded_retry_s=10)
    assert (error.status, error.param, error.message) == (
        400,
        "options.num_predict",
        "options.num_predict: must be at least 1",
    )
    openai = api.openai_chat({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    error = api.error_for(openai, "invalid_request", "max_tokens: must be at least 1", overloaded_retry_s=10)
    assert (error.status, error.param) == (400, "max_tokens")
    busy = api.error_for(openai, "busy", "the queue is full (64 jobs)", overloaded_retry_s=10)
    assert (busy.status, busy.type, busy.retry_after) == (429, "rate_limit_error", 1)
    shed = api.error_for(openai, "overloaded", "the box is shedding load (hot)", overloaded_retry_s=10)
    assert (shed.status, shed.retry_after) == (503, 10)
    overflow = api.error_for(openai, "context_overflow", "the prompt is 5000 tokens", overloaded_retry_s=10)
    assert (overflow.status, overflow.code, overflow.param) == (400, "context_length_exceeded", "messages")
    failed = api.error_for(openai, "model_error", "onnxruntime failed", overloaded_retry_s=10)
    assert (failed.status, failed.type, failed.retry_after) == (500, "server_error", None)
    assert api.openai_error(busy) == {
        "error": {
            "message": "the queue is full (64 jobs)",
            "type": "rate_limit_error",
            "code": "busy",
            "param": None,
        }
    }
    assert api.ollama_error(busy) == {"error": "the queue is full (64 jobs)"}


# -- configuration ------------------------------------------------------------------------------------

KEY = "k" * 24


def test_http_config_needs_keys_off_loopback() -> None:
    assert HTTPConfig().listen is None
    assert HTTPConfig(listen="127.0.0.1:8080").endpoint == ("127.0.0.1", 8080)
    assert HTTPConfig(listen="127.0.0.1:0").endpoint == ("127.0.0.1", 0)  # any free port
    assert HTTPConfig(listen="[::1]:8080").endpoint == ("::1", 8080)
    assert HTTPConfig(listen="localhost:8080").api_keys == []
    assert HTTPConfig(listen="0.0.0.0:8080", api_keys=[KEY]).endpoint == ("0.0.0.0", 8080)
    for listen in ("0.0.0.0:8080", "[::]:8080", "192.168.1.10:8080", "box.lan:8080"):
        with pytest.raises(ValidationError, match="set api_keys"):
            HTTPConfig(listen=listen)


def test_the_config_file_refuses_an_open_listener_without_keys(tmp_path: Path) -> None:
    from agent.config import load_config
    from edge_contract.errors import ConfigError

    base = 'device_id = "b"\nstate_dir = "/tmp/s"\n[model]\npath = "/tmp/m"\n[mqtt]\nallow_plaintext = true\n'
    path = tmp_path / "agent.toml"
    path.write_text(base + '[http]\nlisten = "0.0.0.0:8080"\n')
    with pytest.raises(ConfigError, match=r"http: .*reachable from other machines: set api_keys"):
        load_config(path)
    path.write_text(base + f'[http]\nlisten = "0.0.0.0:8080"\napi_keys = ["{KEY}"]\n')
    assert load_config(path).http.listen == "0.0.0.0:8080"
    path.write_text(base)
    assert load_config(path).http.listen is None  # no [http]: no server


@pytest.mark.parametrize("listen", ["127.0.0.1", "127.0.0.1:", "127.0.0.1:70000", "http://127.0.0.1:80"])
def test_http_listen_needs_host_and_port(listen: str) -> None:
    with pytest.raises(ValidationError, match="HOST:PORT"):
        HTTPConfig(listen=listen)


def test_http_keys_are_long_and_secret() -> None:
    with pytest.raises(ValidationError, match="16-256"):
        HTTPConfig(listen="127.0.0.1:8080", api_keys=["short"])
    config = HTTPConfig(listen="127.0.0.1:8080", api_keys=[KEY])
    assert KEY not in repr(config) and KEY not in str(config.model_dump())


# -- the seam ------------------------------------------------------------------------------------------


def test_a_submission_climbs_the_same_request_rungs_as_an_mqtt_job() -> None:
    address = local_address("http-1")
    job = {"id": "http-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    accepted = intake.admit(Submission("http-1", job, address), View(), RULES, NOW)
    assert isinstance(accepted, Accept) and accepted.reply_topic == address and accepted.correlation is None
    for view, data, code in [
        (View(), {**job, "max_tokens": 1000}, "invalid_request"),  # over this agent's limit
        (View(), {**job, "temperature": "hot"}, "invalid_request"),  # the schema
        (View(depth=2), job, "busy"),  # the queue bound
        (View(shed=["hot"]), job, "overloaded"),  # load shedding
    ]:
        decision = intake.admit(Submission("http-1", data, address), view, RULES, NOW)
        assert isinstance(decision, Reply) and decision.code == code and decision.reply_topic == address
    # the same request over MQTT meets the same rules
    mqtt = intake.decide(msg({**job, "max_tokens": 1000}), View(), RULES, NOW)
    assert isinstance(mqtt, Reply) and mqtt.code == "invalid_request"


def test_an_mqtt_response_topic_cannot_take_a_local_address() -> None:
    rules = Rules(
        topics=Topics("edge", "box-1", None),
        reply_prefix="http:",
        max_payload_bytes=4096,
        max_tokens_limit=100,
        max_queue=2,
        max_manifest_bytes=65536,
    )
    job = {"id": "j1", "prompt": "hi", "max_tokens": 5}
    refused = intake.decide(msg(job, response_topic="http:j1"), View(), rules, NOW)
    assert isinstance(refused, Reply) and "must not start with http:" in refused.message
    assert isinstance(intake.decide(msg(job, response_topic="edge/replies/x"), View(), RULES, NOW), Accept)


class _Sink:
    def __init__(self) -> None:
        self.chunks: list[tuple[str, bytes]] = []
        self.results: list[tuple[str, str]] = []

    def chunk(self, address: str, payload: bytes) -> None:
        self.chunks.append((address, payload))

    def result(self, address: str, payload: str) -> None:
        self.results.append((address, payload))


class _MQTT:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def send_result(
        self, job_id: str, reply_topic: str, correlation: bytes | None, payload: str
    ) -> Future[None]:
        self.sent.append((reply_topic, payload))
        return Future()

    def send_reply(self, reply_topic: str, correlation: bytes | None, payload: str) -> None:
        self.sent.append((reply_topic, payload))


def test_replies_route_by_address(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.accept("http-1", "{}", local_address("http-1"), None, deadline=None)
    store.finish("http-1", "{}")
    mqtt, sink, published = _MQTT(), _Sink(), []
    replies = Replies(mqtt, lambda t, p, c: published.append(t), store, StorageFaults())
    replies.attach(sink)
    replies.publish_chunk(local_address("http-1"), b"chunk", None)
    replies.publish_chunk("edge/replies/a", b"chunk", None)
    done = replies.send_result("http-1", local_address("http-1"), None, "result")
    replies.send_result("j2", "edge/replies/a", None, "result")
    replies.send_reply(local_address("http-2"), None, "rejected")
    assert sink.chunks == [(local_address("http-1"), b"chunk")] and published == ["edge/replies/a"]
    assert sink.results == [(local_address("http-1"), "result"), (local_address("http-2"), "rejected")]
    assert mqtt.sent == [("edge/replies/a", "result")]
    assert done.done()
    job = store.get("http-1")
    assert job is not None and job.delivered  # nobody acknowledges a local result later


def test_the_outbox_never_republishes_a_local_result(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    for job_id, address in [("http-1", local_address("http-1")), ("m-1", "edge/replies/a")]:
        store.accept(job_id, "{}", address, None, deadline=None)
        store.finish(job_id, '{"x": 1}')

    class Link:
        def __init__(self) -> None:
            self.topics: list[str] = []

        def publish(self, topic: str, payload: bytes, **_kw: object) -> int:
            self.topics.append(topic)
            return len(self.topics)

    link = Link()
    Outbox(link, store, StorageFaults()).reconnected()
    assert link.topics == ["edge/replies/a"]


def test_http_jobs_left_by_a_previous_process_are_canceled_at_start(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.accept("http-1", "{}", local_address("http-1"), None, deadline=None)
    store.accept("http-2", "{}", local_address("http-2"), None, deadline=None)
    store.accept("m-1", "{}", "edge/replies/a", None, deadline=None)
    assert store.claim_next() is not None  # http-1 was running when the process died
    stats = JobStats(http=True)
    canceled = cancel_local_orphans(store, model=None, device_id="box-1", stats=stats)
    assert canceled == ["http-1", "http-2"]
    for job_id in canceled:
        job = store.get(job_id)
        assert job is not None and job.state == "done" and job.delivered and job.result is not None
        assert Result.model_validate_json(job.result).status == "canceled"
    mqtt_job = store.get("m-1")
    assert mqtt_job is not None and mqtt_job.state == "queued"  # the MQTT job still runs
    jobs = stats.snapshot_and_reset()
    assert jobs.http_total == 2 and jobs.total.canceled == 2


def test_telemetry_counts_http_jobs_apart_only_when_http_is_on() -> None:
    stats = JobStats(http=True)
    stats.record("succeeded")
    stats.record("rejected")
    stats.record_http("rejected")
    first = stats.snapshot_and_reset()
    assert first.total.succeeded == 1 and first.total.rejected == 1 and first.http_total == 1
    stats.record("succeeded")
    stats.record_http("succeeded")
    assert stats.snapshot_and_reset().http_total == 2  # since start, like total
    off = JobStats()
    off.record_http("succeeded")
    assert off.snapshot_and_reset().http_total is None


def test_a_storage_error_is_not_swallowed_by_submit(tmp_path: Path) -> None:
    """``Inbox.submit`` raises it (the HTTP server answers 503); checked here without a daemon."""
    from agent.daemon.inbox import Inbox

    class BrokenStore:
        def queued_count(self) -> int:
            raise sqlite3.OperationalError("disk I/O error")

        def get(self, job_id: str) -> None:
            return None

    faults = StorageFaults()
    inbox = Inbox(
        RULES,
        store=BrokenStore(),  # type: ignore[arg-type]
        outbox=None,  # type: ignore[arg-type]
        worker=None,  # type: ignore[arg-type]
        updater=None,  # type: ignore[arg-type]
        ack=lambda _m: None,
        shedding=lambda: None,
        model=lambda: None,  # type: ignore[arg-type, return-value]
        device_id="box-1",
        stats=JobStats(),
        faults=faults,
    )
    job = {"id": "http-1", "prompt": "hi", "max_tokens": 5}
    with pytest.raises(sqlite3.OperationalError):
        inbox.submit(Submission("http-1", job, local_address("http-1")))
    assert faults.total >= 1


def test_a_faulty_http_sink_does_not_disturb_the_worker(tmp_path: Path) -> None:
    class Broken:
        def chunk(self, address: str, payload: bytes) -> None:
            raise RuntimeError("a bug")

        def result(self, address: str, payload: str) -> None:
            raise RuntimeError("a bug")

    store = JobStore(tmp_path / "jobs.sqlite3")
    store.accept("http-1", "{}", local_address("http-1"), None, deadline=None)
    store.finish("http-1", "{}")
    replies = Replies(_MQTT(), lambda t, p, c: None, store, StorageFaults())
    replies.attach(Broken())
    replies.publish_chunk(local_address("http-1"), b"chunk", None)
    assert replies.send_result("http-1", local_address("http-1"), None, "result").done()
    job = store.get("http-1")
    assert job is not None and job.delivered  # the bookkeeping went on


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_the_chunk_template_writes_what_the_chunk_function_does(kind: str) -> None:
    import json

    body = {"model": "demo", "messages": [{"role": "user", "content": "x"}], "prompt": "x"}
    call = api.openai_chat(body) if kind == "chat" else api.openai_completion(body)
    template = api.ChunkTemplate(call, "http-1", 1_800_000_000)
    for text in ["It", ' "quoted"\n', "é ü 中文 🙂", "\\u0000 \x00 \t", "data: [DONE]"]:
        expected = (
            b"data: " + json.dumps(api.openai_chunk(call, "http-1", 1_800_000_000, text)).encode() + b"\n\n"
        )
        assert template.event(text) == expected
