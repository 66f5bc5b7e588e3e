"""``edge-fleet server`` as a real process (issue 21) with a real mosquitto and simulated boxes:
rollouts that outlive the CLI and a ``kill -9`` of the server (SQLite and PostgreSQL 15),
selector rollouts halted by their canary, roles and the audit log, metrics, leadership."""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon.test_fleet import KEY, TRUST
from tests.support.fleet import simulated_fleets
from tests.support.fleet_server import FleetServer, fleet_cli
from tests.support.mqtt_client import Caller
from tests.support.postgres import Postgres
from tests.support.releases import placeholder_release
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The server's database: a SQLite file, or a fresh database on the module's PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "server.sqlite3")
    cluster: Postgres = request.getfixturevalue("postgres")
    return cluster.dsn()


@pytest.fixture()
def fleet(broker):  # type: ignore[no-untyped-def]
    yield from simulated_fleets(broker, group="shop", trusted=TRUST)


@pytest.fixture()
def servers(broker, tmp_path: Path) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    """Factory of server processes on the test's broker, all stopped after the test."""
    made: list[FleetServer] = []

    def make(db: str, **kwargs: Any) -> FleetServer:
        made.append(FleetServer(db, broker, tmp_path / f"server-{len(made)}.log", **kwargs))
        return made[-1]

    yield make
    for server in made:
        server.stop()


def _desired_watch(broker) -> Caller:  # type: ignore[no-untyped-def]
    """Records every desired state the broker delivers to boxes."""
    caller = Caller(broker.host, broker.port, reply_filter="test/nothing/#")
    caller.subscribe("edge/+/model/desired")
    return caller


def _desired(caller: Caller) -> dict[str, set[bytes]]:
    seen: dict[str, set[bytes]] = {}
    for topic, body, _c in list(caller.raw.queue):
        if body:
            seen.setdefault(topic.split("/")[1], set()).add(body)
    return seen


def test_a_rollout_survives_the_cli_sigkill_and_the_server_kill9(
    broker, fleet, servers, database: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    sims = fleet(6, update_delay_s=0.8)
    watch = _desired_watch(broker)
    server = servers(database).start()
    wait_until(lambda: len(server.get("/api/v1/devices")) == 6, timeout=30, what="6 devices in the inventory")
    manifest = placeholder_release(KEY, "2.0.0", tmp_path)
    rollout_id = server.rollout_killed_once(
        str(manifest), "--group", "shop", "--waves", "50%,100%", "--max-parallel", "1", until="active"
    )
    assert rollout_id == "assistant@2.0.0/shop"
    # The rollout goes on without the CLI ...
    wait_until(
        lambda: server.rollout(rollout_id)["targets"].get("active", 0) >= 3, timeout=60, what="3 boxes active"
    )
    row = server.rollout(rollout_id)
    assert row["state"] == "running" and row["targets"].get("pending", 0) >= 1, row  # mid-rollout
    # ... and across a kill -9 of the server and a restart on the same database.
    server.kill9()
    server.start()
    done = server.wait_state(rollout_id, "done", "halted", timeout=120)
    assert done["state"] == "done" and done["targets"] == {"active": 6}, done
    assert all(d.active.version == "2.0.0" for d in sims.sim.devices)
    # Every box was sent one release, once decided: nothing it could take for a new release.
    delivered = _desired(watch)
    watch.close()
    assert sorted(delivered) == sorted(sims.ids) and all(len(p) == 1 for p in delivered.values()), delivered
    status = fleet_cli("rollout", "status", rollout_id, "--json", env=server.env("viewer"))
    [line] = [json.loads(x) for x in status.stdout.splitlines()]
    assert line["id"] == rollout_id and line["state"] == "done"


def test_a_selector_rollout_with_a_failing_canary_halts_before_any_other_box_is_touched(
    broker, fleet, servers, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    fleet(4, update_delay_s=0.3, failing={"sim-0000"})
    fleet(2, name_prefix="other", update_delay_s=0.3)  # not matched by the selector
    watch = _desired_watch(broker)
    server = servers(str(tmp_path / "server.sqlite3")).start()
    wait_until(lambda: len(server.get("/api/v1/devices")) == 6, timeout=30, what="6 devices in the inventory")
    for device in ("sim-0000", "sim-0001", "sim-0002", "sim-0003"):
        labelled = fleet_cli("label", device, "region=north", "hw=pi5", env=server.env("operator"))
        assert labelled.returncode == 0, labelled.stderr
    manifest = placeholder_release(KEY, "2.0.0", tmp_path)
    refused = fleet_cli("rollout", str(manifest), "--select", "region=north,hw=pi5", env=server.env("viewer"))
    assert refused.returncode == 1 and "403" in refused.stderr, refused.stderr
    started = fleet_cli("rollout", str(manifest), "--select", "hw=pi5,region=north", "--canary", "1",
                        "--waves", "50%,100%", env=server.env("operator"))  # fmt: skip
    assert started.returncode == 0, started.stderr
    rollout_id = started.stdout.splitlines()[0]
    assert rollout_id == "assistant@2.0.0/select:hw=pi5,region=north"
    halted = server.wait_state(rollout_id, "halted", "done", timeout=60)
    assert halted["state"] == "halted" and "canary" in halted["reason"], halted
    assert halted["targets"] == {"failed": 1, "pending": 3}, halted
    delivered = _desired(watch)
    watch.close()
    assert sorted(delivered) == ["sim-0000"]  # the canary got it (positive control); nobody else did
    audit = fleet_cli("audit", "--json", env=server.env("admin"))
    entries = [json.loads(x) for x in audit.stdout.splitlines()]
    by_action = {(e["action"], e["target"]): e["actor"] for e in entries}
    assert by_action[("rollout.create", rollout_id)] == "operator-user"
    assert by_action[("device.labels", "sim-0001")] == "operator-user"
    assert fleet_cli("audit", "--json", env=server.env("operator")).returncode == 1  # admins only


def test_metrics_show_every_box_and_a_stopped_one_as_zero(broker, fleet, servers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet(2, telemetry_interval_s=1.0)
    leaving = fleet(1, name_prefix="leaving", telemetry_interval_s=1.0)
    server = servers(str(tmp_path / "server.sqlite3")).start()

    def online() -> dict[str, float]:
        families = {f.name: f for f in text_string_to_metric_families(server.get("/metrics"))}
        return {s.labels["device"]: s.value for s in families["edge_device_online"].samples}

    wait_until(
        lambda: online() == {"sim-0000": 1.0, "sim-0001": 1.0, "leaving-0000": 1.0},
        timeout=30,
        what="3 online",
    )

    def hot() -> set[str]:
        families = {f.name: f for f in text_string_to_metric_families(server.get("/metrics"))}
        return {s.labels["device"] for s in families["edge_device_temperature_celsius"].samples}

    wait_until(
        lambda: hot() == {"sim-0000", "sim-0001", "leaving-0000"}, timeout=30, what="every box's telemetry"
    )
    leaving.stop()
    wait_until(
        lambda: online() == {"sim-0000": 1.0, "sim-0001": 1.0, "leaving-0000": 0.0},
        timeout=30,
        what="the stopped box at 0",
    )


def test_two_servers_on_one_postgresql_never_drive_the_same_rollout(
    broker, fleet, servers, postgres, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    fleet(3, update_delay_s=0.3)
    dsn = postgres.dsn()
    first = servers(dsn, server_id="server-a").start()
    second = servers(dsn, server_id="server-b", tokens=first.tokens).start()
    manifest = placeholder_release(KEY, "2.0.0", tmp_path)
    wait_until(lambda: len(first.get("/api/v1/devices")) == 3, timeout=30, what="3 devices")
    started = fleet_cli("rollout", str(manifest), "--group", "shop", "--max-parallel", "1", env=second.env())
    assert started.returncode == 0, started.stderr
    rollout_id = started.stdout.splitlines()[0]
    leaders = set()

    def finished() -> bool:
        for s in (first, second):
            health = s.get("/healthz")
            leaders.update((s.server_id, r) for r in health["leading"])
        return first.rollout(rollout_id)["state"] == "done"

    wait_until(finished, timeout=60, interval=0.05, what="the rollout done")
    assert len(leaders) == 1, leaders  # one server drove it, all along


def _retained_desired(broker, count: int) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    """The retained desired states on the broker, once there are ``count`` of them."""
    caller = Caller(broker.host, broker.port, reply_filter="test/nothing/#")
    try:
        caller.subscribe("edge/#")

        def found() -> dict[str, bytes]:
            seen = {t: body for t, body, _c in list(caller.raw.queue) if t.endswith("/desired")}
            return {t: body for t, body in seen.items() if body}

        return wait_until(
            lambda: len(d := found()) == count and d, timeout=60, what=f"{count} retained desired states"
        )
    finally:
        caller.close()


def test_deploy_jobs_and_the_server_rebuilding_what_the_broker_lost(
    broker, fleet, servers, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    fleet(2, update_delay_s=0.2)
    server = servers(str(tmp_path / "server.sqlite3")).start()
    wait_until(lambda: len(server.get("/api/v1/devices")) == 2, timeout=30, what="2 devices")
    group = fleet_cli(
        "deploy",
        str(placeholder_release(KEY, "2.0.0", tmp_path)),
        "--group",
        "shop",
        "--wait",
        env=server.env(),
    )
    assert group.returncode == 0 and "2 of 2 devices active on assistant@2.0.0" in group.stdout, (
        group.stdout + group.stderr
    )
    # The views keep their fields in server mode.
    status = [
        json.loads(x) for x in fleet_cli("status", "--json", env=server.env("viewer")).stdout.splitlines()
    ]
    assert [(r["device"], r["version"], r["online"]) for r in status] == [
        ("sim-0000", "2.0.0", True),
        ("sim-0001", "2.0.0", True),
    ]
    assert {"update_phase", "update_error", "temp_c", "last_seen"} <= set(status[0])
    listed = [
        json.loads(x) for x in fleet_cli("devices", "--json", env=server.env("viewer")).stdout.splitlines()
    ]
    assert [r["device"] for r in listed] == ["sim-0000", "sim-0001"] and "cert_serial" in listed[0]
    own = fleet_cli(
        "deploy", str(placeholder_release(KEY, "2.5.0", tmp_path)), "--device", "sim-0001", env=server.env()
    )
    assert own.returncode == 0, own.stderr
    shadowed = fleet_cli(
        "deploy", str(placeholder_release(KEY, "2.6.0", tmp_path)), "--group", "shop", env=server.env()
    )
    assert shadowed.returncode == 1 and "sim-0001" in shadowed.stderr and "override" in shadowed.stderr
    before = _retained_desired(broker, 2)
    # The broker crashes and loses its disk: the server notices and publishes them again by itself.
    republished = server.get("/healthz")["republished"]
    broker.kill()
    shutil.rmtree(broker.workdir / "data")
    (broker.workdir / "data").mkdir()
    broker.start()
    assert _retained_desired(broker, 2) == before
    assert server.get("/healthz")["republished"] >= republished + 2  # the server rebuilt them: they were gone
    counts = fleet_cli("reconcile", "--json", env=server.env())
    assert counts.returncode == 0 and json.loads(counts.stdout) == {"device": 1, "group": 1, "cleared": 0}, (
        counts.stderr
    )
    history = fleet_cli("history", "sim-0001", "--json", env=server.env("viewer"))
    rows = [json.loads(x) for x in history.stdout.splitlines()]
    assert [(r["kind"], r["release"], r["actor"]) for r in rows] == [
        ("group", "assistant@2.0.0", "operator-user"),
        ("device", "assistant@2.5.0", "operator-user"),
    ]
    # A job through the API, answered by a box.
    request = urllib.request.Request(
        server.url + "/api/v1/jobs?wait=true", data=json.dumps({"device": "sim-0000", "prompt": "hi"}).encode(),
        headers={"Authorization": f"Bearer {server.tokens['operator']}", "Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as answer:
        job = json.loads(answer.read())
    assert job["state"] == "succeeded" and job["result"]["device_id"] in (None, "sim-0000"), job
