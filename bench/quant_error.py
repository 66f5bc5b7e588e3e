"""How far each export's logits lie from the float32 checkpoint's: ONNX int4/int8 exports vs GGUF Q4_0/Q8_0.

Run as ``python bench/quant_error.py [--exports DIR ...] [--prompt 32] [--forced 32]``.

The model is engine_bench's Phi-3-mini-shaped 4-layer checkpoint (random weights).  A prompt
of ``--prompt`` ids is followed by ``--forced`` ids fed one by one (teacher forcing); at each
of those ``--forced`` positions the logits of transformers' float32 forward pass are the
reference.  The engine computes them as ``teacher_forced_logits`` does (the prompt's pass,
then one-token passes), llama.cpp in one batch with logits for every position.  Per runner:
the relative RMS error (``||logits - reference|| / ||reference||`` over all those rows), the
largest absolute error, and how often the top id matches the reference's.  A speed lever that
changes the quantization (block size, accuracy level) is judged beside this error.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent))

import hf_export
from engine_bench import MODELS_DIR, ensure_checkpoint, machine


def reference(ids: list[int], first: int) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ensure_checkpoint()), dtype=torch.float32)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids[:-1]])).logits[0].numpy()
    return out[first - 1 :]  # type: ignore[no-any-return]


def engine_logits(path: Path, ids: list[int], first: int) -> np.ndarray:
    from agent.engine.engine import Engine, EngineOptions

    engine = Engine(path, EngineOptions(threads=2, prefix_cache_mb=0))
    return np.stack(engine.teacher_forced_logits(ids[:first], ids[first:])).astype(np.float32)


def llama_logits(gguf: Path, ids: list[int], first: int) -> np.ndarray:
    import llama_cpp as lc

    quiet = lc.llama_log_callback(lambda level, text, data: None)
    lc.llama_log_set(quiet, ctypes.c_void_p(0))
    lc.llama_backend_init()
    model = lc.llama_model_load_from_file(str(gguf).encode(), lc.llama_model_default_params())
    cp = lc.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = 512, 512, 512, 2, 2
    ctx = lc.llama_init_from_model(model, cp)
    batch = lc.llama_batch_init(len(ids), 0, 1)
    feed = ids[:-1]
    for i, token in enumerate(feed):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, 1
        batch.seq_id[i][0] = 0
    batch.n_tokens = len(feed)
    if lc.llama_decode(ctx, batch) != 0:
        raise RuntimeError("llama_decode failed")
    vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    rows = [
        np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(vocab,)).copy()
        for i in range(first - 1, len(feed))
    ]
    lc.llama_batch_free(batch)
    lc.llama_free(ctx)
    lc.llama_model_free(model)
    return np.stack(rows)


def compare(got: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    err = got - ref
    return {
        "rel_rms": round(float(np.linalg.norm(err) / np.linalg.norm(ref)), 4),
        "max_abs": round(float(np.abs(err).max()), 4),
        "top1_agree": round(float(np.mean(got.argmax(-1) == ref.argmax(-1))), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exports", nargs="*", type=Path, default=None, help="model folders (default: all)")
    parser.add_argument("--ggufs", nargs="*", default=["Q4_0", "Q8_0"])
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--forced", type=int, default=32)
    args = parser.parse_args()
    ids = [7 + (i * 53 + 11) % 441 for i in range(args.prompt + args.forced)]
    ref = reference(ids, args.prompt)
    print(json.dumps(machine()), flush=True)
    exports = args.exports or sorted(
        p for p in MODELS_DIR.glob("phi3-mini-shape-4l-int*") if (p / "genai_config.json").is_file()
    )
    for path in exports:
        print(
            json.dumps({"runner": path.name, **compare(engine_logits(path, ids, args.prompt), ref)}),
            flush=True,
        )
    for kind in args.ggufs:
        gguf = hf_export.gguf_path(MODELS_DIR / "phi3-mini-shape-4l", kind)
        print(
            json.dumps({"runner": gguf.name, **compare(llama_logits(gguf, ids, args.prompt), ref)}),
            flush=True,
        )


if __name__ == "__main__":
    main()
