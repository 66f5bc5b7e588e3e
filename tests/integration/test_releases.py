"""``edge-fleet keygen`` / ``release`` / ``deploy`` checks that need no broker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent import Engine, SamplingParams
from edge_contract import signing
from edge_contract.manifest import Manifest
from tests.support.models import fixture_path

pytestmark = pytest.mark.e2e


def _fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_fleet.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_release_copies_hashes_smoke_tests_and_signs(tmp_path: Path) -> None:
    assert _fleet("keygen", "--out", str(tmp_path / "k")).returncode == 0
    again = _fleet("keygen", "--out", str(tmp_path / "k"))
    assert again.returncode == 1 and "--force" in again.stderr
    source = fixture_path("qwen3-int8")
    out = tmp_path / "www"
    done = _fleet(
        "release", str(source), "--name", "qwen", "--version", "1.0.0-rc.1", "--base-url", "https://cdn.example/q/",
        "--key", str(tmp_path / "k" / "fleet.key"), "--out", str(out), "--precision", "int8",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    manifest = Manifest.parse((out / "manifest.json").read_bytes())
    public = signing.PublicKey.from_line((tmp_path / "k" / "fleet.pub").read_text())
    manifest.check([public], active=None)
    for entry in manifest.files:
        assert (out / entry.path).read_bytes() == (source / entry.path).read_bytes()
        assert entry.url == f"https://cdn.example/q/{entry.path}"
    engine = Engine(source)
    ids = engine.prompt_ids(manifest.smoke_test.prompt)
    expected = engine.generate(ids, SamplingParams(max_tokens=16, ignore_eos=True)).token_ids
    assert manifest.smoke_test.prompt_ids == ids and manifest.smoke_test.token_ids == expected
    assert manifest.memory_bytes >= sum(f.size for f in manifest.files if ".onnx" in f.path)


def test_release_and_deploy_refuse_bad_input_with_a_message(tmp_path: Path) -> None:
    assert _fleet("keygen", "--out", str(tmp_path / "k")).returncode == 0
    key = str(tmp_path / "k" / "fleet.key")
    base = ["release", str(fixture_path("phi3-int4")), "--name", "p", "--base-url", "http://h/", "--key", key]
    cases = {
        "not a semantic version": [*base, "--version", "1.0", "--out", str(tmp_path / "o1")],
        "http:// or https://": ["release", str(fixture_path("phi3-int4")), "--name", "p", "--version", "1.0.0",
                                "--base-url", "ftp://h/", "--key", key, "--out", str(tmp_path / "o2")],
        "not a model folder": ["release", str(tmp_path), "--name", "p", "--version", "1.0.0", "--base-url",
                               "http://h/", "--key", key, "--out", str(tmp_path / "o3")],
    }  # fmt: skip
    for message, args in cases.items():
        done = _fleet(*args)
        assert done.returncode == 1 and message in done.stderr, (message, done.stderr)

    done = _fleet(*base, "--version", "1.0.0", "--out", str(tmp_path / "good"))
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "good" / "manifest.json").read_text())
    data["expires_at"] = 1
    (tmp_path / "expired.json").write_text(json.dumps(data))
    data["signature"] = ""
    (tmp_path / "unsigned.json").write_text(json.dumps(data))
    for name, message in (("expired.json", "expired"), ("unsigned.json", "not signed")):
        # Refused before any broker is contacted (port 9 has nothing listening).
        done = _fleet(
            "deploy", str(tmp_path / name), "--device", "b", "--broker", "127.0.0.1:9", "--plaintext"
        )
        assert done.returncode == 1 and message in done.stderr, done.stderr
    done = _fleet(
        "deploy", str(tmp_path / "good" / "manifest.json"), "--device", "b", "--broker", "127.0.0.1:9"
    )
    assert done.returncode == 1 and "cannot reach the broker" in done.stderr


def test_a_failed_release_leaves_nothing_behind_and_an_existing_one_needs_force(tmp_path: Path) -> None:
    import shutil

    assert _fleet("keygen", "--out", str(tmp_path / "k")).returncode == 0
    key = str(tmp_path / "k" / "fleet.key")
    www = tmp_path / "www"
    broken = tmp_path / "broken"
    shutil.copytree(fixture_path("phi3-int4"), broken)
    (broken / "model.onnx").write_bytes(b"\x08not an onnx graph" * 64)
    args = ["--name", "p", "--version", "1.0.0", "--base-url", "http://h/", "--key", key]
    failed = _fleet("release", str(broken), *args, "--out", str(www / "p-1.0.0"))
    assert failed.returncode == 1 and "onnxruntime cannot load it" in failed.stderr, failed.stderr
    assert not www.exists() or list(www.iterdir()) == []  # no half-copied folder in the web root

    good = _fleet("release", str(fixture_path("phi3-int4")), *args, "--out", str(www / "p-1.0.0"))
    assert good.returncode == 0, good.stderr
    first = (www / "p-1.0.0" / "manifest.json").read_bytes()
    first_inode = (www / "p-1.0.0" / "manifest.json").stat().st_ino
    again = _fleet("release", str(fixture_path("phi3-int4")), *args, "--out", str(www / "p-1.0.0"))
    assert again.returncode == 1 and "already holds a release" in again.stderr and "--force" in again.stderr
    assert (www / "p-1.0.0" / "manifest.json").read_bytes() == first  # untouched
    forced = _fleet(
        "release", str(fixture_path("phi3-int4")), *args, "--out", str(www / "p-1.0.0"), "--force"
    )
    assert forced.returncode == 0, forced.stderr
    # Built anew and renamed into place (the bytes may equal the first: the same second, a deterministic signature).
    assert (www / "p-1.0.0" / "manifest.json").stat().st_ino != first_inode
    assert sorted(p.name for p in www.iterdir()) == ["p-1.0.0"]
