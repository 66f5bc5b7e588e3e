"""The row-keeping export against the full-logits and the pruned ones: prefill, decode and speculation.

Run as ``python bench/logits_rows_bench.py [--checkpoint HF_DIR] [--rounds 3] [--tokens 1024]
[--new 32] [--threads 2] [--copy]``.  Hold ``flock /work/wt/bench.lock`` on a shared box.

Models: ``models.convert`` (int4, blocks of 128, int8 embedding: its defaults) of engine_bench's
Phi-3-mini-shaped 4-layer checkpoint (random weights; ``--checkpoint`` names another copy of it),
three ways: ``kept`` (the default: ``num_logits_to_keep``), ``full`` (``--full-prefill-logits``) and
``last`` (``--last-position-logits``, onnxruntime-genai's pruned lm_head); built once into
``bench/models/``.  Per round (the arms' order rotating), every arm runs a cold prefill of
``--tokens`` fresh ids (prefix cache off) and ``--new`` greedy tokens: plain on all three, and
speculating on ``kept`` and ``full`` (the pruned export cannot verify).  With ``--copy``, the
trained copy model padded to the same shapes (speculate_bench's ``copy (padded)``, its full-logits
export and a row-keeping copy of it) runs its quote/reformat jobs speculating: drafts accepted.
Reported: medians of prefill and decode tok/s, whole-job seconds, ratios against ``full``, whether
outputs were identical, and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent))

from engine_bench import MODELS_DIR, ensure_checkpoint, machine
from harness import save_report
from ttft_bench import _fresh

FLAGS = {"kept": [], "full": ["--full-prefill-logits"], "last": ["--last-position-logits"]}


def ensure_export(checkpoint: Path, kind: str) -> Path:
    """``models.convert`` of ``checkpoint`` (int4 defaults) with the lm_head ``kind``, built once."""
    from models import convert

    out = MODELS_DIR / f"phi3-mini-shape-4l-int4-{kind}"
    if (out / "genai_config.json").is_file():
        return out
    partial = out.with_name(out.name + ".partial")
    print(f"building {out.name} ...", file=sys.stderr, flush=True)
    convert.main([str(checkpoint), str(partial), "--precision", "int4", "--force", *FLAGS[kind]])
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def ensure_kept_copy(full: Path) -> Path:
    """A row-keeping copy of the full-logits export ``full`` (only its graph differs)."""
    from models import logits_rows

    out = full.with_name(full.name + "-kept")
    if not (out / "genai_config.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(full, out)
        logits_rows.keep_rows(out)
    return out


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_arms(
    arms: dict[str, Any], jobs: list[tuple[list[int], int]], rounds: int, same_as: dict[str, str]
) -> dict[str, Any]:
    """Each arm (engine, speculate) on every job, arms rotating; medians per arm.

    ``same_as``: the arm whose outputs each arm's are compared with (token for token).
    """
    from agent.engine.sampling import SamplingParams

    stats: dict[str, dict[str, list[float]]] = {
        name: {"prefill": [], "decode": [], "job_s": []} for name in arms
    }
    outputs: dict[str, list[list[int]]] = {name: [] for name in arms}
    drafted = {name: 0 for name in arms}
    accepted = {name: 0 for name in arms}
    names = list(arms)
    for round_ in range(rounds):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for ids, new in jobs:
            for name in order:
                engine, speculate = arms[name]
                engine.options = engine.options.model_copy(update={"speculate": speculate})
                started = time.perf_counter()
                out = engine.generate(ids, SamplingParams(max_tokens=new, ignore_eos=True))
                stats[name]["job_s"].append(time.perf_counter() - started)
                stats[name]["prefill"].append(out.timings.prefill_tokens_per_s)
                stats[name]["decode"].append(out.timings.decode_tokens_per_s)
                outputs[name].append(out.token_ids)
                drafted[name] += out.drafted_tokens
                accepted[name] += out.accepted_tokens
    return {
        name: {
            "prefill_tok_s": statistics.median(s["prefill"]),
            "decode_tok_s": statistics.median(s["decode"]),
            "job_s": statistics.median(s["job_s"]),
            "drafted": drafted[name],
            "accepted": accepted[name],
            "same_as": same_as[name],
            "same_outputs": sum(a == b for a, b in zip(outputs[name], outputs[same_as[name]], strict=True)),
            "runs": len(outputs[name]),
        }
        for name, s in stats.items()
    }


def table(title: str, rows: dict[str, Any], base: str) -> str:
    b = rows[base]
    lines = [
        f"### {title}",
        "",
        f"| arm | prefill tok/s | x {base} | decode tok/s | x {base} | job s | drafted / accepted | same output as |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['prefill_tok_s']:.0f} | {r['prefill_tok_s'] / b['prefill_tok_s']:.3f} | "
            f"{r['decode_tok_s']:.1f} | {r['decode_tok_s'] / b['decode_tok_s']:.3f} | {r['job_s']:.2f} | "
            f"{r['drafted']} / {r['accepted']} | {r['same_as']}: {r['same_outputs']}/{r['runs']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="engine_bench's HF checkpoint (default: build it)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--copy", action="store_true", help="also the padded copy model, speculating")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args(argv)
    from agent.engine.engine import Engine, EngineOptions
    from agent.engine.sampling import SamplingParams

    checkpoint = args.checkpoint or ensure_checkpoint()
    paths = {kind: ensure_export(checkpoint, kind) for kind in FLAGS}
    options = EngineOptions(threads=args.threads, prefix_cache_mb=0)
    engines = {kind: Engine(path, options) for kind, path in paths.items()}
    arms = {
        "full": (engines["full"], False),
        "kept": (engines["kept"], False),
        "last (pruned)": (engines["last"], False),
        "full, speculating": (engines["full"], True),
        "kept, speculating": (engines["kept"], True),
    }
    jobs = [(_fresh(args.tokens, salt), args.new) for salt in range(1, 3)]
    for engine in engines.values():  # warm-up: the weights repacked, the arena grown
        engine.generate(_fresh(64, 99), SamplingParams(max_tokens=2))
    report: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    report["load_before"] = _load()
    spec = "full, speculating"
    report["edge"] = run_arms(arms, jobs, args.rounds, {n: spec if "spec" in n else "full" for n in arms})
    report["load_after_edge"] = _load()
    text = [
        table(
            f"Phi-3-mini-shaped 4 layers, int4 b128, {args.tokens}-token cold prefill + {args.new} tokens",
            report["edge"],
            "full",
        )
    ]
    if args.copy:
        from speculate_bench import ensure_padded, workload

        del engines, arms
        full_path = ensure_padded("int4")
        copies = {"full": Engine(full_path, options), "kept": Engine(ensure_kept_copy(full_path), options)}
        copy_jobs = workload("copy", copies["full"], 6)
        for engine in copies.values():
            engine.generate(copy_jobs[0][0], SamplingParams(max_tokens=2))
        copy_arms = {
            "full, speculating": (copies["full"], True),
            "kept, speculating": (copies["kept"], True),
            "kept, plain": (copies["kept"], False),
        }
        report["copy"] = run_arms(copy_arms, copy_jobs, args.rounds, dict.fromkeys(copy_arms, spec))
        report["load_after_copy"] = _load()
        text.append(
            table(
                "copy model padded to Phi-3-mini widths (4 layers, int4 block 32), copy jobs",
                report["copy"],
                "full, speculating",
            )
        )
    text.append(
        f"\nload average before {report['load_before']}, after {report.get('load_after_copy', report['load_after_edge'])}"
    )
    print("\n\n".join(text))
    save_report(args.out, "logits_rows", report, "\n\n".join(text))
    print(json.dumps({k: v for k, v in report.items() if k.startswith("load")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
