"""``agent.link.login``: what doctor's login check says when there is no MQTT broker to log in to."""

from __future__ import annotations

import socket

from agent.config import MQTTConfig
from agent.link.login import try_login


def test_a_port_that_accepts_but_never_answers_connect() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    try:
        port = server.getsockname()[1]
        mqtt = MQTTConfig(host="127.0.0.1", port=port, allow_plaintext=True)
        report = try_login(mqtt, "box-1", ("127.0.0.1", port), ["edge/box-1/jobs"], timeout_s=0.5)
        assert report.problem is not None and report.problem.startswith("no CONNACK")
        assert not report.granted
    finally:
        server.close()


def test_a_closed_port_is_unreachable() -> None:
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    mqtt = MQTTConfig(host="127.0.0.1", port=port, allow_plaintext=True)
    report = try_login(mqtt, "box-1", ("127.0.0.1", port), ["edge/box-1/jobs"], timeout_s=0.5)
    assert report.problem is not None and report.problem.startswith("unreachable")
