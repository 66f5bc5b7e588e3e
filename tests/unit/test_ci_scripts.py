"""The CI scripts (.ci/run, .ci/arm64_emulated.sh) parse and pass shellcheck.

Running them is CI's job (``bash .ci/run``); here only what is cheap.  A
missing shellcheck is a failure, never a skip.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = [ROOT / ".ci" / "run", ROOT / ".ci" / "arm64_emulated.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_parses_it(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_is_clean(script: Path) -> None:
    tool = shutil.which("shellcheck")
    if tool is None:
        pytest.fail("shellcheck is missing: apt-get install shellcheck")
    proc = subprocess.run(
        [tool, "--severity=style", str(script)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout


def test_ci_runs_the_emulated_arm64_step_after_the_test_suite() -> None:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert lines.index("make test") < lines.index("make test-arm64")
    assert "qemu-user-static" in (ROOT / ".ci" / "run").read_text()
