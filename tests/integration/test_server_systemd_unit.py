"""systemd/edge-fleet-server.service: verified and scored with the real systemd tools
(systemd is not PID 1 here, so the unit is not started; a missing tool fails, never skips)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.models import ROOT

pytestmark = pytest.mark.e2e  # runs systemd-analyze

UNIT = ROOT / "systemd" / "edge-fleet-server.service"


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd")
    return tool


def test_security_exposure_is_at_most_2() -> None:
    proc = subprocess.run(
        [_systemd_analyze(), "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
    )
    found = re.search(r"Overall exposure level for edge-fleet-server\.service: (\d+\.\d+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    assert float(found.group(1)) <= 2.0, proc.stdout


def test_verify_passes_with_the_binary_in_place(tmp_path: Path) -> None:
    """``verify`` wants ExecStart's binary to exist: point a copy of the unit at a stand-in."""
    binary = tmp_path / "edge-fleet"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    unit = tmp_path / "edge-fleet-server.service"
    unit.write_text(UNIT.read_text().replace("/opt/edge-fleet/venv/bin/edge-fleet", str(binary)))
    proc = subprocess.run([_systemd_analyze(), "verify", str(unit)], capture_output=True, text=True)
    problems = [line for line in proc.stderr.splitlines() if "edge-fleet-server" in line]
    assert proc.returncode == 0 and not problems, proc.stderr
