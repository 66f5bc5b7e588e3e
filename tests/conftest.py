"""Shared pytest fixtures, and the test tiers.

A test is ``e2e`` when it starts real processes (agents, brokers, the command line as a
subprocess); it says so itself, with ``pytestmark = pytest.mark.e2e`` on its module or a
mark on the test.  A test that uses a broker or agent fixture without the mark is refused
at collection.  The rest is the fast, in-process tier: ``pytest -m "not e2e"``, less the
``exhaustive`` cases: the rest of an exactness matrix beyond its representative cases
(``tests/support/tiers.py``), in-process but run by the full tier only.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import Engine
from tests.support.models import fixture_path


@pytest.fixture(scope="session")
def phi3_dir() -> Path:
    """The Phi-3 int4 fixture: the default model for tests that need any model."""
    return fixture_path("phi3-int4")


@pytest.fixture(scope="session")
def phi3_engine(phi3_dir: Path) -> Engine:
    """One engine on the Phi-3 fixture, shared by the tests of a session."""
    return Engine(phi3_dir)


@pytest.fixture(autouse=True)
def _own_fleet_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own edge-fleet state file and no operator profile (the machine's are never touched)."""
    monkeypatch.setenv("EDGE_FLEET_DB", str(tmp_path / "fleet-state" / "state.sqlite3"))
    monkeypatch.setenv("EDGE_FLEET_PROFILE", str(tmp_path / "fleet-state" / "no-profile.toml"))
    for name in (
        "BROKER",
        "TLS_CA",
        "TLS_CERT",
        "TLS_KEY",
        "PLAINTEXT",
        "PROTOCOL",
        "TOPIC_PREFIX",
        "USERNAME",
        "SERVER",
        "TOKEN",
        "SERVER_DB",
    ):
        monkeypatch.delenv(f"EDGE_FLEET_{name}", raising=False)


@pytest.fixture()
def broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A fresh mosquitto on a free port, stopped after the test."""
    from tests.support.broker import Broker, running

    yield from running(Broker(tmp_path / "broker"))


@pytest.fixture(scope="session")
def postgres():  # type: ignore[no-untyped-def]
    """One PostgreSQL cluster for the session; ``dsn()`` gives each test a new, empty database."""
    from tests.support.postgres import Postgres

    cluster = Postgres()
    yield cluster
    cluster.stop()


@pytest.fixture()
def fleet(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A fleet CA with a broker (localhost, 127.0.0.1) and an operator identity, made by edge-fleet."""
    from tests.support.pki import Fleet

    return Fleet(tmp_path / "pki")


@pytest.fixture()
def tls_broker(tmp_path: Path, fleet):  # type: ignore[no-untyped-def]
    """A mosquitto running what `edge-fleet broker init` writes for the fleet's CA."""
    from tests.support.broker import Broker

    b = Broker(tmp_path / "tls-broker", fleet)
    b.start()
    yield b
    b.cleanup()


@pytest.fixture()
def caller(broker):  # type: ignore[no-untyped-def]
    """A test-side MQTT client collecting replies under ``edge/replies/#`` and ``edge/+/results/#``."""
    from tests.support.mqtt_client import Caller

    c = Caller(broker.host, broker.port, reply_filter=["edge/replies/#", "edge/+/results/#"])
    yield c
    c.close()


@pytest.fixture()
def agents(broker, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Factory of daemon processes; all are stopped after the test."""
    from tests.support.agent import AgentProcess

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
    from tests.support.http import FileServer

    root = tmp_path / "www"
    root.mkdir()
    server = FileServer(root)
    yield server
    server.stop()


@pytest.fixture()
def releases(file_server):  # type: ignore[no-untyped-def]
    """Signed releases of the fixtures, served by ``file_server``, and the key that signs them."""
    from edge_contract import signing
    from tests.support.releases import Releases

    return Releases(file_server, signing.generate())


@pytest.fixture()
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 4 MiB tmpfs (real ENOSPC when filled), unmounted after the test."""
    from tests.support.disk import SmallDisk

    disk = SmallDisk(tmp_path / "small")
    yield disk
    disk.close()


_E2E_FIXTURES = frozenset({"broker", "tls_broker", "agents", "caller", "postgres"})


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects: an exhaustive case must carry e2e by then
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give ``exhaustive`` cases the ``e2e`` mark (the full tier only), and refuse a test that
    starts real processes through a fixture but does not declare ``e2e``.

    The tier is declared where the test is (``pytestmark = pytest.mark.e2e`` on the module or a
    mark on the test), never derived from its path; this check keeps the declaration honest.
    """
    for item in items:
        if item.get_closest_marker("exhaustive") is not None:
            item.add_marker(pytest.mark.e2e)
    undeclared = [
        item.nodeid
        for item in items
        if set(getattr(item, "fixturenames", ())) & _E2E_FIXTURES and item.get_closest_marker("e2e") is None
    ]
    if undeclared:
        raise pytest.UsageError(
            "these tests start a broker or an agent but are not marked e2e "
            "(add `pytestmark = pytest.mark.e2e` to the module): " + ", ".join(undeclared)
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Keep the fast tier in-process: a test without the ``e2e`` mark that starts a process fails.

    Recorded rather than only raised, so that code under test catching the error cannot hide it.
    An ``exhaustive`` case is e2e for selection only: it stays in-process too.
    """
    if item.get_closest_marker("e2e") is not None and item.get_closest_marker("exhaustive") is None:
        return (yield)
    started: list[str] = []
    original = subprocess.Popen.__init__

    def refuse(self: subprocess.Popen[Any], args: Any, *rest: Any, **options: Any) -> None:
        started.append(str(args)[:200])
        raise AssertionError(f"a test without the e2e mark started a process: {args!r}")

    subprocess.Popen.__init__ = refuse  # type: ignore[method-assign]
    try:
        result = yield
    finally:
        subprocess.Popen.__init__ = original  # type: ignore[method-assign]
    if started:
        raise AssertionError(
            f"{item.nodeid} starts processes ({'; '.join(started)}) but is not marked e2e: mark it "
            "(`pytestmark = pytest.mark.e2e` on the module, or on the test) or keep it in-process"
        )
    return result


_DECLARED_E2E = re.compile(r"^pytestmark = .*\bpytest\.mark\.e2e\b", re.MULTILINE)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """For ``-m "not e2e"``, do not import a module whose every test is e2e (it declares so at the top).

    Its tests would all be deselected anyway; importing them (openai, langchain, playwright, ...)
    only costs the fast tier seconds.
    """
    if collection_path.suffix != ".py" or " ".join(config.option.markexpr.split()) != "not e2e":
        return None
    if not collection_path.name.startswith("test_"):
        return None
    return True if _DECLARED_E2E.search(collection_path.read_text(encoding="utf-8")) else None
