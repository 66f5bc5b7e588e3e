"""One connection's requests: authorization, routing, the job's submission and its answer relayed.

``Handler`` does the I/O (``http.server``); what to answer is decided in
``routes``.  ``ConnectionLimitedServer`` runs one handler thread per open
connection, at most ``[http] max_connections`` (more are answered 503 at once).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import socket
import sqlite3
import threading
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from agent.config import HTTPConfig
from agent.daemon import intake
from agent.daemon.http import routes
from agent.daemon.http.waiting import Closed, Gone, HTTPSink, Waiter, Watcher
from agent.daemon.replies import local_address
from edge_contract import __version__
from edge_contract import openai_compat as api
from edge_contract.openai_compat import ApiError, Call
from edge_contract.protocol import ModelRef, Result

log = logging.getLogger(__name__)

#: An idle keep-alive connection (or a client that stops reading) is closed after this long, seconds.
_IDLE_S = 60.0


class Intake(Protocol):
    """Where the server submits jobs and cancels them (the ``Inbox``)."""

    def submit(self, submission: intake.Submission) -> intake.Decision: ...
    def cancel(self, job_id: str) -> None: ...


class Api(Protocol):
    """What a handler needs of the agent's HTTP API (``server.HTTPServer``)."""

    config: HTTPConfig
    inbox: Intake
    model: Callable[[], ModelRef]
    sink: HTTPSink
    watcher: Watcher
    max_body_bytes: int
    max_tokens_limit: int
    overloaded_retry_s: int
    started: int

    def authorized(self, header: str | None) -> bool: ...


class _ClientGone(Exception):
    """The client closed its connection (or stopped reading) before its answer was complete."""


class ConnectionLimitedServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` of them; ``Handler`` serves each."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], api_server: Api, family: int) -> None:
        self.address_family = family
        self.api = api_server
        self._slots = threading.BoundedSemaphore(api_server.config.max_connections)
        super().__init__(address, Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(routes.busy_response())
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("HTTP: unexpected error serving %s", client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"edge-agent/{__version__}"
    sys_version = ""  # no Python version in the Server header
    timeout = _IDLE_S
    server: ConnectionLimitedServer

    # -- plumbing -----------------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        # Tokens go out one small write at a time: do not let Nagle hold them back.
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # the request line only: no header, no key
        log.debug("HTTP %s: " + format, self.client_address[0], *args)

    @property
    def _api(self) -> Api:
        return self.server.api

    def _send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, "application/json", json.dumps(body).encode(), headers)

    def _send(
        self, status: int, content_type: str, data: bytes, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_error(self, error: ApiError) -> None:
        body = api.error_body(None, error, dialect=routes.dialect(self.path))
        headers = {}
        if error.retry_after is not None:
            headers["Retry-After"] = str(error.retry_after)
        if error.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        self._send_json(error.status, body, headers)

    def _start_stream(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _write_chunk(self, data: bytes, *, last: bool = False) -> None:
        """One chunk of a chunked body (``last``: and the body's end, in the same write)."""
        try:
            self.wfile.write(b"%X\r\n%s\r\n%s" % (len(data), data, b"0\r\n\r\n" if last else b""))
        except OSError as exc:  # BrokenPipe, ConnectionReset, a client that stopped reading
            raise _ClientGone() from exc

    # -- methods -----------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._serve(self._get)

    def do_POST(self) -> None:
        self._serve(self._post)

    def do_PUT(self) -> None:
        self._serve(self._not_allowed)

    do_HEAD = do_GET
    do_DELETE = do_PATCH = do_PUT

    def _serve(self, route: Callable[[], None]) -> None:
        try:
            if not self._api.authorized(self.headers.get("Authorization")):
                self.close_connection = True  # the body, if any, stays unread
                raise routes.unauthorized()
            route()
        except ApiError as error:
            try:
                self._send_error(error)
            except OSError:  # the client is gone already
                self.close_connection = True
        except _ClientGone:
            self.close_connection = True
        except Exception:  # a bug must not end the thread with nothing said
            log.exception("HTTP %s %s failed", self.command, self.path)
            self.close_connection = True
            with contextlib.suppress(Exception):  # the answer had started, or the socket is gone
                self._send_error(ApiError(500, "internal error (logged by the agent)", type="server_error"))

    def _not_allowed(self) -> None:
        self.close_connection = True
        raise routes.not_allowed(self.command, self.path)

    def _get(self) -> None:
        answer = routes.get_answer(routes.path_of(self.path), self._api.model(), self._api.started)
        if answer is routes.ROOT:
            self._send(200, "text/plain; charset=utf-8", routes.GREETING)
        elif answer is routes.POST_ONLY:
            self._not_allowed()
        else:
            self._send_json(200, answer)

    def _post(self) -> None:
        path = routes.path_of(self.path)
        parse = routes.POST_ROUTES.get(path)
        if parse is None:
            self.close_connection = True
            if path in routes.GET_PATHS:
                self._not_allowed()
            raise routes.no_route(path)
        call = parse(self._read_json(), self._api.max_tokens_limit)
        ref = self._api.model()
        if not api.serves(call.model, ref.name):
            raise routes.unknown_model(call.model, ref)
        if call.load_only:
            self._send_json(200, api.ollama_final(call, None))
            return
        self._run(call)

    def _read_json(self) -> Any:
        try:
            length = routes.body_length(
                self.headers.get("Transfer-Encoding"),
                self.headers.get("Content-Length"),
                self._api.max_body_bytes,
            )
        except ApiError:
            self.close_connection = True  # the body stays unread
            raise
        data = self.rfile.read(length) if length > 0 else b""
        if len(data) < length:
            self.close_connection = True
            raise _ClientGone()
        return routes.parse_json(data)

    # -- one job -----------------------------------------------------------------------------------

    def _run(self, call: Call) -> None:
        server = self._api
        job_id = "http-" + uuid.uuid4().hex
        address = local_address(job_id)
        waiter = server.sink.open(address)
        server.watcher.watch(self.connection, waiter)
        try:
            try:
                decision = server.inbox.submit(intake.Submission(job_id, {**call.job, "id": job_id}, address))
            except sqlite3.Error:
                raise routes.storage_failed(server.overloaded_retry_s) from None
            if not isinstance(decision, intake.Accept | intake.Reply):
                raise ApiError(
                    500, f"unexpected admission decision {type(decision).__name__}", type="server_error"
                )
            self._relay(call, job_id, waiter)
        except _ClientGone:
            log.info("HTTP job %s: the client went away; canceling it", job_id)
            try:
                server.inbox.cancel(job_id)
            except Exception:  # the store fails: the job runs to its end for nobody, then is forgotten
                log.exception("HTTP job %s: cannot cancel it", job_id)
            raise
        finally:
            server.watcher.unwatch(self.connection)
            server.sink.forget(address)

    def _next(self, waiter: Waiter) -> Result | str | Closed:
        """The next chunk or the result; raises ``_ClientGone`` when the client leaves meanwhile."""
        item = waiter.get()
        if isinstance(item, Gone):
            raise _ClientGone()
        return item

    def _job_error(self, call: Call, result: Result | Closed) -> ApiError:
        return routes.job_error(call, result, self._api.overloaded_retry_s)

    def _relay(self, call: Call, job_id: str, waiter: Waiter) -> None:
        created = api.created_at()
        item = self._next(waiter)
        if not isinstance(item, str) and (isinstance(item, Closed) or item.status != "succeeded"):
            raise self._job_error(call, item)
        if not call.stream:
            while isinstance(item, str):  # a non-streamed job sends no chunks; tolerate them anyway
                item = self._next(waiter)
            if isinstance(item, Closed) or item.status != "succeeded":
                raise self._job_error(call, item)
            self._send_json(200, api.whole_answer(call, job_id, item, created))
            return
        self._start_stream(api.stream_content_type(call))
        writer = api.StreamWriter(call, job_id, created)
        first = True
        while True:
            # What came meanwhile goes out in one write: a client that reads slower than the
            # model writes costs fewer system calls, never more.
            out: list[bytes] = []
            ended = False
            while True:
                if isinstance(item, str):
                    out.append(writer.piece(item, first=first))
                    first = False
                else:
                    good = isinstance(item, Result) and item.status == "succeeded"
                    outcome = item if good and isinstance(item, Result) else self._job_error(call, item)
                    out += api.stream_end(call, job_id, created, outcome, first=first)
                    ended = True
                    break
                try:
                    got = waiter.get_nowait()
                except queue.Empty:
                    break
                if isinstance(got, Gone):
                    raise _ClientGone()
                item = got
            self._write_chunk(b"".join(out), last=ended)
            if ended:
                return
            item = self._next(waiter)
