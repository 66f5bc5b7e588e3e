"""What ``models.convert`` asks the builder for: blocks of 32, the kernels the exactness guarantees hold on.

At block 32 onnxruntime's int8-activation kernels give a row the same bits whatever pass computes it;
at 64 and up (faster prefill on AVX-512 VNNI) they compute rows in pairs and round an unpaired row
otherwise (docs/engine.md, "Prefill levers"), so 32 stays the default and a larger block is the
user's explicit choice.  The builder (a subprocess needing the "models" extra) is stood in for:
only the options it is given are checked.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from models import convert

_CONFIG = {
    "model": {
        "type": "phi3",
        "decoder": {"num_hidden_layers": 2},
        "vocab_size": 448,
        "context_length": 256,
        "eos_token_id": [2],
    }
}


@pytest.fixture
def asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    calls: list[dict[str, object]] = []

    def build(
        hf_dir: Path, out_dir: Path, precision: str, options: dict[str, object], *, quiet: bool
    ) -> list[Path]:
        calls.append({"precision": precision, **options})
        return []

    monkeypatch.setattr(convert.builder, "build", build)
    monkeypatch.setattr(convert.embedding, "quantize_embedding", lambda _out: None)
    monkeypatch.setattr(convert.builder, "check_output", lambda _out: _CONFIG)
    monkeypatch.setattr(convert.builder, "describe", lambda _out: "")
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (hf / name).write_text("{}")
    return calls


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_the_default_export_is_block_32_pruned_with_int8_activations(
    precision: str, asked: list[dict[str, object]], tmp_path: Path
) -> None:
    assert convert.main([str(tmp_path / "hf"), str(tmp_path / "out"), "--precision", precision]) == 0
    assert asked[-1]["block_size"] == 32
    assert asked[-1]["prune_lm_head"] is True and asked[-1]["accuracy_level"] == 4


def test_a_larger_block_is_the_users_choice(asked: list[dict[str, object]], tmp_path: Path) -> None:
    argv = [str(tmp_path / "hf"), str(tmp_path / "out"), "--precision", "int4", "--block-size", "128"]
    assert convert.main(argv) == 0
    assert asked[-1]["block_size"] == 128
