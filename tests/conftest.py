"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import Engine
from tests._models import fixture_path


@pytest.fixture(scope="session")
def phi3_dir() -> Path:
    """The Phi-3 int4 fixture: the default model for tests that need any model."""
    return fixture_path("phi3-int4")


@pytest.fixture(scope="session")
def phi3_engine(phi3_dir: Path) -> Engine:
    """One engine on the Phi-3 fixture, shared by the tests of a session."""
    return Engine(phi3_dir)


@pytest.fixture()
def broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A fresh mosquitto on a free port, stopped after the test."""
    from tests._broker import Broker

    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@pytest.fixture()
def fleet(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A fleet CA with a broker (localhost, 127.0.0.1) and an operator identity, made by edge-fleet."""
    from tests._pki import Fleet

    return Fleet(tmp_path / "pki")


@pytest.fixture()
def tls_broker(tmp_path: Path, fleet):  # type: ignore[no-untyped-def]
    """A mosquitto running what `edge-fleet broker init` writes for the fleet's CA."""
    from tests._broker import Broker

    b = Broker(tmp_path / "tls-broker", fleet)
    b.start()
    yield b
    b.cleanup()


@pytest.fixture()
def caller(broker):  # type: ignore[no-untyped-def]
    """A test-side MQTT client collecting replies under ``test/replies/#`` and ``edge/+/results/#``."""
    from tests._mqtt_client import Caller

    c = Caller(broker.host, broker.port, reply_filter=["test/replies/#", "edge/+/results/#"])
    yield c
    c.close()


@pytest.fixture()
def agents(broker, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Factory of daemon processes; all are stopped after the test."""
    from tests._agent import AgentProcess

    started: list[AgentProcess] = []

    def make(model: Path | None = None, *, on=None, **kwargs) -> AgentProcess:  # type: ignore[no-untyped-def]
        """An agent on ``broker`` (or on the Broker ``on``)."""
        name = kwargs.get("device_id", "box-1")
        agent = AgentProcess(
            on or broker,
            tmp_path / f"agent-{name}-{len(started)}",
            model or fixture_path("phi3-int4"),
            **kwargs,
        )
        started.append(agent)
        return agent

    yield make
    for agent in started:
        agent.stop()


@pytest.fixture()
def file_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real HTTP server (byte ranges, injectable drops) serving ``tmp_path/www``."""
    from tests._http import FileServer

    root = tmp_path / "www"
    root.mkdir()
    server = FileServer(root)
    yield server
    server.stop()


@pytest.fixture()
def releases(file_server):  # type: ignore[no-untyped-def]
    """Signed releases of the fixtures, served by ``file_server``, and the key that signs them."""
    from agent.updates import signing
    from tests._releases import Releases

    return Releases(file_server, signing.generate())
