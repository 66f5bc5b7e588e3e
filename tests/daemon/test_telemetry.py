"""Telemetry, health verdicts and load shedding of a running agent, against a real broker.

This machine has no temperature sensor, so the tests that need a hot box point
``[telemetry] sysfs_root`` at a directory laid out like sysfs with one thermal
zone whose value they write — the agent reads it through its real code path.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

JOBS = "edge/box-1/jobs"


def _messages(caller, topic: str) -> list[dict]:  # type: ignore[no-untyped-def]
    return [json.loads(p) for t, p, _ in list(caller.raw.queue) if t == topic]


def _wait_for(caller, topic: str, predicate, timeout: float = 15, after: int = 0) -> dict:  # type: ignore[no-untyped-def]
    """The newest message on ``topic`` matching ``predicate`` among those after the first ``after``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = [m for m in _messages(caller, topic)[after:] if predicate(m)]
        if found:
            return found[-1]
        time.sleep(0.05)
    raise AssertionError(
        f"no matching message on {topic} within {timeout} s: {_messages(caller, topic)[-2:]}"
    )


@pytest.fixture()
def thermal(tmp_path: Path) -> Path:
    zone = tmp_path / "sys" / "class" / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("45000\n")
    return zone / "temp"


def test_telemetry_reports_the_box_and_the_jobs(agents, caller) -> None:  # type: ignore[no-untyped-def]
    agents(mqtt={"keepalive": 30}).start()
    caller.subscribe("edge/box-1/telemetry")
    caller.send(JOBS, {"id": "tel-1", "prompt": "hi", "max_tokens": 5})
    caller.wait_result("tel-1")
    caller.send(JOBS, {"id": "tel-2", "prompt": "hi", "temperature": -1})
    caller.wait_result("tel-2")
    message = _wait_for(
        caller, "edge/box-1/telemetry", lambda m: m["jobs"]["total"]["rejected"] >= 1, timeout=25
    )
    raw = [p for t, p, _ in list(caller.raw.queue) if t == "edge/box-1/telemetry"]
    assert max(len(p) for p in raw) < 2048
    assert message["type"] == "telemetry" and message["device_id"] == "box-1"
    assert message["jobs"]["total"]["succeeded"] == 1 and message["jobs"]["total"]["rejected"] == 1
    assert message["memory"]["total_mb"] > 0 and message["memory"]["available_mb"] > 0
    assert message["cpu"]["load"] is not None and message["disk_free_mb"] > 0
    assert message["agent"]["rss_mb"] > 10
    assert message["model"]["name"] == "phi3-int4"
    assert message["health"]["verdict"] in ("ok", "degraded")
    # No sensor here: reported as null, never invented.
    assert message["temperature"]["soc_c"] is None and message["throttling"] is None


@pytest.mark.parametrize("mode", ["reject", "queue"])
def test_a_hot_box_sheds_load_and_recovers(agents, caller, thermal: Path, mode: str) -> None:  # type: ignore[no-untyped-def]
    agent = agents(
        telemetry={"interval_s": 1.0, "sysfs_root": str(thermal.parents[3])},
        health={"max_temp_c": 70, "shed_load": mode},
    )
    agent.start()
    caller.subscribe("edge/box-1/status")
    caller.subscribe("edge/box-1/telemetry")
    thermal.write_text("85000\n")
    status = _wait_for(
        caller, "edge/box-1/status", lambda m: (m.get("health") or {}).get("verdict") == "degraded"
    )
    assert status["health"]["reasons"] == ["hot"]
    caller.send(JOBS, {"id": "hot-1", "prompt": "hi", "max_tokens": 3})
    if mode == "reject":
        result = caller.wait_result("hot-1")
        assert result["status"] == "rejected" and result["error"]["code"] == "overloaded"
        assert "hot" in result["error"]["message"]
    else:
        # Two telemetry intervals pass with the box still hot (each a chance to start the job).
        sent_at = len(_messages(caller, "edge/box-1/telemetry"))
        wait_until(
            lambda: (
                len(
                    [
                        m
                        for m in _messages(caller, "edge/box-1/telemetry")[sent_at:]
                        if (m.get("health") or {}).get("verdict") == "degraded"
                    ]
                )
                >= 2
            ),
            timeout=30,
            what="two more telemetry messages from the hot box",
        )
        assert caller.results("hot-1") == [], "a queued job waits while the box is hot"
    seen = len(_messages(caller, "edge/box-1/status"))
    thermal.write_text("50000\n")  # below 70 - 5 °C of hysteresis
    _wait_for(
        caller, "edge/box-1/status", lambda m: (m.get("health") or {}).get("verdict") == "ok", after=seen
    )
    if mode == "queue":
        assert caller.wait_result("hot-1")["status"] == "succeeded"
    caller.send(JOBS, {"id": "cool-1", "prompt": "hi", "max_tokens": 3})
    assert caller.wait_result("cool-1")["status"] == "succeeded"


def test_doctor_command_checks_a_box(agents, broker) -> None:  # type: ignore[no-untyped-def]
    agent = agents()
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "doctor", "--config", str(agent.config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("python", "onnxruntime", "cpu", "memory", "broker", "model"):
        assert name in proc.stdout
    assert "reachable" in proc.stdout
    broker.stop()
    down = subprocess.run(
        [sys.executable, "-m", "agent.cli", "doctor", "--config", str(agent.config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert down.returncode == 1 and "fail  broker" in down.stdout
