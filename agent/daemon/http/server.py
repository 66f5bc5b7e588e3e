"""The HTTP server: OpenAI- and Ollama-compatible endpoints over the agent's one intake.

Standard library only (``http.server.ThreadingHTTPServer``): one thread per
open connection, at most ``[http] max_connections`` of them (more are answered
503 at once).  A request thread

1. checks the key (``Authorization: Bearer KEY``, ``hmac.compare_digest``
   against every configured key; a key is never logged), reads a body of at
   most ``[jobs] max_payload_bytes`` and parses it (a precise 400 otherwise);
2. maps it to a job (``edge_contract.openai_compat``, shared with the fleet's
   gateway), checks the model's name (404), opens a waiter on ``HTTPSink`` for
   the job's reply address and submits the job to the ``Inbox``
   (``Inbox.submit``): the same admission, the same durable queue, batching and
   prefix cache as an MQTT job;
3. relays what the sink receives from the worker (chunks, then the result) as
   the dialect's answer: SSE ``data:`` lines ending ``data: [DONE]``, NDJSON
   lines, or one JSON object; an error before anything was sent is the
   matching HTTP status (400, 413, 429 or 503 with ``Retry-After``, 500);
4. blocks on its queue while it waits (no polling); one watcher thread
   (epoll) tells it when its client closes the connection, and the job is
   canceled through the intake, so the next request is served at once.

No exception from a request ends a thread or the process: each is logged and
answered 500 when the answer has not started.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import queue
import select
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from agent.config import HTTPConfig
from agent.daemon import intake
from agent.daemon.replies import local_address
from agent.health.telemetry import JobStats
from edge_contract import __version__
from edge_contract import openai_compat as api
from edge_contract.errors import ConfigError
from edge_contract.openai_compat import ApiError, Call
from edge_contract.protocol import ModelRef, Result

log = logging.getLogger(__name__)

#: An idle keep-alive connection (or a client that stops reading) is closed after this long, seconds.
_IDLE_S = 60.0


class Intake(Protocol):
    """Where the server submits jobs and cancels them (the ``Inbox``)."""

    def submit(self, submission: intake.Submission) -> intake.Decision: ...
    def cancel(self, job_id: str) -> None: ...


@dataclass(frozen=True)
class _Closed:
    """The agent shuts down: no result will come."""


@dataclass(frozen=True)
class _Gone:
    """The client closed its connection."""


_CLOSED = _Closed()
_GONE = _Gone()
_Item = str | Result | _Closed | _Gone  # a chunk's text, the result, or the end


class _Watcher:
    """One thread that watches the connections of waiting requests (epoll), so no request polls.

    A request waiting for its job blocks on its queue; when its client closes
    the connection, the watcher puts ``_GONE`` there.  Each connection is
    watched once (``EPOLLONESHOT``): data from the client (a pipelined request)
    ends the watch without a verdict.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._lock = threading.Lock()
        self._watched: dict[int, tuple[socket.socket, queue.SimpleQueue[_Item]]] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="edge-agent-http-watch", daemon=True)
        self._thread.start()

    def watch(self, sock: socket.socket, waiter: queue.SimpleQueue[_Item]) -> None:
        fd = sock.fileno()
        with self._lock:
            self._watched[fd] = (sock, waiter)
            self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT)

    def unwatch(self, sock: socket.socket) -> None:
        """Stop watching (before the socket is closed: its number may be reused)."""
        with self._lock:
            fd = sock.fileno()
            if self._watched.pop(fd, None) is not None:
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)

    def close(self) -> None:
        self._closed = True

    def _run(self) -> None:
        while not self._closed:
            try:
                events = self._epoll.poll(1.0)
                for fd, mask in events:
                    with self._lock:
                        entry = self._watched.pop(fd, None)
                        if entry is not None:
                            with contextlib.suppress(OSError):
                                self._epoll.unregister(fd)
                    if entry is not None and _closed_by_peer(entry[0], mask):
                        entry[1].put(_GONE)
            except Exception:  # never let the watcher die: requests would wait for nothing
                log.exception("HTTP: the connection watcher failed")


def _closed_by_peer(sock: socket.socket, mask: int) -> bool:
    if mask & (select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
        return True
    try:  # readable: a close shows as nothing left to read
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class HTTPSink:
    """The reply sink of HTTP jobs: hands each job's chunks and result to the request waiting for them."""

    def __init__(self, stats: JobStats) -> None:
        self._stats = stats
        self._lock = threading.Lock()
        self._waiters: dict[str, queue.SimpleQueue[_Item]] = {}
        self._closed = False

    def open(self, address: str) -> queue.SimpleQueue[_Item]:
        """Start collecting the replies sent to ``address`` (before the job is submitted)."""
        waiter: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        with self._lock:
            if self._closed:
                waiter.put(_CLOSED)
            self._waiters[address] = waiter
        return waiter

    def forget(self, address: str) -> None:
        """Stop collecting (the request is answered, or its client is gone)."""
        with self._lock:
            self._waiters.pop(address, None)

    def chunk(self, address: str, payload: bytes) -> None:
        with self._lock:
            waiter = self._waiters.get(address)
        if waiter is not None:  # the worker's own Chunk JSON: its text is all that is needed
            waiter.put(str(json.loads(payload)["text"]))

    def result(self, address: str, payload: str) -> None:
        result = Result.model_validate_json(payload)
        self._stats.record_http(result.status)
        with self._lock:
            waiter = self._waiters.get(address)
        if waiter is not None:
            waiter.put(result)

    def close(self) -> None:
        """The agent stops: every waiting request learns that no result will come."""
        with self._lock:
            self._closed = True
            for waiter in self._waiters.values():
                waiter.put(_CLOSED)


class _ClientGone(Exception):
    """The client closed its connection (or stopped reading) before its answer was complete."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], api_server: HTTPServer, family: int) -> None:
        self.address_family = family
        self.api = api_server
        self._slots = threading.BoundedSemaphore(api_server.config.max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            body = json.dumps(
                api.openai_error(
                    ApiError(503, "too many connections; retry", type="server_error", code="busy")
                )
            ).encode()
            head = (
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            with contextlib.suppress(OSError):
                request.sendall(head.encode() + body)
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


class HTTPServer:
    """The agent's HTTP API; see the module docstring."""

    def __init__(
        self,
        config: HTTPConfig,
        *,
        inbox: Intake,
        model: Callable[[], ModelRef],
        stats: JobStats,
        max_body_bytes: int,
        max_tokens_limit: int,
        overloaded_retry_s: int,
    ) -> None:
        """Bind the socket (a ``ConfigError`` naming ``http.listen`` when that fails)."""
        self.config = config
        self.inbox = inbox
        self.model = model
        self.sink = HTTPSink(stats)
        self.max_body_bytes = max_body_bytes
        self.max_tokens_limit = max_tokens_limit
        self.overloaded_retry_s = overloaded_retry_s
        self.started = int(time.time())
        self._keys = [key.get_secret_value().encode() for key in config.api_keys]
        host, port = config.endpoint
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            self._server = _Server((host, port), self, family)
        except OSError as exc:
            raise ConfigError(
                f"http.listen: cannot listen on {config.listen} ({exc.strerror or exc}): "
                "choose a free port of an address of this machine"
            ) from None
        self.watcher = _Watcher()
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="edge-agent-http",
            daemon=True,
        )

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port)."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Serve requests on a thread of their own."""
        self._thread.start()

    def stop_accepting(self) -> None:
        """Take no new connection (requests in progress go on)."""
        if self._thread.is_alive():
            self._server.shutdown()

    def close(self) -> None:
        """Answer every waiting request (no result will come) and close the socket."""
        self.sink.close()
        self.watcher.close()
        self._server.server_close()

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries a configured key (always, with none configured)."""
        if not self._keys:
            return True
        scheme, _, token = (header or "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        found = False
        for key in self._keys:  # every key compared, in constant time each
            found |= hmac.compare_digest(given, key)
        return found


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"edge-agent/{__version__}"
    sys_version = ""  # no Python version in the Server header
    timeout = _IDLE_S
    server: _Server

    # -- plumbing -----------------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        # Tokens go out one small write at a time: do not let Nagle hold them back.
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # the request line only: no header, no key
        log.debug("HTTP %s: " + format, self.client_address[0], *args)

    @property
    def _api(self) -> HTTPServer:
        return self.server.api

    def _dialect(self) -> str:
        return "ollama" if self.path.startswith("/api/") else "openai"

    def _send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_error(self, error: ApiError, dialect: str | None = None) -> None:
        body = api.error_body(None, error, dialect=dialect or self._dialect())
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

    def do_HEAD(self) -> None:
        self._serve(self._get)

    def do_POST(self) -> None:
        self._serve(self._post)

    def do_PUT(self) -> None:
        self._serve(self._not_allowed)

    def do_DELETE(self) -> None:
        self._serve(self._not_allowed)

    def do_PATCH(self) -> None:
        self._serve(self._not_allowed)

    def _serve(self, route: Callable[[], None]) -> None:
        try:
            if not self._api.authorized(self.headers.get("Authorization")):
                self.close_connection = True  # the body, if any, stays unread
                raise ApiError(
                    401,
                    "missing or wrong API key: send Authorization: Bearer <one of [http] api_keys>",
                    code="invalid_api_key",
                )
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
        raise ApiError(405, f"{self.command} is not allowed on {self.path}", code="method_not_allowed")

    def _get(self) -> None:
        path = self.path.split("?", 1)[0]
        ref = self._api.model()
        if path in ("/", ""):
            data = b"edge-agent is running (OpenAI- and Ollama-compatible)"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [self._openai_model(ref)]})
        elif path.startswith("/v1/models/"):
            if not api.serves(path.removeprefix("/v1/models/"), ref.name):
                raise self._unknown_model(path.removeprefix("/v1/models/"), ref)
            self._send_json(200, self._openai_model(ref))
        elif path == "/api/tags":
            self._send_json(200, {"models": [self._ollama_model(ref)]})
        elif path == "/api/version":
            self._send_json(200, {"version": __version__})
        elif path in _POST_ROUTES:
            self._not_allowed()
        else:
            raise ApiError(404, f"no route {path}", code="not_found")

    def _openai_model(self, ref: ModelRef) -> dict[str, Any]:
        return api.openai_model(ref.name, self._api.started, "edge-agent")

    def _ollama_model(self, ref: ModelRef) -> dict[str, Any]:
        return api.ollama_model(f"{ref.name}:latest", self._api.started)

    def _unknown_model(self, name: str, ref: ModelRef) -> ApiError:
        return ApiError(
            404,
            f"model {name!r} not found: this box serves {ref.name!r}",
            code="model_not_found",
            param="model",
        )

    def _post(self) -> None:
        path = self.path.split("?", 1)[0]
        parse = _POST_ROUTES.get(path)
        if parse is None:
            self.close_connection = True
            if path in ("/v1/models", "/api/tags", "/api/version", "/"):
                self._not_allowed()
            raise ApiError(404, f"no route {path}", code="not_found")
        body = self._read_json()
        call = parse(body, self._api.max_tokens_limit)
        ref = self._api.model()
        if not api.serves(call.model, ref.name):
            raise self._unknown_model(call.model, ref)
        if call.load_only:
            self._send_json(200, api.ollama_final(call, None))
            return
        self._run(call)

    def _read_json(self) -> Any:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise ApiError(411, "send the body with a Content-Length (chunked bodies are not read)")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self.close_connection = True
            raise ApiError(400, "Content-Length is not a number", code="invalid_request") from None
        limit = self._api.max_body_bytes
        if length > limit:
            self.close_connection = True
            raise ApiError(
                413,
                f"the body is {length} bytes; the limit is {limit} ([jobs] max_payload_bytes)",
                code="payload_too_large",
            )
        if length <= 0:
            raise api.bad_request(None, "the request needs a JSON body", code="invalid_json")
        data = self.rfile.read(length)
        if len(data) < length:
            self.close_connection = True
            raise _ClientGone()
        try:
            return json.loads(data)
        except json.JSONDecodeError as exc:
            raise api.bad_request(
                None,
                f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                code="invalid_json",
            ) from None
        except UnicodeDecodeError as exc:
            raise api.bad_request(
                None, f"the body is not UTF-8 ({exc.reason})", code="invalid_json"
            ) from None
        except RecursionError:
            raise api.bad_request(None, "the body is nested too deeply", code="invalid_json") from None

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
                raise ApiError(
                    503,
                    "the job queue cannot store jobs now (a full or failing disk); retry later",
                    type="server_error",
                    code="storage",
                    retry_after=server.overloaded_retry_s,
                ) from None
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

    def _next(self, waiter: queue.SimpleQueue[_Item]) -> Result | str | _Closed:
        """The next chunk or the result; raises ``_ClientGone`` when the client leaves meanwhile."""
        item = waiter.get()
        if isinstance(item, _Gone):
            raise _ClientGone()
        return item

    def _job_error(self, call: Call, result: Result | _Closed) -> ApiError:
        if isinstance(result, _Closed):
            return ApiError(
                503,
                "the agent is shutting down; retry",
                type="server_error",
                code="shutting_down",
                retry_after=5,
            )
        return api.result_error(call, result, overloaded_retry_s=self._api.overloaded_retry_s)

    def _relay(self, call: Call, job_id: str, waiter: queue.SimpleQueue[_Item]) -> None:
        created = api.created_at()
        item = self._next(waiter)
        if not isinstance(item, str) and (isinstance(item, _Closed) or item.status != "succeeded"):
            raise self._job_error(call, item)
        if not call.stream:
            while isinstance(item, str):  # a non-streamed job sends no chunks; tolerate them anyway
                item = self._next(waiter)
            if isinstance(item, _Closed) or item.status != "succeeded":
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
                if isinstance(got, _Gone):
                    raise _ClientGone()
                item = got
            self._write_chunk(b"".join(out), last=ended)
            if ended:
                return
            item = self._next(waiter)


def _openai_chat(body: Any, _limit: int) -> Call:
    return api.openai_chat(body)


def _openai_completion(body: Any, _limit: int) -> Call:
    return api.openai_completion(body)


_POST_ROUTES: dict[str, Callable[[Any, int], Call]] = {
    "/v1/chat/completions": _openai_chat,
    "/v1/completions": _openai_completion,
    "/api/chat": api.ollama_chat,
    "/api/generate": api.ollama_generate,
}
