"""The benches' random-weight checkpoints and their GGUF exports for llama.cpp (shared).

A checkpoint is built once from a seeded ``transformers`` config and cached; the
ONNX exports (each bench's own) and the GGUF files come from that one folder, so
every runner reads the same weights.  GGUF files are made by llama.cpp's converter
(f16) from llama-cpp-python's sdist (``llama_src``: its ``vendor/llama.cpp``) and
quantized by the installed ``llama_cpp`` package.  A file older than its
checkpoint is rebuilt.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Phi-3-mini's widths (3.8B at 32 layers): the benches' checkpoints take them and choose a depth.
PHI3_MINI_WIDTHS: dict[str, Any] = {
    "hidden_size": 3072,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "intermediate_size": 8192,
    "vocab_size": 32064,
}

# The fixture tokenizer is a byte-level BPE unknown to the converter: say its pre-tokenization
# is GPT-2's, and let Phi-3 (whose converter wants a sentencepiece model) take the BPE path.
_CONVERT_SHIM = (
    "import sys; sys.argv = sys.argv[1:]; "
    "import conversion.base as b, conversion.phi as phi; "
    "b.TextModel.get_vocab_base_pre = lambda self, tok: 'gpt-2'; "
    "phi.Phi3MiniModel.set_vocab = b.TextModel._set_vocab_gpt2; "
    "import runpy; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def ensure_checkpoint(out: Path, make_config: Callable[[], Any], seed: int, *, half: bool = False) -> Path:
    """``out``: a causal LM of ``make_config()`` with weights drawn after ``seed``, and the fixture tokenizer.

    ``half``: stored in float16 (half the memory to build and export it).
    """
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM

    from models import fixtures, tokenizer

    config = make_config()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16 if half else torch.float32)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial))
    tokenizer.save(fixtures.fixture_tokenizer(), partial, config.max_position_embeddings)
    partial.rename(out)
    return out


def fresh(path: Path, checkpoint: Path) -> bool:
    """Whether ``path`` exists and was made after ``checkpoint`` was."""
    source = checkpoint / "config.json"
    return path.is_file() and (not source.is_file() or path.stat().st_mtime >= source.stat().st_mtime)


def gguf_path(stem: Path, kind: str) -> Path:
    """``<stem>-<kind>.gguf`` (kind f16, q4_0, q8_0, ...)."""
    return stem.with_name(f"{stem.name}-{kind.lower()}.gguf")


def ensure_gguf(checkpoint: Path, stem: Path, kind: str, llama_src: Path | None) -> Path:
    """``checkpoint`` as GGUF ``kind`` (Q4_0, Q8_0): the converter's f16, then llama.cpp's quantizer."""
    out = gguf_path(stem, kind)
    if fresh(out, checkpoint):
        return out
    if llama_src is None:
        raise SystemExit(f"{out} is missing or stale: pass --llama-src (the sdist's vendor/llama.cpp)")
    f16 = gguf_path(stem, "f16")
    if not fresh(f16, checkpoint):
        print(f"converting {f16.name} ...", file=sys.stderr, flush=True)
        env = {**os.environ, "PYTHONPATH": f"{llama_src}{os.pathsep}{llama_src / 'gguf-py'}"}
        cmd = [sys.executable, "-c", _CONVERT_SHIM, str(llama_src / "convert_hf_to_gguf.py"), str(checkpoint)]
        # A name with "phi3" in it makes llama.cpp look up Phi-3's "<|endoftext|>", which the
        # fixture tokenizer lacks: loading then fails with "unordered_map::at".
        cmd += ["--outtype", "f16", "--outfile", str(f16), "--model-name", "edge-agent-bench"]
        subprocess.run(cmd, check=True, env=env)
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    params.nthread = 2
    print(f"quantizing {out.name} ...", file=sys.stderr, flush=True)
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params) != 0:
        raise SystemExit(f"llama.cpp could not quantize {f16}")
    return out
