"""What ``models.convert`` asks the builder for (int4 in blocks of 128, int8 in blocks of 32, int8
activations) and which lm_head it leaves: the rows a pass asks for by default (``models.logits_rows``).

At block 128 onnxruntime's int4 kernels prefill ~1.4x faster on AVX-512 VNNI, and compute rows in
pairs there, rounding an unpaired row otherwise; the engine gives every pass an even number of rows
(``Engine.even_rows``), which keeps its guarantees bit for bit (tests/integration/test_even_rows.py).
int8 stays at 32 (Q8_0's logit error; 128 decodes slower).  The builder (a subprocess needing the
"models" extra) is stood in for: only the options it is given are checked.
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
    monkeypatch.setattr(convert.logits_rows, "keep_rows", lambda _out: calls.append({"kept": True}) or True)
    monkeypatch.setattr(convert.kv_variants, "add_int8_variant", lambda _out, **_kw: _out)
    monkeypatch.setattr(convert.builder, "check_output", lambda _out: _CONFIG)
    monkeypatch.setattr(convert.builder, "describe", lambda _out: "")
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (hf / name).write_text("{}")
    return calls


@pytest.mark.parametrize(("precision", "block"), [("int4", 128), ("int8", 32)])
def test_the_default_export_keeps_rows_with_int8_activations_in_blocks_per_precision(
    precision: str, block: int, asked: list[dict[str, object]], tmp_path: Path
) -> None:
    assert convert.main([str(tmp_path / "hf"), str(tmp_path / "out"), "--precision", precision]) == 0
    build, kept = asked
    assert build["block_size"] == block and build["accuracy_level"] == 4
    assert "prune_lm_head" not in build and kept == {"kept": True}


@pytest.mark.parametrize(
    ("flag", "pruned"), [("--full-prefill-logits", False), ("--last-position-logits", True)]
)
def test_the_other_lm_heads_are_asked_for_by_name(
    flag: str, pruned: bool, asked: list[dict[str, object]], tmp_path: Path
) -> None:
    assert convert.main([str(tmp_path / "hf"), str(tmp_path / "out"), "--precision", "int4", flag]) == 0
    assert len(asked) == 1  # no row-keeping rewrite
    assert asked[0].get("prune_lm_head", False) is pruned


def test_another_block_is_the_users_choice(asked: list[dict[str, object]], tmp_path: Path) -> None:
    argv = [str(tmp_path / "hf"), str(tmp_path / "out"), "--precision", "int4", "--block-size", "32"]
    assert convert.main(argv) == 0
    assert asked[0]["block_size"] == 32
