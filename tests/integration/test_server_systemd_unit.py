"""systemd/edge-fleet-server.service: verified and scored with the real systemd tools
(systemd is not PID 1 here, so the unit is not started; a missing tool fails, never skips)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.models import ROOT
from tests.support.tools import systemd_exposure, tool

pytestmark = pytest.mark.e2e  # runs systemd-analyze

UNIT = ROOT / "systemd" / "edge-fleet-server.service"


def test_security_exposure_is_at_most_2() -> None:
    assert systemd_exposure(UNIT) <= 2.0


def test_verify_passes_with_the_binary_in_place(tmp_path: Path) -> None:
    """``verify`` wants ExecStart's binary to exist: point a copy of the unit at a stand-in."""
    binary = tmp_path / "edge-fleet"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    unit = tmp_path / "edge-fleet-server.service"
    unit.write_text(UNIT.read_text().replace("/opt/edge-fleet/venv/bin/edge-fleet", str(binary)))
    proc = subprocess.run(
        [tool("systemd-analyze", "systemd"), "verify", str(unit)], capture_output=True, text=True
    )
    problems = [line for line in proc.stderr.splitlines() if "edge-fleet-server" in line]
    assert proc.returncode == 0 and not problems, proc.stderr
