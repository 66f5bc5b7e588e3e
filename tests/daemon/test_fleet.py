"""Fleet operations against a real mosquitto: rollouts over simulated devices, the fleet views,
and ``edge-fleet submit`` against a real agent."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import Engine, SamplingParams
from edge_contract import signing
from tests.support.fleet import simulated_fleets
from tests.support.models import ROOT
from tests.support.releases import placeholder_release

pytestmark = pytest.mark.e2e

KEY = signing.generate()
TRUST = [signing.PublicKey(KEY.public_key(), signing.key_id(KEY.public_key()))]


def _manifest(tmp_path: Path, version: str = "2.0.0") -> Path:
    return placeholder_release(KEY, version, tmp_path)


def _fleet_cmd(broker, *args: str, db: Path | None = None) -> list[str]:  # type: ignore[no-untyped-def]
    extra = ["--db", str(db)] if db is not None else []
    return [
        sys.executable,
        "-m",
        "edge_fleet.cli",
        *args,
        *extra,
        "--broker",
        f"{broker.host}:{broker.port}",
        "--plaintext",
    ]


def _run(
    broker, *args: str, db: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(_fleet_cmd(broker, *args, db=db), capture_output=True, text=True, timeout=timeout)


def _targets(db: Path, rollout: str) -> dict[str, tuple[int, str]]:
    with sqlite3.connect(db) as conn:
        try:
            rows = conn.execute("SELECT device, wave, state FROM targets WHERE rollout = ?", (rollout,))
        except sqlite3.OperationalError:  # the controller has created the file but not its tables yet
            return {}
        return {d: (w, s) for d, w, s in rows}


def _rollout_state(db: Path, rollout: str) -> tuple[str, int] | None:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT state, wave FROM rollouts WHERE id = ?", (rollout,)).fetchone()
    return None if row is None else (row[0], row[1])


def _start_rollout(broker, db: Path, rollout_id: str, manifest: Path, waves: str) -> subprocess.Popen[str]:  # type: ignore[no-untyped-def]
    """``edge-fleet rollout`` to group shop in the background, returned once its first wave is sent."""
    controller = subprocess.Popen(
        _fleet_cmd(broker, "rollout", str(manifest), "--group", "shop", "--waves", waves, db=db),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not any(s == "sent" for _w, s in (_targets(db, rollout_id) if db.exists() else {}).values()):
        assert time.monotonic() < deadline, "the first wave was never sent"
        time.sleep(0.05)
    return controller


@pytest.fixture()
def fleet(broker):  # type: ignore[no-untyped-def]
    """Factory of simulated fleets on the test's broker, stopped after the test."""
    yield from simulated_fleets(broker, group="shop", trusted=TRUST)


def test_rollout_goes_wave_by_wave_to_every_device(broker, fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sim = fleet(20, update_delay_s=0.3)
    fleet(3, group="other", name_prefix="bystander")
    db = tmp_path / "rollouts.sqlite3"
    manifest = str(_manifest(tmp_path))
    done = _run(broker, "rollout", manifest, "--group", "shop", "--waves", "10%,50%,100%", db=db)
    assert done.returncode == 0, done.stdout + done.stderr
    targets = _targets(db, "assistant@2.0.0/shop")
    assert sorted(targets) == sim.ids  # the other group is not touched
    assert [sum(1 for w, _s in targets.values() if w == wave) for wave in range(3)] == [2, 8, 10]
    assert {s for _w, s in targets.values()} == {"active"}
    assert all(d.active.version == "2.0.0" for d in sim.sim.devices)
    assert "wave 1/3" in done.stdout and "wave 3/3" in done.stdout and "done" in done.stdout
    status = _run(broker, "rollout", "status", "assistant@2.0.0/shop", "--json", db=db)
    row = json.loads(status.stdout)
    assert row["state"] == "done" and row["targets"] == {"active": 20}
    # The same command again is safe: it reports the finished rollout and publishes nothing.
    again = _run(broker, "rollout", manifest, "--group", "shop", db=db)
    assert again.returncode == 0 and "is done" in again.stdout
    # A different release under the same version is refused, not mixed in.
    other = _run(broker, "rollout", str(_manifest(tmp_path)), "--group", "shop", db=db)
    assert other.returncode == 1 and "different manifest" in other.stderr


def test_rollout_halts_in_the_first_wave_that_crosses_the_failure_threshold(
    broker, fleet, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # 20 % of the devices fail; the first (wave 1) and third waves hold one each.
    sim = fleet(20, update_delay_s=0.2, failing={"sim-0003", "sim-0007", "sim-0013", "sim-0018"})
    db = tmp_path / "rollouts.sqlite3"
    done = _run(
        broker, "rollout", str(_manifest(tmp_path)), "--group", "shop", "--waves", "25%,50%,75%,100%",
        "--max-failure-rate", "0.15", db=db,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "HALTED — 1 of 5 devices in wave 1 failed (limit 15%)" in done.stdout
    assert _rollout_state(db, "assistant@2.0.0/shop") == ("halted", 0)
    targets = _targets(db, "assistant@2.0.0/shop")
    assert targets["sim-0003"] == (0, "failed")
    assert all(s == "pending" for w, s in targets.values() if w > 0)
    untouched = [d for d in sim.sim.devices if targets[d.device_id][0] > 0]
    assert len(untouched) == 15 and all(d.update is None for d in untouched)


def test_abort_withdraws_unfinished_devices_and_resume_continues(
    broker, fleet, caller, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    fleet(6, update_delay_s=30.0)  # slow enough that the abort lands mid-wave
    db = tmp_path / "rollouts.sqlite3"
    rollout_id = "assistant@2.0.0/shop"
    controller = _start_rollout(broker, db, rollout_id, _manifest(tmp_path), "50%,100%")
    aborted = _run(broker, "rollout", "abort", rollout_id, db=db)
    assert aborted.returncode == 0, aborted.stderr
    controller.communicate(timeout=30)
    assert controller.returncode == 2
    targets = _targets(db, rollout_id)
    assert sorted(s for _w, s in targets.values()) == ["canceled"] * 3 + ["pending"] * 3
    # The withdrawn devices' desired state is cleared on the broker (an empty retained message).
    assert not [t for t, body in caller.retained("edge/+/model/desired") if body]
    assert _rollout_state(db, rollout_id) == ("aborted", 0)


def test_a_halted_rollout_resumes_and_a_killed_controller_picks_up_where_it_was(
    broker, fleet, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    sim = fleet(10, update_delay_s=0.3, failing={"sim-0000"})
    db = tmp_path / "rollouts.sqlite3"
    rollout_id = "assistant@2.0.0/shop"
    manifest = str(_manifest(tmp_path))
    args = ("rollout", manifest, "--group", "shop", "--waves", "20%,60%,100%", "--max-failure-rate", "0.2")
    halted = _run(broker, *args, db=db)
    assert halted.returncode == 2 and "HALTED" in halted.stdout, halted.stdout  # 1 of 2 in wave 1 failed

    # Resume, then kill -9 the controller once wave 2 has been sent; the same command finishes it.
    controller = subprocess.Popen(
        _fleet_cmd(broker, "rollout", "resume", rollout_id, db=db),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while (_rollout_state(db, rollout_id) or ("", 0))[1] < 1 or not any(
        w == 1 and s != "pending" for w, s in _targets(db, rollout_id).values()
    ):
        assert time.monotonic() < deadline, "wave 2 never started"
        time.sleep(0.05)
    controller.send_signal(signal.SIGKILL)
    controller.wait(timeout=10)
    finished = _run(broker, *args, db=db)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "continuing" in finished.stdout
    targets = _targets(db, rollout_id)
    assert targets.pop("sim-0000") == (0, "failed")
    assert {s for _w, s in targets.values()} == {"active"}
    assert sum(1 for d in sim.sim.devices if d.active.version == "2.0.0") == 9


def test_status_and_watch_show_the_fleet(broker, fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet(12, telemetry_interval_s=0.3)
    fleet(2, group="other", name_prefix="elsewhere", telemetry_interval_s=0.3)
    status = _run(broker, "status", "--json", "--group", "shop")
    rows = [json.loads(line) for line in status.stdout.splitlines()]
    assert [r["device"] for r in rows] == [f"sim-{i:04d}" for i in range(12)]
    assert all(r["online"] and r["model"] == "sim" and r["version"] == "1.0.0" for r in rows)

    watch = _run(broker, "watch", "--duration", "2.5", "--refresh", "0.5", "--sort", "temp")
    assert watch.returncode == 0, watch.stderr
    frame = watch.stdout.split("\f")[-1]
    assert "devices 14  online 14  degraded 0  updating 0  failed 0" in frame
    lines = [line for line in frame.splitlines() if line.startswith(("sim-", "elsewhere-"))]
    assert len(lines) == 14
    temps = [float(line.split()[6]) for line in lines]
    assert temps == sorted(temps)  # sorted by temperature, all reported by telemetry


def test_submit_streams_an_answer_from_a_real_agent_and_reports_batch_latency(
    broker, agents, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    demo = ROOT / "models" / "demo"
    agents(demo).start()
    # By default the prompt goes as a user message: the box renders its model's chat template.
    done = _run(broker, "submit", "--device", "box-1", "Is the device hot?", "--stream", "--max-tokens", "24")
    assert done.returncode == 0, done.stderr
    engine = Engine(demo)
    chat = engine.prompt_ids(messages=[{"role": "user", "content": "Is the device hot?"}])
    expected = engine.generate(chat, SamplingParams(max_tokens=24)).text
    assert expected.strip() and done.stdout.strip() == expected.strip()
    raw = _run(broker, "submit", "--device", "box-1", "Is the device hot?", "--raw", "--max-tokens", "24")
    plain = engine.generate(engine.prompt_ids("Is the device hot?"), SamplingParams(max_tokens=24)).text
    assert raw.returncode == 0 and raw.stdout.strip() == plain.strip()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Is the device hot?\nHow is the fan?\n\nWhat is the temperature?\n")
    batch = _run(broker, "submit", "--device", "box-1", "--file", str(prompts), "--max-tokens", "8", "--json")
    assert batch.returncode == 0, batch.stderr
    report = json.loads(batch.stderr.strip().splitlines()[-1])
    assert report["jobs"] == 3 and report["statuses"] == {"succeeded": 3}
    assert 0 < report["latency_p50_s"] <= report["latency_p95_s"] <= report["latency_max_s"]
    results = [json.loads(line) for line in batch.stdout.splitlines()]
    assert sorted(r["status"] for r in results) == ["succeeded"] * 3
    bad = _run(broker, "submit", "--device", "box-1", "hi", "--max-tokens", "0")
    assert bad.returncode == 1 and "max_tokens" in bad.stderr


def test_rollout_to_real_agents_with_a_real_release(broker, agents, releases, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = {"trusted_keys": [releases.public_line]}
    for name in ("till-1", "till-2", "till-3"):
        agents(device_id=name, group="shop", model_version="1.0.0", update=settings).start()
    releases.make("2.0.0")
    manifest = releases.server.root / "assistant-2.0.0" / "manifest.json"
    db = tmp_path / "rollouts.sqlite3"
    done = _run(broker, "rollout", str(manifest), "--group", "shop", "--waves", "33%,100%", db=db)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _targets(db, "assistant@2.0.0/shop") == {
        "till-1": (0, "active"),
        "till-2": (1, "active"),
        "till-3": (1, "active"),
    }
    status = _run(broker, "status", "--json", "--group", "shop")
    rows = [json.loads(line) for line in status.stdout.splitlines()]
    assert [(r["device"], r["version"], r["update_phase"]) for r in rows] == [
        (name, "2.0.0", "active") for name in ("till-1", "till-2", "till-3")
    ]


def test_a_rollback_release_rolls_out_in_waves_too(broker, fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from edge_contract.signing import private_pem

    sim = fleet(6, update_delay_s=0.2)
    db = tmp_path / "rollouts.sqlite3"
    first = _manifest(tmp_path, "1.5.0")
    forward = _run(broker, "rollout", str(first), "--group", "shop", db=db)
    assert forward.returncode == 0, forward.stdout + forward.stderr
    assert (
        _run(broker, "rollout", str(_manifest(tmp_path, "2.0.0")), "--group", "shop", db=db).returncode == 0
    )
    assert {d.active.version for d in sim.sim.devices} == {"2.0.0"}

    key = tmp_path / "fleet.key"
    key.write_bytes(private_pem(KEY))
    back = tmp_path / "rollback.json"
    written = _run(broker, "rollback", str(first), "--key", str(key), "--out", str(back))
    assert written.returncode == 0 and back.exists(), written.stderr
    done = _run(broker, "rollout", str(back), "--group", "shop", "--waves", "50%,100%", db=db)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {d.active.version for d in sim.sim.devices} == {"1.5.0"}
    rollouts = [
        json.loads(line) for line in _run(broker, "rollout", "status", "--json", db=db).stdout.splitlines()
    ]
    assert sorted(r["id"].split("/rollback-")[0] for r in rollouts) == [
        "assistant@1.5.0/shop", "assistant@1.5.0/shop", "assistant@2.0.0/shop",
    ]  # fmt: skip
    assert all(r["state"] == "done" for r in rollouts)


def test_watch_in_a_terminal_sorts_on_keys_and_quits_on_q(broker, fleet) -> None:  # type: ignore[no-untyped-def]
    import os
    import pty
    import select as select_module

    fleet(5, telemetry_interval_s=0.3)
    pid, fd = pty.fork()
    if pid == 0:  # the child: edge-fleet watch on a real terminal
        os.execv(sys.executable, _fleet_cmd(broker, "watch", "--refresh", "0.2"))
    screen = b""

    def read_until(text: bytes, timeout: float = 20.0) -> None:
        nonlocal screen
        end = time.monotonic() + timeout
        while text not in screen.split(b"\x1b[H\x1b[2J")[-1]:
            assert time.monotonic() < end, f"{text!r} never shown; last: {screen[-800:]!r}"
            if select_module.select([fd], [], [], 0.1)[0]:
                screen += os.read(fd, 65536)

    try:
        read_until(b"sorted by device")
        read_until(b"devices 5  online 5")
        os.write(fd, b"s")
        read_until(b"sorted by group")
        os.write(fd, b"s")
        read_until(b"sorted by health")
        os.write(fd, b"r")
        read_until("sorted by health ↓".encode())
        os.write(fd, b"p")
        read_until(b"problems only")
        assert b"sim-0000" not in screen.split(b"\x1b[H\x1b[2J")[-1]  # all five are fine
        os.write(fd, b"q")
        _pid, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(fd)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_devices_joining_the_group_during_a_rollout_get_the_release(broker, fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet(4, update_delay_s=1.5)
    db = tmp_path / "rollouts.sqlite3"
    rollout_id = "assistant@2.0.0/shop"
    controller = _start_rollout(broker, db, rollout_id, _manifest(tmp_path), "25%,50%,100%")
    late = fleet(2, name_prefix="late", update_delay_s=0.2)  # installed while wave 1 runs
    out, _ = controller.communicate(timeout=60)
    assert controller.returncode == 0, out
    targets = _targets(db, rollout_id)
    assert targets["late-0000"] == (1, "active") and targets["late-0001"] == (1, "active")
    # (the two may be noticed together or one after the other)
    assert "late-0000" in out and "late-0001" in out and "joined shop: added to wave 2" in out
    assert all(d.active.version == "2.0.0" for d in late.sim.devices)
