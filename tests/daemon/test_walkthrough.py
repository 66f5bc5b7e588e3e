"""The lab walkthrough of docs/fleet.md, run as written: its shell block, on free ports and a scratch home."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.support.broker import free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def _walkthrough(page: str, marker: str) -> str:
    text = (REPO / "docs" / page).read_text()
    block = text.split(marker, 1)[1]
    return block.split("```sh\n", 1)[1].split("```", 1)[0]


def _run(script: str, tmp_path: Path, ports: tuple[str, ...]) -> tuple[int, str]:
    """The block in bash -e from a scratch clone and home; only the ports change.

    (Other engineers' brokers and servers may hold the documented ports on this machine.)
    """
    for port in ports:
        assert port in script
        script = script.replace(port, str(free_port()))
    lab = tmp_path / "clone"
    lab.mkdir()
    (lab / ".venv").symlink_to(REPO / ".venv")
    (lab / "models").symlink_to(REPO / "models")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_FLEET_", "XDG_"))}
    env["HOME"] = str(tmp_path / "home")
    (tmp_path / "home").mkdir()
    # Output to a file, not a pipe: when a command fails, the block's background processes
    # (which inherit its output) must not keep the test waiting for an end of file.
    log = tmp_path / "walkthrough.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            ["bash", "-e", "-c", script],
            cwd=lab,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=900)
            # Its last line stops the lab: nothing the block started may outlive it.
            deadline = time.monotonic() + 10
            while (leftover := _session(proc.pid)) and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text()
    if proc.returncode == 0:
        assert not leftover, f"still running after the walkthrough: {leftover}\n{out[-2000:]}"
    return proc.returncode, out


def _session(sid: int) -> list[list[str]]:
    found = []
    for candidate in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if os.getsid(candidate.pid) == sid and candidate.status() != psutil.STATUS_ZOMBIE:
                found.append(candidate.cmdline())
    return found


def test_the_lab_walkthrough_runs_as_written(tmp_path: Path) -> None:
    returncode, out = _run(_walkthrough("fleet.md", "<!-- walkthrough -->"), tmp_path, ("1883", "8000"))
    assert returncode == 0, out[-6000:]
    assert "devices 51  online 51" in out, out[-4000:]
    assert "51 of 51 devices active on demo@1.0.0" in out, out[-4000:]
    assert "rollout demo@1.1.0/shop-3: done — 51 active" in out, out[-4000:]
    # The rollout reports by wave, not by device: its lines stay few for 51 boxes.
    rollout = out.split("rollout demo@1.1.0/shop-3: wave 1/2", 1)[1].split(
        "rollout demo@1.1.0/shop-3: done", 1
    )[0]
    assert len(rollout.splitlines()) < 15, rollout
    assert "rollout demo@1.1.0/shop-3/rollback: done — 51 active" in out, out[-4000:]
    # The streamed answer: the line after the devices' summary, before deploy's first line.
    summary = next(line for line in out.splitlines() if line.startswith("devices 51  online 51  offline 0"))
    after = out.split(summary + "\n", 1)[1]
    answer = next(line for line in after.splitlines() if not line.startswith("edge-fleet: warning"))
    assert answer.strip() and not answer.startswith("desired model"), after[:500]
    assert "shop-3-till-1" in out and "rollout demo@1.1.0/shop-3/rollback" in out
    assert "Traceback" not in out, out[-4000:]


def test_the_server_walkthrough_runs_as_written(tmp_path: Path) -> None:
    script = _walkthrough("fleet-server.md", "<!-- server-walkthrough -->")
    returncode, out = _run(script, tmp_path, ("1883", "8000", "8080"))
    assert returncode == 0, out[-6000:]
    # The rollout ran on the server: canary first, then the waves, every box on 1.1.0.
    rollout_id = "demo@1.1.0/select:group=shop-3"
    assert f"rollout {rollout_id}: done" in out, out[-4000:]
    status = [json.loads(line) for line in out.splitlines() if line.startswith("{") and rollout_id in line]
    assert status and status[-1]["state"] == "done", out[-4000:]
    # The audit log names the operator of each change: the label and the rollout.
    audit = [line for line in out.splitlines() if " alice " in f" {line} "]
    assert any("label" in line for line in audit) and any("rollout" in line for line in audit), out[-3000:]
    assert "Traceback" not in out, out[-4000:]
