"""deploy/install.sh: parses, passes shellcheck, and refuses bad arguments before touching the box.

The CI scripts (.ci/run, .ci/arm64_emulated.sh, .ci/x86_avx2_emulated.sh) must parse and pass shellcheck too.

The install itself (apt, a system user, /opt, /etc, systemctl) changes the
machine, so the tests run only what stops before that.  A missing shellcheck
is a failure, never a skip.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.tools import tool

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "install.sh"
SHELL_SCRIPTS = [
    SCRIPT,
    ROOT / ".ci" / "run",
    ROOT / ".ci" / "arm64_emulated.sh",
    ROOT / ".ci" / "x86_avx2_emulated.sh",
]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, check=False, timeout=60
    )


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_bash_parses_it(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_is_clean(script: Path) -> None:
    proc = subprocess.run(
        [tool("shellcheck"), "--severity=style", str(script)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout


def test_help_prints_the_usage() -> None:
    proc = _run("--help")
    assert proc.returncode == 0
    assert "deploy/install.sh [--no-start] [CHECKOUT]" in proc.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--bogus"], "unknown option: --bogus"),
        (["/nonexistent-checkout"], "no such directory: /nonexistent-checkout"),
        (["/", "/"], "give one checkout path"),
    ],
)
def test_bad_arguments_stop_before_anything_is_done(args: list[str], message: str) -> None:
    proc = _run(*args)
    assert proc.returncode != 0 and message in proc.stderr
    assert "==>" not in proc.stdout


def test_a_directory_that_is_not_a_checkout(tmp_path: Path) -> None:
    proc = _run(str(tmp_path))
    assert proc.returncode != 0 and "is not an edge-agent checkout" in proc.stderr
