"""Prefill levers one at a time: the engine against llama.cpp on the same weights, in the same run.

Run as ``python bench/prefill_levers.py [--levers NAME ...] [--rounds 2] [--threads 2]
[--tokens 1024] [--new 32]`` (``--list`` names the levers).  Hold ``flock /work/wt/bench.lock``
on a shared box.

Model: engine_bench's Phi-3-mini-shaped 4-layer checkpoint (random weights); each lever is an
ONNX export of it (built once into ``bench/models/``, named after its builder options), the
engine's options and onnxruntime session entries.  llama.cpp runs the GGUF of the same
checkpoint (Q4_0 against int4, Q8_0 against int8; build them with ``batch_bench.py
--llama-src``), as ``ttft_bench.py`` drives it: batches of 512, logits for the last prompt
token only, the engine's thread count.  Per lever and round the two arms run back to back
(order alternating): a cold prefill of ``--tokens`` fresh ids (prefix cache off), then ``--new``
greedy tokens.  Each row reports the load average before and after and the cores other
processes kept busy (``other_cores``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent))

import hf_export
from engine_bench import MODELS_DIR, _cpu_seconds, ensure_checkpoint, machine, model_dir
from harness import save_report
from ttft_bench import Llama, _fresh, _other_cores


@dataclasses.dataclass(frozen=True)
class Lever:
    """One change against the baseline (engine_bench's export, the engine's defaults)."""

    precision: str = "int4"
    export: tuple[tuple[str, object], ...] = ()  # builder extra options; () = engine_bench's export
    options: tuple[tuple[str, object], ...] = ()  # EngineOptions fields
    config: tuple[tuple[str, str], ...] = ()  # onnxruntime session config entries
    pin: bool = False  # main thread on CPU 0 while the engine runs, its worker on CPU 1


PRUNED: tuple[tuple[str, object], ...] = (("prune_lm_head", True),)
LEVERS: dict[str, Lever] = {
    "baseline (full logits, int4 lm_head, block 32, acc 4)": Lever(),
    "pruned lm_head": Lever(export=PRUNED),
    "pruned + block 16": Lever(export=(*PRUNED, ("block_size", 16))),
    "pruned + block 64": Lever(export=(*PRUNED, ("block_size", 64))),
    "pruned + block 128": Lever(export=(*PRUNED, ("block_size", 128))),
    "pruned + block 256": Lever(export=(*PRUNED, ("block_size", 256))),
    "pruned + block 128, k_quant": Lever(export=(*PRUNED, ("block_size", 128), ("algo_config", "k_quant"))),
    "pruned + accuracy 1 (fp32 activations)": Lever(export=(*PRUNED, ("accuracy_level", 1))),
    "pruned + chunk 256": Lever(export=PRUNED, options=(("prefill_chunk_tokens", 256),)),
    "pruned + chunk 1024": Lever(export=PRUNED, options=(("prefill_chunk_tokens", 1024),)),
    "pruned + no spinning": Lever(export=PRUNED, options=(("spin_us", 0),)),
    "pruned + pinned threads": Lever(export=PRUNED, pin=True),
    "pruned + dynamic block scheduling": Lever(export=PRUNED, config=(("session.dynamic_block_base", "4"),)),
    "int8 baseline (full logits)": Lever(precision="int8"),
    "int8 pruned lm_head": Lever(precision="int8", export=PRUNED),
    "int8 pruned + block 128": Lever(precision="int8", export=(*PRUNED, ("block_size", 128))),
}


def export_dir(lever: Lever) -> Path:
    """The lever's model folder (engine_bench's own when the export is the baseline's)."""
    if not lever.export:
        return model_dir(lever.precision)
    tag = "-".join(f"{k}{'' if v is True else v}" for k, v in sorted(lever.export))
    return MODELS_DIR / f"{model_dir(lever.precision).name}-{tag.replace('_', '')}"


def ensure_export(lever: Lever) -> Path:
    from engine_bench import ensure_models

    from models import builder, fixtures

    if not lever.export:
        return ensure_models([lever.precision])[lever.precision]
    checkpoint = ensure_checkpoint()
    out = export_dir(lever)
    if hf_export.fresh(out / "genai_config.json", checkpoint):
        return out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"building {out.name} ...", file=sys.stderr, flush=True)
    builder.build(checkpoint, partial, lever.precision, dict(lever.export), quiet=True)
    builder.set_eos(partial, fixtures.EOS_IDS)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


class Ours:
    """The engine on the lever's export, options and session entries; prefix cache off (every run cold)."""

    def __init__(self, lever: Lever, threads: int) -> None:
        from agent.engine.engine import Engine, EngineOptions
        from agent.engine.sampling import SamplingParams

        config = dict(lever.config)
        if lever.pin:
            config["session.intra_op_thread_affinities"] = "2"  # the one worker (1-based ids)

        class Configured(Engine):
            def _session_options(self) -> Any:
                so = super()._session_options()
                for key, value in config.items():
                    so.add_session_config_entry(key, value)
                return so

        options = EngineOptions(threads=threads, prefix_cache_mb=0, **dict(lever.options))
        self.engine = Configured(ensure_export(lever), options)
        self.params = SamplingParams
        self.pin = lever.pin
        self.speeds(_fresh(64, 999), 4)  # warm-up: first allocations

    def speeds(self, ids: list[int], new: int) -> tuple[float, float]:
        mask = os.sched_getaffinity(0)
        if self.pin:
            os.sched_setaffinity(0, {0})
        try:
            out = self.engine.generate(ids, self.params(max_tokens=new + 1, ignore_eos=True))
        finally:
            os.sched_setaffinity(0, mask)
        return out.timings.prefill_tokens_per_s, out.timings.decode_tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--levers", nargs="*", default=None, help="names (or unique prefixes) of levers to run"
    )
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args()
    if args.list:
        print("\n".join(LEVERS))
        return
    names = list(LEVERS) if not args.levers else [_pick(p) for p in args.levers]
    print(json.dumps(machine()), flush=True)
    llamas: dict[str, Llama] = {}
    rows: list[dict[str, Any]] = []
    for name in names:
        lever = LEVERS[name]
        ours = Ours(lever, args.threads)
        if lever.precision not in llamas:
            kind = {"int4": "Q4_0", "int8": "Q8_0"}[lever.precision]
            gguf = hf_export.gguf_path(MODELS_DIR / "phi3-mini-shape-4l", kind)
            llamas[lever.precision] = Llama(args.threads, args.tokens + args.new + 64, False, gguf)
            llamas[lever.precision].speeds(_fresh(64, 998), 4)
        arms: list[tuple[str, Any]] = [("engine", ours), ("llama.cpp", llamas[lever.precision])]
        for rnd in range(args.rounds):
            load0, s, t0 = os.getloadavg()[0], _cpu_seconds(), time.perf_counter()
            got: dict[str, tuple[float, float]] = {}
            for arm, runner in arms if rnd % 2 == 0 else arms[::-1]:
                got[arm] = runner.speeds(_fresh(args.tokens, 100 * len(rows) + (arm == "engine")), args.new)
            row = {
                "lever": name,
                "round": rnd,
                "engine_prefill": round(got["engine"][0], 1),
                "llama_prefill": round(got["llama.cpp"][0], 1),
                "ratio": round(got["engine"][0] / got["llama.cpp"][0], 3),
                "engine_decode": round(got["engine"][1], 1),
                "llama_decode": round(got["llama.cpp"][1], 1),
                "load": f"{load0:.2f}-{os.getloadavg()[0]:.2f}",
                "other_cores": round(_other_cores(s, t0), 2),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        del ours
    head = "| lever | round | engine prefill | llama.cpp prefill | ratio | engine decode | llama.cpp decode | load | other cores |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    lines += [
        f"| {r['lever']} | {r['round']} | {r['engine_prefill']} | {r['llama_prefill']} | {r['ratio']:.2f} | "
        f"{r['engine_decode']} | {r['llama_decode']} | {r['load']} | {r['other_cores']} |"
        for r in rows
    ]
    text = "\n".join([json.dumps(machine()), *lines])
    print(text)
    save_report(args.out, "prefill_levers", {"machine": machine(), "rows": rows}, text)


def _pick(prefix: str) -> str:
    if prefix in LEVERS:
        return prefix
    found = [n for n in LEVERS if n.startswith(prefix)]
    if len(found) != 1:
        raise SystemExit(f"{prefix!r} names {len(found)} levers: {found or list(LEVERS)}")
    return found[0]


if __name__ == "__main__":
    main()
