"""Issue 22's two ratio targets against what no loop on this CPU's kernels can beat, in one run.

Run as ``python bench/floor_bench.py [--threads 2] [--rounds 3] [--model DIR]``.

Model: ``models.convert``'s default export (int4, blocks of 128, lm_head rows on demand) of
engine_bench's Phi-3-mini-shaped 4-layer checkpoint (random weights), built once into
``bench/models/`` (``--model`` another folder).  Arms rotate round by round in one process;
each figure comes with the cores other processes kept busy meanwhile.

* **Warm time to first token** (1,000-token instruction + 10-token input, ``max_tokens = 1``,
  prefix cache on): cold (cache emptied), warm from memory, warm after a restart (a new engine
  on the same disk cache, once its read-back at start is done).  Two floors: a warm job computes
  its 10 input positions in at least one pass that reads every weight and the instruction's keys
  and values, so it cannot take less than **one decode step at that context** (measured: the
  mean step of 16 tokens generated after the 1,010-token prompt); and it computes 10 of the cold
  run's 1,010 rows, so unless a 10-row pass is more efficient per row than a 1,010-row prefill
  (it never is: the prefill reads each weight once for hundreds of rows) it cannot take less
  than **10 / 1,010 = 0.99 % of cold**.  Target: warm ≤ 1 % of cold; the larger floor ÷ cold says
  whether any kernel schedule could meet it.
* **4 jobs at once vs the prefill rate** (64-token prompts, 64 new tokens, prefix cache on):
  aggregate decode tok/s of a 4-slot batch, solo decode tok/s, prefill tok/s of a cold
  1,024-token prompt.  The ceiling: a 4-row pass is never faster than a 1-row pass (measured
  below too), so the aggregate cannot pass 4 x solo.  Target: aggregate ≥ 80 % of prefill;
  4 x solo ÷ prefill says whether it is reachable here.

Where prefill is compute-bound and fast against the memory bandwidth (AVX-512 VNNI), both
ceilings can sit below the targets; where prefill is slow (the issue's AVX2 VM: prefill 49 tok/s,
decode 22) they do not.  The report states which, with this machine's figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent))

from batch_bench import _others, _prompts
from engine_bench import ensure_checkpoint, machine, prompt_ids
from harness import save_report
from logits_rows_bench import ensure_export

INSTRUCTION, INPUT, STEPS = 1000, 10, 16


def _inputs(round_: int, arm: int) -> list[int]:
    """A 10-token input no earlier job used (so only the instruction can be cached)."""
    start = 500 + (round_ * 7 + arm) * INPUT
    return [7 + (start + i) % 441 for i in range(INPUT)]


def measure(path: Path, args: argparse.Namespace, pc_dir: Path) -> dict[str, Any]:
    from agent.engine.batch import Batcher
    from agent.engine.engine import Engine, EngineOptions
    from agent.engine.sampling import SamplingParams

    options = EngineOptions(threads=args.threads)
    # In memory only, so emptying it makes a cold run; the restart arm has a disk cache of its own.
    engine = Engine(path, options, prepacked_dir=pc_dir.parent / "prepacked")
    assert engine.prefix_cache is not None
    instruction = prompt_ids(INSTRUCTION)
    first = SamplingParams(max_tokens=1, ignore_eos=True)
    daemon_like = {
        "prefix_cache_dir": pc_dir,
        "prepacked_dir": pc_dir.parent / "prepacked",
    }  # as the daemon opens it
    Engine(path, options, **daemon_like).generate(instruction + _inputs(0, 9), first)  # on disk
    steps = SamplingParams(max_tokens=STEPS + 1, ignore_eos=True)
    decode64 = SamplingParams(max_tokens=64, ignore_eos=True)
    engine.generate(prompt_ids(64), decode64)  # warm-up

    def timed(on: Any, ids: list[int], params: Any) -> tuple[Any, float]:
        started = time.perf_counter()
        done = on.generate(ids, params)
        return done, time.perf_counter() - started

    def cold() -> tuple[Any, float]:
        engine.prefix_cache.clear()  # type: ignore[union-attr]
        engine.release_kept()
        return timed(engine, instruction + _inputs(r, 0), first)

    def warm() -> tuple[Any, float]:
        return timed(engine, instruction + _inputs(r, 1), first)

    def restarted() -> tuple[Any, float]:
        again = Engine(path, options, **daemon_like)  # its start and read-back are not timed
        assert again.prefix_read_back is not None
        again.prefix_read_back.join()  # a job that comes sooner loads what it needs from disk itself
        return timed(again, instruction + _inputs(r, 2), first)

    def step_at_context() -> tuple[Any, float]:
        return timed(engine, instruction + _inputs(r, 3), steps)

    def solo() -> tuple[Any, float]:
        return timed(engine, _prompts(64, 1)[0], decode64)

    def prefill_1024() -> tuple[Any, float]:
        engine.prefix_cache.clear()  # type: ignore[union-attr]
        engine.release_kept()
        return timed(engine, prompt_ids(1024 + r), first)

    def batch4() -> Batcher:
        batcher = Batcher(engine, max_batch=4, slot_tokens=64 + 64)
        for p in _prompts(64, 4):
            batcher.submit(p, decode64)
        batcher.run()
        batcher.close()
        return batcher

    rows: dict[str, list[dict[str, float]]] = {}
    arms = ["cold", "warm", "restarted", "step", "solo", "prefill", "batch4"]
    for r in range(args.rounds):
        order = arms[r % len(arms) :] + arms[: r % len(arms)]
        if order.index("warm") < order.index("cold"):  # warm follows a cold fill of the same instruction
            order.remove("warm")
            order.insert(order.index("cold") + 1, "warm")
        for arm in order:
            if arm == "batch4":
                batcher, others = _others(batch4)
                row = {"aggregate_tok_s": batcher.rows / batcher.decode_seconds}
            else:
                fn = {
                    "cold": cold,
                    "warm": warm,
                    "restarted": restarted,
                    "step": step_at_context,
                    "solo": solo,
                    "prefill": prefill_1024,
                }[arm]
                (done, seconds), others = _others(fn)
                t = done.timings
                row = {
                    "ttft_ms": seconds * 1e3,
                    "cached_tokens": float(done.cached_tokens),
                    "decode_tok_s": t.decode_tokens_per_s,
                    "prefill_tok_s": t.prefill_tokens_per_s,
                }
            rows.setdefault(arm, []).append(row | {"others": others})
        print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    for arm in ("cold", "prefill"):
        if any(x["cached_tokens"] for x in rows[arm]):
            raise SystemExit(f"floor_bench: a {arm} run found cached tokens; its figure would not be cold")

    def med(arm: str, key: str) -> float:
        return statistics.median(x[key] for x in rows[arm])

    cold_ms, warm_ms, restart_ms = med("cold", "ttft_ms"), med("warm", "ttft_ms"), med("restarted", "ttft_ms")
    step_ms = 1e3 / med("step", "decode_tok_s")
    solo_tok_s, prefill_tok_s = med("solo", "decode_tok_s"), med("prefill", "prefill_tok_s")
    agg = med("batch4", "aggregate_tok_s")
    return {
        "rows": rows,
        "summary": {
            "cold_ms": cold_ms,
            "warm_ms": warm_ms,
            "restarted_ms": restart_ms,
            "warm_cached_tokens": med("warm", "cached_tokens"),
            "restarted_cached_tokens": med("restarted", "cached_tokens"),
            "decode_step_ms_at_1010": step_ms,
            "warm_vs_cold": warm_ms / cold_ms,
            "restarted_vs_cold": restart_ms / cold_ms,
            "warm_step_floor_vs_cold": step_ms / cold_ms,
            "warm_rows_floor_vs_cold": INPUT / (INSTRUCTION + INPUT),
            "warm_floor_vs_cold": max(step_ms / cold_ms, INPUT / (INSTRUCTION + INPUT)),
            "warm_vs_floor": warm_ms / max(step_ms, cold_ms * INPUT / (INSTRUCTION + INPUT)),
            "solo_decode_tok_s": solo_tok_s,
            "prefill_tok_s_1024": prefill_tok_s,
            "batch4_aggregate_tok_s": agg,
            "batch4_vs_prefill": agg / prefill_tok_s,
            "batch4_ceiling_vs_prefill": 4 * solo_tok_s / prefill_tok_s,
            "batch4_vs_4x_solo": agg / (4 * solo_tok_s),
            "others_cores_median": statistics.median(x["others"] for rs in rows.values() for x in rs),
        },
    }


def _warm_verdict(floor: float) -> str:
    if floor > 0.01:
        return "no: the floor is above 1 %"
    if floor > 0.0095:
        return "only by a 10-row pass that costs no more per row than the cold prefill, weights read for free"
    return "yes"


def render(report: dict[str, Any]) -> str:
    s = report["summary"]
    m = report["machine"]
    lines = [
        f"# floor_bench: {m['cpu']}, {m['logical_cores']} logical cores, onnxruntime {m['onnxruntime']}, "
        f"{report['threads']} threads, {report['rounds']} rounds, other cores busy (median) {s['others_cores_median']:.2f}",
        f"model: {report['model']}",
        "",
        "| target | measured | what no loop on these kernels beats | target reachable here? |",
        "|---|---|---|---|",
        f"| warm TTFT ≤ 1 % of cold ({INSTRUCTION} + {INPUT} tokens) | {s['warm_ms']:.1f} ms = "
        f"{100 * s['warm_vs_cold']:.2f} % of {s['cold_ms']:.0f} ms (after a restart {s['restarted_ms']:.1f} ms = "
        f"{100 * s['restarted_vs_cold']:.2f} %) | one decode step at that context, {s['decode_step_ms_at_1010']:.1f} ms = "
        f"{100 * s['warm_step_floor_vs_cold']:.2f} % of cold; the input's share of the rows, "
        f"{100 * s['warm_rows_floor_vs_cold']:.2f} %; warm = {s['warm_vs_floor']:.2f}x the larger | "
        f"{_warm_verdict(s['warm_floor_vs_cold'])} |",
        f"| 4 jobs ≥ 80 % of prefill | {s['batch4_aggregate_tok_s']:.1f} tok/s = {100 * s['batch4_vs_prefill']:.1f} % of "
        f"{s['prefill_tok_s_1024']:.0f} tok/s | 4 x solo ({s['solo_decode_tok_s']:.1f} tok/s) = "
        f"{100 * s['batch4_ceiling_vs_prefill']:.1f} % of prefill; aggregate = {100 * s['batch4_vs_4x_solo']:.1f} % of it | "
        f"{'yes' if s['batch4_ceiling_vs_prefill'] >= 0.8 else 'no: the ceiling is below 80 %'} |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args(argv)
    path = args.model or ensure_export(ensure_checkpoint(), "kept")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = measure(path, args, Path(tmp) / "prefix_cache")
    report = {
        "machine": machine(),
        "model": str(path),
        "threads": args.threads,
        "rounds": args.rounds,
    } | result
    text = render(report)
    print(text)
    save_report(args.out, "floor_bench", report, text)
    print(json.dumps(report["summary"], indent=2), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
