"""A prompt joining running sequences: what its prefill chunks cost them, per chunk size.

Run as ``python bench/join_bench.py [--threads 2] [--chunks 128 256 512] [--prompt 1000]``.

onnxruntime's GroupQueryAttention cannot run a joining prompt's chunk and the
running sequences' decode rows in one pass (several new tokens per row need a
batch of one), so the scheduler interleaves: one chunk, then one decode pass for
everyone (``agent.engine.batch``).  Here 3 sequences decode on engine_bench's
Phi-3-mini-shaped 4-layer int4 model (random weights) when a 4th joins with a
``--prompt``-token prompt.  Per chunk size: the joiner's time to first token, the
longest gap between two tokens of a running sequence while it prefilled (one
chunk's pass plus one decode pass), the running sequences' mean decode rate over
the join, and the rate with nobody joining.  ``--chunks`` sets
``prefill_chunk_tokens``; while others decode the scheduler caps a joining
prompt's chunk at ``JOIN_CHUNK_TOKENS`` (128) whatever it is.  Cores other processes kept busy are
reported with each row.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent))

from engine_bench import _cpu_seconds, ensure_models, prompt_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunks", nargs="+", type=int, default=[128, 256, 512])
    parser.add_argument("--prompt", type=int, default=1000)
    args = parser.parse_args()

    from agent.engine.batch import Batcher
    from agent.engine.engine import Engine, EngineOptions
    from agent.engine.sampling import SamplingParams

    path = ensure_models(["int4"])["int4"]
    engine = Engine(path, EngineOptions(threads=args.threads, prefix_cache_mb=0))
    engine.generate(prompt_ids(64), SamplingParams(max_tokens=4))  # warm-up
    running_params = SamplingParams(max_tokens=400, ignore_eos=True)
    for chunk in [0, *args.chunks]:  # 0: nobody joins
        (box0, own0), t0 = _cpu_seconds(), time.perf_counter()
        batcher = Batcher(engine, max_batch=4, slot_tokens=args.prompt + 512, prefill_chunk=chunk or 512)
        stamps: list[list[float]] = [[] for _ in range(3)]
        running = [batcher.submit(prompt_ids(40 + j)[j:], running_params) for j in range(3)]

        def step(
            batcher: Batcher = batcher, running: list[Any] = running, stamps: list[list[float]] = stamps
        ) -> None:
            batcher.step()
            now = time.perf_counter()
            for job, s in zip(running, stamps, strict=True):
                s += [now] * (len(job.seq.generated) - len(s))

        for _ in range(20):  # all three decoding
            step()
        joined_at = time.perf_counter()
        before = [len(s) for s in stamps]
        first: list[float] = []
        if chunk:
            joiner = batcher.submit(prompt_ids(args.prompt), SamplingParams(max_tokens=2, ignore_eos=True))
            while joiner.state != "done" and not joiner.seq.first_token_at:
                step()
            first.append(time.perf_counter())
        else:
            for _ in range(30):
                step()
        ended = time.perf_counter()
        gaps = [b - a for s, n in zip(stamps, before, strict=True) for a, b in itertools.pairwise(s[n - 1 :])]
        tokens = sum(len(s) - n for s, n in zip(stamps, before, strict=True))
        (box1, own1), t1 = _cpu_seconds(), time.perf_counter()
        print(
            json.dumps(
                {
                    "chunk": chunk or None,
                    "joiner_ttft_ms": round((first[0] - joined_at) * 1e3, 1) if first else None,
                    "max_gap_ms": round(max(gaps) * 1e3, 1) if gaps else None,
                    # Under other load the longest gap is one spike: the median and the 90th
                    # percentile say what the chunks cost the running sequences.
                    "median_gap_ms": round(statistics.median(gaps) * 1e3, 1) if gaps else None,
                    "p90_gap_ms": round(sorted(gaps)[int(0.9 * (len(gaps) - 1))] * 1e3, 1) if gaps else None,
                    "running_tok_s_each": round(tokens / 3 / (ended - joined_at), 1),
                    "other_cores": round(max(0.0, (box1 - box0) - (own1 - own0)) / (t1 - t0), 2),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
