"""Published configurations for Raspberry Pi 5 boxes: what the daemon's sizing gives, projected.

    python bench/memory_configs.py

Every figure here is a projection: the estimator of ``agent.engine.memory_plan``
(calibrated on Phi-3-mini-shaped int4 layers measured by ``memory_bench``) applied
to model shapes computed from their published dimensions, as onnxruntime-genai's
builder exports them for CPU and ``models.convert`` leaves them (int4 in blocks of
128, int8 in blocks of 32, float32 scales, zero points, a quantized lm_head, pruned
logits, the embedding table in int8 blocks of 32 by ``models.embedding``), with a
float32 KV cache (the default) or an int8 one (the graph ``models.convert`` writes beside it,
which the daemon serves where float32 would cut the context: ``agent.engine.kv_choice``).  No Pi
ran these.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import EngineOptions
from agent.engine.memory_plan import ModelShape, estimate, fit
from edge_contract.errors import MemoryFitError

_MiB = 1 << 20
#: MatMulNBits block size per precision (models.convert's defaults).
BLOCK = {"int4": 128, "int8": 32}
BITS = {"int4": 4, "int8": 8}
#: What a Pi 5 leaves to the agent: RAM less the OS (an estimate: a lite OS takes a few hundred MB)
#: and the agent's health margin (min_mem_available_mb, 200 MiB).
BOXES = {"Pi 5, 4 GB": 3500 * 10**6 - 200 * _MiB, "Pi 5, 8 GB": 7500 * 10**6 - 200 * _MiB}


@dataclass(frozen=True)
class Dims:
    """A decoder's published dimensions."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_size: int
    intermediate: int
    vocab: int
    context: int


MODELS = [
    Dims("Phi-3-mini (3.8 B)", 3072, 32, 32, 32, 96, 8192, 32064, 4096),
    Dims("Llama-3.2-3B-shaped", 3072, 28, 24, 8, 128, 8192, 128256, 131072),
    Dims("Qwen2.5-1.5B-shaped", 1536, 28, 12, 2, 128, 8960, 151936, 32768),
]


def shape(d: Dims, precision: str, kv_value_bytes: int = 4) -> ModelShape:
    """The builder's CPU export of ``d`` at ``precision``, as the estimator sees it."""
    attention = d.hidden * d.heads * d.head_size * 2 + d.hidden * d.kv_heads * d.head_size * 2
    per_layer = attention + 3 * d.hidden * d.intermediate
    weights = d.layers * per_layer + d.vocab * d.hidden  # + the lm_head
    packed, block = BITS[precision] / 8, BLOCK[precision]
    quantized = weights * (packed + 4 / block + packed / block)  # values, float32 scale, zero point
    repacked = weights * (packed + 8 / block)  # agent.engine.memory_plan.repacked_matrix_bytes
    embedding = d.vocab * d.hidden * 9 // 8  # int8 values + a float32 scale per 32 (models.embedding)
    return ModelShape(
        file_bytes=int(quantized) + embedding,
        embedding_bytes=embedding,
        quantized_bytes=int(quantized),
        repacked_bytes=int(repacked),
        kv_bytes_per_token=d.layers * 2 * d.kv_heads * d.head_size * kv_value_bytes,
        kv_element_bytes=float(kv_value_bytes),
        hidden_size=d.hidden,
        attention_heads=d.heads,
        vocab_size=d.vocab,
        context_length=d.context,
        full_logits=False,
    )


def main() -> int:
    print(
        "| model | precision | KV | file | box | context | prefix cache | prefill chunk | anonymous peak "
        "| + repacked weights mapped | + rest of the mapped model | first start |"
    )
    print("|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for dims in MODELS:
        for precision, kv in (("int4", 4), ("int4", 1), ("int8", 4), ("int8", 1)):
            s = shape(dims, precision, kv)
            for box, memory in BOXES.items():
                kv_name = "float32" if kv == 4 else "int8"
                cells = [dims.name, precision, kv_name, f"{s.file_bytes / 1e9:.2f} GB", box]
                try:  # the daemon's defaults: the repacked weights mapped from disk when the first start fits
                    b = fit(s, EngineOptions(), memory)
                except MemoryFitError:
                    print("| " + " | ".join([*cells, "does not fit", "", "", "", "", "", ""]) + " |")
                    continue
                peak = estimate(s, b, weights_mapped=b.prepacked_on_disk)
                cells += [
                    f"{b.context_tokens:,}",
                    f"{b.prefix_cache_mb:,} MiB",
                    str(b.prefill_chunk_tokens),
                    f"{peak.anonymous / _MiB:,.0f} MiB",
                    f"{peak.weights / _MiB:,.0f} MiB" if peak.weights_mapped else "(in anonymous)",
                    f"{peak.mapped / _MiB:,.0f} MiB",
                    f"{peak.first_load / _MiB:,.0f} MiB"
                    if peak.weights_mapped
                    else "prepacked_on_disk = false",
                ]
                print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
