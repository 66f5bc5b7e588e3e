"""A real mosquitto for the tests: own config, own free ports, own persistence.

With ``fleet`` the broker runs what ``edge-fleet broker init`` writes for the
fleet's CA, as written (only the ports and the bind address are chosen by the
test, through broker init's own flags), and is started the documented way:
``mosquitto -c OUT/mosquitto.conf`` — as root here, so it drops to the user
mosquitto, which is why OUT lies in a folder that user can enter.  Devices the
fleet issues are registered on it through the dynamic-security API, as
``provision --live`` does.  CI installs mosquitto; a missing binary fails the
tests (it never skips them).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import pytest

from edge_fleet.cli import main as fleet_cli
from tests.support.pki import Identity
from tests.support.wait import wait_until

if TYPE_CHECKING:
    from tests.support.pki import Fleet


class _Part(Protocol):
    def start(self) -> object: ...
    def stop(self) -> object: ...


_P = TypeVar("_P", bound=_Part)


def running(part: _P) -> Iterator[_P]:
    """A fixture's body: ``part`` (a broker, a cluster) started, yielded, stopped after the test.

    Use as ``yield from running(Broker(...))``.
    """
    part.start()
    try:
        yield part
    finally:
        part.stop()


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_binary() -> str:
    """The mosquitto executable (a missing one fails the test)."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        pytest.fail("mosquitto is not installed (CI installs it: apt-get install mosquitto)")
    return binary


def open_folder(prefix: str) -> Path:
    """A fresh folder every user can enter (pytest's are 0700: the user mosquitto could not)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


class Broker:
    """One mosquitto process; ``restart`` keeps its ports and persisted sessions.

    Without ``fleet``: plain TCP, anonymous, on ``port``.  With ``fleet``: the setup of
    ``edge-fleet broker init``; devices connect to ``port``, the test's operator clients
    (``client_identity``) to ``operator_port``.
    """

    def __init__(self, workdir: Path, fleet: Fleet | None = None, *, device_logins: bool = False) -> None:
        """``device_logins``: `broker init --device-logins` (devices log in with passwords; the
        fleet's devices are then not registered automatically: provision them with --login)."""
        self.binary = mosquitto_binary()
        self.workdir = workdir
        self.port = free_port()
        self.operator_port = self.port
        self.host = "127.0.0.1"
        self.fleet = fleet
        self.client_identity: Identity | None = fleet.operator if fleet else None
        self.client_login: tuple[str, str] | None = None
        self._registered = False
        if fleet is None:
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "data").mkdir(exist_ok=True)
            self.setup: Path | None = None
            self.conf = workdir / "mosquitto.conf"
            self.log = workdir / "mosquitto.log"
            lines = [
                # As root, mosquitto would switch to its own user and could not
                # write this test's persistence and log files; as anyone else
                # this line is ignored.
                "user root",
                "autosave_interval 1",
                f"log_dest file {self.log}",
                "log_type error",
                "log_type warning",
                "log_type notice",
                f"listener {self.port} 127.0.0.1",
                # Small MQTT packets must not wait for Nagle + delayed ACK (~40 ms each).
                "set_tcp_nodelay true",
                "allow_anonymous true",
                "persistence true",
                f"persistence_location {workdir / 'data'}/",
                "max_queued_messages 100000",
                "max_inflight_messages 100",
            ]
            self.conf.write_text("\n".join([*lines, ""]))
        else:
            self.operator_port = free_port()
            self.setup = open_folder("edge-broker-") / "broker"
            code = fleet_cli(
                [
                    "broker",
                    "init",
                    "--ca",
                    str(fleet.ca_dir),
                    "--hostname",
                    "localhost",
                    "--hostname",
                    "127.0.0.1",
                    "--out",
                    str(self.setup),
                    "--port",
                    str(self.port),
                    "--operator-port",
                    str(self.operator_port),
                    "--bind",
                    "127.0.0.1",
                    *(["--device-logins"] if device_logins else []),
                ]
            )
            assert code == 0, "edge-fleet broker init failed"
            self.conf = self.setup / "mosquitto.conf"
            self.log = self.setup / "log" / "mosquitto.log"
            if not device_logins:
                fleet.brokers.append(self)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start mosquitto and wait until it accepts connections (and knows the fleet's devices)."""
        # Its stderr goes to a file: a pipe nobody reads fills up (64 KiB of connection log
        # under a burst of reconnections) and then blocks the broker in write().
        stderr = self.workdir / "mosquitto.stderr"
        self.workdir.mkdir(parents=True, exist_ok=True)
        with stderr.open("ab") as sink:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=sink
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mosquitto exited at start: {stderr.read_text(errors='replace')[-4000:]}")
            try:
                for port in {self.port, self.operator_port}:
                    with socket.create_connection((self.host, port), timeout=0.2):
                        pass
                break
            except OSError:
                time.sleep(0.05)
        else:
            pytest.fail("mosquitto did not start listening within 10 s")
        if self.fleet is not None and not self._registered:
            self._registered = True
            for name, group in self.fleet.registered.items():
                self.fleet.register_on(self, name, group)

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

    @property
    def running(self) -> bool:
        """Whether the process is up."""
        return self.proc is not None and self.proc.poll() is None

    def _close_pipes(self) -> None:
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def restart(self, down_s: float = 0.2, *, until: Callable[[], bool] | None = None) -> None:
        """Stop, stay down until ``until()`` holds (say, a client noticed) or else ``down_s`` seconds,
        and start again on the same port."""
        self.stop()
        if until is not None:
            wait_until(until, what="the outage to be noticed")
        else:
            time.sleep(down_s)
        self.start()

    def admin_flags(self) -> list[str]:
        """edge-fleet's flags for identity commands on this broker, as the fleet's operator."""
        assert self.fleet is not None
        op = self.fleet.operator
        return [
            "--broker",
            f"{self.host}:{self.operator_port}",
            "--admin-port",
            str(self.port),
            "--tls-ca",
            str(op.ca),
            "--tls-cert",
            str(op.cert),
            "--tls-key",
            str(op.key),
        ]

    def cleanup(self) -> None:
        """Stop and remove the setup folder (it lies outside pytest's tmp_path)."""
        self.stop()
        if self.setup is not None:
            shutil.rmtree(self.setup.parent, ignore_errors=True)


class NatsBroker:
    """A nats-server with its MQTT listener (MQTT 3.1.1 only; sessions and retained messages in
    JetStream): the same agent, another broker.  CI installs nats-server; missing, it fails."""

    fleet = None
    operator_port: int
    client_identity = None
    client_login = None

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        if not Path(binary).exists():
            pytest.fail("nats-server is not installed (CI installs it: apt-get install nats-server)")
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = free_port()
        self.operator_port = self.port
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
