"""How a request waits for its job: the sink that hands it its replies, the watcher that says its client left.

A request thread blocks on one queue (no polling).  ``HTTPSink`` puts there
what the worker sends to the job's reply address (each chunk's text, then the
``Result``), or ``CLOSED`` when the agent stops; ``Watcher`` (one epoll
thread) puts ``GONE`` there when the request's client closes its connection.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import select
import socket
import threading
from dataclasses import dataclass

from agent.health.telemetry import JobStats
from edge_contract.protocol import Result

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Closed:
    """The agent shuts down: no result will come."""


@dataclass(frozen=True)
class Gone:
    """The client closed its connection."""


CLOSED = Closed()
GONE = Gone()
Item = str | Result | Closed | Gone  # a chunk's text, the result, or the end
Waiter = queue.SimpleQueue[Item]


class Watcher:
    """One thread that watches the connections of waiting requests (epoll), so no request polls.

    A request waiting for its job blocks on its queue; when its client closes
    the connection, the watcher puts ``GONE`` there.  Each connection is
    watched once (``EPOLLONESHOT``): data from the client (a pipelined request)
    ends the watch without a verdict.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._lock = threading.Lock()
        self._watched: dict[int, tuple[socket.socket, Waiter]] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="edge-agent-http-watch", daemon=True)
        self._thread.start()

    def watch(self, sock: socket.socket, waiter: Waiter) -> None:
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
                        entry[1].put(GONE)
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
        self._waiters: dict[str, Waiter] = {}
        self._closed = False

    def open(self, address: str) -> Waiter:
        """Start collecting the replies sent to ``address`` (before the job is submitted)."""
        waiter: Waiter = queue.SimpleQueue()
        with self._lock:
            if self._closed:
                waiter.put(CLOSED)
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
                waiter.put(CLOSED)
