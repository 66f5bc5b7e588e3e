"""The fleet's gateway (issue 25): ``edge-fleet server`` as a real process, a real mosquitto and two
real ``edge-agent run`` boxes, spoken to by clients nobody here wrote — the official ``openai``
SDK, LangChain's ``ChatOpenAI``, Ollama's client and ``curl -N``.  Every answer is compared with
the MQTT answer to the same messages; a box ``kill -9``ed mid-stream ends the stream with an
error event and the next request goes to the other box.  The ``llama-long`` fixture never hits
eos, so a job runs exactly ``max_tokens`` tokens (long enough to be interrupted on purpose)."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from langchain_openai import ChatOpenAI

from tests.support import http_clients
from tests.support.fleet_server import FleetServer
from tests.support.http_clients import close_clients_after_each_test  # noqa: F401 (an autouse fixture)
from tests.support.models import fixture_path
from tests.support.tools import tool
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e
MESSAGES = http_clients.MESSAGES

MODEL = "llama-long"
GROUP = "shop-3"
BOXES = ("till-1", "till-2")


class Fleet:
    """The server, its agents by name, and clients of the gateway."""

    def __init__(self, server: FleetServer, agents: dict[str, Any]) -> None:
        self.server = server
        self.agents = agents

    def openai(self, role: str = "operator", token: str | None = None) -> openai.OpenAI:
        return http_clients.openai_client(self.server.url, token or self.server.tokens[role])

    def ollama(self, role: str = "operator") -> ollama.Client:
        return http_clients.ollama_client(self.server.url, self.server.tokens[role])

    def headers(self, role: str = "operator") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.server.tokens[role]}"}

    @contextlib.contextmanager
    def running_stream(self) -> Iterator[tuple[httpx.Response, Iterator[str]]]:
        """A streamed chat of 4000 tokens whose first text came: the response and its lines left."""
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4000, "stream": True}
        url = f"{self.server.url}/v1/chat/completions"
        with (
            httpx.Client(timeout=60) as raw,
            raw.stream("POST", url, json=body, headers=self.headers()) as response,
        ):
            assert response.status_code == 200
            lines = response.iter_lines()
            first = next(line for line in lines if line)
            assert "content" in json.loads(first.removeprefix("data: "))["choices"][0]["delta"]  # it runs
            yield response, lines


def _fleet(broker, agents, tmp_path: Path, **settings: Any) -> Iterator[Fleet]:  # type: ignore[no-untyped-def]
    started = {}
    for name in BOXES:
        jobs = {"max_tokens_limit": 4000, **settings.pop("jobs", {})}
        agent = agents(fixture_path(MODEL), device_id=name, group=GROUP, jobs=jobs, **settings)
        agent.start()
        started[name] = agent
    server = FleetServer(str(tmp_path / "server.sqlite3"), broker, tmp_path / "server.log").start()
    try:
        found = Fleet(server, started)
        client = found.openai("viewer")
        wait_until(
            lambda: {m.id for m in client.models.list()} >= {MODEL, *(f"device:{b}" for b in BOXES)},
            timeout=60,
            what="both boxes routable",
        )
        yield found
    finally:
        server.stop()


@pytest.fixture()
def fleet(broker, agents, tmp_path: Path) -> Iterator[Fleet]:  # type: ignore[no-untyped-def]
    yield from _fleet(broker, agents, tmp_path)


def _mqtt(caller, device: str, job_id: str, **job: Any) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return http_clients.mqtt_answer(caller, f"edge/{device}/jobs", job_id, **job)


def test_models_list_what_is_routable(fleet: Fleet) -> None:
    names = [m.id for m in fleet.openai("viewer").models.list()]
    assert names == [MODEL, f"group:{GROUP}", "device:till-1", "device:till-2"]
    tags = [m.model for m in fleet.ollama("viewer").list().models]
    assert tags == [f"{MODEL}:latest", f"group:{GROUP}", "device:till-1", "device:till-2"]


def test_openai_sdk_answers_equal_the_mqtt_answers(fleet: Fleet, caller) -> None:  # type: ignore[no-untyped-def]
    client = fleet.openai()
    mqtt = _mqtt(caller, "till-2", "m-chat", messages=MESSAGES, max_tokens=24)
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0)  # type: ignore[arg-type]
    assert whole.choices[0].message.content == mqtt["text"] and mqtt["text"]
    assert whole.choices[0].finish_reason == "length" and whole.model == MODEL
    assert whole.usage is not None and whole.usage.completion_tokens == 24
    assert whole.usage.prompt_tokens == mqtt["usage"]["prompt_tokens"]

    for target in (MODEL, f"group:{GROUP}", "device:till-1"):
        chunks = list(
            client.chat.completions.create(
                model=target,
                messages=MESSAGES,  # type: ignore[arg-type]
                max_tokens=24,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == mqtt["text"], target
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24

    raw = _mqtt(caller, "till-1", "m-raw", prompt="The device reports", max_tokens=16)
    completion = client.completions.create(model=MODEL, prompt="The device reports", max_tokens=16)
    assert completion.choices[0].text == raw["text"] and raw["text"]


def test_openai_sdk_errors_are_its_exception_classes(fleet: Fleet) -> None:
    with pytest.raises(openai.AuthenticationError) as denied:
        fleet.openai(token="wrong-token-0123456789").models.list()
    assert "token" in denied.value.message
    with pytest.raises(openai.AuthenticationError):
        fleet.openai(token="wrong-token-0123456789").chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    viewer = fleet.openai("viewer")
    assert MODEL in [m.id for m in viewer.models.list()]  # positive control: a viewer may list ...
    with pytest.raises(openai.PermissionDeniedError) as forbidden:  # ... but not run jobs
        viewer.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    assert "operator" in forbidden.value.message
    client = fleet.openai()
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5000)  # type: ignore[arg-type]
    assert bad.value.param == "max_tokens" and "4000" in bad.value.message  # the box's own limit
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=9)  # type: ignore[arg-type]
    assert bad.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert missing.value.code == "model_not_found" and "GET /v1/models" in missing.value.message
    ok = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    assert ok.choices[0].message.content  # the gateway kept serving


def test_langchain_chat_openai(fleet: Fleet, caller) -> None:  # type: ignore[no-untyped-def]
    llm = ChatOpenAI(
        model=MODEL,
        base_url=f"{fleet.server.url}/v1",
        api_key=fleet.server.tokens["operator"],  # type: ignore[arg-type]
        temperature=0,
        max_tokens=24,  # type: ignore[call-arg]
        max_retries=0,
    )
    turns = [("system", MESSAGES[0]["content"]), ("human", MESSAGES[1]["content"])]
    mqtt = _mqtt(caller, "till-1", "m-lc", messages=MESSAGES, max_tokens=24)
    assert llm.invoke(turns).content == mqtt["text"]
    assert "".join(str(piece.content) for piece in llm.stream(turns)) == mqtt["text"]


def test_ollama_client_chat(fleet: Fleet, caller) -> None:  # type: ignore[no-untyped-def]
    client = fleet.ollama()
    options = {"num_predict": 24, "temperature": 0}
    mqtt = _mqtt(caller, "till-2", "m-ol", messages=MESSAGES, max_tokens=24)
    whole = client.chat(model=MODEL, messages=MESSAGES, options=options, stream=False)
    assert whole.message.content == mqtt["text"] and whole.done and whole.eval_count == 24
    pieces = list(client.chat(model=f"{MODEL}:latest", messages=MESSAGES, options=options, stream=True))
    assert "".join(p.message.content or "" for p in pieces) == mqtt["text"]
    assert pieces[-1].done and pieces[-1].done_reason == "length"
    generated = client.generate(model=MODEL, prompt="The device reports", raw=True, options=options)
    raw = _mqtt(caller, "till-1", "m-ol-raw", prompt="The device reports", max_tokens=24)
    assert generated.response == raw["text"]
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="llama3:8b", messages=MESSAGES, options=options)
    assert missing.value.status_code == 404


def test_curl_sse_and_a_wrong_token(fleet: Fleet) -> None:
    curl = tool("curl")
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 24, "stream": True})

    def run(token: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [curl, "-sSN", "-w", "\n%{http_code}", f"{fleet.server.url}/v1/chat/completions",
             "-H", f"Authorization: Bearer {token}", "-H", "Content-Type: application/json", "-d", body],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip

    ok = run(fleet.server.tokens["operator"])
    *events, status = [line for line in ok.stdout.split("\n") if line]
    assert status == "200"
    text = http_clients.sse_text(events)
    whole = fleet.openai().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24)  # type: ignore[arg-type]
    assert text == whole.choices[0].message.content and text
    denied = run("wrong-token-0123456789")
    *answer, status = [line for line in denied.stdout.split("\n") if line]
    assert status == "401" and json.loads("".join(answer))["error"]["code"] == "invalid_api_key"


def test_eight_concurrent_streams_all_complete(fleet: Fleet) -> None:
    client = fleet.openai()
    expected = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=32)  # type: ignore[arg-type]
    texts, _reasons = http_clients.concurrent_streams(client, MODEL, max_tokens=32)
    assert set(texts.values()) == {expected.choices[0].message.content}


def test_a_box_killed_mid_stream_ends_the_stream_with_an_error_and_the_next_goes_elsewhere(
    fleet: Fleet,
) -> None:
    with fleet.running_stream() as (response, lines):
        victim = response.headers["X-Edge-Device"]
        fleet.agents[victim].kill()  # kill -9, mid-stream
        rest = [line for line in lines if line]  # ends: no hang (the client's timeout is 60 s)
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert error["code"] == "box_lost" and victim in error["message"] and "offline" in error["message"]
    assert all("error" not in json.loads(line.removeprefix("data: ")) for line in rest[:-2])
    # The next request is served, by the other box.
    client = fleet.openai()
    after = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    assert after.headers["X-Edge-Device"] == next(b for b in BOXES if b != victim)
    assert after.parse().choices[0].finish_reason == "length"


def test_a_box_that_refuses_passes_the_request_to_another(broker, agents, caller, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """till-1's queue (one job) is filled over MQTT, behind the gateway's back (telemetry once a
    minute does not tell it): the gateway tries till-1 first (the tie goes by name), is refused
    (busy) and the request is answered by till-2."""
    settings = {"jobs": {"max_queue": 1}, "telemetry": {"interval_s": 60.0}}
    made = _fleet(broker, agents, tmp_path, **settings)
    fleet = next(made)
    try:
        caller.send(
            "edge/till-1/jobs", {"id": "m-long", "messages": MESSAGES, "max_tokens": 4000, "stream": True}
        )
        # Positive control: till-1 turns the next job away now.
        caller.send("edge/till-1/jobs", {"id": "m-refused", "messages": MESSAGES, "max_tokens": 4})
        assert caller.wait_result("m-refused", timeout=60)["error"]["code"] == "busy"
        client = fleet.openai()
        answer = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=4
        )  # type: ignore[arg-type]
        assert answer.headers["X-Edge-Device"] == "till-2"
        assert answer.parse().choices[0].finish_reason == "length"
        log = fleet.server.log.read_text()
        assert "on till-1: the queue is full" in log and "trying another" in log
    finally:
        made.close()


def test_a_client_that_disconnects_cancels_its_job_on_the_box(fleet: Fleet) -> None:
    with fleet.running_stream() as (response, _lines):
        box = fleet.agents[response.headers["X-Edge-Device"]]
    # The client closed its connection mid-stream: the gateway cancels the job on its box.
    line = wait_until(
        lambda: next(
            (
                m
                for m in re.findall(
                    r"job gw-\S+ (canceled: \d+ prompt \+ \d+ completion tokens)", box.log_text()
                )
            ),
            None,
        ),
        timeout=60,
        what="the job canceled on its box",
    )
    assert 0 < int(re.search(r"(\d+) completion tokens", line).group(1)) < 4000  # type: ignore[union-attr]


def test_a_client_that_leaves_a_whole_answer_cancels_its_job_on_the_box(fleet: Fleet) -> None:
    """``stream`` false: nothing is sent until the result, yet a client that leaves is noticed."""
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 4000}).encode()
    sock = socket.create_connection(("127.0.0.1", fleet.server.port), timeout=60)
    try:
        token = fleet.server.tokens["operator"]
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        running = wait_until(lambda: _running(fleet), timeout=60, what="the job running on a box")
    finally:
        sock.close()
    device, job_id = running
    line = wait_until(
        lambda: re.search(
            rf"job {job_id} canceled: \d+ prompt \+ (\d+) completion tokens", fleet.agents[device].log_text()
        ),
        timeout=60,
        what="the job canceled on its box",
    )
    assert int(line.group(1)) < 4000


def _running(fleet: Fleet) -> tuple[str, str] | None:
    for name, agent in fleet.agents.items():
        db = sqlite3.connect(f"file:{agent.state_dir / 'jobs.sqlite3'}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT id FROM jobs WHERE state = 'running' AND id LIKE 'gw-%'").fetchone()
        finally:
            db.close()
        if row:
            return name, str(row[0])
    return None


def test_a_box_gone_before_answering_passes_the_request_to_another(fleet: Fleet, caller) -> None:  # type: ignore[no-untyped-def]
    """till-1 is frozen (SIGSTOP: still online for the broker) and takes the request (the tie goes
    by name); it is then killed before it answered: the gateway sends the request to till-2."""
    caller.subscribe("edge/+/jobs")  # watches where the gateway sends jobs
    caller.client.publish("edge/nobody/jobs", b"{}", qos=1)
    wait_until(lambda: _seen(caller, "edge/nobody/jobs", b"{}"), what="the watch subscribed")
    frozen = fleet.agents["till-1"]
    assert frozen.proc is not None
    frozen.proc.send_signal(signal.SIGSTOP)
    answers: list[Any] = []
    client = fleet.openai()

    def ask() -> None:
        answers.append(
            client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
        )

    asking = threading.Thread(target=ask)
    try:
        asking.start()
        wait_until(lambda: _seen(caller, "edge/till-1/jobs", b'"id":"gw-'), what="the job sent to till-1")
    finally:
        frozen.proc.send_signal(signal.SIGKILL)  # its socket closes: the broker publishes its Last Will
        frozen.proc.wait(timeout=10)
    asking.join(60)
    assert answers and answers[0].headers["X-Edge-Device"] == "till-2"
    assert answers[0].parse().choices[0].finish_reason == "length"
    log = fleet.server.log.read_text()
    assert "box till-1 went offline before answering" in log and "trying another" in log


def _seen(caller, topic: str, fragment: bytes) -> bool:  # type: ignore[no-untyped-def]
    return any(t == topic and fragment in body for t, body, _c in list(caller.raw.queue))
