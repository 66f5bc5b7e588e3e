"""The systemd notification protocol, spoken directly: one datagram per message.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a file-system path, or
an abstract socket name written with a leading ``@``) and, when ``WatchdogSec=``
is set, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.  A notification is a datagram of
newline-separated ``KEY=value`` assignments sent to that socket; see
sd_notify(3).  Outside systemd (no ``NOTIFY_SOCKET``) every method is a no-op,
so the daemon calls them unconditionally.

Sending never raises: a lost notification must not take the daemon down (a
missing watchdog ping is what systemd acts on).  The first failure is logged as
a warning, later ones at debug level.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

log = logging.getLogger(__name__)

_SEND_TIMEOUT_S = 1.0


class Notifier:
    """Sends ``READY``, ``STATUS``, ``WATCHDOG`` and ``STOPPING`` notifications to systemd.

    Thread-safe: the daemon's threads may share one instance.  ``environ``
    defaults to ``os.environ``; it is read once, at construction.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = _watchdog_usec(env) if self._address is not None else None
        self._sock: socket.socket | None = None
        self._warned = False
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Whether a notification socket was given (the process runs under ``Type=notify``)."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Seconds between watchdog pings (half of ``WATCHDOG_USEC``); None when no watchdog is set.

        None as well when ``WATCHDOG_PID`` names another process: the watchdog
        is then not this process's to keep.
        """
        return None if self._watchdog_usec is None else self._watchdog_usec / 2e6

    def ready(self, status: str | None = None) -> bool:
        """Start-up is complete (``READY=1``), optionally with a status line."""
        return self.notify("READY=1", *([] if status is None else [_status_line(status)]))

    def status(self, text: str) -> bool:
        """A one-line description of the current state (``STATUS=``); newlines become spaces."""
        return self.notify(_status_line(text))

    def watchdog(self) -> bool:
        """The service is alive (``WATCHDOG=1``); send every ``watchdog_interval_s``."""
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more to finish starting or stopping (``EXTEND_TIMEOUT_USEC=``).

        Useful while start-up waits on something slow but alive (a broker that
        is not reachable yet): the start timeout is pushed out only as long as
        the agent keeps asking.
        """
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1e6))}")

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun (``STOPPING=1``), optionally with a status line."""
        return self.notify("STOPPING=1", *([] if status is None else [_status_line(status)]))

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments in one datagram; True when it was sent."""
        if self._address is None or not assignments:
            return False
        datagram = "\n".join(assignments).encode("utf-8", "replace")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    # A stuck receiver must not stall the main loop: a lost ping costs less.
                    self._sock.settimeout(_SEND_TIMEOUT_S)
                self._sock.sendto(datagram, self._address)
            except OSError as exc:
                level = logging.DEBUG if self._warned else logging.WARNING
                self._warned = True
                log.log(level, "cannot notify systemd at %r: %s", self._address, exc)
                return False
        return True

    def close(self) -> None:
        """Close the socket (a later notification opens a new one)."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _socket_address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        # Abstract namespace: a leading NUL byte, and no terminating one.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    if value:
        # e.g. "vsock:..." from a virtual machine's manager: not spoken here.
        log.warning("NOTIFY_SOCKET=%r is not a path or abstract socket; not notifying systemd", value)
    return None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec


def _status_line(text: str) -> str:
    return "STATUS=" + " ".join(text.split())
