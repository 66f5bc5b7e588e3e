"""A broken model folder yields an error that names the file or field at fault."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agent import Engine, ModelConfigError, ModelFileError
from agent.engine.model_folder import ModelFolder
from tests.support.models import fixture_path


@pytest.fixture()
def model_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(fixture_path("phi3-int4"), dst)
    return dst


def _edit_config(folder: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_good_folder_reads_ids_and_lengths(model_copy: Path) -> None:
    folder = ModelFolder(model_copy)
    assert folder.context_length == 256
    assert 2 in folder.eos_token_ids
    assert folder.chat_template and "<|assistant|>" in folder.chat_template


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="model folder not found"):
        Engine(tmp_path / "nope")


@pytest.mark.parametrize("name", ["genai_config.json", "model.onnx", "tokenizer.json", "model.onnx.data"])
def test_missing_file_is_named(model_copy: Path, name: str) -> None:
    (model_copy / name).unlink()
    with pytest.raises(ModelFileError, match=name.replace(".", r"\.")):
        Engine(model_copy)


def test_invalid_json_config(model_copy: Path) -> None:
    (model_copy / "genai_config.json").write_text("{ not json")
    with pytest.raises(ModelFileError, match=r"genai_config\.json: not valid JSON"):
        Engine(model_copy)


def test_missing_field_is_named(model_copy: Path) -> None:
    _edit_config(model_copy, lambda c: c["model"]["decoder"].pop("num_key_value_heads"))
    with pytest.raises(ModelConfigError, match=r"model\.decoder\.num_key_value_heads"):
        Engine(model_copy)


def test_unsupported_model_type(model_copy: Path) -> None:
    _edit_config(model_copy, lambda c: c["model"].__setitem__("type", "whisper"))
    with pytest.raises(ModelConfigError, match="'whisper' is not supported"):
        Engine(model_copy)


def test_input_name_absent_from_graph(model_copy: Path) -> None:
    _edit_config(model_copy, lambda c: c["model"]["decoder"]["inputs"].__setitem__("input_ids", "ids"))
    with pytest.raises(ModelConfigError, match="input 'ids'"):
        Engine(model_copy)


def test_head_count_disagreeing_with_graph(model_copy: Path) -> None:
    _edit_config(model_copy, lambda c: c["model"]["decoder"].__setitem__("num_key_value_heads", 3))
    with pytest.raises(ModelConfigError, match="num_key_value_heads is 3"):
        Engine(model_copy)


def test_filename_escaping_the_folder(model_copy: Path) -> None:
    _edit_config(model_copy, lambda c: c["model"]["decoder"].__setitem__("filename", "../model.onnx"))
    with pytest.raises(ModelConfigError, match="filename"):
        Engine(model_copy)


def test_corrupt_graph(model_copy: Path) -> None:
    data = (model_copy / "model.onnx").read_bytes()
    (model_copy / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=r"model\.onnx: onnxruntime cannot load it"):
        Engine(model_copy)


def test_truncated_weights(model_copy: Path) -> None:
    data = (model_copy / "model.onnx.data").read_bytes()
    (model_copy / "model.onnx.data").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelFileError, match=r"model\.onnx"):
        Engine(model_copy)


def test_corrupt_tokenizer(model_copy: Path) -> None:
    (model_copy / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(ModelFileError, match=r"tokenizer\.json: not a valid tokenizer"):
        Engine(model_copy)


def test_broken_chat_template(model_copy: Path) -> None:
    (model_copy / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ModelConfigError, match="chat template does not compile"):
        Engine(model_copy)
