"""Weights repacked for this CPU kept on disk and mapped at load (agent.engine.prepacked)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from agent import Engine, SamplingParams
from agent.engine import prepacked
from agent.engine.engine import EngineOptions
from tests.support.models import fixture_path

PROMPT = [7 + i * 13 % 400 for i in range(60)]
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A private copy of the phi3 int4 fixture (the tests change its files)."""
    return Path(shutil.copytree(fixture_path("phi3-int4-pruned"), tmp_path / "phi3-int4"))


def _copy_of(root: Path, model: Path) -> Path:
    return prepacked.copy_dir(root, model)


@pytest.mark.parametrize("name", ["phi3-int4-pruned", "llama-int8", "qwen3-int4"])
def test_the_mapped_copy_gives_the_same_tokens(name: str, tmp_path: Path) -> None:
    folder = fixture_path(name)
    root = tmp_path / "prepacked"
    plain = Engine(folder).generate(PROMPT, GREEDY).token_ids
    first = Engine(folder, prepacked_dir=root)  # makes the copy
    again = Engine(folder, prepacked_dir=root)  # maps it
    copy = _copy_of(root, folder)
    manifest = prepacked.read_manifest(copy)
    assert manifest is not None and manifest.source == str(folder.resolve())
    # The copy holds the repacked blobs beside the weights: larger than the model's data file.
    assert (copy / prepacked.DATA_FILE).stat().st_size > (folder / "model.onnx.data").stat().st_size
    assert first.generate(PROMPT, GREEDY).token_ids == plain
    assert again.generate(PROMPT, GREEDY).token_ids == plain


def test_the_copy_is_made_once_and_again_when_the_model_changes(model: Path, tmp_path: Path) -> None:
    root = tmp_path / "prepacked"
    Engine(model, prepacked_dir=root)
    copy = _copy_of(root, model)
    made = prepacked.read_manifest(copy)
    assert made is not None
    Engine(model, prepacked_dir=root)
    kept = prepacked.read_manifest(copy)
    assert kept is not None and kept.made_at == made.made_at  # reused, not rewritten
    data = model / "model.onnx.data"
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 1_000_000))
    Engine(model, prepacked_dir=root)
    remade = prepacked.read_manifest(copy)
    assert remade is not None and remade.made_at > made.made_at and remade.key != made.key


def test_a_damaged_copy_is_made_again(model: Path, tmp_path: Path) -> None:
    root = tmp_path / "prepacked"
    plain = Engine(model).generate(PROMPT, GREEDY).token_ids
    Engine(model, prepacked_dir=root)
    copy = _copy_of(root, model)
    made = prepacked.read_manifest(copy)
    assert made is not None and prepacked.usable(copy, made.key)
    with (copy / prepacked.DATA_FILE).open("r+b") as f:  # a torn write: the data file cut short
        f.truncate(1000)
    assert not prepacked.usable(copy, made.key)
    engine = Engine(model, prepacked_dir=root)
    assert prepacked.usable(copy, made.key)
    assert engine.generate(PROMPT, GREEDY).token_ids == plain
    graph = copy / prepacked.MODEL_FILE
    data = graph.read_bytes()
    graph.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one byte of the graph changed
    assert not prepacked.usable(copy, made.key)


def test_an_unwritable_place_falls_back_to_repacking_in_memory(
    model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING):
        engine = Engine(model, prepacked_dir=blocker / "prepacked")
    assert "could not be made" in caplog.text and "prepacked_on_disk = false" in caplog.text
    assert engine.generate(PROMPT, GREEDY).token_ids == Engine(model).generate(PROMPT, GREEDY).token_ids


def test_switched_off_no_copy_is_made(model: Path, tmp_path: Path) -> None:
    root = tmp_path / "prepacked"
    Engine(model, EngineOptions(prepacked_on_disk=False), prepacked_dir=root)
    Engine(model, EngineOptions(prepack_weights=False), prepacked_dir=root)
    assert not root.exists()
    Engine(model, prepacked_dir=root)  # positive control
    assert prepacked.read_manifest(_copy_of(root, model)) is not None


def test_copies_of_removed_models_and_torn_writes_are_removed(model: Path, tmp_path: Path) -> None:
    root = tmp_path / "prepacked"
    other = Path(shutil.copytree(model, tmp_path / "other"))
    Engine(other, prepacked_dir=root)
    Engine(model, prepacked_dir=root)
    assert prepacked.read_manifest(_copy_of(root, other)) is not None
    shutil.rmtree(other)
    torn = root / ".x.partial-999999999"  # no such process
    torn.mkdir()
    prepacked.remove_orphans(root)
    assert not _copy_of(root, other).exists() and not torn.exists()
    assert prepacked.read_manifest(_copy_of(root, model)) is not None  # the live model's stays


def test_a_disk_without_room_for_the_copy_is_left_alone(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "prepacked"
    real = shutil.disk_usage
    monkeypatch.setattr(prepacked.shutil, "disk_usage", lambda path: real(path)._replace(free=100 << 20))
    with caplog.at_level(logging.WARNING):
        Engine(model, prepacked_dir=root)
    assert "MiB free and the copy needs" in caplog.text
    assert not _copy_of(root, model).exists()
    monkeypatch.setattr(prepacked.shutil, "disk_usage", real)  # positive control: room again
    Engine(model, prepacked_dir=root)
    assert prepacked.read_manifest(_copy_of(root, model)) is not None
