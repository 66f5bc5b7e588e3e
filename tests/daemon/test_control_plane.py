"""The operator's control plane (issue 14) against a real mosquitto and simulated devices: the
inventory, rollouts that plan with offline devices, durable desired state, deployment-bound
rollback, jobs that say where they went, and the reports' ergonomics.  Each test is one row of
the issue's table (or one item of "what to build")."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edge_contract.protocol import Status
from edge_contract.signing import private_pem
from edge_fleet.cli import main as fleet_cli
from tests.daemon.test_fleet import (  # helpers of the rollout tests
    KEY,
    TRUST,
    _fleet_cmd,
    _manifest,
    _run,
    _start_rollout,
    _targets,
)
from tests.support.fleet import simulated_fleets
from tests.support.mqtt_client import Caller

pytestmark = pytest.mark.e2e


@pytest.fixture()
def fleet(broker):  # type: ignore[no-untyped-def]
    """Factory of simulated fleets (group shop by default) on the test's broker."""
    yield from simulated_fleets(broker, group="shop", trusted=TRUST)


def _gone(broker, fleet, name_prefix: str = "gone") -> None:  # type: ignore[no-untyped-def]
    """A shop device seen once (recorded by `edge-fleet devices`), then offline, its retained status
    without its group — what an agent's Last Will said before issue 14."""
    sim = fleet(1, name_prefix=name_prefix)
    seen = _run(broker, "devices", "--json")
    assert f"{name_prefix}-0000" in seen.stdout, seen.stdout + seen.stderr
    sim.stop()
    caller = Caller(broker.host, broker.port, reply_filter="test/nothing/#")
    try:
        offline = Status(online=False, device_id=f"{name_prefix}-0000", group=None)
        caller.publish_retained(f"edge/{name_prefix}-0000/status", offline.model_dump_json().encode())
    finally:
        caller.close()


def _retained(broker, topic_filter: str) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    """Non-empty retained messages under ``topic_filter`` right now."""
    caller = Caller(broker.host, broker.port, reply_filter="test/nothing/#")
    try:
        return {t: body for t, body in caller.retained(topic_filter) if body}
    finally:
        caller.close()


def _local(*args: str) -> subprocess.CompletedProcess[str]:
    """An edge-fleet command that does not talk to the broker."""
    return subprocess.run(
        [sys.executable, "-m", "edge_fleet.cli", *args], capture_output=True, text=True, timeout=60
    )


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_devices_lists_provisioned_never_seen_and_offline_ones(broker, fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ca = tmp_path / "ca"
    assert fleet_cli(["ca", "init", "--out", str(ca)]) == 0
    out = str(tmp_path / "t9")
    assert fleet_cli(["provision", "shop-3-till-9", "--ca", str(ca), "--out", out, "--group", "shop"]) == 0
    fleet(2)
    _gone(broker, fleet)
    listed = _json_lines(_run(broker, "devices", "--json").stdout)
    by_name = {r["device"]: r for r in listed}
    assert sorted(by_name) == ["gone-0000", "shop-3-till-9", "sim-0000", "sim-0001"]
    till = by_name["shop-3-till-9"]
    assert till["online"] is None and till["group"] == "shop" and len(till["cert_serial"]) > 8
    assert till["cert_expires"] > time.time() + 300 * 86400
    assert by_name["gone-0000"]["online"] is False and by_name["gone-0000"]["group"] == "shop"
    assert by_name["sim-0000"]["online"] is True and by_name["sim-0000"]["version"] == "1.0.0"
    table = _run(broker, "devices", "--group", "shop")
    assert "never seen" in table.stdout and "offline" in table.stdout, table.stdout
    assert "devices 4  online 2  offline 1  never seen 1" in table.stdout


def test_a_rollout_plans_offline_devices_waits_for_them_and_counts_them_failed(
    broker, fleet, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    fleet(3, update_delay_s=0.2)
    _gone(broker, fleet)
    db = Path(os.environ["EDGE_FLEET_DB"])  # the one every command here uses
    done = _run(
        broker, "rollout", str(_manifest(tmp_path)), "--group", "shop", "--waves", "100%",
        "--wave-timeout", "4", "--max-failure-rate", "0.5", db=db,
    )  # fmt: skip
    out = done.stdout
    assert "4 devices in waves of 4; offline now: gone-0000" in out, out
    assert "gone-0000 (offline)" in out and "sim-0000" in out  # the wave line names its devices
    assert "gone-0000: timed_out — offline within the wave timeout of 4 s" in out
    assert "waiting for gone-0000" in out  # progress inside the wave
    assert _targets(db, "assistant@2.0.0/shop")["gone-0000"] == (0, "timed_out")
    assert "3 active, 1 timed_out" in out
    # The views show it too, in its group.
    rows = _json_lines(_run(broker, "status", "--json", "--group", "shop").stdout)
    assert [r["device"] for r in rows] == ["gone-0000", "sim-0000", "sim-0001", "sim-0002"]
    assert rows[0]["online"] is False


def test_defer_offline_reports_pending_and_status_tracks_them_until_done(
    broker, fleet, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    fleet(2, update_delay_s=0.2)
    _gone(broker, fleet)
    db = Path(os.environ["EDGE_FLEET_DB"])  # the one every command here uses
    rollout_id = "assistant@2.0.0/shop"
    waiting = _run(
        broker, "rollout", str(_manifest(tmp_path)), "--group", "shop", "--waves", "50%,100%",
        "--defer-offline", db=db,
    )  # fmt: skip
    assert waiting.returncode == 3, waiting.stdout + waiting.stderr
    assert "NOT DONE" in waiting.stdout and "gone-0000" in waiting.stdout
    assert " done —" not in waiting.stdout
    [row] = _json_lines(_run(broker, "rollout", "status", rollout_id, "--json", db=db).stdout)
    assert row["state"] == "waiting" and row["waiting_for"] == ["gone-0000"]
    assert row["targets"] == {"active": 2, "deferred": 1}
    # The box comes back: it finds its desired state retained, and status sees the rollout through.
    back = fleet(1, name_prefix="gone", update_delay_s=0.2)
    deadline = time.monotonic() + 30
    while back.sim.devices[0].active.version != "2.0.0":
        assert time.monotonic() < deadline, "the returning device never updated"
        time.sleep(0.1)
    [row] = _json_lines(_run(broker, "rollout", "status", rollout_id, "--json", db=db).stdout)
    assert row["state"] == "done" and row["targets"] == {"active": 3}, row


def test_rollout_status_keeps_tracking_after_a_halt(broker, fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet(1, name_prefix="fast", update_delay_s=0.1, failing={"fast-0000"})
    slow = fleet(2, name_prefix="slow", update_delay_s=3.0)
    db = Path(os.environ["EDGE_FLEET_DB"])  # the one every command here uses
    halted = _run(broker, "rollout", str(_manifest(tmp_path)), "--group", "shop", "--waves", "100%", db=db)
    assert halted.returncode == 2 and "HALTED" in halted.stdout, halted.stdout
    assert "fast-0000: failed — smoke_test_failed: simulated failure" in halted.stdout
    deadline = time.monotonic() + 30
    while not all(d.active.version == "2.0.0" for d in slow.sim.devices):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    [row] = _json_lines(_run(broker, "rollout", "status", "--json", db=db).stdout)
    assert row["state"] == "halted" and row["targets"] == {"active": 2, "failed": 1}, row
    assert row["failures"] == {"fast-0000": "failed: smoke_test_failed: simulated failure"}
    text = _run(broker, "rollout", "status", db=db).stdout
    assert "2 active, 1 failed" in text and "fast-0000: failed" in text


def test_an_aborted_rollout_is_final(broker, fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sim = fleet(4, update_delay_s=30.0)
    db = Path(os.environ["EDGE_FLEET_DB"])  # the one every command here uses
    rollout_id = "assistant@2.0.0/shop"
    controller = _start_rollout(broker, db, rollout_id, _manifest(tmp_path), "50%,100%")
    assert _run(broker, "rollout", "abort", rollout_id, db=db).returncode == 0
    controller.communicate(timeout=30)
    resumed = _run(broker, "rollout", "resume", rollout_id, db=db)
    assert resumed.returncode == 1 and "abort is final" in resumed.stderr, resumed.stdout + resumed.stderr
    # Positive control: the first wave's devices were sent it; the second wave's never were.
    wave2 = [d for d, (w, _s) in _targets(db, rollout_id).items() if w == 1]
    assert len(wave2) == 2
    desired = _retained(broker, "edge/+/model/desired")
    assert not [t for t in desired if t.split("/")[1] in wave2]
    assert all(d.update is None for d in sim.sim.devices if d.device_id in wave2)
    again = _run(broker, "rollout", str(_manifest(tmp_path)), "--group", "shop", db=db)
    assert again.returncode == 1  # a different manifest: refused; the same one would say "aborted"


def test_rollback_is_bound_to_the_rollout_and_group_deploys_refuse_to_be_shadowed(
    broker, fleet, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    sim = fleet(4, update_delay_s=0.2)
    fleet(1, group="other", name_prefix="bystander", update_delay_s=0.2)
    db = Path(os.environ["EDGE_FLEET_DB"])  # the one every command here uses
    first = _manifest(tmp_path, "1.5.0")
    assert _run(broker, "rollout", str(first), "--group", "shop", db=db).returncode == 0
    assert (
        _run(broker, "rollout", str(_manifest(tmp_path, "2.0.0")), "--group", "shop", db=db).returncode == 0
    )
    assert {d.active.version for d in sim.sim.devices} == {"2.0.0"}
    key = tmp_path / "fleet.key"
    key.write_bytes(private_pem(KEY))

    # The README's old way: a group rollback that the devices' own desired state would shadow.
    refused = _run(broker, "rollback", str(first), "--key", str(key), "--group", "shop", db=db)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "4 of its devices have their own desired state" in refused.stderr
    assert all(
        f"sim-000{i} (assistant@2.0.0, by rollout assistant@2.0.0/shop)" in refused.stderr for i in range(4)
    )
    assert "--override" in refused.stderr and "rollback" not in refused.stdout
    assert {d.active.version for d in sim.sim.devices} == {"2.0.0"}

    # Bound to the rollout: exactly its devices go back to what they ran before, in waves.
    back = _run(broker, "rollout", "rollback", "assistant@2.0.0/shop", "--key", str(key), db=db)
    assert back.returncode == 0, back.stdout + back.stderr
    assert "4 devices back to assistant@1.5.0 (4) in waves of 2, 2" in back.stdout
    assert "done — 4 active" in back.stdout
    assert {d.active.version for d in sim.sim.devices} == {"1.5.0"}
    history = _json_lines(_local("history", "sim-0001", "--json", "--db", str(db)).stdout)
    assert [(h["release"], h["origin"]) for h in history] == [
        ("assistant@1.5.0", "rollout assistant@1.5.0/shop"),
        ("assistant@2.0.0", "rollout assistant@2.0.0/shop"),
        ("assistant@1.5.0", "rollout assistant@2.0.0/shop/rollback"),
    ]

    # With --override the group deploy takes the devices back and says so; --wait follows them.
    deploy = _run(
        broker, "deploy", str(_manifest(tmp_path, "2.1.0")), "--group", "shop", "--override", "--wait", db=db
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    assert "cleared the own desired state of sim-0000, sim-0001, sim-0002, sim-0003" in deploy.stdout
    assert "sim-0002: active assistant@2.1.0" in deploy.stdout and "4 of 4 devices active" in deploy.stdout
    assert {d.active.version for d in sim.sim.devices} == {"2.1.0"}


def test_reconcile_rebuilds_every_retained_desired_state_after_the_broker_lost_them(
    broker, fleet, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    fleet(2, update_delay_s=0.2)
    late = fleet(1, name_prefix="late", update_delay_s=0.2)
    _run(broker, "devices")
    late.stop()
    db = Path(os.environ["EDGE_FLEET_DB"])  # the one every command here uses
    assert _run(broker, "deploy", str(_manifest(tmp_path, "2.0.0")), "--group", "shop", db=db).returncode == 0
    assert (
        _run(broker, "deploy", str(_manifest(tmp_path, "2.5.0")), "--device", "sim-0001", db=db).returncode
        == 0
    )
    before = _retained(broker, "edge/#")
    assert "edge/groups/shop/model/desired" in before and "edge/sim-0001/model/desired" in before

    broker.kill()  # a crash, and its persistence gone with the disk
    shutil.rmtree(broker.workdir / "data")
    (broker.workdir / "data").mkdir()
    broker.start()
    assert not [t for t in _retained(broker, "edge/#") if t.endswith("/desired")]  # control: all gone

    done = _run(broker, "reconcile", "--json", db=db)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"device": 1, "group": 1, "cleared": 0}
    after = _retained(broker, "edge/#")
    assert after["edge/groups/shop/model/desired"] == before["edge/groups/shop/model/desired"]
    assert after["edge/sim-0001/model/desired"] == before["edge/sim-0001/model/desired"]
    # The box that was away converges on its group's release from the rebuilt state.
    returned = fleet(1, name_prefix="late", update_delay_s=0.2)
    deadline = time.monotonic() + 30
    while returned.sim.devices[0].active.version != "2.0.0":
        assert time.monotonic() < deadline, "the returning device never converged"
        time.sleep(0.1)
    hist = _local("history", "shop", "--db", str(db))
    assert "group shop" in hist.stdout and "assistant@2.0.0" in hist.stdout and "deploy" in hist.stdout


def test_submit_says_at_once_that_a_device_is_unknown_or_offline(broker, fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet(1)
    _gone(broker, fleet)
    started = time.monotonic()
    unknown = _run(broker, "submit", "--device", "shop-9-till-1", "hi", "--timeout", "300", timeout=60)
    assert unknown.returncode == 1 and "device 'shop-9-till-1' is unknown" in unknown.stderr, unknown.stderr
    assert time.monotonic() - started < 60
    offline = _run(broker, "submit", "--device", "gone-0000", "hi", "--timeout", "2")
    assert "device gone-0000 is offline since" in offline.stderr and "waits in its session" in offline.stderr
    assert offline.returncode == 1 and "no result" in offline.stderr
    # Positive control: an online device answers, and the result names the model that answered.
    online = _run(broker, "submit", "--device", "sim-0000", "hi", "--json")
    assert online.returncode == 0, online.stderr
    answered = json.loads(online.stdout)
    assert answered["model"] == {"name": "sim", "version": "1.0.0"} and answered["device_id"] == "sim-0000"
    text = _run(broker, "submit", "--device", "sim-0000", "hi")
    assert text.returncode == 0 and "answered by sim-0000 (sim@1.0.0)" in text.stderr, text.stderr
    assert "is offline" not in online.stderr and "unknown" not in online.stderr


def test_reports_json_profile_and_a_closed_pipe(broker, fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sim = fleet(3, failing={"sim-0001"}, update_delay_s=0.1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\nc\n")
    batch = _run(broker, "submit", "--device", "sim-0000", "--file", str(prompts))
    assert batch.returncode == 0 and "3 jobs (3 succeeded)" in batch.stderr and "{" not in batch.stderr
    batch_json = _run(broker, "submit", "--device", "sim-0000", "--file", str(prompts), "--json")
    assert json.loads(batch_json.stderr.splitlines()[-1])["statuses"] == {"succeeded": 3}

    # A profile holds the broker flags: commands run with none of them.
    profile = tmp_path / "profile.toml"
    profile.write_text(f'broker = "{broker.host}:{broker.port}"\nplaintext = true\n')
    env = {**os.environ, "EDGE_FLEET_PROFILE": str(profile)}
    plain = subprocess.run(
        [sys.executable, "-m", "edge_fleet.cli", "status"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.startswith("edge-fleet status — all devices") and "(s sort" not in plain.stdout
    assert "LAST SEEN" in plain.stdout and "TEMP" not in plain.stdout
    env_only = {
        **os.environ,
        "EDGE_FLEET_BROKER": f"{broker.host}:{broker.port}",
        "EDGE_FLEET_PLAINTEXT": "1",
    }
    assert (
        subprocess.run(
            [sys.executable, "-m", "edge_fleet.cli", "devices"], capture_output=True, env=env_only, timeout=60
        ).returncode
        == 0
    )
    # status --device: the whole error message.
    deploy = _run(
        broker, "deploy", str(_manifest(tmp_path)), "--device", "sim-0001", "--wait", "--wait-timeout", "20"
    )
    assert (
        deploy.returncode == 1 and "sim-0001: failed — smoke_test_failed: simulated failure" in deploy.stdout
    )
    one = subprocess.run(
        [sys.executable, "-m", "edge_fleet.cli", "status", "--device", "sim-0001"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert "update error:  smoke_test_failed: simulated failure" in one.stdout, one.stdout
    assert (
        json.loads(_run(broker, "status", "--json", "--group", "shop").stdout.splitlines()[1])[
            "update_message"
        ]
        == "simulated failure"
    )
    # A closed pipe ends the command quietly.
    piped = subprocess.run(
        " ".join(_fleet_cmd(broker, "status")) + " | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert piped.stdout.startswith("edge-fleet status") and "Traceback" not in piped.stderr, piped.stderr
    assert sim.sim.devices[0].active.version == "1.0.0"


def test_watch_shows_groups_problems_and_a_ticking_clock(broker, fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet(2, telemetry_interval_s=60)
    _gone(broker, fleet)
    watch = _run(broker, "watch", "--duration", "3.5", "--refresh", "1", "--problems")
    frames = [f for f in watch.stdout.split("\f") if f.strip()]
    clocks = {f.splitlines()[0].rsplit(" ", 1)[-1] for f in frames}
    assert len(frames) >= 3 and len(clocks) >= 2, frames  # redrawn though nothing changed
    last = frames[-1]
    assert "GROUP" in last and "problems only" in last
    rows = [line for line in last.splitlines() if line.startswith(("gone-", "sim-"))]
    assert len(rows) == 1 and rows[0].split()[:3] == ["gone-0000", "shop", "no"], last
