"""What the scheduler's exactness rules cost, on the Phi-3-mini-shaped 4-layer int4 model (random weights).

Run as ``python bench/scheduler_bench.py [--threads 2] [--rounds 3] [--new 48]`` (builds the
model once into ``bench/models/``, as ``engine_bench.py`` does; needs ``.[models]``).
Arms alternate job by job in one process, so the box's load hits them alike:

* ``one-row`` vs ``filler``: a lone sequence's decode step as one row, and as the two-row
  pass (a filler slot beside it) the engine takes where one-row passes round differently
  (int4 on AVX2-only x86; forced here on whatever CPU runs this);
* ``plain`` vs ``speculate`` vs ``speculate, never rests``: a prompt of 64 distinct ids,
  nothing to copy (the speculator rests after 8 dry steps, or never: every step a two-row pass).

Prints decode tokens/s (median over jobs) per arm, the ratios, and how many cores other
processes kept busy meanwhile.
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
sys.path.append(str(Path(__file__).resolve().parent.parent))  # the models tool

from engine_bench import _cpu_seconds, ensure_models, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--new", type=int, default=48)
    args = parser.parse_args()

    from agent.engine.engine import Engine, EngineOptions
    from agent.engine.sampling import SamplingParams
    from agent.engine.speculate import Speculator

    path = ensure_models(["int4"])["int4"]
    base = EngineOptions(threads=args.threads, prefix_cache_mb=0)
    one_row = Engine(path, base)
    filler = Engine(path, base)
    filler.even_rows = True
    one_row.even_rows = False
    spec = Engine(path, base.model_copy(update={"speculate": True}))
    spec.even_rows = False
    params = SamplingParams(max_tokens=args.new, ignore_eos=True)
    rest_after = Speculator.REST_AFTER

    def never_rests(ids: list[int]) -> Any:
        Speculator.REST_AFTER = 10**9
        try:
            return spec.generate(ids, params)
        finally:
            Speculator.REST_AFTER = rest_after

    arms: dict[str, Any] = {
        "one-row": lambda ids: one_row.generate(ids, params),
        "filler": lambda ids: filler.generate(ids, params),
        "speculate": lambda ids: spec.generate(ids, params),
        "speculate, never rests": never_rests,
    }
    rates: dict[str, list[float]] = {name: [] for name in arms}
    tokens: dict[str, list[list[int]]] = {name: [] for name in arms}
    (box0, own0), t0 = _cpu_seconds(), time.perf_counter()
    for round_ in range(args.rounds):
        for job in range(args.jobs):
            ids = [7 + (i * 37 + (round_ * args.jobs + job) * 64) % 441 for i in range(64)]
            order = list(arms)[job % len(arms) :] + list(arms)[: job % len(arms)]
            for name in order:
                out = arms[name](ids)
                rates[name].append(out.timings.decode_tokens_per_s)
                tokens[name].append(out.token_ids)
    (box1, own1), t1 = _cpu_seconds(), time.perf_counter()
    median = {name: statistics.median(v) for name, v in rates.items()}
    report = {
        "machine": machine(),
        "other_cores": round(max(0.0, (box1 - box0) - (own1 - own0)) / (t1 - t0), 2),
        "decode_tok_s": {k: round(v, 2) for k, v in median.items()},
        "filler / one-row": round(median["filler"] / median["one-row"], 3),
        "speculate / plain": round(median["speculate"] / median["one-row"], 3),
        "never rests / plain": round(median["speculate, never rests"] / median["one-row"], 3),
        "same answers filler vs one-row": sum(
            a == b for a, b in zip(tokens["filler"], tokens["one-row"], strict=True)
        ),
        "jobs": len(rates["one-row"]),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
