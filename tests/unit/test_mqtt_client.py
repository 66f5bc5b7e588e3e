"""``agent.link.mqtt``'s ``Client`` against a scripted peer: each way a broker says no (or says
nothing) comes out as one ``LinkError`` naming it — never a paho return code or reason object."""

from __future__ import annotations

import queue
import socket
import ssl

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent.link.mqtt import (
    Client,
    ClosedBeforeLogin,
    ConnectionLost,
    LoginRefused,
    Message,
    NoAnswer,
    PublishRefused,
    SubscribeRefused,
    TLSFailed,
    Unreachable,
)
from agent.link.mqtt.errors import failure, socket_error
from edge_contract.errors import LinkError
from tests.support.fake_broker import CONNACK_OK, FakeBroker, connack, puback, publish, suback

CONNECT, PUBLISH, SUBSCRIBE = 0x1, 0x3, 0x8


def _closed_port() -> int:
    probe = socket.create_server(("127.0.0.1", 0))
    port = int(probe.getsockname()[1])
    probe.close()
    return port


def _connected(script: object) -> tuple[FakeBroker, Client]:
    broker = FakeBroker(script)  # type: ignore[arg-type]
    client = Client(name="test", reconnect_delay_s=0.05)
    client.connect("127.0.0.1", broker.port, timeout=5)
    return broker, client


def test_a_closed_port_is_unreachable() -> None:
    with pytest.raises(Unreachable) as caught:
        Client(name="test").connect("127.0.0.1", _closed_port(), timeout=5)
    assert "refused" in caught.value.detail.lower()
    assert isinstance(caught.value, LinkError)


def test_silence_after_connect_is_no_answer() -> None:
    broker = FakeBroker(lambda kind, body: b"")
    try:
        with pytest.raises(NoAnswer, match="the CONNECT"):
            Client(name="test").connect("127.0.0.1", broker.port, timeout=0.5)
    finally:
        broker.close()


def test_a_hang_up_before_connack_is_a_rejected_login() -> None:
    broker = FakeBroker(lambda kind, body: None)
    try:
        with pytest.raises(ClosedBeforeLogin):
            Client(name="test").connect("127.0.0.1", broker.port, timeout=5)
    finally:
        broker.close()


def test_a_refused_connack_names_its_reason() -> None:
    broker = FakeBroker(lambda kind, body: connack(0x87))
    try:
        with pytest.raises(LoginRefused) as caught:
            Client(name="test").connect("127.0.0.1", broker.port, timeout=5)
    finally:
        broker.close()
    assert caught.value.reason == "Not authorized"


def test_suback_gives_each_filters_answer_and_subscribed_raises_the_refusal() -> None:
    answers = {CONNECT: lambda body: CONNACK_OK, SUBSCRIBE: lambda body: suback(body, 0x01, 0x87)}
    broker, client = _connected(lambda kind, body: answers[kind](body) if kind in answers else None)
    try:
        assert client.subscribe(["ok/#", "no/#"]).wait(5) == [None, "Not authorized"]
        with pytest.raises(SubscribeRefused) as caught:
            client.subscribed(["ok/#", "no/#"], timeout=5)
        assert (caught.value.topic, caught.value.reason) == ("no/#", "Not authorized")
    finally:
        client.close()
        broker.close()


def test_a_refused_puback_raises_and_an_accepted_one_returns() -> None:
    def answer(kind: int, body: bytes) -> bytes | None:
        if kind == CONNECT:
            return CONNACK_OK
        if kind != PUBLISH:
            return None
        return puback(body, 0x87 if b"no/" in body else 0x00)

    broker, client = _connected(answer)
    try:
        assert client.publish("ok/x", b"1").wait(5) == [None]
        with pytest.raises(PublishRefused) as caught:
            client.publish("no/x", b"1").wait(5)
        assert (caught.value.topic, caught.value.reason) == ("no/x", "Not authorized")
    finally:
        client.close()
        broker.close()


def test_a_routed_filter_goes_to_its_handler_and_the_rest_to_the_queue() -> None:
    def answer(kind: int, body: bytes) -> bytes | None:
        if kind == CONNECT:
            return CONNACK_OK
        if kind == SUBSCRIBE:
            return suback(body, 0x00) + publish("jobs/1", b"routed") + publish("other", b"queued")
        return None

    broker, client = _connected(answer)
    routed: queue.SimpleQueue[Message] = queue.SimpleQueue()
    try:
        client.route("jobs/+", routed.put)
        client.subscribed("#", timeout=5)
        assert client.messages.get(timeout=5).payload == b"queued"
        assert routed.get(timeout=5).payload == b"routed"
        assert client.messages.empty(), "a routed message is not queued too"
    finally:
        client.close()
        broker.close()


def test_a_drop_while_waiting_fails_the_ack_at_once() -> None:
    broker, client = _connected(lambda kind, body: CONNACK_OK if kind == CONNECT else None)
    try:
        with pytest.raises(ConnectionLost):
            client.publish("x", b"1").wait(30)
    finally:
        client.close()
        broker.close()


@pytest.mark.parametrize("keep", [True, False])
def test_a_kept_session_under_3_1_1_connects_with_clean_session_off(keep: bool) -> None:
    connects: list[bytes] = []

    def answer(kind: int, body: bytes) -> bytes | None:
        if kind != CONNECT:
            return None
        connects.append(body)
        return b"\x20\x02\x01\x00"  # 3.1.1 CONNACK: session present, accepted

    broker = FakeBroker(answer)
    client = Client("box-1", protocol="3.1.1", keep_session=keep, session_expiry_s=60)
    try:
        assert client.connect("127.0.0.1", broker.port, timeout=5) is True
    finally:
        client.close()
        broker.close()
    flags = connects[0][7]  # after the protocol name (6 bytes) and level
    assert connects[0][6] == 4, "MQTT 3.1.1"
    assert bool(flags & 0x02) is not keep, "clean session off exactly when the session is kept"


def test_socket_errors_become_link_errors() -> None:
    where = "the broker at b:1"
    unverified = ssl.SSLCertVerificationError(1, "certificate verify failed")
    unverified.verify_message = "self-signed certificate"
    tls = socket_error(where, unverified)
    assert isinstance(tls, TLSFailed) and tls.unverified == "self-signed certificate"
    assert isinstance(socket_error(where, ssl.SSLError(1, "wrong version number")), TLSFailed)
    assert isinstance(socket_error(where, ConnectionRefusedError(111, "Connection refused")), Unreachable)
    assert isinstance(socket_error(where, ValueError("Invalid host.")), Unreachable)


def test_reason_codes_in_words_only_when_they_refuse() -> None:
    assert failure(ReasonCode(PacketTypes.SUBACK, identifier=0x87)) == "Not authorized"
    assert failure(ReasonCode(PacketTypes.SUBACK, identifier=0x01)) is None
    assert failure(0x80) == "Unspecified error"  # MQTT 3.1.1's SUBACK refusal
    assert failure(1) is None
