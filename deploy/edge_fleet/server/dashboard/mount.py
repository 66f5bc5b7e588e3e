"""``mount(app)``: the dashboard's routes, page, security headers, compression and the
telemetry recorder (started and stopped with the app)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.gzip import GZipMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import api, jobs_stream, session
from .history import History, Recorder

STATIC = Path(__file__).parent / "static"
# Only the server's own files; no inline script or style; no framing; no referrer to leak ids.
_PAGE_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
     b"connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
]  # fmt: skip


class _PageHeaders:
    """Adds ``nosniff`` to every answer, and the page's policy headers to ``/`` and ``/ui/…``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        page = path == "/" or path.startswith("/ui/")

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _v in headers}
                extra = [(b"x-content-type-options", b"nosniff"), *(_PAGE_HEADERS if page else [])]
                headers += [(k, v) for k, v in extra if k not in names]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, sending)


def mount(app: FastAPI, *, record_every_s: float = 2.0) -> None:
    """Add the dashboard to the server's ``app`` (its ``state.store`` and ``state.link`` set)."""
    for router in (session.router, api.router, jobs_stream.router):
        app.include_router(router)
    app.mount("/ui", StaticFiles(directory=STATIC), name="dashboard")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.add_middleware(_PageHeaders)
    app.add_middleware(GZipMiddleware, minimum_size=1024)  # (server-sent events stay uncompressed)
    history = History(app.state.store.db)
    app.state.history = history
    link = app.state.link
    if link is None:
        return
    recorder = Recorder(history, link, every_s=record_every_s)
    app.state.recorder = recorder
    previous = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        recorder.start()
        try:
            async with previous(a) as state:
                yield state
        finally:
            recorder.stop()

    app.router.lifespan_context = lifespan
