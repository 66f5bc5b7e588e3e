"""The fleet server with three real ``edge-agent run`` processes and real signed releases: a
selector rollout with a canary, started through the CLI, survives the CLI's SIGKILL and the
server's ``kill -9``; the box the selector does not match is never touched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.fleet_server import FleetServer, fleet_cli
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

FIXTURE = "llama-int4"


def _versions(server: FleetServer) -> dict[str, Any]:
    return {r["device_id"]: r["version"] for r in server.get("/api/v1/devices")}


def test_a_selector_rollout_over_real_agents_outlives_the_cli_and_the_server(
    broker, agents, releases, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from tests.support.models import fixture_path

    settings = {"trusted_keys": [releases.public_line]}
    for name, group in (("till-1", "shop-3"), ("till-2", "shop-3"), ("till-4", "shop-4")):
        agents(
            fixture_path(FIXTURE), device_id=name, group=group, model_version="1.0.0", update=settings
        ).start()
    manifest = tmp_path / "m-1.5.0.json"
    manifest.write_text(releases.make("1.5.0", fixture=FIXTURE, name=FIXTURE).model_dump_json())
    server = FleetServer(str(tmp_path / "server.sqlite3"), broker, tmp_path / "server.log").start()
    try:
        wait_until(lambda: len(_versions(server)) == 3, timeout=60, what="3 agents in the inventory")
        for device, hw in (("till-1", "pi5"), ("till-2", "pi5"), ("till-4", "pi4")):
            assert fleet_cli("label", device, f"hw={hw}", env=server.env()).returncode == 0
        rollout_id = server.rollout_killed_once(
            str(manifest), "--select", "hw=pi5", "--canary", "1", "--waves", "100%", until="sent"
        )
        assert rollout_id == f"{FIXTURE}@1.5.0/select:hw=pi5"
        server.kill9()
        server.start()
        done = server.wait_state(rollout_id, "done", "halted", timeout=180)
        assert done["state"] == "done" and done["targets"] == {"active": 2}, done
        assert done["waves"] == 2 and done["canary"] is True
        # The canary finished before the other box was sent anything (the event log says so, in order).
        events = [e["text"] for e in server.get(f"/api/v1/rollouts/{rollout_id}/events")["events"]]
        assert any("wave 1 finished" in e for e in events) and any("wave 2/2" in e for e in events)
        assert next(i for i, e in enumerate(events) if "wave 1 finished" in e) < next(
            i for i, e in enumerate(events) if "wave 2/2" in e
        )
        versions = wait_until(
            lambda: (v := _versions(server))["till-2"] == "1.5.0" and v, timeout=60, what="versions"
        )
        assert versions == {"till-1": "1.5.0", "till-2": "1.5.0", "till-4": "1.0.0"}  # till-4 (pi4) untouched
    finally:
        server.stop()
