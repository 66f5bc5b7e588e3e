"""Generate tiny random-weight ONNX test fixtures for several model families.

Run as ``python -m models.fixtures [--out models/fixtures] [--family phi3 ...]
[--precision int8 int4]``. For every family/precision pair a tiny Hugging Face
checkpoint (hidden 64, 2 layers, 4 heads, 2 KV heads, context 256) is created with
a fixed seed and a shared multilingual byte-level BPE tokenizer, then exported with
the onnxruntime-genai builder into ``{out}/{family}-{precision}/``.

Weights are initialised with a large ``initializer_range`` so greedy decoding
produces varied tokens with clear top-1 margins (stable cross-runtime parity).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from agent.engine.model_folder import MODEL_FAMILIES
from models import builder, tokenizer

FAMILIES = MODEL_FAMILIES
SEED = 1234
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 128
CONTEXT = 256
# 448 = 7 * 64: every model id is a real token, so decoding never hits a hole.
TOKENIZER_VOCAB = 448
INIT_RANGE = 0.3
EOS_IDS: list[int] = [tokenizer.EOS_ID, tokenizer.END_ID]
DEFAULT_OUT = Path(__file__).resolve().parent / "fixtures"


def make_config(family: str, vocab_size: int) -> PretrainedConfig:
    """Return the tiny transformers config for ``family``."""
    common: dict = {
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": CONTEXT,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.BOS_ID,
        "eos_token_id": EOS_IDS,
        "pad_token_id": tokenizer.PAD_ID,
        "initializer_range": INIT_RANGE,
    }
    if family == "phi3":
        # Without this the builder takes the LongRoPE path and crashes.
        return Phi3Config(original_max_position_embeddings=CONTEXT, **common)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if family == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)
    if family == "qwen3":
        return Qwen3Config(head_dim=HIDDEN // HEADS, use_sliding_window=False, **common)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def fixture_tokenizer() -> tokenizer.Tokenizer:
    """Train the shared fixture tokenizer (deterministic for a given input)."""
    return tokenizer.train_bpe(tokenizer.MULTILINGUAL_TEXT, TOKENIZER_VOCAB)


def make_checkpoint(family: str, hf_dir: Path, tok: tokenizer.Tokenizer) -> torch.nn.Module:
    """Create and save a seeded random-weight checkpoint plus tokenizer in ``hf_dir``."""
    config = make_config(family, tokenizer.vocab_size_padded(tok))
    torch.manual_seed(SEED + FAMILIES.index(family))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.BOS_ID,
        eos_token_id=EOS_IDS,
        pad_token_id=tokenizer.PAD_ID,
        do_sample=False,
    )
    model.save_pretrained(str(hf_dir))
    tokenizer.save(tok, hf_dir, CONTEXT)
    return model


def build_fixture(family: str, precision: str, out_root: Path, tok: tokenizer.Tokenizer) -> Path:
    """Build ``{out_root}/{family}-{precision}`` and return its path."""
    out_dir = out_root / f"{family}-{precision}"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    with tempfile.TemporaryDirectory(prefix=f"fixture-{family}-") as tmp:
        hf_dir = Path(tmp) / "hf"
        make_checkpoint(family, hf_dir, tok)
        builder.build(hf_dir, out_dir, precision, quiet=True)
    builder.set_eos(out_dir, EOS_IDS)
    return out_dir


LONG_NAME = "llama-long"
LONG_CONTEXT = 4096


def build_long_fixture(out_root: Path, tok: tokenizer.Tokenizer) -> Path:
    """Build ``llama-long``: a 4,096-token context and no eos under greedy decoding.

    The rows of the eos ids in ``lm_head`` are zero, so their logit is exactly 0
    while the best of the other random logits is always far above it: greedy
    generation runs to ``max_tokens``.  Daemon tests use it for jobs that last
    long enough to be canceled, killed or disconnected mid-stream.
    """
    out_dir = out_root / LONG_NAME
    if out_dir.exists():
        shutil.rmtree(out_dir)
    config = make_config("llama", tokenizer.vocab_size_padded(tok))
    config.max_position_embeddings = LONG_CONTEXT
    torch.manual_seed(SEED + 100)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for eos in EOS_IDS:
            model.lm_head.weight[eos].zero_()
    return _export(model, tok, out_dir, "int8", context=LONG_CONTEXT)


def _export(
    model: torch.nn.Module,
    tok: tokenizer.Tokenizer,
    out_dir: Path,
    precision: str,
    options: dict[str, object] | None = None,
    *,
    context: int = CONTEXT,
) -> Path:
    """Save ``model`` (greedy, the fixtures' eos ids) with ``tok`` and export it into ``out_dir``."""
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.BOS_ID, eos_token_id=EOS_IDS, pad_token_id=tokenizer.PAD_ID, do_sample=False
    )
    with tempfile.TemporaryDirectory(prefix=f"fixture-{out_dir.name}-") as tmp:
        hf_dir = Path(tmp) / "hf"
        model.save_pretrained(str(hf_dir))
        tokenizer.save(tok, hf_dir, context)
        builder.build(hf_dir, out_dir, precision, options, quiet=True)
    builder.set_eos(out_dir, EOS_IDS)
    return out_dir


PRUNED_NAME = "phi3-int4-pruned"


def build_pruned_fixture(out_root: Path, tok: tokenizer.Tokenizer) -> Path:
    """Build ``phi3-int4-pruned``: phi3-int4's weights exported with ``prune_lm_head``.

    Its prompt pass returns logits for the last position only, the layout
    ``models.convert`` writes by default; the engine must give the same tokens.
    """
    out_dir = out_root / PRUNED_NAME
    if out_dir.exists():
        shutil.rmtree(out_dir)
    with tempfile.TemporaryDirectory(prefix="fixture-pruned-") as tmp:
        hf_dir = Path(tmp) / "hf"
        make_checkpoint("phi3", hf_dir, tok)
        builder.build(hf_dir, out_dir, "int4", {"prune_lm_head": True}, quiet=True)
    builder.set_eos(out_dir, EOS_IDS)
    return out_dir


BLOCK128_NAME = "llama-int4-b128"


def build_block128_fixture(out_root: Path, tok: tokenizer.Tokenizer) -> Path:
    """Build ``llama-int4-b128``: int4 in blocks of 128, wide enough for them (hidden 256, MLP 512).

    From block 64 up onnxruntime's int4 kernels compute rows in pairs on AVX-512 VNNI and round an
    unpaired row otherwise (docs/engine.md, "Prefill levers"): the fixture the even-row passes
    (``Engine.even_rows``) are tested on.  Full logits, so that speculation can verify on it.
    """
    out_dir = out_root / BLOCK128_NAME
    if out_dir.exists():
        shutil.rmtree(out_dir)
    config = make_config("llama", tokenizer.vocab_size_padded(tok))
    config.hidden_size, config.intermediate_size = 4 * HIDDEN, 4 * INTERMEDIATE
    config.head_dim = config.hidden_size // HEADS
    torch.manual_seed(SEED + 200)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return _export(model, tok, out_dir, "int4", {"block_size": 128, "accuracy_level": 4})


def smoke_test(model_dir: Path, prompt: str = "The edge agent", steps: int = 30) -> list[int]:
    """Greedily generate ``steps`` tokens with onnxruntime-genai; return new token ids."""
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    tok = og.Tokenizer(model)
    ids = tok.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + steps)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    out: list[int] = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--family", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument(
        "--precision", nargs="+", choices=builder.PRECISIONS, default=list(builder.PRECISIONS)
    )
    parser.add_argument(
        "--long", action="store_true", help=f"build only {LONG_NAME} (daemon tests' slow model)"
    )
    parser.add_argument(
        "--pruned", action="store_true", help=f"build only {PRUNED_NAME} (last-position logits)"
    )
    parser.add_argument(
        "--block128", action="store_true", help=f"build only {BLOCK128_NAME} (int4 rows computed in pairs)"
    )
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime-genai smoke test")
    args = parser.parse_args(argv)

    tok = fixture_tokenizer()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.pruned:
        out_dir = build_pruned_fixture(args.out, tok)
        print(f"{out_dir.name:<14} {sum(p.stat().st_size for p in out_dir.iterdir()) / 1024:7.1f} KiB")
        return 0
    if args.block128:
        out_dir = build_block128_fixture(args.out, tok)
        print(f"{out_dir.name:<14} {sum(p.stat().st_size for p in out_dir.iterdir()) / 1024:7.1f} KiB")
        return 0
    if args.long:
        out_dir = build_long_fixture(args.out, tok)
        print(f"{out_dir.name:<14} {sum(p.stat().st_size for p in out_dir.iterdir()) / 1024:7.1f} KiB")
        return 0
    for family in args.family:
        for precision in args.precision:
            out_dir = build_fixture(family, precision, args.out, tok)
            size = sum(p.stat().st_size for p in out_dir.iterdir())
            line = f"{out_dir.name:<14} {size / 1024:7.1f} KiB"
            if not args.no_check:
                new = smoke_test(out_dir)
                line += f"  greedy: {len(set(new))} distinct of {len(new)} tokens"
                if len(set(new)) < 3:
                    raise SystemExit(f"{out_dir}: greedy output too repetitive: {new}")
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
