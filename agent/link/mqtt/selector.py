"""Many ``Client``s on one thread: a ``selectors`` loop in place of a network thread each.

paho's external-loop hooks (socket opened, closed, has data to write, has written it) keep
the selector in step with every client's socket; ``poll`` reads and writes what is ready and
``tick`` sends the keepalive pings and retries.  A thousand clients cost a thousand sockets,
not a thousand threads (``edge-fleet simulate``).
"""

from __future__ import annotations

import contextlib
import selectors
from typing import Any

from agent.link.mqtt.client import KEEPALIVE_S, Client
from agent.link.mqtt.errors import socket_error
from agent.link.mqtt.messages import no_delay


class SelectorLoop:
    """Drives the clients ``add``-ed to it from the thread that calls ``poll`` and ``tick``."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.clients: list[Client] = []

    def add(self, client: Client) -> None:
        """Take ``client`` (made, not yet connected) into the loop."""
        raw = client._paho

        def opened(_c: Any, _u: Any, sock: Any) -> None:
            no_delay(_c, _u, sock)
            self.selector.register(sock, selectors.EVENT_READ, client)

        def closed(_c: Any, _u: Any, sock: Any) -> None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(sock)

        def want_write(_c: Any, _u: Any, sock: Any) -> None:
            self.selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

        def wrote(_c: Any, _u: Any, sock: Any) -> None:
            self.selector.modify(sock, selectors.EVENT_READ, client)

        raw.on_socket_open, raw.on_socket_close = opened, closed
        raw.on_socket_register_write, raw.on_socket_unregister_write = want_write, wrote
        self.clients.append(client)

    def connect(self, client: Client, host: str, port: int, *, keepalive: int = KEEPALIVE_S) -> None:
        """Open the connection (``poll`` completes the handshake); raises ``Unreachable``/``TLSFailed``."""
        client._dial(host, port, keepalive, background=False)

    def reconnect(self, client: Client) -> None:
        """Open the connection again, after a drop; raises as ``connect``."""
        try:
            client._paho.reconnect()
        except (OSError, ValueError) as exc:
            raise socket_error(client.where, exc) from exc

    def poll(self, timeout: float) -> None:
        """Read and write on every socket ready within ``timeout`` seconds."""
        for key, mask in self.selector.select(timeout):
            client: Client = key.data
            if mask & selectors.EVENT_READ:
                client._paho.loop_read()
            if mask & selectors.EVENT_WRITE:
                client._paho.loop_write()

    def tick(self) -> None:
        """Keepalive pings and retries (about once a second)."""
        for client in self.clients:
            client._paho.loop_misc()

    def leave(self, client: Client) -> None:
        """Disconnect ``client`` now (its DISCONNECT written before this returns)."""
        client._paho.disconnect()
        client._paho.loop_write()
