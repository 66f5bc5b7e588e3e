"""The gateway's routes on ``edge-fleet server``: OpenAI's ``/v1/…`` and Ollama's ``/api/…``.

``GET /v1/models`` and ``GET /api/tags`` list what can be asked for (model names served by
online boxes, ``group:GROUP``, ``device:DEVICE``) to any token (viewer and up);
``POST /v1/chat/completions``, ``/v1/completions``, ``/api/chat`` and ``/api/generate`` run
jobs and need an operator token (or admin).  Errors are in the dialect's shape (OpenAI's
``{"error": {message, type, code, param}}``, Ollama's ``{"error": message}``), with the status
the box would give; bodies are mapped by ``edge_contract.openai_compat``, as on the box.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.security.utils import get_authorization_scheme_param

from edge_contract import __version__
from edge_contract import openai_compat as api
from edge_contract.openai_compat import ApiError, Call
from edge_contract.params import DEFAULTS

from ..auth import require
from ..store import Principal, Role
from .dispatch import Dispatcher
from .relay import Gateway
from .routing import DEVICE, GROUP

log = logging.getLogger(__name__)
router = APIRouter(tags=["gateway (OpenAI, Ollama)"])
_lock = threading.Lock()
#: What Ollama's ``num_predict`` -1 ("until the end") becomes: the contract's default limit.
_OLLAMA_UNTIL_END = DEFAULTS.max_tokens
#: Seconds a request waits for the gateway's broker connection (its first use, a reconnection).
_CONNECT_S = 10.0
#: The largest request body taken (a box takes 64 KiB by default: ``[jobs] max_payload_bytes``).
MAX_BODY_BYTES = 1 << 20
#: The response header naming the box that answered.
DEVICE_HEADER = "X-Edge-Device"


def _who(role: Role) -> Callable[[Request], Principal]:
    """The server's tokens (``auth.require``), with their 401/403 in the dialect's error shape."""
    check = require(role)

    def principal(request: Request) -> Principal:
        scheme, token = get_authorization_scheme_param(request.headers.get("Authorization"))
        credentials = (
            HTTPAuthorizationCredentials(scheme=scheme, credentials=token) if scheme and token else None
        )
        try:
            return check(request, credentials)
        except HTTPException as exc:
            denied = exc.status_code == 401
            raise ApiError(
                exc.status_code,
                str(exc.detail),
                type="authentication_error" if denied else "permission_error",
                code="invalid_api_key" if denied else "insufficient_role",
            ) from None

    return principal


_VIEWER = Depends(_who("viewer"))
_OPERATOR = Depends(_who("operator"))


def _gateway(request: Request) -> Gateway:
    """The app's gateway, made on first use (its broker connection waited for, up to ``_CONNECT_S``)."""
    app = request.app
    found: Gateway | None = getattr(app.state, "gateway", None)
    if found is None:
        link = app.state.link
        if link is None:
            raise ApiError(503, "this server has no broker link: start it with --broker", type="server_error")
        with _lock:
            if getattr(app.state, "gateway", None) is None:
                try:
                    app.state.gateway = Gateway(link, Dispatcher(link.options))
                except Exception as exc:  # e.g. TLS files the server's --tls-* options name are unreadable
                    log.exception("gateway: cannot connect to the broker")
                    raise ApiError(
                        503,
                        f"the fleet server's gateway cannot connect to the broker ({exc}); check its --broker "
                        "and --tls-* options",
                        type="server_error",
                        code="broker_unavailable",
                    ) from None
            found = app.state.gateway
            assert found is not None
    if not found.dispatcher.connected.wait(_CONNECT_S):
        raise ApiError(
            503,
            "the fleet server's gateway is not connected to the broker (see the server's log); retry",
            type="server_error",
            code="broker_unavailable",
            retry_after=5,
        )
    return found


async def _gateway_of(request: Request) -> Gateway:
    found: Gateway | None = getattr(request.app.state, "gateway", None)
    if found is not None and found.dispatcher.connected.is_set():
        return found  # the usual case: no thread needed
    return await anyio.to_thread.run_sync(_gateway, request)


async def _body(request: Request) -> Any:
    declared = request.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large(int(declared))
    data = b""
    async for piece in request.stream():
        data += piece
        if len(data) > MAX_BODY_BYTES:
            raise _too_large(len(data))
    if not data:
        raise api.bad_request(None, "the request needs a JSON body", code="invalid_json")
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise api.bad_request(None, f"the body is not valid JSON ({exc})", code="invalid_json") from None


def _too_large(size: int) -> ApiError:
    return ApiError(
        413,
        f"the body is {size} bytes or more; the gateway takes at most {MAX_BODY_BYTES} (shorten the messages)",
        code="payload_too_large",
    )


# -- what can be asked for ---------------------------------------------------------------------------


def _names(gateway: Gateway) -> list[str]:
    """Model names served by online boxes, then ``group:G`` and ``device:D`` of online boxes."""
    online = [c for c in gateway.candidates() if c.online]
    models = sorted({c.model for c in online if c.model})
    groups = sorted({GROUP + c.group for c in online if c.group})
    devices = sorted(DEVICE + c.device_id for c in online)
    return models + groups + devices


@router.get("/v1/models")
def openai_models(request: Request, _who: Principal = _VIEWER) -> dict[str, Any]:
    """What a request's ``model`` may name (see docs/http-api.md, "Through the fleet")."""
    now = int(time.time())
    return {
        "object": "list",
        "data": [api.openai_model(n, now, "edge-fleet") for n in _names(_gateway(request))],
    }


@router.get("/v1/models/{name:path}")
def openai_model(request: Request, name: str, _who: Principal = _VIEWER) -> dict[str, Any]:
    """One routable name (404 when nothing online answers to it)."""
    if name.removesuffix(":latest") not in _names(_gateway(request)):
        raise ApiError(
            404,
            f"model {name!r} not found: GET /v1/models lists what can be asked for",
            code="model_not_found",
            param="model",
        )
    return api.openai_model(name, int(time.time()), "edge-fleet")


@router.get("/api/tags")
def ollama_tags(request: Request, _who: Principal = _VIEWER) -> dict[str, Any]:
    """Ollama's list: model names as ``NAME:latest``, groups and devices as they are."""
    now = int(time.time())
    names = _names(_gateway(request))
    return {"models": [api.ollama_model(n if ":" in n else f"{n}:latest", now) for n in names]}


@router.get("/api/version")
def ollama_version() -> dict[str, str]:
    """Ollama's version probe (no token, as Ollama)."""
    return {"version": __version__}


# -- jobs --------------------------------------------------------------------------------------------


async def _run(request: Request, parse: Callable[[Any], Call]) -> Response:
    try:
        call = parse(await _body(request))
        return await _unless_gone(request, _answer(await _gateway_of(request), call))
    except ApiError:
        raise
    except Exception:  # a bug: logged, answered in the dialect's shape, the server goes on
        log.exception("gateway: %s failed", request.url.path)
        raise ApiError(500, "internal error (logged by the fleet server)", type="server_error") from None


async def _gone(request: Request) -> None:
    """Returns when the client closes its connection (its body is read: nothing else can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: Request, work: Coroutine[Any, Any, Response]) -> Response:
    """``work``, canceled (and with it the job on its box) if the client leaves before the answer
    starts: while its job waits in a queue, or runs with ``stream`` false."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_gone(request))
    try:
        done, _pending = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ApiError):
            await task
        log.info(
            "gateway: the client of %s went away before its answer; its job is canceled", request.url.path
        )
        return Response(status_code=499)  # (nobody reads it)
    finally:
        watch.cancel()


async def _answer(gateway: Gateway, call: Call) -> Response:
    if call.load_only:
        return JSONResponse(api.ollama_final(call, None))
    answer = await gateway.start(call)
    served_by = {DEVICE_HEADER: answer.device_id}
    if not call.stream:
        result = await answer.result()
        body = api.whole_answer(call, answer.job_id, result, answer.created)
        return JSONResponse(body, headers=served_by)
    return StreamingResponse(
        answer.stream(),
        media_type=api.stream_content_type(call),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **served_by},
    )


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, _who: Principal = _OPERATOR) -> Response:
    """OpenAI's chat completions, on the best box for ``model``."""
    return await _run(request, api.openai_chat)


@router.post("/v1/completions")
async def completions(request: Request, _who: Principal = _OPERATOR) -> Response:
    """OpenAI's (legacy) completions: the prompt as is."""
    return await _run(request, api.openai_completion)


@router.post("/api/chat")
async def ollama_chat(request: Request, _who: Principal = _OPERATOR) -> Response:
    """Ollama's chat (NDJSON stream unless ``"stream": false``)."""
    return await _run(request, lambda body: api.ollama_chat(body, _OLLAMA_UNTIL_END))


@router.post("/api/generate")
async def ollama_generate(request: Request, _who: Principal = _OPERATOR) -> Response:
    """Ollama's generate."""
    return await _run(request, lambda body: api.ollama_generate(body, _OLLAMA_UNTIL_END))


def _error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    dialect = "ollama" if request.url.path.startswith("/api/") else "openai"
    return JSONResponse(api.error_body(None, exc, dialect=dialect), status_code=exc.status, headers=headers)


def mount(app: FastAPI) -> None:
    """Add the gateway's routes (and its error shape) to the server's app; its broker connection,
    made on first use, is closed when the app stops."""
    app.include_router(router)
    app.add_exception_handler(ApiError, _error)
    previous = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        try:
            async with previous(a) as state:
                yield state
        finally:
            gateway: Gateway | None = getattr(app.state, "gateway", None)
            if gateway is not None:
                gateway.dispatcher.close()

    app.router.lifespan_context = lifespan
