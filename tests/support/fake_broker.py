"""A scripted MQTT 5 peer on a local socket: it answers each packet as a test says, so the
wrapper's handling of a refusal or a hang-up is tested in-process, without mosquitto."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

#: The answer to a packet: bytes to send, None to hang up, b"" to stay silent.
Script = Callable[[int, bytes], bytes | None]

CONNACK_OK = b"\x20\x03\x00\x00\x00"


def connack(reason: int) -> bytes:
    """A CONNACK with ``reason`` (0x87: not authorized)."""
    return bytes([0x20, 0x03, 0x00, reason, 0x00])


def packet_id(kind: int, body: bytes) -> bytes:
    """The packet id of a SUBSCRIBE (its first two bytes) or a QoS 1 PUBLISH (after its topic)."""
    if kind == 0x3:
        length = int.from_bytes(body[:2], "big")
        return body[2 + length : 4 + length]
    return body[:2]


def suback(body: bytes, *reasons: int) -> bytes:
    """A SUBACK answering the SUBSCRIBE ``body`` with ``reasons`` (0x01: granted QoS 1)."""
    rest = packet_id(0x8, body) + b"\x00" + bytes(reasons)
    return bytes([0x90, len(rest)]) + rest


def puback(body: bytes, reason: int) -> bytes:
    """A PUBACK of the PUBLISH ``body`` with ``reason`` (0x87: not authorized)."""
    return bytes([0x40, 0x04]) + packet_id(0x3, body) + bytes([reason, 0x00])


def publish(topic: str, payload: bytes) -> bytes:
    """A QoS 0 PUBLISH of ``payload`` on ``topic`` (MQTT 5, no properties)."""
    rest = len(topic).to_bytes(2, "big") + topic.encode() + b"\x00" + payload
    return bytes([0x30, len(rest)]) + rest


class FakeBroker:
    """Accepts one connection and answers every packet (kind = the high nibble) through ``script``."""

    def __init__(self, script: Script) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.script = script
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.server.accept()
        except OSError:
            return
        with conn:
            while True:
                packet = _read(conn)
                if packet is None:
                    return
                answer = self.script(*packet)
                if answer is None:
                    conn.shutdown(socket.SHUT_RDWR)
                    return
                if answer:
                    conn.sendall(answer)

    def close(self) -> None:
        """Stop listening."""
        self.server.close()


def _read(conn: socket.socket) -> tuple[int, bytes] | None:
    head = conn.recv(1)
    if not head:
        return None
    length, shift = 0, 0
    while True:
        byte = conn.recv(1)
        if not byte:
            return None
        length |= (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            break
    body = b""
    while len(body) < length:
        chunk = conn.recv(length - len(body))
        if not chunk:
            return None
        body += chunk
    return head[0] >> 4, body
