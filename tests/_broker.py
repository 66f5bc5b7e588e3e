"""A real mosquitto for the tests: own config, own free port, own persistence.

With ``fleet`` the broker runs the shipped ``deploy/mosquitto/edge.conf`` (TLS,
client certificates, the CN as user name) with the shipped ACL, changing only
paths and the port. CI installs mosquitto; a missing binary fails the tests
(it never skips them).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests._pki import Identity

if TYPE_CHECKING:
    from tests._pki import Fleet

REPO = Path(__file__).resolve().parents[1]
EDGE_CONF = REPO / "deploy" / "mosquitto" / "edge.conf"
EDGE_ACL = REPO / "deploy" / "mosquitto" / "edge.acl"
# The lines of edge.conf that name a machine's paths or port: the tests put their own there.
_LOCAL_KEYS = {"listener", "cafile", "certfile", "keyfile", "acl_file", "persistence_location"}


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """One mosquitto process; ``restart`` keeps its port and persisted sessions.

    ``fleet``: run edge.conf with the fleet's broker certificate and ``acl`` (default: the
    shipped edge.acl); test clients then connect as ``client_identity`` (the operator).
    ``passwords`` (user name to password) switches it to logins over TLS, as edge.conf
    describes: no client certificates, a mosquitto_passwd file; test clients log in as
    ``client_login`` (the operator).
    """

    def __init__(
        self,
        workdir: Path,
        fleet: Fleet | None = None,
        acl: Path | None = None,
        passwords: dict[str, str] | None = None,
    ) -> None:
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
        self.fleet = fleet
        self.client_identity: Identity | None = fleet.operator if fleet else None
        self.client_login: tuple[str, str] | None = None
        common = [
            # As root, mosquitto would switch to its own user and could not
            # write this test's persistence and log files; as anyone else
            # this line is ignored.
            "user root",
            "autosave_interval 1",
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if fleet is None:
            lines = [
                f"listener {self.port} 127.0.0.1",
                # Small MQTT packets must not wait for Nagle + delayed ACK (~40 ms each).
                "set_tcp_nodelay true",
                "allow_anonymous true",
                "persistence true",
                f"persistence_location {workdir / 'data'}/",
                "max_queued_messages 100000",
                "max_inflight_messages 100",
            ]
        else:
            local = {
                "listener": f"listener {self.port} 127.0.0.1",
                "cafile": f"cafile {fleet.ca}",
                "certfile": f"certfile {fleet.broker.cert}",
                "keyfile": f"keyfile {fleet.broker.key}",
                "acl_file": f"acl_file {acl or EDGE_ACL}",
                "persistence_location": f"persistence_location {workdir / 'data'}/",
            }
            lines = []
            for line in EDGE_CONF.read_text().splitlines():
                key = line.split(" ", 1)[0]
                lines.append(local.pop(key) if key in _LOCAL_KEYS else line)
            assert not local, f"edge.conf lacks {sorted(local)}"
            if passwords:
                lines = self._with_passwords(lines, passwords)
                self.client_identity = Identity("operator", fleet.ca, None, None)
                self.client_login = ("operator", passwords["operator"])
        self.conf.write_text("\n".join([*common, *lines, ""]))
        self.proc: subprocess.Popen[bytes] | None = None

    def _with_passwords(self, lines: list[str], passwords: dict[str, str]) -> list[str]:
        """edge.conf turned to logins over TLS, the three edits its comment names."""
        passwd = self.workdir / "edge.passwd"
        passwd.touch(mode=0o600)
        for user, password in passwords.items():
            subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True)
        edits = {
            "require_certificate true": "require_certificate false",
            "use_identity_as_username true": "use_identity_as_username false",
        }
        assert all(line in lines for line in edits), "edge.conf changed: update this test helper"
        return [edits.get(line, line) for line in lines] + [f"password_file {passwd}"]

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

    def kill(self) -> None:
        """``kill -9``: the broker vanishes mid-stream, saving nothing."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._close_pipes()
        self.proc = None

    def stop(self) -> None:
        """Stop mosquitto (SIGTERM: it saves its persistence file)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self._close_pipes()
        self.proc = None

    def _close_pipes(self) -> None:
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def restart(self, down_s: float = 0.5) -> None:
        """Stop, stay down ``down_s`` seconds, start again on the same port."""
        self.stop()
        time.sleep(down_s)
        self.start()


class NatsBroker:
    """A nats-server with its MQTT listener (MQTT 3.1.1 only; sessions and retained messages in
    JetStream): the same agent, another broker.  CI installs nats-server; missing, it fails."""

    fleet = None
    client_identity = None
    client_login = None

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        if not Path(binary).exists():
            pytest.fail("nats-server is not installed (CI installs it: apt-get install nats-server)")
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "nats.log"
        self.conf = workdir / "nats.conf"
        self.conf.write_text(
            "\n".join(
                [
                    "server_name: edge-test",  # JetStream (which MQTT needs) wants a name
                    f"listen: 127.0.0.1:{free_port()}",
                    f'jetstream {{ store_dir: "{workdir / "js"}" }}',
                    f"mqtt {{ listen: 127.0.0.1:{self.port} }}",
                    "",
                ]
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start nats-server and wait until its MQTT listener accepts connections."""
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf), "-l", str(self.log)])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"nats-server exited at start: {self.log.read_text() if self.log.exists() else ''}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        pytest.fail("nats-server's MQTT listener did not open within 15 s")

    def stop(self) -> None:
        """Stop nats-server."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None
