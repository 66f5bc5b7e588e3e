"""The HTTP API of a real ``edge-agent run`` and a real mosquitto, spoken by clients nobody here wrote.

The official ``openai`` SDK (streamed and not, errors as its exception
classes), LangChain's ``ChatOpenAI``, Ollama's own Python client and ``curl
-N``.  Every answer is compared with the MQTT answer to the same messages from
the same agent: one intake, two transports.  The ``llama-long`` fixture never
hits eos, so a job runs exactly ``max_tokens`` tokens (long enough to be
interrupted on purpose).
"""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from langchain_openai import ChatOpenAI

from tests.support import http_clients
from tests.support.agent import AgentProcess
from tests.support.http_clients import close_clients_after_each_test  # noqa: F401 (an autouse fixture)
from tests.support.models import fixture_path
from tests.support.tools import tool
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e
MESSAGES = http_clients.MESSAGES

JOBS = "edge/box-1/jobs"
KEY = "test-key-0123456789abcdef"
MODEL = "llama-long"


class Box:
    """An agent serving HTTP on a free loopback port, with a key."""

    def __init__(self, agent: AgentProcess, port: int) -> None:
        self.agent = agent
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def openai(self, key: str = KEY) -> openai.OpenAI:
        return http_clients.openai_client(self.url, key)

    def ollama(self, key: str = KEY) -> ollama.Client:
        return http_clients.ollama_client(self.url, key)

    def job_lines(self) -> dict[str, str]:
        """The daemon's one log line per finished job, by job id."""
        found = re.findall(r"job (\S+) (\w+: \d+ prompt \+ \d+ completion tokens.*)", self.agent.log_text())
        return dict(found)


def _box(agents, engine: dict[str, Any] | None = None, **jobs: Any) -> Box:  # type: ignore[no-untyped-def]
    agent = agents(
        fixture_path(MODEL),
        jobs={"max_tokens_limit": 4000, **jobs},
        http={"listen": "127.0.0.1:0", "api_keys": [KEY]},
        engine=engine,
    )
    agent.start()
    return Box(agent, agent.http_port())


@pytest.fixture()
def box(agents) -> Box:  # type: ignore[no-untyped-def]
    return _box(agents)


def _mqtt(caller, job_id: str, **job: Any) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return http_clients.mqtt_answer(caller, JOBS, job_id, **job)


def test_openai_sdk_answers_equal_the_mqtt_answers(box: Box, caller) -> None:  # type: ignore[no-untyped-def]
    client = box.openai()
    assert [m.id for m in client.models.list()] == [MODEL]

    first = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0)  # type: ignore[arg-type]
    mqtt = _mqtt(caller, "m-chat", messages=MESSAGES, max_tokens=24)
    answer = first.choices[0].message.content
    assert answer and answer == mqtt["text"]
    assert first.choices[0].finish_reason == "length" and first.model == MODEL
    assert first.usage is not None and first.usage.completion_tokens == 24
    assert first.usage.prompt_tokens == mqtt["usage"]["prompt_tokens"]
    assert first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0  # a fresh agent: nothing cached yet

    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 24
    # The same prompt a third time: its prefix came from the cache, as for MQTT jobs.
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens > 0

    # stop, and seeded sampling (temperature, top_p, seed): as the same MQTT job does.
    stop = answer[8:12]
    assert stop.strip() and answer.index(stop) > 0
    stopped = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, stop=stop)  # type: ignore[arg-type]
    assert stopped.choices[0].message.content == answer[: answer.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    sampled = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=24,
        temperature=0.9,
        top_p=0.95,
        seed=7,
    )
    seeded = _mqtt(caller, "m-seed", messages=MESSAGES, max_tokens=24, temperature=0.9, top_p=0.95, seed=7)
    assert sampled.choices[0].message.content == seeded["text"]

    completion = client.completions.create(
        model=MODEL, prompt="The device reports", max_tokens=16, temperature=0
    )
    raw = _mqtt(caller, "m-raw", prompt="The device reports", max_tokens=16)
    assert completion.choices[0].text == raw["text"] and completion.choices[0].text


def test_openai_sdk_errors_are_its_exception_classes(box: Box) -> None:
    with pytest.raises(openai.AuthenticationError):
        box.openai(key="wrong-key-0123456789abcdef").models.list()
    client = box.openai()
    assert [m.id for m in client.models.list()] == [MODEL]  # positive control: the right key
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5000)  # type: ignore[arg-type]
    assert bad.value.param == "max_tokens" and "4000" in bad.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=9)  # type: ignore[arg-type]
    assert bad.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2)  # type: ignore[arg-type]
    assert bad.value.param == "n"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert missing.value.code == "model_not_found"
    ok = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    assert ok.choices[0].message.content  # the agent kept serving
    log = box.agent.log_text()
    assert "POST /v1/chat/completions" in log  # requests are logged (positive control) ...
    assert KEY not in log and "wrong-key" not in log  # ... their keys never


def test_langchain_chat_openai(box: Box, caller) -> None:  # type: ignore[no-untyped-def]
    llm = ChatOpenAI(
        model=MODEL,
        base_url=f"{box.url}/v1",
        api_key=KEY,
        temperature=0,
        max_tokens=24,
        max_retries=0,  # type: ignore[arg-type]
    )
    turns = [("system", MESSAGES[0]["content"]), ("human", MESSAGES[1]["content"])]
    mqtt = _mqtt(caller, "m-lc", messages=MESSAGES, max_tokens=24)
    assert llm.invoke(turns).content == mqtt["text"]
    assert "".join(str(piece.content) for piece in llm.stream(turns)) == mqtt["text"]


def test_ollama_client_chat_and_generate(box: Box, caller) -> None:  # type: ignore[no-untyped-def]
    client = box.ollama()
    assert [m.model for m in client.list().models] == [f"{MODEL}:latest"]
    options = {"num_predict": 24, "temperature": 0}
    mqtt = _mqtt(caller, "m-ol", messages=MESSAGES, max_tokens=24)
    whole = client.chat(model=MODEL, messages=MESSAGES, options=options, stream=False)
    assert whole.message.content == mqtt["text"] and whole.done and whole.eval_count == 24
    pieces = list(client.chat(model=f"{MODEL}:latest", messages=MESSAGES, options=options, stream=True))
    assert "".join(p.message.content or "" for p in pieces) == mqtt["text"]
    assert pieces[-1].done and pieces[-1].done_reason == "length"

    raw = _mqtt(caller, "m-ol-raw", prompt="The device reports", max_tokens=24)
    generated = client.generate(model=MODEL, prompt="The device reports", raw=True, options=options)
    assert generated.response == raw["text"]
    templated = _mqtt(caller, "m-ol-gen", messages=[{"role": "user", "content": "Hi"}], max_tokens=24)
    streamed = client.generate(model=MODEL, prompt="Hi", options=options, stream=True)
    assert "".join(p.response or "" for p in streamed) == templated["text"]

    with pytest.raises(ollama.ResponseError) as denied:
        box.ollama(key="wrong-key-0123456789abcdef").chat(model=MODEL, messages=MESSAGES, options=options)
    assert denied.value.status_code == 401
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="llama3:8b", messages=MESSAGES, options=options)
    assert missing.value.status_code == 404


def test_curl_sse(box: Box) -> None:
    curl = tool("curl")
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 24, "stream": True}
    proc = subprocess.run(
        [
            curl,
            "-sSN",
            "--fail-with-body",
            f"{box.url}/v1/chat/completions",
            *("-H", f"Authorization: Bearer {KEY}", "-H", "Content-Type: application/json"),
            *("-d", json.dumps(body)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    text = http_clients.sse_text([line for line in proc.stdout.split("\n") if line])
    whole = box.openai().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24)  # type: ignore[arg-type]
    assert text == whole.choices[0].message.content and text


@pytest.mark.parametrize("max_batch", [1, 4])
def test_eight_concurrent_streams_all_complete(agents, max_batch: int) -> None:  # type: ignore[no-untyped-def]
    """One at a time, or decoded together in batches of four: the same answers, every stream complete."""
    box = _box(agents, engine={"max_batch": max_batch})
    client = box.openai()
    expected = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=48)  # type: ignore[arg-type]
    texts, reasons = http_clients.concurrent_streams(client, MODEL, max_tokens=48, timeout=120)
    assert set(texts.values()) == {expected.choices[0].message.content}
    assert set(reasons.values()) == {"length"}


def test_a_client_that_disconnects_cancels_its_job_and_the_next_is_served(agents) -> None:  # type: ignore[no-untyped-def]
    box = _box(agents, max_queue=1)  # one job fills the queue: the next request shows whether it left
    client = box.openai()
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4000, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    # Positive control: a client that stays gets all 4000 tokens (llama-long never stops early).
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4000)  # type: ignore[arg-type]
    assert whole.usage is not None and whole.usage.completion_tokens == 4000
    with (
        httpx.Client(timeout=60) as raw,
        raw.stream("POST", f"{box.url}/v1/chat/completions", json=body, headers=headers) as response,
    ):
        assert response.status_code == 200
        assert next(response.iter_lines()).startswith("data: ")
    # The client closed its connection mid-stream: its job ends canceled, short of its 4000 tokens.
    line = wait_until(
        lambda: next((v for v in box.job_lines().values() if v.startswith("canceled")), None),
        timeout=60,
        what="the streaming job to be canceled",
    )
    completion_tokens = int(re.search(r"(\d+) completion tokens", line).group(1))  # type: ignore[union-attr]
    assert 0 < completion_tokens < 4000
    # The queue (one job at most) is free again: the next request is served, not turned away with 429.
    after = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    assert after.choices[0].finish_reason == "length"


def test_http_jobs_do_not_run_for_nobody_after_a_restart(agents, caller) -> None:  # type: ignore[no-untyped-def]
    box = _box(agents)
    errors: list[BaseException] = []

    def request() -> None:  # each runs 4000 tokens, one after the other
        try:
            box.openai().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4000)  # type: ignore[arg-type]
        except BaseException as exc:
            errors.append(exc)

    clients = [threading.Thread(target=request) for _ in range(4)]
    for client in clients:
        client.start()
    wait_until(lambda: len(_open(box)) >= 4, what="the four HTTP jobs stored")
    caller.send(JOBS, {"id": "m-queued", "prompt": "hello", "max_tokens": 8})  # an MQTT job behind them
    wait_until(lambda: "m-queued" in _open(box), what="the MQTT job stored")
    box.agent.kill()
    left = [job_id for job_id, address in _open(box).items() if address.startswith("http:")]
    assert left, "the kill must land while HTTP jobs wait for this test to mean anything"
    for client in clients:
        client.join(60)
    assert errors  # their connections died with the agent
    before = len(box.agent.log_text())
    box.agent.start()
    box = Box(box.agent, box.agent.http_port(after=before))  # port 0: another one this time
    # The MQTT job resumes (positive control); the HTTP jobs left are canceled, never run.
    assert caller.wait_result("m-queued", timeout=60)["status"] == "succeeded"
    restarted = box.agent.log_text()[before:]
    canceled = re.search(r"canceled (\d+) HTTP job\(s\) left from before the restart", restarted)
    assert canceled and int(canceled.group(1)) == len(left)
    assert not re.search(r"job http-\S+ succeeded", restarted)
    assert all(job_id not in _open(box) for job_id in left)
    assert [m.id for m in box.openai().models.list()] == [MODEL]  # and the API serves again


def _open(box: Box) -> dict[str, str]:
    """Jobs queued or running in the agent's store: id -> reply address."""
    db = sqlite3.connect(f"file:{box.agent.state_dir / 'jobs.sqlite3'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT id, reply_topic FROM jobs WHERE state IN ('queued', 'running')").fetchall()
        return {str(job_id): str(address) for job_id, address in rows}
    finally:
        db.close()


def test_telemetry_counts_http_jobs(box: Box, caller) -> None:  # type: ignore[no-untyped-def]
    caller.subscribe("edge/box-1/telemetry")
    box.openai().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    _mqtt(caller, "m-tel", messages=MESSAGES, max_tokens=4)
    seen: list[dict[str, Any]] = []

    def counted() -> bool:
        while not caller.raw.empty():
            topic, payload, _ = caller.raw.get()
            if topic == "edge/box-1/telemetry":
                seen.append(json.loads(payload)["jobs"])
        return any(j["total"]["succeeded"] >= 2 for j in seen)

    wait_until(counted, timeout=30, what="telemetry counting both jobs")
    last = next(j for j in seen if j["total"]["succeeded"] >= 2)
    assert last["http_total"] == 1  # the HTTP one; the other came over MQTT


def test_apps_on_the_box_are_served_while_the_broker_is_away(box: Box, broker) -> None:  # type: ignore[no-untyped-def]
    """HTTP needs no broker: an app one process away keeps its model when the fleet's link is down."""
    client = box.openai()
    before = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)  # type: ignore[arg-type]
    broker.stop()
    wait_until(lambda: "disconnected from broker" in box.agent.log_text(), what="the agent to notice")
    during = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)  # type: ignore[arg-type]
    assert during.choices[0].message.content == before.choices[0].message.content
    assert during.choices[0].finish_reason == "length"


def _hot_box(agents, tmp_path: Path, shed_load: str, **jobs: Any) -> tuple[Box, Path]:  # type: ignore[no-untyped-def]
    """A box whose (simulated) SoC sensor reads 85 °C, over its 70 °C limit: it sheds load."""
    zone = tmp_path / "sys" / "class" / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("85000\n")
    agent = agents(
        fixture_path(MODEL),
        jobs={"max_tokens_limit": 4000, **jobs},
        http={"listen": "127.0.0.1:0", "api_keys": [KEY]},
        telemetry={"interval_s": 1.0, "sysfs_root": str(tmp_path / "sys")},
        health={"max_temp_c": 70, "shed_load": shed_load},
    )
    agent.start()
    wait_until(lambda: "health: degraded" in agent.log_text(), what="the box to find itself hot")
    return Box(agent, agent.http_port()), zone / "temp"


def test_a_box_shedding_load_answers_503_with_retry_after(agents, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    box, temp = _hot_box(agents, tmp_path, "reject")
    client = box.openai()
    with pytest.raises(openai.InternalServerError) as shed:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    assert shed.value.status_code == 503 and shed.value.code == "overloaded"
    assert shed.value.response.headers["retry-after"] == "1"  # one telemetry interval
    with pytest.raises(ollama.ResponseError) as also:
        box.ollama().chat(model=MODEL, messages=MESSAGES, options={"num_predict": 4})
    assert also.value.status_code == 503 and "hot" in also.value.error
    temp.write_text("50000\n")  # cool again (below 70 - 5 °C of hysteresis)
    served = wait_until(lambda: _served(client), timeout=30, what="the box to serve again once cool")
    assert served.choices[0].finish_reason == "length"


def _served(client: openai.OpenAI) -> Any:
    try:
        return client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    except openai.InternalServerError:
        return None


def test_a_full_queue_is_429_and_a_queued_job_whose_client_leaves_never_runs(agents, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """shed_load = "queue" holds every job while the box is hot: the queue fills deterministically."""
    box, temp = _hot_box(agents, tmp_path, "queue", max_queue=1)
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", box.port), timeout=60) as held:  # stored, then held
        held.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: box\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_until(lambda: len(_open(box)) == 1, what="the first job stored")
        with pytest.raises(openai.RateLimitError) as busy:
            box.openai().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
        assert busy.value.code == "busy" and busy.value.response.headers["retry-after"] == "1"
    # The client left while its job waited in the queue.
    line = wait_until(
        lambda: next((v for v in box.job_lines().values() if v.startswith("canceled")), None),
        what="the queued job to be canceled",
    )
    assert "0 completion tokens" in line and "before it started" in line
    temp.write_text("50000\n")
    after = box.openai().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    assert after.choices[0].finish_reason == "length"  # the queue was free: served, once cool
