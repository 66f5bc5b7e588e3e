"""The model store: atomic pointer, whole versions only, garbage collection."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from agent.updates.record import UpdateRecord
from agent.updates.store import ModelStore, Pointer
from edge_contract import signing
from edge_contract.errors import UpdateError
from edge_contract.manifest import FileEntry, Manifest, SmokeTest

KEY = signing.generate()


def _manifest(version: str, files: dict[str, bytes]) -> Manifest:
    now = int(time.time())
    return Manifest(
        name="m",
        version=version,
        files=[
            FileEntry(path=p, size=len(d), sha256=hashlib.sha256(d).hexdigest(), url=f"http://h/{p}")
            for p, d in files.items()
        ],
        memory_bytes=0,
        smoke_test=SmokeTest(prompt="p", prompt_ids=[1], token_ids=[1]),
        created_at=now,
        expires_at=now + 60,
        key_id="0" * 16,
    ).signed(KEY)


def _install(store: ModelStore, version: str) -> Manifest:
    files = {"genai_config.json": b"{}", "sub/model.onnx": version.encode()}
    m = _manifest(version, files)
    staging = store.staging(m)
    for path, data in files.items():
        store.target(staging, path).write_bytes(data)
    store.install(m)
    return m


def test_install_moves_a_whole_version_and_keeps_its_manifest(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    m = _install(store, "1.0.0")
    assert (store.path("m@1.0.0") / "sub" / "model.onnx").read_bytes() == b"1.0.0"
    assert store.manifest("m@1.0.0") == m
    assert not (store.staging_root / "m@1.0.0").exists()


def test_pointer_switches_and_ignores_versions_that_are_not_installed(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    assert store.pointer() == Pointer()
    _install(store, "1.0.0")
    store.set_pointer(Pointer(active="m@1.0.0", previous="m@0.1.0"))
    assert store.pointer() == Pointer(active="m@1.0.0", previous=None)
    (tmp_path / "store.json").write_text("{truncated")
    assert store.pointer() == Pointer()  # unreadable: the configured model serves
    assert not list(tmp_path.glob("*.tmp"))


def test_target_refuses_a_symlinked_folder_inside_staging(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    m = _manifest("1.0.0", {"genai_config.json": b"{}"})
    staging = store.staging(m)
    outside = tmp_path / "outside"
    outside.mkdir()
    (staging / "sub").symlink_to(outside)
    with pytest.raises(UpdateError) as err:
        store.target(staging, "sub/model.onnx")
    assert err.value.code == "unsafe_path"


def test_garbage_collection_keeps_active_previous_and_newest(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    for version in ("1.0.0", "2.0.0", "3.0.0", "4.0.0"):
        _install(store, version)
    store.set_pointer(Pointer(active="m@2.0.0", previous="m@1.0.0"))
    removed = store.collect_garbage(keep=3)
    assert sorted(p.name for p in store.versions.iterdir()) == ["m@1.0.0", "m@2.0.0", "m@4.0.0"]
    assert removed == ["m@3.0.0"]
    with pytest.raises(UpdateError):
        store.remove("m@2.0.0")


def test_update_record_is_replaced_atomically(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    assert store.read_record() == UpdateRecord()
    record = UpdateRecord()
    record.remember_refused("a" * 64)
    store.write_record(record)
    assert json.loads(store.record_file.read_text())["refused"] == ["a" * 64]
    assert store.read_record() == record
    assert not store.record_file.with_name("updates.json.tmp").exists()
    store.record_file.write_text("[1, 2]")
    assert store.read_record() == UpdateRecord()
