"""Prompt-lookup speculative decoding vs plain decoding, on the copy-task model and an edge-sized one.

Run as ``python bench/speculate_bench.py [--threads 2] [--rounds 3] [--jobs 6] [--out bench/out]``.

Workloads (greedy; plain and speculative engines alternate job by job, same threads):

* ``copy`` -- the trained copy model (``models/copy/int4`` and ``int8``, from
  ``python -m models.copy_task``) on quote and reformat jobs, whose answers are
  spans of their prompts;
* ``extract`` -- the same model on extraction jobs (short answers);
* ``copy (padded)`` -- the copy workload on ``models.edge_cost``'s padding of the
  same checkpoint to Phi-3-mini's layer shapes (4 layers, int4 and int8; built
  once into ``bench/models/``): the trained model's answers at the weight traffic
  of a Phi-3-mini-shaped 4-layer model;
* ``recite`` -- the quickstart demo model (``models/demo``) asked to repeat a text
  its prompt holds;
* ``nothing-to-copy`` -- the Phi-3-mini-shaped 4-layer int4 model (random weights,
  engine_bench's) on a prompt with no repeats: drafts are rare and always refused,
  so this measures what speculation costs when it cannot help (its steps feed
  two rows where plain decoding feeds one, see ``agent.engine.speculate``).

Reported per workload: decode tok/s plain and speculative (median over jobs and
rounds) and their ratio, acceptance rate (accepted / drafted), tokens per pass,
whether every speculative output equalled the plain one, and the cost of a pass
over ``n`` new tokens against one on the edge-sized model.
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


def ensure_padded(precision: str) -> Path:
    """The copy model padded to Phi-3-mini's layer shapes (models.edge_cost), exported once."""
    import shutil

    from engine_bench import MODELS_DIR

    out = MODELS_DIR / f"copy-padded-{precision}"
    if (out / "genai_config.json").is_file():
        return out
    hf = MODELS_DIR / "copy-padded-hf"
    if not (hf / "config.json").is_file():
        import subprocess

        partial = hf.with_name(hf.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        cmd = [sys.executable, "-m", "models.edge_cost", str(COPY_MODEL / "hf"), str(partial)]
        subprocess.run(cmd, check=True, cwd=ROOT)
        partial.rename(hf)
    from models.copy_task import export

    partial = out.with_name(out.name + ".partial")
    print(f"exporting {out.name} ...", file=sys.stderr, flush=True)
    export(hf, partial, precision)
    partial.rename(out)
    return out


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
    drafted = accepted = tokens = same = runs = 0
    box0, own0 = _cpu_seconds()
    t0 = time.perf_counter()
    for round_ in range(args.rounds):
        for ids, new in jobs:
            params = SamplingParams(max_tokens=new, ignore_eos=ignore_eos)
            order = [("plain", plain), ("spec", spec)]
            outs = {}
            for name, engine in order if round_ % 2 == 0 else order[::-1]:
                out = outs[name] = engine.generate(ids, params)
                if out.completion_tokens > 1:
                    speeds[name].append(out.timings.decode_tokens_per_s)
                if name == "spec":
                    drafted += out.drafted_tokens
                    accepted += out.accepted_tokens
                    tokens += max(0, out.completion_tokens - 1)
            same += outs["plain"].token_ids == outs["spec"].token_ids
            runs += 1
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
        "identical_outputs": f"{same}/{runs}",
        "new_tokens_per_job": tokens / (runs or 1),
        "others_cores": max(0.0, (box1 - box0) - (own1 - own0)) / (time.perf_counter() - t0),
    }


def measure_batched(kind: str, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The workload's jobs ``--batch`` at a time through one scheduler, plain vs speculating (same jobs).

    Tokens generated per second of wall time, prefill included (the same for both arms).
    """
    from agent.engine.batch import Batcher
    from agent.engine.engine import Engine, EngineOptions
    from agent.engine.sampling import SamplingParams

    engines = {
        "plain": Engine(path, EngineOptions(threads=args.threads)),
        "spec": Engine(path, EngineOptions(threads=args.threads, speculate=True)),
    }
    jobs = workload(kind, engines["plain"], args.batch)
    ignore_eos = kind == "nothing-to-copy"
    rates: dict[str, list[float]] = {"plain": [], "spec": []}
    outputs: dict[str, list[list[int]]] = {}
    box0, own0 = _cpu_seconds()
    t0 = time.perf_counter()
    for round_ in range(args.rounds):
        order = list(engines.items())
        for name, engine in order if round_ % 2 == 0 else order[::-1]:
            batcher = Batcher(engine, max_batch=args.batch, speculate=name == "spec", slot_tokens=1024)
            started = time.perf_counter()
            done = batcher.generate_all(
                [(ids, SamplingParams(max_tokens=new, ignore_eos=ignore_eos)) for ids, new in jobs]
            )
            rates[name].append(sum(c.completion_tokens for c in done) / (time.perf_counter() - started))
            outputs[name] = [c.token_ids for c in done]
    box1, own1 = _cpu_seconds()
    p, s = statistics.median(rates["plain"]), statistics.median(rates["spec"])
    same = sum(a == b for a, b in zip(outputs["plain"], outputs["spec"], strict=True))
    return {
        "batch": args.batch,
        "plain_tok_s": p,
        "spec_tok_s": s,
        "speedup": s / p,
        "identical_outputs": f"{same}/{len(jobs)}",
        "others_cores": max(0.0, (box1 - box0) - (own1 - own0)) / (time.perf_counter() - t0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--precisions", nargs="+", default=["int4", "int8"])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument("--batch", type=int, default=0, help="also run the jobs N at a time (batched)")
    parser.add_argument("--only", nargs="*", default=None, help="workloads to run (default: all)")
    args = parser.parse_args(argv)
    if not (COPY_MODEL / "hf" / "config.json").is_file():
        raise SystemExit(f"{COPY_MODEL} is missing: python -m models.copy_task")
    edge = ensure_models(["int4"])["int4"]
    runs: list[tuple[str, Path]] = []
    for precision in args.precisions:
        runs += [
            (f"copy {precision}", COPY_MODEL / precision),
            (f"extract {precision}", COPY_MODEL / precision),
            (f"copy (padded) {precision}", ensure_padded(precision)),
        ]
    runs += [("recite", ROOT / "models" / "demo"), ("nothing-to-copy", edge)]
    if args.only:
        runs = [(kind, path) for kind, path in runs if kind in args.only]
    sizes = _pass_sizes()
    report: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    for kind, path in runs:
        print(f"{kind} on {path.name} ...", file=sys.stderr, flush=True)
        r = report[kind] = measure(kind.split(" ")[0], path, args, sizes)
        rate = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.0%}"
        print(
            f"{kind:>22} ({path.name}): plain {r['plain_decode_tok_s']:.1f} tok/s, speculative "
            f"{r['spec_decode_tok_s']:.1f} tok/s = {r['speedup']:.2f}x; acceptance {rate}, "
            f"{r['tokens_per_pass']:.2f} tokens/pass, {r['new_tokens_per_job']:.0f} tokens/job, "
            f"identical {r['identical_outputs']}; others kept {r['others_cores']:.1f} cores busy",
            flush=True,
        )
        if args.batch > 1:
            b = report[f"{kind}, {args.batch} at a time"] = measure_batched(kind.split(" ")[0], path, args)
            print(
                f"{kind:>22} ({path.name}), {args.batch} at a time: plain {b['plain_tok_s']:.1f} tok/s, "
                f"speculative {b['spec_tok_s']:.1f} tok/s = {b['speedup']:.2f}x; identical "
                f"{b['identical_outputs']}; others kept {b['others_cores']:.1f} cores busy",
                flush=True,
            )
    from agent.engine.engine import Engine, EngineOptions

    cost = verify_cost(Engine(edge, EngineOptions(threads=args.threads)), 64, list(range(1, 10)))
    report["verify_cost_vs_one"] = {n: c / cost[1] for n, c in cost.items()}
    print(
        f"pass over n tokens vs one ({edge.name}): "
        + ", ".join(f"{n}: {c / cost[1]:.2f}x" for n, c in cost.items())
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speculate_bench.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
