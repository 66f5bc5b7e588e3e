"""The daemon speaks systemd's notify protocol: READY, STATUS, and a watchdog that stops when it hangs.

systemd is not PID 1 here, so the test plays its part: it binds the datagram
socket named by NOTIFY_SOCKET and reads what the real agent process sends.
"""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

JOBS = "edge/box-1/jobs"


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.datagrams: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.datagrams.append((time.monotonic(), data.decode()))

    def lines(self, prefix: str) -> list[tuple[float, str]]:
        return [
            (t, line) for t, d in list(self.datagrams) for line in d.splitlines() if line.startswith(prefix)
        ]

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


def test_ready_status_watchdog_and_a_stalled_agent_stops_pinging(agents, caller, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        agent = agents()
        agent.start(env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000"})
        wait_until(
            lambda: notify.lines("READY=1") and len(notify.lines("WATCHDOG=1")) >= 2,
            timeout=30,
            what="READY=1 and two watchdog pings",
        )
        statuses = [line for _, line in notify.lines("STATUS=")]
        assert any("serving phi3-int4" in s and "connected" in s for s in statuses), statuses
        pings = [t for t, _ in notify.lines("WATCHDOG=1")]
        assert len(pings) >= 2, "pings at half of WATCHDOG_USEC"

        # Stall the agent's storage the way a hung SD card does: hold the database's write lock.
        db = sqlite3.connect(agent.state_dir / "jobs.sqlite3", isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        caller.send(JOBS, {"id": "stalled-1", "prompt": "hi", "max_tokens": 3})
        stalled_at = time.monotonic()
        # The pings stop: wait until none came for twice their interval (1 s, half of WATCHDOG_USEC).
        wait_until(
            lambda: (
                time.monotonic() - max(t for t, _ in notify.lines("WATCHDOG=1")) > 2.0
                and time.monotonic() - stalled_at > 2.5
            ),
            timeout=30,
            what="the watchdog pings to stop while storage hangs",
        )
        db.execute("COMMIT")
        db.close()
        released_at = time.monotonic()

        result = caller.wait_result("stalled-1")
        assert result["status"] == "succeeded", "the job survives the stall"
        wait_until(
            lambda: [t for t, _ in notify.lines("WATCHDOG=1") if t > released_at + 0.5],
            timeout=30,
            what="the watchdog pings to resume",
        )
        during = [t for t, _ in notify.lines("WATCHDOG=1") if stalled_at + 0.5 < t < released_at]
        after = [t for t, _ in notify.lines("WATCHDOG=1") if t > released_at + 0.5]
        assert not during, "a hung agent must not ping the watchdog"
        assert after, "pings resume once the agent recovers"
        assert len(caller.results("stalled-1")) == 1
        agent.terminate()
        assert notify.lines("STOPPING=1")
    finally:
        notify.close()
