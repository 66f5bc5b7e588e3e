"""The lab walkthrough of docs/fleet.md, run as written: its shell block, on free ports and a scratch home."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support.broker import free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def _walkthrough() -> str:
    text = (REPO / "docs" / "fleet.md").read_text()
    block = text.split("<!-- walkthrough -->", 1)[1]
    return block.split("```sh\n", 1)[1].split("```", 1)[0]


def test_the_lab_walkthrough_runs_as_written(tmp_path: Path) -> None:
    script = _walkthrough()
    assert "1883" in script and "8000" in script
    # Only the ports change (other engineers' brokers may hold 1883 on this machine).
    script = script.replace("1883", str(free_port())).replace("8000", str(free_port()))
    lab = tmp_path / "clone"
    lab.mkdir()
    (lab / ".venv").symlink_to(REPO / ".venv")
    (lab / "models").symlink_to(REPO / "models")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_FLEET_", "XDG_"))}
    env["HOME"] = str(tmp_path / "home")
    (tmp_path / "home").mkdir()
    proc = subprocess.Popen(
        ["bash", "-e", "-c", script],
        cwd=lab,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-6000:]
    assert "devices 51  online 51" in out, out[-4000:]
    assert "51 of 51 devices active on demo@1.0.0" in out, out[-4000:]
    assert "rollout demo@1.1.0/shop-3: done — 51 active" in out, out[-4000:]
    assert "rollout demo@1.1.0/shop-3/rollback: done — 51 active" in out, out[-4000:]
    # The streamed answer: the line after the devices' summary, before deploy's first line.
    summary = next(line for line in out.splitlines() if line.startswith("devices 51  online 51  offline 0"))
    after = out.split(summary + "\n", 1)[1]
    answer = next(line for line in after.splitlines() if not line.startswith("edge-fleet: warning"))
    assert answer.strip() and not answer.startswith("desired model"), after[:500]
    assert "shop-3-till-1" in out and "rollout demo@1.1.0/shop-3/rollback" in out
    assert "Traceback" not in out, out[-4000:]
