"""Cost of choosing one token (``agent.engine.sampling.Sampler``) per setting and vocabulary size.

Run: ``python bench/sampler_bench.py``.  A decode step of a small int4 model on a Raspberry Pi 5
takes tens of milliseconds, so a sampler in the milliseconds is visible in tokens per second.
The logits are shaped like a language model's: a flat bulk and a peaked head.
"""

from __future__ import annotations

import platform
import timeit

import numpy as np

from agent.engine.sampling import Sampler, SamplingParams

SETTINGS = {
    "greedy": {},
    "temperature 0.8, top_k 40, top_p 0.9": {"temperature": 0.8, "top_k": 40, "top_p": 0.9},
    "temperature 0.8, top_p 0.95": {"temperature": 0.8, "top_p": 0.95},
    "temperature 1.0": {"temperature": 1.0},
    "temperature 0.8, top_p 0.9, repetition_penalty 1.1": {
        "temperature": 0.8,
        "top_p": 0.9,
        "repetition_penalty": 1.1,
    },
}


def main() -> None:
    """Print the median time per token for each setting at 32k and 152k vocabularies."""
    rng = np.random.default_rng(0)
    print(f"machine: {platform.machine()} {platform.processor() or ''}".strip())
    for vocab in (32064, 151936):
        logits = (rng.normal(size=vocab) * 2).astype(np.float32)
        logits[rng.choice(vocab, 20, replace=False)] += rng.uniform(8, 14, 20).astype(np.float32)
        for label, knobs in SETTINGS.items():
            sampler = Sampler(SamplingParams(seed=1, **knobs), vocab, list(range(100)))
            runs = timeit.repeat(lambda s=sampler, x=logits: s(x), number=20, repeat=9)
            per_call_ms = sorted(runs)[len(runs) // 2] / 20 * 1e3
            print(f"vocab {vocab:>6}  {label:<52} {per_call_ms:8.3f} ms")


if __name__ == "__main__":
    main()
