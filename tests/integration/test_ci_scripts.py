"""CI (.ci/run) runs the emulated aarch64 and AVX2-only steps after the test suite and installs what they need.

That the CI scripts parse and pass shellcheck is checked in test_install_script.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_ci_runs_the_emulated_arm64_step_after_the_test_suite() -> None:
    text = (ROOT / ".ci" / "run").read_text()
    lines = text.splitlines()
    assert lines.index("make test") < lines.index("make test-arm64")
    assert "need_apt+=(qemu-user-static)" in text


def test_ci_runs_the_emulated_avx2_step_after_the_test_suite() -> None:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert lines.index("make test") < lines.index("make test-avx2")
    makefile = (ROOT / "Makefile").read_text()
    assert "test-avx2: setup" in makefile and ".ci/x86_avx2_emulated.sh" in makefile


def test_every_test_the_avx2_step_names_exists() -> None:
    named = _bash_array((ROOT / ".ci" / "x86_avx2_emulated.sh").read_text(), "TESTS")
    assert len(named) >= 3, named
    for node in named:
        path, _, test = node.strip('"').partition("::")
        assert (ROOT / path).is_file(), node
        if test:
            name = test.split("[")[0]
            assert f"def {name}(" in (ROOT / path).read_text(), f"{node}: no such test"


def test_make_test_arm64_runs_the_emulation_script() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "test-arm64: setup" in makefile and ".ci/arm64_emulated.sh" in makefile


def _bash_array(text: str, name: str) -> list[str]:
    body = text[text.index(f"{name}=(") + len(name) + 2 :]
    return [
        line.strip()
        for line in body[: body.index("\n)")].splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def test_every_test_the_emulated_step_names_exists() -> None:
    """A renamed test must not turn `make test-arm64` into "not found" (it did once)."""
    script = (ROOT / ".ci" / "arm64_emulated.sh").read_text()
    named = _bash_array(script, "EMULATED_TESTS") + _bash_array(script, "DRIVEN_TESTS")
    assert len(named) >= 5, named
    for node in named:
        path, _, test = node.partition("::")
        assert (ROOT / path).is_file(), node
        if test:
            assert f"def {test}(" in (ROOT / path).read_text(), f"{node}: no such test"
