"""The HTTP server over a fake intake: routes, keys, errors, streaming and disconnects, in-process.

The fake intake runs the real admission (``intake.admit``) and, for an accepted
job, a fake worker thread that streams three chunks and a result through the
server's sink, exactly as the ``Replies`` seam hands them over in the daemon.
The real daemon with the real clients is ``tests/daemon/test_http_clients.py``.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from agent.config import HTTPConfig
from agent.daemon import intake
from agent.daemon.http.server import HTTPServer
from agent.daemon.results import error_result
from agent.health.telemetry import JobStats
from edge_contract.protocol import Chunk, ModelRef, Result, Usage
from tests.support.wait import wait_until
from tests.unit.test_intake import NOW, RULES, View

KEY = "test-key-0123456789abcdef"
MODEL = ModelRef(name="demo")


class FakeIntake:
    """Admission as the daemon's; a job 'runs' on a thread: three chunks, then the result."""

    def __init__(self) -> None:
        self.view = View()
        self.server: HTTPServer | None = None
        self.canceled: list[str] = []
        self.submitted: list[intake.Submission] = []
        self.hold = threading.Event()  # set: jobs wait after their first chunk until canceled
        self.fail = False
        self._cancels: dict[str, threading.Event] = {}

    def submit(self, submission: intake.Submission) -> intake.Decision:
        if self.fail:
            raise RuntimeError("a bug")
        self.submitted.append(submission)
        decision = intake.admit(submission, self.view, RULES, NOW)
        assert self.server is not None
        sink = self.server.sink
        if isinstance(decision, intake.Reply):
            result = error_result(
                decision.job_id, decision.status, decision.code, decision.message, model=MODEL, device_id="b"
            )
            sink.result(decision.reply_topic, result.model_dump_json(exclude_none=True))
        elif isinstance(decision, intake.Accept):
            self._cancels[decision.job_id] = threading.Event()
            threading.Thread(target=self._run, args=(decision,), daemon=True).start()
        return decision

    def _run(self, job: intake.Accept) -> None:
        assert self.server is not None
        sink, request = self.server.sink, job.request
        for seq, text in enumerate(["It ", "is ", "cool."]):
            if request.stream:
                sink.chunk(
                    job.reply_topic, Chunk(id=job.job_id, seq=seq, text=text).model_dump_json().encode()
                )
            if self.hold.is_set():
                self._cancels[job.job_id].wait(30)
                result = error_result(
                    job.job_id, "canceled", "canceled", "canceled while running", model=MODEL, device_id="b"
                )
                sink.result(job.reply_topic, result.model_dump_json(exclude_none=True))
                return
        result = Result(
            id=job.job_id,
            status="succeeded",
            text="It is cool.",
            finish_reason="stop",
            usage=Usage(prompt_tokens=5, completion_tokens=3, cached_tokens=2),
            model=MODEL,
        )
        sink.result(job.reply_topic, result.model_dump_json(exclude_none=True))

    def cancel(self, job_id: str) -> None:
        self.canceled.append(job_id)
        self._cancels[job_id].set()


@pytest.fixture(autouse=True)
def _prompt_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test stops its server: waiting out the daemon's 0.2 s poll would only slow the tests."""
    monkeypatch.setattr(HTTPServer, "POLL_S", 0.01)


def _serve(keys: list[str], max_connections: int = 8) -> tuple[HTTPServer, FakeIntake]:
    fake = FakeIntake()
    server = HTTPServer(
        HTTPConfig(listen="127.0.0.1:0", api_keys=keys, max_connections=max_connections),
        inbox=fake,
        model=lambda: MODEL,
        stats=JobStats(http=True),
        max_body_bytes=4096,
        max_tokens_limit=100,
        overloaded_retry_s=10,
    )
    fake.server = server
    server.start()
    return server, fake


@pytest.fixture()
def served() -> Iterator[tuple[HTTPServer, FakeIntake]]:
    server, fake = _serve([KEY])
    yield server, fake
    server.stop_accepting()
    server.close()


def _request(
    server: HTTPServer,
    method: str,
    path: str,
    body: Any = None,
    *,
    key: str | None = KEY,
    raw: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(*server.address, timeout=30)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=headers)
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, payload


CHAT = {"model": "demo", "messages": [{"role": "user", "content": "Is it hot?"}], "max_tokens": 5}


def test_models_routes(served: tuple[HTTPServer, FakeIntake]) -> None:
    server, _ = served
    status, _, body = _request(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == ["demo"]
    status, _, body = _request(server, "GET", "/v1/models/demo")
    assert status == 200 and json.loads(body)["id"] == "demo"
    status, _, body = _request(server, "GET", "/api/tags")
    assert status == 200 and json.loads(body)["models"][0]["name"] == "demo:latest"
    status, _, body = _request(server, "GET", "/api/version")
    assert status == 200 and "version" in json.loads(body)


def test_head_the_greeting_and_the_other_methods(served: tuple[HTTPServer, FakeIntake]) -> None:
    server, fake = served
    status, headers, body = _request(server, "HEAD", "/v1/models")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0  # GET's headers, no body
    status, _, body = _request(server, "GET", "/")
    assert status == 200 and body.startswith(b"edge-agent is running")
    for method in ("PUT", "DELETE", "PATCH"):
        status, _, body = _request(server, method, "/v1/chat/completions", CHAT)
        assert status == 405 and json.loads(body)["error"]["code"] == "method_not_allowed", method
    status, _, _ = _request(server, "POST", "/api/tags", CHAT)
    assert status == 405
    status, _, body = _request(server, "GET", "/v1/models/gpt-4o")
    assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"
    assert fake.submitted == []
    status, _, _ = _request(server, "POST", "/v1/chat/completions", CHAT)  # the positive control
    assert status == 200 and len(fake.submitted) == 1


def test_a_missing_or_wrong_key_is_401_and_the_right_one_passes(
    served: tuple[HTTPServer, FakeIntake],
) -> None:
    server, fake = served
    for key in (None, "wrong-key-0123456789abcdef", KEY[:-1]):
        status, headers, body = _request(server, "POST", "/v1/chat/completions", CHAT, key=key)
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert json.loads(body)["error"]["code"] == "invalid_api_key"
    status, _, body = _request(server, "GET", "/api/tags", key=None)
    assert status == 401 and json.loads(body) == {"error": json.loads(body)["error"]}  # Ollama's shape
    assert fake.submitted == []
    status, _, body = _request(server, "POST", "/v1/chat/completions", CHAT)
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "It is cool."


def test_no_key_asked_when_none_is_configured() -> None:
    server, _ = _serve([])
    try:
        status, _, _ = _request(server, "GET", "/v1/models", key=None)
        assert status == 200
    finally:
        server.stop_accepting()
        server.close()


def test_unknown_routes_models_and_methods(served: tuple[HTTPServer, FakeIntake]) -> None:
    server, fake = served
    status, _, body = _request(server, "GET", "/v1/nothing")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    status, _, body = _request(server, "POST", "/api/nothing", {})
    assert status == 404 and isinstance(json.loads(body)["error"], str)
    status, _, body = _request(server, "POST", "/v1/chat/completions", {**CHAT, "model": "gpt-4o"})
    error = json.loads(body)["error"]
    assert status == 404 and error["code"] == "model_not_found" and error["param"] == "model"
    assert "'demo'" in error["message"]
    status, _, _ = _request(server, "GET", "/v1/chat/completions")
    assert status == 405
    assert fake.submitted == []
    ollama = {**CHAT, "model": "demo:latest", "stream": False, "options": {"num_predict": 5}}
    status, _, _ = _request(server, "POST", "/api/chat", ollama)
    assert status == 200  # positive control


def test_bad_bodies_get_a_precise_400_or_413(served: tuple[HTTPServer, FakeIntake]) -> None:
    server, fake = served
    status, _, body = _request(server, "POST", "/v1/chat/completions", raw=b'{"model": "demo",')
    error = json.loads(body)["error"]
    assert status == 400 and error["code"] == "invalid_json" and "line 1 column 18" in error["message"]
    status, _, body = _request(server, "POST", "/v1/chat/completions", raw=b"\xff\xfe")
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json"
    status, _, body = _request(server, "POST", "/v1/chat/completions", raw=b"[" * 100_000)
    assert status == 413  # over max_body_bytes
    status, _, body = _request(server, "POST", "/v1/chat/completions", raw=b"[" * 4000)
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json"  # nested too deeply
    status, _, body = _request(server, "POST", "/v1/chat/completions", {**CHAT, "temperature": "hot"})
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "temperature" and error["message"].startswith("temperature:")
    status, _, body = _request(server, "POST", "/api/chat", {**CHAT, "options": {"num_predict": 1000}})
    assert status == 400 and json.loads(body)["error"].startswith("options.num_predict:")
    assert all(s.data.get("temperature") != "hot" or True for s in fake.submitted)


def test_a_full_queue_is_429_with_retry_after(served: tuple[HTTPServer, FakeIntake]) -> None:
    server, fake = served
    fake.view.depth = RULES.max_queue
    status, headers, body = _request(server, "POST", "/v1/chat/completions", CHAT)
    assert status == 429 and headers["retry-after"] == "1" and json.loads(body)["error"]["code"] == "busy"
    fake.view.shed = ["hot"]
    status, headers, body = _request(
        server, "POST", "/api/generate", {"model": "demo", "prompt": "x", "options": {"num_predict": 5}}
    )
    assert status == 503 and headers["retry-after"] == "10" and "shedding" in json.loads(body)["error"]
    fake.view.depth, fake.view.shed = 0, None
    status, _, _ = _request(server, "POST", "/v1/chat/completions", CHAT)
    assert status == 200


def test_sse_stream_ends_with_done(served: tuple[HTTPServer, FakeIntake]) -> None:
    server, _ = served
    status, headers, body = _request(
        server,
        "POST",
        "/v1/chat/completions",
        {**CHAT, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert status == 200 and headers["content-type"] == "text/event-stream"
    events = [line.removeprefix("data: ") for line in body.decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert (
        "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "It is cool."
    )
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 2


def test_ollama_streams_ndjson_by_default(served: tuple[HTTPServer, FakeIntake]) -> None:
    server, _ = served
    status, headers, body = _request(server, "POST", "/api/chat", {**CHAT, "options": {"num_predict": 5}})
    assert status == 200 and headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in body.decode().splitlines()]
    assert "".join(line["message"]["content"] for line in lines) == "It is cool."
    assert [line["done"] for line in lines] == [False, False, False, True]


def test_a_client_that_goes_away_cancels_its_job_and_the_next_is_served(
    served: tuple[HTTPServer, FakeIntake],
) -> None:
    server, fake = served
    fake.hold.set()
    for stream in (True, False):
        fake.canceled.clear()
        sock = socket.create_connection(server.address, timeout=30)
        body = json.dumps({**CHAT, "stream": stream}).encode()
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
        if stream:
            received = b""
            while b"data: " not in received:  # the first chunk came
                data = sock.recv(65536)
                assert data, received
                received += data
        else:
            wait_until(lambda: len(fake.submitted) > 0, what="the job to be submitted")
        sock.close()
        wait_until(lambda: fake.canceled, what="the job to be canceled")
        assert fake.canceled == [fake.submitted[-1].job_id]
    fake.hold.clear()
    status, _, body = _request(server, "POST", "/v1/chat/completions", CHAT)
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "It is cool."


def test_a_bug_is_a_500_and_the_server_keeps_serving(served: tuple[HTTPServer, FakeIntake]) -> None:
    server, fake = served
    fake.fail = True
    status, _, body = _request(server, "POST", "/v1/chat/completions", CHAT)
    assert status == 500 and json.loads(body)["error"]["type"] == "server_error"
    fake.fail = False
    status, _, _ = _request(server, "POST", "/v1/chat/completions", CHAT)
    assert status == 200


def test_connections_beyond_the_bound_get_503() -> None:
    server, _ = _serve([KEY], max_connections=1)
    try:
        held = socket.create_connection(server.address, timeout=30)
        held.sendall(
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n"
        )
        assert b"200 OK" in held.recv(65536)  # served, and kept alive: it holds the one slot
        status, headers, _ = _request(server, "GET", "/v1/models")
        assert status == 503 and headers["retry-after"] == "1"
        held.close()
        wait_until(lambda: _request(server, "GET", "/v1/models")[0] == 200, what="the slot to be free")
    finally:
        server.stop_accepting()
        server.close()


def test_waiting_requests_are_answered_when_the_agent_stops(served: tuple[HTTPServer, FakeIntake]) -> None:
    server, fake = served
    fake.hold.set()
    answers: list[tuple[int, dict[str, str], bytes]] = []
    thread = threading.Thread(
        target=lambda: answers.append(_request(server, "POST", "/v1/chat/completions", CHAT))
    )
    thread.start()
    wait_until(lambda: fake.submitted, what="the job to be submitted")
    server.close()
    thread.join(30)
    assert answers and answers[0][0] == 503 and json.loads(answers[0][2])["error"]["code"] == "shutting_down"
