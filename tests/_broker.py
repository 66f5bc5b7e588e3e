"""A real mosquitto for the tests: own config, own free port, own persistence.

CI installs mosquitto; a missing binary fails the tests (it never skips them).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """One mosquitto process; ``restart`` keeps its port and persisted sessions."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            pytest.fail("mosquitto is not installed (CI installs it: apt-get install mosquitto)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.host = "127.0.0.1"
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            "\n".join(
                [
                    # As root, mosquitto would switch to its own user and could not
                    # write this test's persistence and log files; as anyone else
                    # this line is ignored.
                    "user root",
                    f"listener {self.port} 127.0.0.1",
                    # Small MQTT packets must not wait for Nagle + delayed ACK (~40 ms each).
                    "set_tcp_nodelay true",
                    "allow_anonymous true",
                    "persistence true",
                    f"persistence_location {workdir / 'data'}/",
                    "autosave_interval 1",
                    "max_queued_messages 100000",
                    "max_inflight_messages 100",
                    f"log_dest file {self.log}",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    "",
                ]
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start mosquitto and wait until it accepts connections."""
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                pytest.fail(f"mosquitto exited at start: {err}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        pytest.fail("mosquitto did not start listening within 10 s")

    def stop(self) -> None:
        """Stop mosquitto (SIGTERM: it saves its persistence file)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self, down_s: float = 0.5) -> None:
        """Stop, stay down ``down_s`` seconds, start again on the same port."""
        self.stop()
        time.sleep(down_s)
        self.start()
