"""Prompt-lookup speculative decoding vs plain decoding, on the copy-task model and an edge-sized one.

Run as ``python bench/speculate_bench.py [--threads 2] [--rounds 3] [--jobs 6] [--out bench/out]``.

Workloads (greedy; plain and speculative engines alternate, same threads):

* ``copy`` -- the trained copy model (``models/copy``, ``python -m models.copy_task``)
  on quote and reformat jobs, whose answers are spans of their prompts;
* ``extract`` -- the same model on extraction jobs (short answers);
* ``recite`` -- the quickstart demo model (``models/demo``), whose training text it
  knows by heart, asked to repeat that text, which its prompt holds: a trained model
  whose output copies its prompt, without the copy model;
* ``nothing-to-copy`` -- the Phi-3-mini-shaped 4-layer int4 model (random weights,
  engine_bench's) on a prompt with no repeats: drafts are rare and always refused,
  so this measures what speculation costs when it cannot help.

Reported per workload: decode tok/s plain and speculative (median over jobs and
rounds) and their ratio, acceptance rate (accepted / drafted), tokens per pass.
``edge projection``: the copy workload's passes (how many tokens each verified),
priced at the edge-sized model's measured cost of a pass over ``n`` tokens
against one -- a projection for a model of Phi-3-mini's layer shapes that copied
as well as the copy model does, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent))  # the models tool (models/ has an __init__)

from batch_bench import verify_cost
from engine_bench import _cpu_seconds, ensure_models, machine, prompt_ids

ROOT = Path(__file__).resolve().parent.parent
COPY_MODEL = ROOT / "models" / "copy"


def _pass_sizes() -> Counter[int]:
    """Wrap Speculator.step to count passes by the number of tokens they fed."""
    from agent.engine import speculate

    sizes: Counter[int] = Counter()
    step = speculate.Speculator.step

    def counted(self: Any, token: int, past: int, limit: int) -> list[int]:
        before = self.drafted
        out: list[int] = step(self, token, past, limit)
        sizes[1 + self.drafted - before] += 1
        return out

    speculate.Speculator.step = counted  # type: ignore[method-assign]
    return sizes


def workload(kind: str, engine: Any, count: int) -> list[tuple[list[int], int]]:
    """(prompt ids, max new tokens) for ``count`` jobs."""
    if kind == "nothing-to-copy":
        return [(prompt_ids(64 + j)[j:], 48) for j in range(count)]
    if kind == "recite":
        from models.demo_corpus import EDGE_TEXT

        lines = EDGE_TEXT.splitlines()
        out = []
        for j in range(count):
            start = " ".join(lines[j % len(lines)].split()[:4])
            text = f"Here is a text:\n{EDGE_TEXT}\nThe same text again:\n{start}"
            out.append((engine.prompt_ids(text), 120))
        return out
    from models.copy_task import job

    rng = random.Random(7)
    kinds = ["quote", "reformat"] if kind == "copy" else ["extract"]
    out = []
    for j in range(count):
        prompt, _answer = job(rng, kinds[j % len(kinds)])
        out.append(([1, *engine.tokenizer.encode(prompt, add_special_tokens=False)], 160))
    return out


def measure(kind: str, path: Path, args: argparse.Namespace, sizes: Counter[int]) -> dict[str, Any]:
    from agent.engine.engine import Engine, EngineOptions
    from agent.engine.sampling import SamplingParams

    plain = Engine(path, EngineOptions(threads=args.threads))
    spec = Engine(path, EngineOptions(threads=args.threads, speculate=True))
    jobs = workload(kind, plain, args.jobs)
    ignore_eos = kind == "nothing-to-copy"
    for engine in (plain, spec):  # warm-up
        engine.generate(jobs[0][0], SamplingParams(max_tokens=8, ignore_eos=ignore_eos))
    sizes.clear()
    speeds: dict[str, list[float]] = {"plain": [], "spec": []}
    drafted = accepted = tokens = 0
    box0, own0 = _cpu_seconds()
    t0 = time.perf_counter()
    for round_ in range(args.rounds):
        for ids, new in jobs:
            params = SamplingParams(max_tokens=new, ignore_eos=ignore_eos)
            order = [("plain", plain), ("spec", spec)]
            for name, engine in order if round_ % 2 == 0 else order[::-1]:
                out = engine.generate(ids, params)
                if out.completion_tokens > 1:
                    speeds[name].append(out.timings.decode_tokens_per_s)
                if name == "spec":
                    drafted += out.drafted_tokens
                    accepted += out.accepted_tokens
                    tokens += max(0, out.completion_tokens - 1)
    box1, own1 = _cpu_seconds()
    passes = sum(sizes.values())
    p, s = statistics.median(speeds["plain"]), statistics.median(speeds["spec"])
    return {
        "plain_decode_tok_s": p,
        "spec_decode_tok_s": s,
        "speedup": s / p,
        "acceptance_rate": accepted / drafted if drafted else None,
        "tokens_per_pass": tokens / passes if passes else 1.0,
        "pass_sizes": dict(sorted(sizes.items())),
        "others_cores": max(0.0, (box1 - box0) - (own1 - own0)) / (time.perf_counter() - t0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args(argv)
    have_copy = (COPY_MODEL / "genai_config.json").is_file()
    if not have_copy:
        print(
            f"{COPY_MODEL} is missing (python -m models.copy_task): copy workloads skipped", file=sys.stderr
        )
    edge = ensure_models(["int4"])["int4"]
    sizes = _pass_sizes()
    report: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    demo = ROOT / "models" / "demo"
    kinds = [("copy", COPY_MODEL), ("extract", COPY_MODEL)] if have_copy else []
    for kind, path in [*kinds, ("recite", demo), ("nothing-to-copy", edge)]:
        print(f"{kind} on {path.name} ...", file=sys.stderr, flush=True)
        r = report[kind] = measure(kind, path, args, sizes)
        rate = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.0%}"
        print(
            f"{kind:>16} ({path.name}): plain {r['plain_decode_tok_s']:.1f} tok/s, speculative "
            f"{r['spec_decode_tok_s']:.1f} tok/s = {r['speedup']:.2f}x; acceptance {rate}, "
            f"{r['tokens_per_pass']:.2f} tokens/pass; others kept {r['others_cores']:.1f} cores busy"
        )
    from agent.engine.engine import Engine, EngineOptions

    cost = verify_cost(Engine(edge, EngineOptions(threads=args.threads)), 64, list(range(1, 10)))
    source = "copy" if have_copy else "recite"
    copy = report[source]
    count = sum(copy["pass_sizes"].values())
    spec_time = sum(k * cost[min(n, 9)] for n, k in copy["pass_sizes"].items())
    plain_time = (copy["tokens_per_pass"] * count) * cost[1]
    report["edge_projection"] = {
        "workload": source,
        "cost_vs_one": {n: c / cost[1] for n, c in cost.items()},
        "projected_speedup": plain_time / spec_time,
    }
    print(
        f"edge projection ({source} workload's passes priced at {edge.name}'s pass costs): "
        f"{plain_time / spec_time:.2f}x; pass over n tokens vs one: "
        + ", ".join(f"{n}: {c / cost[1]:.2f}x" for n, c in cost.items())
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speculate_bench.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
