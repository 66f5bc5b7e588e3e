"""The system tools some e2e tests run (systemd-analyze, promtool, shellcheck, curl): found, or the test fails.

A missing tool is a failure naming the package to install, never a skip (CI installs them).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest


def tool(name: str, package: str | None = None) -> str:
    """The path of the executable ``name``; fails the test when it is missing, naming its package."""
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: apt-get install {package or name}")
    return found


def systemd_exposure(unit: Path) -> float:
    """``systemd-analyze security --offline=yes``'s overall exposure level for ``unit`` (lower is safer)."""
    proc = subprocess.run(
        [tool("systemd-analyze", "systemd"), "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(rf"Overall exposure level for {re.escape(unit.name)}: (\d+\.\d+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    return float(found.group(1))
