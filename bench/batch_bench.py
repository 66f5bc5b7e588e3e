"""Continuous batching on the Phi-3-mini-shaped 4-layer models: 1, 2, 4, 8 jobs at once vs one.

Run as ``python bench/batch_bench.py [--precisions int4 int8] [--concurrency 1 2 4 8]
[--prompt 64] [--new 64] [--threads 2] [--rounds 3] [--out bench/out]``.

Models are engine_bench's (random weights, built once and cached in ``bench/models/``).
Per precision, one engine; each round runs (in rotating order) a solo ``generate`` and
a :class:`Batcher` with ``c`` jobs submitted at once (different prompts of the same
length, greedy, eos ignored).  Reported, medians over rounds:

* aggregate decode tok/s: tokens produced by batched decode passes / time in them;
* per-job decode tok/s: each job's ``(new - 1) / decode time`` (its own view, stalls included);
* the verify cost of a pass over ``n`` new tokens against one (what speculation and
  chunked prefill pay), and prefill tok/s against decode tok/s: how much room the
  kernels leave (the issue's criterion: prefill at least 3x faster per token).

The box may be shared: each run records how many cores other processes kept busy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_bench import _cpu_seconds, ensure_models, machine, prompt_ids


def _others(fn: Any) -> tuple[Any, float]:
    (box0, own0), t0 = _cpu_seconds(), time.perf_counter()
    result = fn()
    (box1, own1), t1 = _cpu_seconds(), time.perf_counter()
    return result, max(0.0, (box1 - box0) - (own1 - own0)) / (t1 - t0)


def _prompts(n: int, count: int) -> list[list[int]]:
    base = prompt_ids(n + count)
    return [base[j : j + n] for j in range(count)]


def verify_cost(engine: Any, past: int, sizes: list[int], repeat: int = 7) -> dict[int, float]:
    """Median seconds of one pass over ``n`` new tokens after ``past`` cached ones, per ``n``."""
    io = engine._io
    binding, _cache, _ = engine._prefill(prompt_ids(past), past + max(sizes))
    out: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(repeat):
        for n in sizes:
            ids = np.asarray([prompt_ids(n)], dtype=np.int64)
            logits = np.empty((1, n, io.vocab), dtype=io.logits_dtype)
            engine._bind_step(binding, ids, past=past, logits=logits)
            started = time.perf_counter()
            engine.session.run_with_iobinding(binding)
            out[n].append(time.perf_counter() - started)
    return {n: statistics.median(v) for n, v in out.items()}


def measure(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    from agent.engine.batch import Batcher
    from agent.engine.engine import Engine, EngineOptions
    from agent.engine.sampling import SamplingParams

    engine = Engine(path, EngineOptions(threads=args.threads))
    params = SamplingParams(max_tokens=args.new, ignore_eos=True)
    engine.generate(prompt_ids(args.prompt), params)  # warm-up
    configs: list[int | str] = ["solo", *args.concurrency]
    runs: dict[str, list[dict[str, float]]] = {str(c): [] for c in configs}
    for round_ in range(args.rounds):
        for c in configs[round_ % len(configs) :] + configs[: round_ % len(configs)]:
            if c == "solo":
                done, others = _others(lambda: engine.generate(prompt_ids(args.prompt), params))
                t = done.timings
                runs["solo"].append(
                    {
                        "decode_tok_s": t.decode_tokens_per_s,
                        "prefill_tok_s": t.prefill_tokens_per_s,
                        "others": others,
                    }
                )
                continue
            assert isinstance(c, int)
            batcher = Batcher(engine, max_batch=c, slot_tokens=args.prompt + args.new)

            def run(batcher: Batcher = batcher, c: int = c) -> list[Any]:
                jobs = [batcher.submit(p, params) for p in _prompts(args.prompt, c)]
                batcher.run()
                return jobs

            jobs, others = _others(run)
            runs[str(c)].append(
                {
                    "aggregate_decode_tok_s": batcher.rows / batcher.decode_seconds,
                    "per_job_decode_tok_s": statistics.median(
                        j.completion.timings.decode_tokens_per_s for j in jobs
                    ),
                    "occupancy": batcher.occupancy,
                    "others": others,
                }
            )
        print(f"  round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    cost = verify_cost(engine, args.prompt, [1, 2, 3, 5, 9])
    summary: dict[str, Any] = {
        "solo_decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs["solo"]),
        "solo_prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in runs["solo"]),
        "verify_cost_vs_one": {n: cost[n] / cost[1] for n in cost},
        "one_token_pass_ms": cost[1] * 1e3,
        "others_cores_median": statistics.median(r["others"] for rs in runs.values() for r in rs),
    }
    solo = summary["solo_decode_tok_s"]
    summary["prefill_over_decode_per_token"] = summary["solo_prefill_tok_s"] / solo
    for c in args.concurrency:
        agg = statistics.median(r["aggregate_decode_tok_s"] for r in runs[str(c)])
        per = statistics.median(r["per_job_decode_tok_s"] for r in runs[str(c)])
        summary[f"c{c}"] = {
            "aggregate_decode_tok_s": agg,
            "per_job_decode_tok_s": per,
            "aggregate_vs_solo": agg / solo,
            "per_job_vs_solo": per / solo,
        }
    return {"summary": summary, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", nargs="+", default=["int4", "int8"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args(argv)
    paths = ensure_models(args.precisions)
    report: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    for precision, path in paths.items():
        print(f"{path.name} ...", file=sys.stderr, flush=True)
        report[precision] = measure(path, args)
        s = report[precision]["summary"]
        print(
            f"{path.name}: solo decode {s['solo_decode_tok_s']:.2f} tok/s, prefill {s['solo_prefill_tok_s']:.1f} tok/s "
            f"({s['prefill_over_decode_per_token']:.1f}x per token); other processes kept "
            f"{s['others_cores_median']:.1f} cores busy (median)"
        )
        for c in args.concurrency:
            r = s[f"c{c}"]
            print(
                f"  {c} jobs: aggregate {r['aggregate_decode_tok_s']:.2f} tok/s ({r['aggregate_vs_solo']:.2f}x solo), "
                f"per job {r['per_job_decode_tok_s']:.2f} tok/s ({r['per_job_vs_solo']:.2f}x)"
            )
        costs = ", ".join(f"{n}: {v:.2f}x" for n, v in s["verify_cost_vs_one"].items())
        print(f"  pass over n new tokens vs one ({s['one_token_pass_ms']:.1f} ms): {costs}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch_bench.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
