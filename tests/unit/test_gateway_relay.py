"""The gateway's request loop over a scripted dispatcher: retries, refusals, a box lost mid-stream, errors."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

import pytest

from edge_contract import openai_compat as api
from edge_contract.openai_compat import ApiError
from edge_contract.protocol import Chunk, ErrorInfo, JobRequest, ModelRef, Result, Status
from edge_fleet.fleet_view import FleetView
from edge_fleet.server.gateway.dispatch import Item, Offline, Sink
from edge_fleet.server.gateway.relay import Gateway

Script = Callable[[JobRequest, Sink], None]


class _Link:
    def __init__(self, *boxes: tuple[str, bool]) -> None:
        self.lock = threading.Lock()
        self.view = FleetView("edge")
        for name, online in boxes:
            status = Status(online=online, device_id=name, group="shop-3", model=ModelRef(name="phi3"))
            self.view.feed(f"edge/{name}/status", status.model_dump_json().encode())


class _Dispatcher:
    def __init__(self, scripts: dict[str, Script]) -> None:
        self.scripts = scripts
        self.sent: list[str] = []
        self.canceled: list[str] = []
        self.forgotten = 0

    def send(self, device_id: str, job: JobRequest, sink: Sink) -> bytes:
        self.sent.append(device_id)
        self.scripts[device_id](job, sink)
        return device_id.encode()

    def forget(self, _ticket: bytes) -> None:
        self.forgotten += 1

    def cancel(self, device_id: str, _job_id: str) -> None:
        self.canceled.append(device_id)

    def offline(self, _device_id: str) -> bool:
        return False


def _answers(*items: Callable[[JobRequest], Item]) -> Script:
    return lambda job, sink: [sink(make(job)) for make in items] and None


def _result(text: str = "hello", **fields: Any) -> Callable[[JobRequest], Item]:
    return lambda job: Result(id=job.id, status="succeeded", text=text, finish_reason="stop", **fields)


def _refusal(code: str) -> Callable[[JobRequest], Item]:
    error = ErrorInfo(code=code, message=f"refused: {code}")  # type: ignore[arg-type]
    return lambda job: Result(id=job.id, status="rejected", error=error)


def _chunk(seq: int, text: str) -> Callable[[JobRequest], Item]:
    return lambda job: Chunk(id=job.id, seq=seq, text=text)


def _gone(device: str) -> Callable[[JobRequest], Item]:
    return lambda _job: Offline(device)


def _gateway(scripts: dict[str, Script], *offline: str) -> tuple[Gateway, _Dispatcher]:
    link = _Link(*[(name, name not in offline) for name in scripts])
    dispatcher = _Dispatcher(scripts)
    return Gateway(link, dispatcher, timeout_s=5), dispatcher  # type: ignore[arg-type]


def _chat(**extra: Any) -> api.Call:
    return api.openai_chat({"model": "phi3", "messages": [{"role": "user", "content": "hi"}], **extra})


async def _whole(gateway: Gateway, call: api.Call) -> tuple[str, str]:
    answer = await gateway.start(call)
    return answer.device_id, (await answer.result()).text


async def _events(gateway: Gateway, call: api.Call) -> tuple[str, list[Any]]:
    answer = await gateway.start(call)
    wire = b"".join([piece async for piece in answer.stream()]).decode()
    events = [e for e in wire.split("\n\n") if e]  # (pieces that came together go out in one write)
    return answer.device_id, [e.removeprefix("data: ") for e in events]


def test_a_refusal_moves_the_request_to_the_next_box_which_then_comes_last() -> None:
    gateway, dispatcher = _gateway({"a": _answers(_refusal("busy")), "b": _answers(_result("from b"))})
    assert asyncio.run(_whole(gateway, _chat())) == ("b", "from b")
    assert dispatcher.sent == ["a", "b"] and dispatcher.canceled == []  # a refusal needs no cancel
    # The box that refused goes after the other while its Retry-After lasts.
    assert asyncio.run(_whole(gateway, _chat())) == ("b", "from b")
    assert dispatcher.sent == ["a", "b", "b"]


def test_a_box_offline_before_answering_is_left_for_the_next_and_told_to_cancel() -> None:
    gateway, dispatcher = _gateway({"a": _answers(_gone("a")), "b": _answers(_result("from b"))})
    assert asyncio.run(_whole(gateway, _chat())) == ("b", "from b")
    assert dispatcher.canceled == ["a"]  # its job may wait in its session: canceled there


def test_when_every_box_refuses_the_last_refusal_is_the_answer() -> None:
    gateway, dispatcher = _gateway({"a": _answers(_refusal("busy")), "b": _answers(_refusal("overloaded"))})
    with pytest.raises(ApiError) as refused:
        asyncio.run(_whole(gateway, _chat()))
    assert refused.value.status == 503 and refused.value.retry_after == 2 and dispatcher.sent == ["a", "b"]


def test_other_errors_are_not_retried() -> None:
    error = ErrorInfo(code="context_overflow", message="the prompt is too long")
    rejected: Script = _answers(lambda job: Result(id=job.id, status="rejected", error=error))
    gateway, dispatcher = _gateway({"a": rejected, "b": _answers(_result())})
    with pytest.raises(ApiError) as bad:
        asyncio.run(_whole(gateway, _chat(stream=True)))  # before any event: a real HTTP status
    assert bad.value.status == 400 and bad.value.code == "context_length_exceeded"
    assert dispatcher.sent == ["a"]


def test_a_box_lost_mid_stream_ends_the_stream_with_an_error_event() -> None:
    script = _answers(_chunk(0, "Hel"), _chunk(0, "Hel"), _chunk(1, "lo"), _gone("a"))
    gateway, dispatcher = _gateway({"a": script})
    device, events = asyncio.run(_events(gateway, _chat(stream=True)))
    assert device == "a" and events[-1] == "[DONE]"
    pieces = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-2]]
    assert pieces == ["Hel", "lo"]  # the duplicate (QoS 1) relayed once
    error = json.loads(events[-2])["error"]
    assert error["code"] == "box_lost" and "went offline mid-answer" in error["message"]
    assert dispatcher.canceled == ["a"]


def test_a_whole_stream_ends_with_the_finish_and_nothing_to_cancel() -> None:
    gateway, dispatcher = _gateway({"a": _answers(_chunk(0, "Hi"), _result("Hi"))})
    _device, events = asyncio.run(_events(gateway, _chat(stream=True)))
    assert [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]] == [None, "stop"]
    assert dispatcher.canceled == [] and dispatcher.forgotten == 1


def test_no_box_is_404_for_an_unknown_model_and_503_for_an_offline_one() -> None:
    gateway, _ = _gateway({"a": _answers(_result())}, "a")
    with pytest.raises(ApiError) as offline:
        asyncio.run(_whole(gateway, _chat()))
    assert offline.value.status == 503 and "offline" in offline.value.message
    with pytest.raises(ApiError) as unknown:
        asyncio.run(
            _whole(
                gateway, api.openai_chat({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
            )
        )
    assert unknown.value.status == 404 and unknown.value.code == "model_not_found"


def test_a_field_the_contract_refuses_is_a_400_in_the_dialects_words() -> None:
    gateway, dispatcher = _gateway({"a": _answers(_result())})
    body = {"model": "phi3", "messages": [{"role": "user", "content": "x"}], "options": {"num_predict": "9"}}
    with pytest.raises(ApiError) as bad:
        asyncio.run(_whole(gateway, api.ollama_chat(body, 256)))
    assert bad.value.status == 400 and bad.value.param == "options.num_predict"
    assert dispatcher.sent == []  # positive control below: a good request is sent
    assert asyncio.run(_whole(gateway, _chat())) == ("a", "hello")
