"""``edge-fleet release`` / ``rollback --replace-model``: switching a box's model is a signed flag."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.updates.policy import Install, Running
from edge_contract.manifest import Manifest
from tests.unit.test_update_policy import KEY, _code, _decide, _release

pytestmark = pytest.mark.e2e  # runs edge-fleet as a subprocess


def _fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_fleet.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_rollback_can_sign_the_way_back_to_another_model(tmp_path: Path) -> None:
    from edge_contract.signing import private_pem

    key = tmp_path / "fleet.key"
    key.write_bytes(private_pem(KEY))
    earlier = tmp_path / "demo-1.4.0.json"
    earlier.write_text(_release("demo", "1.4.0").model_dump_json())
    out = tmp_path / "back.json"
    done = _fleet(
        "rollback", str(earlier), "--key", str(key), "--out", str(out), "--replace-model", "llama-long"
    )
    assert done.returncode == 0, done.stderr
    back = Manifest.parse(out.read_bytes())
    assert back.rollback and back.replaces == ("llama-long",)
    assert _decide(back, Running(name="llama-long", version="1.0.0")) == Install()
    # Without the flag, the rollback release is refused by a box running another model.
    plain = tmp_path / "plain.json"
    assert _fleet("rollback", str(earlier), "--key", str(key), "--out", str(plain)).returncode == 0
    assert _code(
        _decide(Manifest.parse(plain.read_bytes()), Running(name="llama-long", version="1.0.0"))
    ) == ("other_model")


@pytest.mark.parametrize("name", ["demo", "bad name", "x\n"])
def test_release_refuses_a_replace_model_that_is_not_another_model(tmp_path: Path, name: str) -> None:
    from edge_contract.signing import private_pem

    (tmp_path / "k").write_bytes(private_pem(KEY))
    done = _fleet(
        "release", str(tmp_path), "--name", "demo", "--version", "1.0.0", "--base-url", "http://h/x",
        "--key", str(tmp_path / "k"), "--out", str(tmp_path / "out"), "--replace-model", name,
    )  # fmt: skip
    assert done.returncode != 0
    assert "--replace-model" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
