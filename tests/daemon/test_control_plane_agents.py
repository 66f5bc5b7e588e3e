"""The issue-14 scenarios end to end with real ``edge-agent run`` processes and real signed releases:
a rollout while a box is stopped, a broken release halted then aborted (final), a group rollback
refused because the rollout's per-device states would shadow it, the rollout-bound rollback, and
a broker that lost its persistence rebuilt by ``reconcile``."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from edge_contract.signing import private_pem
from tests.daemon.test_control_plane import _json_lines, _retained
from tests.daemon.test_fleet import _run, _targets
from tests.support.releases import replace_file

pytestmark = pytest.mark.e2e

FIXTURE = "llama-int4"  # the agents' model folder: its name is the releases' model name


def _write_manifest(manifest: Any, path: Path) -> Path:
    path.write_text(manifest.model_dump_json())
    return path


def _versions(broker, group: str | None = None) -> dict[str, str | None]:  # type: ignore[no-untyped-def]
    args = ["status", "--json"] + (["--group", group] if group else [])
    return {r["device"]: r["version"] for r in _json_lines(_run(broker, *args).stdout)}


def _wait_versions(broker, expected: dict[str, str], timeout: float = 90) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        now = _versions(broker)
        if all(now.get(d) == v for d, v in expected.items()):
            return
        assert time.monotonic() < deadline, f"expected {expected}, have {now}"
        time.sleep(1.0)


def test_operator_scenarios_with_real_agents(broker, agents, releases, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.support.models import fixture_path

    settings = {"trusted_keys": [releases.public_line]}
    boxes = {
        name: agents(
            fixture_path(FIXTURE), device_id=name, group=group, model_version="1.0.0", update=settings
        )
        for name, group in (("till-1", "shop-3"), ("till-2", "shop-3"), ("till-4", "shop-4"))
    }
    for box in boxes.values():
        box.start()
    db = Path(os.environ["EDGE_FLEET_DB"])
    key = tmp_path / "fleet.key"
    key.write_bytes(private_pem(releases.key))
    v15 = _write_manifest(releases.make("1.5.0", fixture=FIXTURE, name=FIXTURE), tmp_path / "m-1.5.0.json")
    v20 = _write_manifest(releases.make("2.0.0", fixture=FIXTURE, name=FIXTURE), tmp_path / "m-2.0.0.json")
    seen = _run(broker, "devices")
    assert "devices 3  online 3" in seen.stdout, seen.stdout + seen.stderr

    # 1. A shop-3 box is stopped; the rollout plans it, defers it, says so, and sees it through.
    assert boxes["till-2"].terminate() == 0
    first = _run(
        broker, "rollout", str(v15), "--group", "shop-3", "--waves", "50%,100%", "--defer-offline", db=db
    )
    assert first.returncode == 3, first.stdout + first.stderr
    assert "2 devices in waves of 1, 1; offline now: till-2" in first.stdout
    assert "NOT DONE" in first.stdout and "till-2" in first.stdout
    status = _run(broker, "status", "--group", "shop-3")
    assert "till-2" in status.stdout, status.stdout  # the stopped box is not hidden
    boxes["till-2"].start()
    _wait_versions(broker, {"till-1": "1.5.0", "till-2": "1.5.0", "till-4": "1.0.0"})
    [row] = _json_lines(_run(broker, "rollout", "status", f"{FIXTURE}@1.5.0/shop-3", "--json", db=db).stdout)
    assert row["state"] == "done" and row["targets"] == {"active": 2}, row

    # 2. The next release rolls out; a broken one halts in wave 1, is aborted, and stays aborted.
    assert (
        _run(broker, "rollout", str(v20), "--group", "shop-3", "--waves", "50%,100%", db=db).returncode == 0
    )
    broken = replace_file(
        releases, releases.make("2.1.0", fixture=FIXTURE, name=FIXTURE), "model.onnx", b"\x08broken" * 64
    )
    bad = _write_manifest(broken, tmp_path / "m-2.1.0.json")
    halted = _run(
        broker,
        "rollout",
        str(bad),
        "--group",
        "shop-3",
        "--waves",
        "50%,100%",
        "--max-failure-rate",
        "0",
        db=db,
    )
    assert halted.returncode == 2 and "HALTED" in halted.stdout, halted.stdout + halted.stderr
    bad_id = f"{FIXTURE}@2.1.0/shop-3"
    assert _run(broker, "rollout", "abort", bad_id, db=db).returncode == 0
    resumed = _run(broker, "rollout", "resume", bad_id, db=db)
    assert resumed.returncode == 1 and "abort is final" in resumed.stderr
    [(second, (_wave, state))] = [(d, t) for d, t in _targets(db, bad_id).items() if t[0] == 1]
    assert state == "pending"
    assert f"edge/{second}/model/desired" in _retained(broker, "edge/+/model/desired")  # (2.0.0's, still)
    assert (
        json.loads(_retained(broker, f"edge/{second}/model/desired")[f"edge/{second}/model/desired"])[
            "version"
        ]
        == "2.0.0"
    )

    # 3. The README's group rollback is refused: the rollouts' per-device states would shadow it.
    refused = _run(broker, "rollback", str(v15), "--key", str(key), "--group", "shop-3", db=db)
    assert refused.returncode == 1 and "till-1" in refused.stderr and "till-2" in refused.stderr
    assert _versions(broker, "shop-3") == {"till-1": "2.0.0", "till-2": "2.0.0"}

    # 4. Rolling back the 2.0.0 rollout returns exactly its devices to what they ran before.
    back = _run(broker, "rollout", "rollback", f"{FIXTURE}@2.0.0/shop-3", "--key", str(key), db=db)
    assert back.returncode == 0, back.stdout + back.stderr
    assert f"2 devices back to {FIXTURE}@1.5.0 (2)" in back.stdout
    _wait_versions(broker, {"till-1": "1.5.0", "till-2": "1.5.0", "till-4": "1.0.0"}, timeout=30)

    # 5. The broker loses every retained message; reconcile rebuilds them and a box that was away
    #    converges on its assignment from the rebuilt state.
    assert boxes["till-4"].terminate() == 0
    deploy = _run(broker, "deploy", str(v15), "--device", "till-4", db=db)
    assert deploy.returncode == 0 and "recorded, and retained by the broker" in deploy.stdout
    before = _retained(broker, "edge/+/model/desired")
    broker.kill()
    shutil.rmtree(broker.workdir / "data")
    (broker.workdir / "data").mkdir()
    broker.start()
    assert _retained(broker, "edge/+/model/desired") == {}
    rec = _run(broker, "reconcile", db=db)
    assert rec.returncode == 0, rec.stderr
    assert _retained(broker, "edge/+/model/desired") == before
    boxes["till-4"].start()
    _wait_versions(broker, {"till-1": "1.5.0", "till-2": "1.5.0", "till-4": "1.5.0"})
