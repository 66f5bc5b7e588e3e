"""Continuous batching on the Phi-3-mini-shaped 4-layer models: 1, 2, 4, 8 jobs at once vs one, vs llama.cpp.

Run as ``python bench/batch_bench.py [--precisions int4 int8] [--concurrency 1 2 4 8]
[--prompt 64] [--new 64] [--threads 2] [--rounds 3] [--out bench/out]
[--llama-src SDIST/vendor/llama.cpp]``.

Models are engine_bench's (random weights, built once and cached in ``bench/models/``).
Per precision, one engine; each round runs (in rotating order) a solo ``generate`` and
a :class:`Batcher` with ``c`` jobs submitted at once (different prompts of the same
length, greedy, eos ignored).  Reported, medians over rounds:

* aggregate decode tok/s: tokens produced by batched decode passes / time in them;
* per-job decode tok/s: each job's ``(new - 1) / decode time`` (its own view, stalls included);
* the verify cost of a pass over ``n`` new tokens against one (what speculation and
  chunked prefill pay), and prefill tok/s against decode tok/s: how much room the
  kernels leave (the issue's criterion: prefill at least 3x faster per token).

The llama.cpp arm (``llama_parallel``) decodes the same checkpoint's weights as GGUF
(Q4_0 against int4, Q8_0 against int8, built once with ``--llama-src``, the converter
of llama-cpp-python's sdist) the way its server does with ``--parallel c``: the
``c`` prompts in one ``llama_decode``, then one ``llama_decode`` per step with one
token per sequence.  Its runs are interleaved with ours (the order rotates every
round and the two arms swap places), same prompts, same new-token counts, same
threads; reported the same way, with ours/llama.cpp at each ``c`` and llama.cpp's own
``c`` vs 1.  Without llama-cpp-python or the GGUF files the report says the arm was
not run.

The box may be shared: each run records how many cores other processes kept busy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hf_export
import llama_parallel
from engine_bench import _cpu_seconds, checkpoint_dir, ensure_models, machine, prompt_ids

GGUF_KIND = {"int4": "Q4_0", "int8": "Q8_0"}
BUSY_CORES = 0.2  # other processes' median busy cores above which the llama.cpp comparison is flagged


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
    from agent.engine.kv_cache import KVCache

    io = engine.graph
    cache = KVCache(
        layers=io.layers,
        kv_heads=io.kv_heads,
        head_size=io.head_size,
        capacity=past + max(sizes),
        dtype=io.kv_dtype,
    )
    binding = engine.session.io_binding()
    cache.bind(binding, io.past_names, io.present_names)
    prompt = np.asarray([prompt_ids(past)], dtype=np.int64)
    first = np.empty((1, io.prefill_logits_rows(past), io.vocab), dtype=io.logits_dtype)
    engine.bind_chunk(binding, prompt, past=0, logits=first)
    engine.session.run_with_iobinding(binding)
    out: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(repeat):
        for n in sizes:
            ids = np.asarray([prompt_ids(n)], dtype=np.int64)
            logits = np.empty((1, n, io.vocab), dtype=io.logits_dtype)
            engine.bind_chunk(binding, ids, past=past, logits=logits)
            started = time.perf_counter()
            engine.session.run_with_iobinding(binding)
            out[n].append(time.perf_counter() - started)
    return {n: statistics.median(v) for n, v in out.items()}


def _order(round_: int, concurrency: list[int], llama: list[int]) -> list[tuple[str, int]]:
    """This round's runs: solo, then (ours, c) and (llama, c) side by side, swapped and rotated per round."""
    arms = ("ours", "llama") if round_ % 2 == 0 else ("llama", "ours")
    pairs = sorted({*concurrency, *llama})
    items = [("solo", 1)] + [
        (arm, c) for c in pairs for arm in arms if c in (concurrency if arm == "ours" else llama)
    ]
    k = round_ % len(items)
    return items[k:] + items[:k]


def measure(path: Path, args: argparse.Namespace, llama: Any) -> dict[str, Any]:
    """Our engine (solo and batched), and llama.cpp batched when ``llama`` is given, interleaved."""
    from agent.engine.batch import Batcher
    from agent.engine.engine import Engine, EngineOptions
    from agent.engine.sampling import SamplingParams

    engine = Engine(path, EngineOptions(threads=args.threads))
    params = SamplingParams(max_tokens=args.new, ignore_eos=True)
    engine.generate(prompt_ids(args.prompt), params)  # warm-up
    llama_cs = sorted({1, *args.concurrency}) if llama else []
    for c in llama_cs:
        llama.run(_prompts(args.prompt, c), min(args.new, 8))  # warm-up: the context for c sequences
    runs: dict[str, list[dict[str, float]]] = {str(c): [] for c in ["solo", *args.concurrency]}
    llama_runs: dict[str, list[dict[str, float]]] = {str(c): [] for c in llama_cs}
    for round_ in range(args.rounds):
        for arm, c in _order(round_, args.concurrency, llama_cs):
            if arm == "llama":
                row, others = _others(lambda c=c: llama.run(_prompts(args.prompt, c), args.new))
                llama_runs[str(c)].append(row | {"others": others})
                continue
            if arm == "solo":
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
    every = [r for rs in (*runs.values(), *llama_runs.values()) for r in rs]
    summary: dict[str, Any] = {
        "solo_decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs["solo"]),
        "solo_prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in runs["solo"]),
        "verify_cost_vs_one": {n: cost[n] / cost[1] for n in cost},
        "one_token_pass_ms": cost[1] * 1e3,
        "others_cores_median": statistics.median(r["others"] for r in every),
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
    if llama:
        summary["llama_cpp"] = _llama_summary(llama_runs, summary, args.concurrency)
    return {"summary": summary, "runs": runs, "llama_cpp_runs": llama_runs}


def _llama_summary(
    runs: dict[str, list[dict[str, float]]], ours: dict[str, Any], concurrency: list[int]
) -> dict[str, Any]:
    """llama.cpp's medians, its c vs 1, and ours/llama.cpp at each c (written into ``ours``' rows too)."""
    med = {
        c: {
            k: statistics.median(r[k] for r in rs) for k in ("aggregate_decode_tok_s", "per_job_decode_tok_s")
        }
        for c, rs in runs.items()
    }
    one = med["1"]["aggregate_decode_tok_s"]
    out: dict[str, Any] = {}
    for c, row in med.items():
        out[f"c{c}"] = row | {
            "aggregate_vs_c1": row["aggregate_decode_tok_s"] / one,
            "per_job_vs_c1": row["per_job_decode_tok_s"] / one,
            "prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in runs[c]),
        }
    for c in concurrency:
        mine, theirs = ours[f"c{c}"], med[str(c)]
        mine["ours_over_llama_aggregate"] = mine["aggregate_decode_tok_s"] / theirs["aggregate_decode_tok_s"]
        mine["ours_over_llama_per_job"] = mine["per_job_decode_tok_s"] / theirs["per_job_decode_tok_s"]
    return out


def _open_llama(args: argparse.Namespace) -> tuple[dict[str, Path], str | None]:
    """The GGUF file of each precision, or why the llama.cpp arm cannot run."""
    why = llama_parallel.unavailable()
    if why:
        return {}, why
    checkpoint = checkpoint_dir()  # built by ensure_models
    stem = checkpoint.with_name(checkpoint.name.removesuffix("-hf"))
    kinds = {p: GGUF_KIND[p] for p in args.precisions}
    stale = [k for k in kinds.values() if not hf_export.fresh(hf_export.gguf_path(stem, k), checkpoint)]
    if stale and args.llama_src is None:
        return {}, f"no GGUF {', '.join(stale)} of {checkpoint.name} yet and no --llama-src to convert it"
    return {p: hf_export.ensure_gguf(checkpoint, stem, k, args.llama_src) for p, k in kinds.items()}, None


def _print(name: str, s: dict[str, Any], concurrency: list[int]) -> None:
    print(
        f"{name}: solo decode {s['solo_decode_tok_s']:.2f} tok/s, prefill {s['solo_prefill_tok_s']:.1f} tok/s "
        f"({s['prefill_over_decode_per_token']:.1f}x per token); other processes kept "
        f"{s['others_cores_median']:.1f} cores busy (median)"
    )
    for c in concurrency:
        r = s[f"c{c}"]
        print(
            f"  {c} jobs: aggregate {r['aggregate_decode_tok_s']:.2f} tok/s ({r['aggregate_vs_solo']:.2f}x solo), "
            f"per job {r['per_job_decode_tok_s']:.2f} tok/s ({r['per_job_vs_solo']:.2f}x)"
        )
    costs = ", ".join(f"{n}: {v:.2f}x" for n, v in s["verify_cost_vs_one"].items())
    print(f"  pass over n new tokens vs one ({s['one_token_pass_ms']:.1f} ms): {costs}")
    if "llama_cpp" not in s:
        return
    gguf = s["llama_cpp_gguf"]
    for c, r in s["llama_cpp"].items():
        print(
            f"  llama.cpp {gguf} {c[1:]} seqs: aggregate {r['aggregate_decode_tok_s']:.2f} tok/s "
            f"({r['aggregate_vs_c1']:.2f}x its 1), per job {r['per_job_decode_tok_s']:.2f} tok/s "
            f"({r['per_job_vs_c1']:.2f}x), prefill {r['prefill_tok_s']:.1f} tok/s"
        )
    ratios = ", ".join(
        f"{c}: {s[f'c{c}']['ours_over_llama_aggregate']:.2f} / {s[f'c{c}']['ours_over_llama_per_job']:.2f}"
        for c in concurrency
    )
    print(f"  ours/llama.cpp {gguf}, aggregate / per job, by jobs: {ratios}")
    if s["others_cores_median"] > BUSY_CORES:
        print(
            f"  WARNING: other processes kept {s['others_cores_median']:.1f} cores busy: llama.cpp's decode "
            "(a thread barrier per operator) collapses when its threads are preempted, ours much less; "
            "these ratios do not hold on a quiet box"
        )


def _cpu_flags() -> dict[str, bool]:
    flags = set(
        " ".join(
            ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")
        ).split()
    )
    return {"avx2": "avx2" in flags, "avx512": "avx512f" in flags, "avx512_vnni": "avx512_vnni" in flags}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", nargs="+", default=["int4", "int8"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument(
        "--llama-src", type=Path, default=None, help="vendor/llama.cpp of llama-cpp-python's sdist"
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the models package
    paths = ensure_models(args.precisions)
    ggufs, llama_why = _open_llama(args)
    if llama_why:
        print(f"llama.cpp arm NOT run: {llama_why}", file=sys.stderr, flush=True)
    report: dict[str, Any] = {
        "machine": machine() | _cpu_flags() | {"llama_cpp_python": llama_parallel.version()},
        "load_average_start": os.getloadavg(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "llama_cpp_not_run": llama_why,
    }
    m = report["machine"]
    print(
        f"{m['cpu']}, {m['logical_cores']} cores, AVX2 {m['avx2']}, AVX-512 {m['avx512']} (VNNI {m['avx512_vnni']}); "
        f"llama-cpp-python {m['llama_cpp_python']}; load average at start "
        + ", ".join(f"{x:.2f}" for x in report["load_average_start"])
    )
    for precision, path in paths.items():
        print(f"{path.name} ...", file=sys.stderr, flush=True)
        llama = None
        if precision in ggufs:
            slot, widest = args.prompt + args.new, max(args.concurrency) * args.prompt
            llama = llama_parallel.LlamaParallel(ggufs[precision], args.threads, slot, widest)
        try:
            report[precision] = measure(path, args, llama)
        finally:
            if llama:
                llama.close()
        s = report[precision]["summary"]
        if llama:
            s["llama_cpp_gguf"] = ggufs[precision].name
        _print(path.name, s, args.concurrency)
    if llama_why:
        print(f"llama.cpp arm NOT run: {llama_why}")
    report["load_average_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch_bench.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
