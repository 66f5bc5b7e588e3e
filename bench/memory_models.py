"""Phi-3-mini-shaped random-weight models at full width and a few layers, for ``memory_bench``.

A full-size (32-layer) export through onnxruntime-genai's builder peaks at
about 22 GB of RAM, so the memory bench builds the same widths (hidden 3072, 32
heads, intermediate 8192, vocab 32064) with 2 and 4 layers and extrapolates
per layer: every per-layer cost (weights, prepacked copies, KV) is linear in
the layer count, and the rest (embedding, lm_head, runtime) does not depend on
it.  Cached in ``bench/models/`` (git-ignored); never built in CI.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hf_export

MODELS_DIR = Path(__file__).resolve().parent / "models"
WIDTHS: dict[str, Any] = {
    **hf_export.PHI3_MINI_WIDTHS,
    "max_position_embeddings": 4096,
}
SEED = 20240501


def checkpoint(layers: int) -> Path:
    """The random-weight Hugging Face checkpoint with ``layers`` layers (built once)."""

    def config() -> Any:
        from transformers import Phi3Config

        from models import fixtures, tokenizer

        return Phi3Config(
            **WIDTHS,
            num_hidden_layers=layers,
            original_max_position_embeddings=WIDTHS["max_position_embeddings"],
            tie_word_embeddings=False,
            bos_token_id=tokenizer.BOS_ID,
            eos_token_id=fixtures.EOS_IDS,
            pad_token_id=tokenizer.PAD_ID,
        )

    # From 6 layers on, float16 (a float32 8-layer checkpoint passed 9 GB while being written).
    half = layers >= 6
    name = f"phi3-mini-shape-{layers}l-hf{'16' if half else ''}"
    return hf_export.ensure_checkpoint(MODELS_DIR / name, config, SEED, half=half)


def kv_variant(base: Path, kind: str) -> Path:
    """A folder beside ``base`` whose graph keeps a ``kind`` ("kv16", "kv8") KV cache, sharing its weights.

    kv16: float16 (``models.kv_dtype``); kv8: int8 calibrated on ``base`` (``models.kv_quant``).
    The weights file is shared through hard links (onnxruntime refuses a symlink out of the folder).
    """
    out = base.with_name(base.name + "-" + kind)
    if (out / "model.onnx").is_file() and out.stat().st_mtime >= base.stat().st_mtime:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    for item in base.iterdir():
        if item.name == "model.onnx":
            shutil.copy(item, out / item.name)
        else:
            os.link(item, out / item.name)
    if kind == "kv16":
        from models import kv_dtype

        kv_dtype.set_kv_dtype(out, "float16")
    else:
        from models import kv_quant

        kv_quant.main([str(out)])
    return out


def model(
    layers: int,
    precision: str = "int4",
    *,
    pruned: bool = True,
    kv16: bool = False,
    kv8: bool = False,
    accuracy: int = 4,
    block: int = 32,
) -> Path:
    """The builder's export of ``checkpoint(layers)`` (pruned lm_head unless ``pruned`` is false).

    ``kv16``/``kv8``: the float16 / calibrated int8 KV variant of it (``kv_variant``);
    ``block``: the int4 block size (the builder's and ``models.convert``'s default 32).
    """
    from models import builder, fixtures

    if kv16 or kv8:
        base = model(layers, precision, pruned=pruned, block=block)
        return kv_variant(base, "kv16" if kv16 else "kv8")

    source = checkpoint(layers)
    suffix = ("" if pruned else "-full") + ("" if accuracy == 4 else f"-acc{accuracy}")
    suffix += "" if block == 32 else f"-b{block}"
    out = MODELS_DIR / f"phi3-mini-shape-{layers}l-{precision}{suffix}"
    if hf_export.fresh(out / "genai_config.json", source):
        return out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"building {out.name} ...", file=sys.stderr, flush=True)
    options: dict[str, object] = {"prune_lm_head": True} if pruned else {}
    if accuracy != 4:
        options["int4_accuracy_level"] = accuracy
    if block != 32:
        options["block_size"] = block
    builder.build(source, partial, precision, options or None, quiet=True)
    builder.set_eos(partial, fixtures.EOS_IDS)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


if __name__ == "__main__":
    for spec in sys.argv[1:]:  # e.g. 2:int4 4:int4 2:int4:full 2:int4:acc1 4:int4:b128 4:int4:kv8
        layers, precision, *rest = spec.split(":")
        accuracy = next((int(r[3:]) for r in rest if r.startswith("acc")), 4)
        block = next((int(r[1:]) for r in rest if r.startswith("b") and r[1:].isdigit()), 32)
        built = model(
            int(layers),
            precision,
            pruned="full" not in rest,
            kv8="kv8" in rest,
            accuracy=accuracy,
            block=block,
        )
        print(built, flush=True)
