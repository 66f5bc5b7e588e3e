"""The one TLS client context: TLS 1.2+, the broker's certificate and host name verified."""

from __future__ import annotations

import argparse
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.link.tls import client_context
from edge_contract.errors import LinkError
from edge_fleet.broker import BrokerOptions, add_broker_args, options_from
from edge_fleet.pki import create_ca, provision


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A TLS server on loopback whose certificate is valid for the name ``mq.lan`` only."""
    create_ca(tmp_path / "ca")
    provision("mq", tmp_path / "ca", tmp_path / "ids", kind="broker", hosts=["mq.lan"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "ids" / "mq.crt", tmp_path / "ids" / "mq.key")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)  # accept() wakes up to see stop; a closed socket would not wake it
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                pass  # the client refused us: what some tests want

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], tmp_path / "ca" / "ca.crt"
    stop.set()
    thread.join(timeout=5)
    listener.close()


def _handshake(port: int, context: ssl.SSLContext, name: str) -> None:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname=name),
    ):
        pass


def test_the_context_verifies_and_needs_tls_1_2() -> None:
    context = client_context()
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED


def test_the_brokers_host_name_is_checked(server: tuple[int, Path]) -> None:
    port, ca = server
    _handshake(port, client_context(ca), "mq.lan")
    with pytest.raises(ssl.SSLCertVerificationError, match=r"mismatch|doesn't match"):
        _handshake(port, client_context(ca), "other.lan")


def test_a_broker_of_another_ca_is_refused(server: tuple[int, Path], tmp_path: Path) -> None:
    port, _ = server
    create_ca(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(port, client_context(tmp_path / "other" / "ca.crt"), "mq.lan")


def test_missing_files_are_link_errors_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(LinkError, match=r"nope\.crt"):
        client_context(tmp_path / "nope.crt")


def test_edge_fleet_is_tls_unless_told_plaintext() -> None:
    parser = argparse.ArgumentParser()
    add_broker_args(parser)
    tls = options_from(parser.parse_args(["--broker", "mq.lan", "--tls-ca", "/ca.crt"]))
    assert tls.address == ("mq.lan", 8884) and not tls.plaintext, "the operators' listener of broker init"
    plain = options_from(parser.parse_args(["--broker", "127.0.0.1", "--plaintext"]))
    assert plain.address == ("127.0.0.1", 1883) and plain.plaintext
    assert BrokerOptions(port=1884, plaintext=True).address == ("127.0.0.1", 1884)
