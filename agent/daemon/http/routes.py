"""What a request is answered, decided without I/O: its route, its body's checks, the model's name, a job's error.

The dialects' mapping onto the job contract lives in ``edge_contract.openai_compat``
(shared with the fleet's gateway); this module picks the route and the HTTP error.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Final

from agent.daemon.http.waiting import Closed
from edge_contract import __version__
from edge_contract import openai_compat as api
from edge_contract.openai_compat import ApiError, Call
from edge_contract.protocol import ModelRef, Result

#: The plain-text answer of ``GET /``.
GREETING: Final = b"edge-agent is running (OpenAI- and Ollama-compatible)"
#: ``get_answer``'s verdict for a path that takes POST only.
POST_ONLY: Final = object()
#: ``get_answer``'s verdict for ``/``: the greeting, as text.
ROOT: Final = object()

GET_PATHS = ("/v1/models", "/api/tags", "/api/version", "/")


def _openai_chat(body: Any, _limit: int) -> Call:
    return api.openai_chat(body)


def _openai_completion(body: Any, _limit: int) -> Call:
    return api.openai_completion(body)


#: Each POST path's parser: the request body and the box's max_tokens limit to a ``Call``.
POST_ROUTES: dict[str, Callable[[Any, int], Call]] = {
    "/v1/chat/completions": _openai_chat,
    "/v1/completions": _openai_completion,
    "/api/chat": api.ollama_chat,
    "/api/generate": api.ollama_generate,
}


def path_of(target: str) -> str:
    """The request target without its query."""
    return target.split("?", 1)[0]


def dialect(target: str) -> str:
    """Which dialect a request's errors are written in."""
    return "ollama" if target.startswith("/api/") else "openai"


def get_answer(path: str, ref: ModelRef, started: int) -> Any:
    """The JSON body that answers ``GET path`` (``ROOT``: the greeting; ``POST_ONLY``: a 405)."""
    if path in ("/", ""):
        return ROOT
    if path == "/v1/models":
        return {"object": "list", "data": [api.openai_model(ref.name, started, "edge-agent")]}
    if path.startswith("/v1/models/"):
        name = path.removeprefix("/v1/models/")
        if not api.serves(name, ref.name):
            raise unknown_model(name, ref)
        return api.openai_model(ref.name, started, "edge-agent")
    if path == "/api/tags":
        return {"models": [api.ollama_model(f"{ref.name}:latest", started)]}
    if path == "/api/version":
        return {"version": __version__}
    if path in POST_ROUTES:
        return POST_ONLY
    raise no_route(path)


def no_route(path: str) -> ApiError:
    return ApiError(404, f"no route {path}", code="not_found")


def not_allowed(method: str, path: str) -> ApiError:
    return ApiError(405, f"{method} is not allowed on {path}", code="method_not_allowed")


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "missing or wrong API key: send Authorization: Bearer <one of [http] api_keys>",
        code="invalid_api_key",
    )


def unknown_model(name: str, ref: ModelRef) -> ApiError:
    return ApiError(
        404,
        f"model {name!r} not found: this box serves {ref.name!r}",
        code="model_not_found",
        param="model",
    )


def body_length(transfer_encoding: str | None, content_length: str | None, limit: int) -> int:
    """The body's declared length; an ``ApiError`` (after which the body stays unread) when it cannot be read."""
    if (transfer_encoding or "").lower() == "chunked":
        raise ApiError(411, "send the body with a Content-Length (chunked bodies are not read)")
    try:
        length = int(content_length or "0")
    except ValueError:
        raise ApiError(400, "Content-Length is not a number", code="invalid_request") from None
    if length > limit:
        raise ApiError(
            413,
            f"the body is {length} bytes; the limit is {limit} ([jobs] max_payload_bytes)",
            code="payload_too_large",
        )
    return length


def parse_json(data: bytes) -> Any:
    """The request's JSON body, or a precise 400."""
    if not data:
        raise api.bad_request(None, "the request needs a JSON body", code="invalid_json")
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise api.bad_request(
            None,
            f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            code="invalid_json",
        ) from None
    except UnicodeDecodeError as exc:
        raise api.bad_request(None, f"the body is not UTF-8 ({exc.reason})", code="invalid_json") from None
    except RecursionError:
        raise api.bad_request(None, "the body is nested too deeply", code="invalid_json") from None


def storage_failed(retry_s: int) -> ApiError:
    return ApiError(
        503,
        "the job queue cannot store jobs now (a full or failing disk); retry later",
        type="server_error",
        code="storage",
        retry_after=retry_s,
    )


def job_error(call: Call, result: Result | Closed, overloaded_retry_s: int) -> ApiError:
    """The HTTP error for a job that did not succeed (or never will: the agent stops)."""
    if isinstance(result, Closed):
        return ApiError(
            503,
            "the agent is shutting down; retry",
            type="server_error",
            code="shutting_down",
            retry_after=5,
        )
    return api.result_error(call, result, overloaded_retry_s=overloaded_retry_s)


def busy_response() -> bytes:
    """The whole 503 answer for a connection over ``[http] max_connections`` (sent before any handler)."""
    body = json.dumps(
        api.openai_error(ApiError(503, "too many connections; retry", type="server_error", code="busy"))
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body
