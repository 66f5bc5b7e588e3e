"""The systemd notification protocol, checked against real AF_UNIX datagram sockets."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.health.sd_notify import Notifier


class Receiver:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(5.0)

    def next(self) -> bytes:
        return self.sock.recv(4096)

    def empty(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(5.0)
        return False


@pytest.fixture()
def path_receiver(tmp_path: Path) -> Iterator[tuple[Receiver, str]]:
    path = str(tmp_path / "notify")
    receiver = Receiver(path)
    yield receiver, path
    receiver.sock.close()


def test_messages_are_the_exact_datagrams(path_receiver: tuple[Receiver, str]) -> None:
    receiver, path = path_receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready()
    assert receiver.next() == b"READY=1"
    assert notifier.ready("serving phi3-int4")
    assert receiver.next() == b"READY=1\nSTATUS=serving phi3-int4"
    assert notifier.status("running job a1\n  2 queued")
    assert receiver.next() == b"STATUS=running job a1 2 queued", "a status is one line"
    assert notifier.watchdog()
    assert receiver.next() == b"WATCHDOG=1"
    assert notifier.extend_timeout(12.5)
    assert receiver.next() == b"EXTEND_TIMEOUT_USEC=12500000"
    assert notifier.stopping("stopping: finishing job a1")
    assert receiver.next() == b"STOPPING=1\nSTATUS=stopping: finishing job a1"
    assert notifier.status("température ok")
    assert receiver.next() == "STATUS=température ok".encode()
    notifier.close()
    assert notifier.watchdog(), "a closed notifier reopens its socket"
    assert receiver.next() == b"WATCHDOG=1"
    assert receiver.empty()
    notifier.close()


def test_abstract_socket() -> None:
    name = f"edge-agent-test-{uuid.uuid4().hex}"
    receiver = Receiver(b"\0" + name.encode())
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready("up")
        assert receiver.next() == b"READY=1\nSTATUS=up"
        notifier.close()
    finally:
        receiver.sock.close()


def test_without_notify_socket_everything_is_a_noop() -> None:
    notifier = Notifier({"WATCHDOG_USEC": "30000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None, "no socket, nobody to ping"
    assert not notifier.ready() and not notifier.watchdog() and not notifier.status("x")
    assert not notifier.stopping()


def test_reads_the_process_environment(
    path_receiver: tuple[Receiver, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver, path = path_receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = Notifier()
    assert notifier.watchdog_interval_s == 15.0
    assert notifier.watchdog()
    assert receiver.next() == b"WATCHDOG=1"
    notifier.close()


@pytest.mark.parametrize(
    "env,interval",
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(tmp_path: Path, env: dict[str, str], interval: float | None) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), **env})
    assert notifier.watchdog_interval_s == interval


def test_unsupported_address_disables(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="agent.health.sd_notify"):
        notifier = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled and not notifier.ready()
    assert "vsock:2:1234" in caplog.text


def test_send_errors_never_raise_and_warn_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    with caplog.at_level(logging.DEBUG, logger="agent.health.sd_notify"):
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.status("still here")
    notifier.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "nobody-listens" in warnings[0].getMessage()


def test_receiver_appearing_later_gets_the_next_message(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert not notifier.watchdog()
    receiver = Receiver(path)
    try:
        assert notifier.watchdog()
        assert receiver.next() == b"WATCHDOG=1"
    finally:
        notifier.close()
        receiver.sock.close()
