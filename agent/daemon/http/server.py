"""The HTTP server: OpenAI- and Ollama-compatible endpoints over the agent's one intake.

Standard library only (``http.server.ThreadingHTTPServer``): one thread per
open connection, at most ``[http] max_connections`` of them (more are answered
503 at once).  A request thread (``handler.Handler``)

1. checks the key (``Authorization: Bearer KEY``, ``hmac.compare_digest``
   against every configured key; a key is never logged), reads a body of at
   most ``[jobs] max_payload_bytes`` and parses it (a precise 400 otherwise);
2. maps it to a job (``edge_contract.openai_compat``, shared with the fleet's
   gateway; the route and the errors: ``routes``), checks the model's name
   (404), opens a waiter on ``HTTPSink`` for the job's reply address and
   submits the job to the ``Inbox`` (``Inbox.submit``): the same admission,
   the same durable queue, batching and prefix cache as an MQTT job;
3. relays what the sink receives from the worker (chunks, then the result) as
   the dialect's answer: SSE ``data:`` lines ending ``data: [DONE]``, NDJSON
   lines, or one JSON object; an error before anything was sent is the
   matching HTTP status (400, 413, 429 or 503 with ``Retry-After``, 500);
4. blocks on its queue while it waits (no polling); one watcher thread
   (epoll, ``waiting.Watcher``) tells it when its client closes the
   connection, and the job is canceled through the intake, so the next
   request is served at once.

No exception from a request ends a thread or the process: each is logged and
answered 500 when the answer has not started.  This module holds the server's
life: binding, serving, stopping, and the keys.
"""

from __future__ import annotations

import hmac
import socket
import threading
import time
from collections.abc import Callable

from agent.config import HTTPConfig
from agent.daemon.http.handler import ConnectionLimitedServer, Intake
from agent.daemon.http.waiting import HTTPSink, Watcher
from agent.health.telemetry import JobStats
from edge_contract.errors import ConfigError
from edge_contract.protocol import ModelRef

__all__ = ["HTTPServer"]


class HTTPServer:
    """The agent's HTTP API; see the module docstring."""

    #: How often the serving thread looks for ``stop_accepting``: the longest that call waits.
    POLL_S = 0.2

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
            self._server = ConnectionLimitedServer((host, port), self, family)
        except OSError as exc:
            raise ConfigError(
                f"http.listen: cannot listen on {config.listen} ({exc.strerror or exc}): "
                "choose a free port of an address of this machine"
            ) from None
        self.watcher = Watcher()
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": self.POLL_S},
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
