"""The gateway's routes in-process (FastAPI's TestClient) over a scripted dispatcher: auth and its
error shapes, bodies refused before any box is asked, answers and streams in both dialects."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from edge_fleet.server.app import create_app
from edge_fleet.server.db import Database
from edge_fleet.server.gateway.relay import Gateway
from edge_fleet.server.store import Store
from tests.unit.test_gateway_relay import _answers, _chunk, _Dispatcher, _Link, _result

CHAT = {"model": "phi3", "messages": [{"role": "user", "content": "hi"}]}


class _Connected(_Dispatcher):
    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.connected = threading.Event()
        self.connected.set()


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    return Store(Database(str(tmp_path / "server.sqlite3")))


@pytest.fixture()
def client(store: Store) -> TestClient:
    app = create_app(store)
    dispatcher = _Connected({"a": _answers(_chunk(0, "Hel"), _chunk(1, "lo"), _result("Hello"))})
    app.state.gateway = Gateway(_Link(("a", True)), dispatcher, timeout_s=5)  # type: ignore[arg-type]
    return TestClient(app)


def _auth(store: Store, role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {store.create_token(role + '-1', role, 'test')}"}  # type: ignore[arg-type]


def test_tokens_and_roles_in_each_dialects_error_shape(client: TestClient, store: Store) -> None:
    missing = client.post("/v1/chat/completions", json=CHAT)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    assert (
        missing.json()["error"]["code"] == "invalid_api_key" and "token" in missing.json()["error"]["message"]
    )
    wrong = client.post("/api/chat", json=CHAT, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and isinstance(wrong.json()["error"], str)  # Ollama's shape
    viewer = _auth(store, "viewer")
    listed = client.get("/v1/models", headers=viewer)  # positive control: a viewer may list
    assert listed.status_code == 200
    assert [m["id"] for m in listed.json()["data"]] == ["phi3", "group:shop-3", "device:a"]
    assert client.get("/api/tags", headers=viewer).json()["models"][0]["name"] == "phi3:latest"
    denied = client.post("/v1/chat/completions", json=CHAT, headers=viewer)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "insufficient_role"


def test_bad_bodies_are_refused_before_any_box_is_asked(client: TestClient, store: Store) -> None:
    operator = _auth(store, "operator")
    bad = client.post("/v1/chat/completions", content=b"{nope", headers=operator)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    huge = client.post("/v1/completions", content=b"x" * (1 << 20 + 1), headers=operator)
    assert huge.status_code == 413 and "at most" in huge.json()["error"]["message"]
    n = client.post("/v1/chat/completions", json={**CHAT, "n": 2}, headers=operator)
    assert n.status_code == 400 and n.json()["error"]["param"] == "n"
    assert client.app.state.gateway.dispatcher.sent == []  # type: ignore[attr-defined]
    ok = client.post("/v1/chat/completions", json=CHAT, headers=operator)  # positive control
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "Hello"
    assert ok.headers["X-Edge-Device"] == "a"


def test_streams_in_both_dialects(client: TestClient, store: Store) -> None:
    operator = _auth(store, "operator")
    sse = client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=operator)
    assert sse.headers["content-type"].startswith("text/event-stream")
    events = [e.removeprefix("data: ") for e in sse.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "Hello"
    lines = client.post("/api/chat", json=CHAT, headers=operator).text.splitlines()  # NDJSON by default
    assert [json.loads(line)["done"] for line in lines] == [False, False, True]
    assert "".join(json.loads(line)["message"]["content"] for line in lines) == "Hello"
