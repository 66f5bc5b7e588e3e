"""Supervision in process: the watchdog is fed only while the agent works; storage trouble shows everywhere."""

from __future__ import annotations

import json
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.daemon.faults import StorageFaults
from agent.daemon.outbox import Outbox
from agent.daemon.supervisor import Supervisor
from agent.daemon.worker import Worker
from agent.engine.engine import Engine
from agent.health.sd_notify import Notifier
from agent.health.telemetry import JobStats
from agent.jobs.store import JobStore
from edge_contract.protocol import Topics
from tests.support.parts import RecordingLink, models
from tests.support.wait import wait_until


class _Systemd:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.path = path

    def received(self) -> list[bytes]:
        got = []
        while True:
            try:
                got.append(self.sock.recv(4096))
            except BlockingIOError:
                return got


def _parts(
    state_dir: Path, engine: Engine, systemd: _Systemd | None = None
) -> tuple[Supervisor, Worker, RecordingLink]:
    config = AgentConfig(
        device_id="box-1",
        state_dir=state_dir,
        model={"path": str(engine.folder.path)},
        mqtt={"allow_plaintext": True},
        telemetry={"interval_s": 1.0},
    )
    store = JobStore(state_dir / "jobs.sqlite3")
    link, faults, stats = RecordingLink(), StorageFaults(), JobStats()
    outbox = Outbox(link, store, faults)
    served = models(engine)
    worker = Worker(
        store, outbox, served, device_id="box-1", stats=stats, faults=faults, publish_chunk=lambda *_a: None
    )
    env = {"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "2000000"} if systemd else {}
    supervisor = Supervisor(
        config,
        Topics("edge", "box-1", None),
        link=link,  # type: ignore[arg-type]
        store=store,
        outbox=outbox,
        worker=worker,
        models=served,
        stats=stats,
        faults=faults,
        notifier=Notifier(env),
    )
    return supervisor, worker, link


def test_the_watchdog_is_fed_only_while_the_worker_shows_life(tmp_path: Path, phi3_engine: Engine) -> None:
    systemd = _Systemd(tmp_path / "notify")
    supervisor, worker, _link = _parts(tmp_path / "state", phi3_engine, systemd)
    worker.start()
    try:
        now = time.monotonic()
        supervisor.tick(now)
        assert b"WATCHDOG=1" in systemd.received(), "positive control: a working agent is pinged"
        later = now + 60  # a minute on, with no heartbeat since (as if stuck in one engine call)
        assert not supervisor.working(later, 2.0)
        supervisor.tick(later)
        assert b"WATCHDOG=1" not in systemd.received()
        worker.quiet_until = later + 100  # ... unless it announced a long prefill
        supervisor.tick(later + 1.5)
        assert b"WATCHDOG=1" in systemd.received()
    finally:
        worker.stop(0)
        worker.join(5)
        supervisor.notifier.close()
        systemd.sock.close()
    assert not supervisor.working(time.monotonic(), 1e9), "a dead worker thread is never healthy"


def test_a_full_disk_is_no_hang_the_worker_keeps_showing_life(small_disk: Any, phi3_engine: Engine) -> None:
    supervisor, worker, _link = _parts(small_disk.path, phi3_engine)
    worker.store.accept(
        "d-1", '{"id": "d-1", "prompt": "hi", "max_tokens": 2}', "edge/replies/x", None, deadline=None
    )
    small_disk.fill()
    worker.start()
    try:
        wait_until(lambda: worker.faults.failing, what="the worker meeting the full disk")
        seen = worker.beat
        wait_until(lambda: worker.beat > seen, what="a heartbeat while waiting for the disk")
        assert supervisor.working(time.monotonic(), 2.5)
        supervisor.publish_telemetry()
        assert supervisor.health is not None and "storage" in supervisor.health.reasons
        assert "JOB STORE FAILING" in supervisor.status_line()
        small_disk.free()
        wait_until(lambda: worker.store.get("d-1").state == "done", what="the job once space returned")  # type: ignore[union-attr]
    finally:
        worker.stop(0)
        worker.join(5)
    supervisor.publish_telemetry()
    assert supervisor.health is not None and "storage" not in supervisor.health.reasons


def test_a_database_moved_aside_shows_in_telemetry_health_and_status(
    tmp_path: Path, phi3_engine: Engine
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    supervisor, _worker, link = _parts(state, phi3_engine)
    supervisor.publish_telemetry()
    clean = json.loads(link.to("edge/box-1/telemetry")[-1].payload)
    assert clean["jobs"]["store_resets"] == 0 and "storage" not in clean["health"]["reasons"]
    (state / "jobs.sqlite3.corrupt-20260101T000000Z").write_bytes(b"junk")
    supervisor.publish_telemetry()
    message = json.loads(link.to("edge/box-1/telemetry")[-1].payload)
    assert message["jobs"]["store_resets"] == 1
    assert message["health"]["verdict"] == "degraded" and "storage" in message["health"]["reasons"]
    assert (
        "JOB DATABASE WAS CORRUPT: moved to jobs.sqlite3.corrupt-20260101T000000Z" in supervisor.status_line()
    )


@pytest.mark.parametrize("mode,shedding,holding", [("reject", True, False), ("queue", False, True)])
def test_overload_sheds_at_intake_or_holds_the_worker(
    tmp_path: Path, phi3_engine: Engine, mode: str, shedding: bool, holding: bool
) -> None:
    from edge_contract.protocol import Health

    supervisor, _worker, _link = _parts(tmp_path, phi3_engine)
    supervisor.config = supervisor.config.model_copy(
        update={"health": supervisor.config.health.model_copy(update={"shed_load": mode})}
    )
    assert supervisor.shedding() is None and not supervisor.holding()
    supervisor.health = Health(verdict="degraded", reasons=["hot"])
    assert (supervisor.shedding() == ["hot"]) is shedding
    assert supervisor.holding() is holding


def test_telemetry_reports_the_certificate_in_use_after_a_renewal(
    tmp_path: Path, phi3_engine: Engine
) -> None:
    supervisor, _worker, link = _parts(tmp_path / "state", phi3_engine)
    supervisor.publish_telemetry()
    before = json.loads(link.to("edge/box-1/telemetry")[-1].payload)
    assert before["cert_expires_at"] is None, "no certificate configured, none reported"
    renewed = datetime(2031, 1, 2, tzinfo=UTC)
    link.cert_expiry = renewed  # what MQTTLink says once it loaded renewed files
    supervisor.publish_telemetry()
    after = json.loads(link.to("edge/box-1/telemetry")[-1].payload)
    assert after["cert_expires_at"] == renewed.timestamp()
