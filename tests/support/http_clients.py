"""Clients nobody here wrote (the official ``openai`` SDK, Ollama's client, ``curl -N``) pointed at an
OpenAI/Ollama-compatible API under test — a box's or the fleet gateway's — and what the tests send them."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import ollama
import openai
import pytest

#: The chat every HTTP test sends (and compares with the MQTT answer to the same messages).
MESSAGES = [
    {"role": "system", "content": "You are the till's assistant. Answer in one short sentence, politely."},
    {"role": "user", "content": "Is the device hot?"},
]

#: Every client made, closed after its test (an unclosed socket is a ResourceWarning, an error here).
_OPENED: list[Callable[[], None]] = []


def openai_client(url: str, key: str) -> openai.OpenAI:
    """The openai SDK on ``url``'s ``/v1`` with ``key``, no retries (closed after the test)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)
    _OPENED.append(client.close)
    return client


def ollama_client(url: str, key: str) -> ollama.Client:
    """Ollama's client on ``url`` with ``key`` as a bearer token (closed after the test)."""
    client = ollama.Client(host=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    _OPENED.append(client._client.close)
    return client


@pytest.fixture(autouse=True)
def close_clients_after_each_test() -> Iterator[None]:
    """Close every client the test made (autouse where a test module imports it)."""
    yield
    while _OPENED:
        _OPENED.pop()()


def mqtt_answer(caller, topic: str, job_id: str, **job: Any) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The same job sent over MQTT to ``topic``: its succeeded result."""
    caller.send(topic, {"id": job_id, **job})
    result: dict[str, Any] = caller.wait_result(job_id, timeout=60)
    assert result["status"] == "succeeded", result
    return result


def sse_text(lines: list[str]) -> str:
    """The text of a chat-completions event stream as ``curl -N`` prints it (checks its framing)."""
    assert lines and all(line.startswith("data: ") for line in lines), lines[:3]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


def concurrent_streams(
    client: openai.OpenAI, model: str, max_tokens: int, n: int = 8, timeout: float = 180
) -> tuple[dict[int, str], dict[int, str | None]]:
    """Stream ``n`` chats at once; return each one's text and last finish reason (fails on any error)."""
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    errors: list[BaseException] = []

    def stream(i: int) -> None:
        try:
            parts, reason = [], None
            for chunk in client.chat.completions.create(
                model=model,
                messages=MESSAGES,  # type: ignore[arg-type]
                max_tokens=max_tokens,
                stream=True,
            ):
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
                    reason = chunk.choices[0].finish_reason or reason
            texts[i], reasons[i] = "".join(parts), reason
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not errors, errors
    assert sorted(texts) == list(range(n))
    return texts, reasons
