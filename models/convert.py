"""Convert a local Hugging Face checkpoint folder into an edge-agent model folder.

Run as ``python -m models.convert HF_CHECKPOINT_DIR OUT_DIR --precision int8|int4
[--block-size 128|32] [--accuracy-level 4] [--full-prefill-logits | --last-position-logits]
[--float-embedding] [--int8-kv] [--force]``. The input folder must hold
``config.json``, the safetensors weights and the tokenizer files; nothing is
downloaded. The onnxruntime-genai builder writes ``genai_config.json``,
``model.onnx`` (+ ``model.onnx.data``) and the tokenizer files into ``OUT_DIR``;
then the token-embedding table, which the builder leaves in float32, is stored
as int8 blocks (``models.embedding``; ``--float-embedding`` keeps it float32),
and the lm_head computes logits for the rows a pass asks for (``models.logits_rows``).
Beside the float32-KV graph it writes an int8-KV one sharing the weights file, with
scales calibrated on the converted model (``models.kv_variants``, ``models.kv_quant``:
a quarter of float32's bytes per token), listed in ``kv_variants.json``: the daemon
chooses between them at start (``[engine] kv_cache``). ``--int8-kv`` makes the int8
one the graph genai_config.json names (for runtimes that read one graph).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from models import builder, embedding, kv_variants, logits_rows

BLOCK_SIZES: tuple[int, ...] = (16, 32, 64, 128, 256)
# Weights per quantization scale unless asked: int4 in blocks of 128 prefills ~1.4x faster than 32 on
# AVX-512 VNNI at Q4_0's logit error, and its repacked weights are 25 % smaller; its kernels pair rows
# there, which the engine's even-row passes make exact (docs/engine.md, "Prefill levers").  int8 at
# 128 loses Q8_0's error and decodes slower: 32.
DEFAULT_BLOCK_SIZE = {"int4": 128, "int8": 32}
ACCURACY_LEVELS: tuple[int, ...] = (1, 2, 3, 4)
# Which rows' logits a pass computes: those it asks for (``num_logits_to_keep``), every row, or the last.
LOGITS: tuple[str, ...] = ("kept", "all", "last")


def check_input(hf_dir: Path) -> None:
    """Raise ``SystemExit`` with a clear message if ``hf_dir`` is not a usable checkpoint."""
    if not hf_dir.is_dir():
        raise SystemExit(f"error: {hf_dir} is not a directory")
    if not (hf_dir / "config.json").is_file():
        raise SystemExit(f"error: {hf_dir} has no config.json")
    if not any(hf_dir.glob("*.safetensors")) and not any(hf_dir.glob("*.bin")):
        raise SystemExit(f"error: {hf_dir} has no *.safetensors (or *.bin) weights")
    if not (hf_dir / "tokenizer.json").is_file() and not (hf_dir / "tokenizer.model").is_file():
        raise SystemExit(f"error: {hf_dir} has no tokenizer.json / tokenizer.model")


def prepare_output(out_dir: Path, force: bool) -> None:
    """Create ``out_dir``; refuse a non-empty one unless ``force`` (then empty it)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SystemExit(f"error: {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise SystemExit(f"error: {out_dir} is not empty (use --force to overwrite)")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def convert(
    hf_dir: Path,
    out_dir: Path,
    precision: str,
    block_size: int | None = None,
    accuracy_level: int = 4,
    force: bool = False,
    logits: str = "kept",
    int8_embedding: bool = True,
    int8_kv: bool = False,
    int8_kv_graph: bool = True,
) -> list[Path]:
    """Convert ``hf_dir`` into ``out_dir`` and return the files written.

    ``block_size``: weights per quantization scale (default ``DEFAULT_BLOCK_SIZE[precision]``).

    ``logits``: ``"kept"`` (the default) gives the graph an input ``num_logits_to_keep``
    and its lm_head computes the last that many rows of a pass (``models.logits_rows``):
    a prefill chunk pays the lm_head for one or two rows, a verify pass for the rows it
    checks, so one export prefills at the pruned export's speed and speculates.  ``"last"``
    is onnxruntime-genai's ``prune_lm_head`` (the last row only: no speculation);
    ``"all"`` computes every row's (measured on a Phi-3-mini-shaped model at a 1,024-token
    prompt, 0.76-0.80x their prefill rate, ~100 MB more peak memory).

    ``int8_embedding`` stores the float32 embedding table as int8 blocks of 32
    values (``models.embedding``): Phi-3-mini's 376 MiB table becomes 106 MiB
    (the file, the repacked copy and the first start's anonymous peak shrink by
    ~270 MiB); greedy tokens can change where the two best logits are nearly
    tied (docs/memory.md: within 0.26 logits on every fixture).

    Every export also gets an int8-KV graph beside the float32-KV one, sharing its
    weights file (``models.kv_variants``): static per-channel scales calibrated on the
    converted model, 1/4 of the float32 cache's bytes (Phi-3-mini: 192 instead of 768
    KiB per token); greedy tokens move within the bound docs/memory.md gives.  The
    daemon serves it when the float32 cache would cut the context (``[engine] kv_cache``).
    ``int8_kv`` makes it the graph genai_config.json names (what onnxruntime-genai and
    agents before ``kv_cache`` open).  ``int8_kv_graph`` false skips it (its calibration runs
    every token of the vocabulary through the model: ~21 minutes for Phi-3-mini on 2 vCPUs);
    ``python -m models.kv_variants OUT_DIR`` adds it later.
    """
    if int8_kv and not int8_kv_graph:
        raise ValueError("int8_kv needs the int8-KV graph")
    if logits not in LOGITS:
        raise ValueError(f"logits must be one of {LOGITS}, got {logits!r}")
    check_input(hf_dir)
    prepare_output(out_dir, force)
    options: dict[str, object] = {
        "block_size": block_size or DEFAULT_BLOCK_SIZE.get(precision, 32),
        "accuracy_level": accuracy_level,
        "hf_remote": False,
    }
    if logits == "last":
        options["prune_lm_head"] = True
    try:
        builder.build(hf_dir.resolve(), out_dir.resolve(), precision, options, quiet=True)
    except builder.BuildError as exc:
        raise SystemExit(f"error: {exc}") from exc
    if int8_embedding:
        embedding.quantize_embedding(out_dir)
    if logits == "kept":  # before the int8-KV graph is copied from it: both graphs keep rows
        logits_rows.keep_rows(out_dir)
    if int8_kv_graph:
        kv_variants.add_int8_variant(out_dir, default_int8=int8_kv)
    return sorted(p for p in out_dir.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", type=Path, metavar="HF_CHECKPOINT_DIR")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    parser.add_argument("--precision", choices=builder.PRECISIONS, required=True)
    parser.add_argument(
        "--block-size",
        type=int,
        choices=BLOCK_SIZES,
        default=None,
        help=(
            "weights per quantization scale (default: 128 for int4, 32 for int8). int4 at 128 prefills "
            "~1.4x faster than at 32 on AVX-512 VNNI, at Q4_0's logit error, with 25%% smaller repacked "
            "weights; 32 is a little closer to the float model (docs/engine.md, 'Prefill levers')"
        ),
    )
    parser.add_argument("--accuracy-level", type=int, choices=ACCURACY_LEVELS, default=4)
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty OUT_DIR")
    rows = parser.add_mutually_exclusive_group()
    rows.add_argument(
        "--full-prefill-logits",
        action="store_true",
        help=(
            "compute logits for every row of every pass (default: the rows a pass asks for, "
            "input num_logits_to_keep: prefill pays the lm_head for one or two rows, speculation works)"
        ),
    )
    rows.add_argument(
        "--last-position-logits",
        action="store_true",
        help="onnxruntime-genai's pruned lm_head: the last row's logits only (no speculative decoding)",
    )
    parser.add_argument(
        "--float-embedding",
        action="store_true",
        help="keep the builder's float32 embedding table (default: int8 blocks, 0.28x the bytes)",
    )
    kv = parser.add_mutually_exclusive_group()
    kv.add_argument(
        "--no-int8-kv-graph",
        action="store_true",
        help=(
            "write the float32-KV graph only: no calibration (it runs the whole vocabulary through the "
            "model, ~21 min for Phi-3-mini on 2 vCPUs); the box then never serves an int8 cache "
            "(add it later: python -m models.kv_variants OUT_DIR)"
        ),
    )
    kv.add_argument(
        "--int8-kv",
        action="store_true",
        help=(
            "make the int8-KV graph (written anyway, beside the float32-KV one) the graph genai_config.json "
            "names, for runtimes that read one graph (onnxruntime-genai, agents before [engine] kv_cache)"
        ),
    )
    args = parser.parse_args(argv)

    print(f"converting {args.hf_dir} -> {args.out_dir} ({args.precision}) ...", file=sys.stderr)
    convert(
        args.hf_dir,
        args.out_dir,
        args.precision,
        args.block_size,
        args.accuracy_level,
        args.force,
        logits="all" if args.full_prefill_logits else "last" if args.last_position_logits else "kept",
        int8_embedding=not args.float_embedding,
        int8_kv=args.int8_kv,
        int8_kv_graph=not args.no_int8_kv_graph,
    )
    cfg = builder.check_output(args.out_dir)
    model = cfg["model"]
    print(f"wrote {args.out_dir}:")
    print(builder.describe(args.out_dir))
    print(
        f"type={model['type']} layers={model['decoder']['num_hidden_layers']} "
        f"vocab={model['vocab_size']} context={model['context_length']} eos={model['eos_token_id']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
