"""Prefill and the prefix cache: engine vs llama.cpp (llama-cpp-python) vs onnxruntime-genai vs a bare loop.

Run as ``python bench/prefill_bench.py [--out bench/out] [--threads 2] [--prompts 512 1024 4096]
[--parts ttft prefill rss blocks]``.

The model is Llama-shaped (hidden 3072, 32 heads, 32 KV heads, MLP 8192, vocab
32064) with 4 layers and random weights: 650 M parameters, the issue's reference.
The checkpoint is built once with the models tool and cached in ``bench/models/``
with its exports: ONNX int4 by onnxruntime-genai's builder (full logits and
pruned, last-position logits) and GGUF Q4_0 by llama.cpp's converter and
quantizer, from the same weights.  The converter comes from llama-cpp-python's
sdist (``--llama-src``, a ``vendor/llama.cpp`` directory); the package itself
must be installed (``pip install llama-cpp-python``, built portable, see the note
in the README).  Nothing of llama.cpp is kept in this repository.

Parts (each measurement in a fresh subprocess, one run after a warm-up):

- ``ttft``: time to first token of a job = 1,000-token shared instruction +
  32-token input: cold, warm from memory (a new input after the same
  instruction), warm after a restart (a new process, from disk).  llama.cpp
  reuses the longest common prefix of its previous prompt (its prompt cache) and,
  after a restart, the state saved with ``save_state`` (what its server's slot
  save/restore does); onnxruntime-genai keeps nothing across requests.
- ``prefill``: cold prefill tokens/s at each ``--prompts`` length.
- ``chunks``: cold prefill tokens/s of 1,024 tokens for several chunk sizes.
- ``rss``: peak RSS of a 4,096-token prompt, chunked vs one pass.
- ``blocks``: warm time to first token for several cache block sizes.

The box is usually shared: every figure comes with the CPU time other processes
took meanwhile (``other_cores``); compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hf_export
from harness import save_report

BENCH_DIR = Path(__file__).resolve().parent
MODELS_DIR = BENCH_DIR / "models"
NAME = "llama-650m-4l"
SHAPE: dict[str, Any] = {
    **hf_export.PHI3_MINI_WIDTHS,
    "num_hidden_layers": 4,
    "max_position_embeddings": 8192,
}
SEED = 20240615
INSTRUCTION_TOKENS, INPUT_TOKENS = 1000, 32


# -- models ------------------------------------------------------------------------------


def hf_dir() -> Path:
    return MODELS_DIR / f"{NAME}-hf"


def onnx_dir(variant: str) -> Path:
    return MODELS_DIR / f"{NAME}-{variant}"


def gguf_path(kind: str) -> Path:
    return hf_export.gguf_path(MODELS_DIR / NAME, kind)


def ensure_checkpoint() -> Path:
    """The random-weight Llama checkpoint with the fixture tokenizer (built once)."""

    def config() -> Any:
        from transformers import LlamaConfig

        from models import fixtures, tokenizer

        return LlamaConfig(
            **SHAPE,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.BOS_ID,
            eos_token_id=fixtures.EOS_IDS,
            pad_token_id=tokenizer.PAD_ID,
        )

    return hf_export.ensure_checkpoint(hf_dir(), config, SEED)


VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "int4": ("int4", {}),
    "int4-pruned": ("int4", {"prune_lm_head": True}),
    "int8-pruned": ("int8", {"prune_lm_head": True}),
}


def ensure_onnx(variant: str) -> Path:
    """An onnxruntime-genai builder export of the checkpoint."""
    out = onnx_dir(variant)
    if (out / "genai_config.json").is_file():
        return out
    from models import builder, fixtures

    precision, extra = VARIANTS[variant]
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"exporting {out.name} ...", file=sys.stderr, flush=True)
    builder.build(ensure_checkpoint(), partial, precision, extra, quiet=True)
    builder.set_eos(partial, fixtures.EOS_IDS)
    partial.rename(out)
    return out


def ensure_gguf(kind: str, llama_src: Path | None) -> Path:
    """GGUF by llama.cpp's converter (f16) and quantizer (``kind``: Q4_0 or Q8_0)."""
    return hf_export.ensure_gguf(ensure_checkpoint(), MODELS_DIR / NAME, kind, llama_src)


def prompt_ids(n: int, salt: int = 0) -> list[int]:
    """``n`` ordinary ids of the fixture tokenizer (the same for every runner)."""
    return [7 + (i * 37 + salt * 101) % 441 for i in range(n)]


def job(salt: int) -> list[int]:
    """The shared instruction followed by input number ``salt``."""
    return prompt_ids(INSTRUCTION_TOKENS) + prompt_ids(INPUT_TOKENS, 1 + salt)


# -- runners: each returns seconds to the first token for a list of ids --------------------


def engine_runner(path: Path, threads: int, **options: Any) -> Callable[[list[int]], float]:
    from agent.engine.engine import Engine, EngineOptions
    from agent.engine.sampling import SamplingParams

    cache_dir = options.pop("cache_dir", None)
    engine = Engine(path, EngineOptions(threads=threads, **options), prefix_cache_dir=cache_dir)
    params = SamplingParams(max_tokens=1, ignore_eos=True)

    def run(ids: list[int]) -> float:
        started = time.perf_counter()
        engine.generate(ids, params)
        return time.perf_counter() - started

    run.engine = engine  # type: ignore[attr-defined]
    return run


def llama_runner(path: Path, threads: int, n_ctx: int) -> Callable[[list[int]], float]:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False
    )

    def run(ids: list[int]) -> float:
        started = time.perf_counter()
        # generate(reset=True) keeps the longest common prefix with the previous call's tokens.
        for _ in llm.generate(ids, top_k=1, reset=True):
            break
        return time.perf_counter() - started

    run.llm = llm  # type: ignore[attr-defined]
    return run


def genai_runner(path: Path, threads: int) -> Callable[[list[int]], float]:
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(str(path))
    options = {"intra_op_num_threads": threads}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    model = og.Model(config)

    def run(ids: list[int]) -> float:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + 1)
        started = time.perf_counter()
        gen = og.Generator(model, params)
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        gen.generate_next_token()
        gen.get_next_tokens()
        return time.perf_counter() - started

    return run


def bare_runner(path: Path, threads: int, n: int) -> Callable[[list[int]], float]:
    sys.path.insert(0, str(BENCH_DIR))
    from engine_bench import BareLoop

    def run(ids: list[int]) -> float:
        loop = BareLoop(path, ids, 1, threads)
        prefill_tok_s, _, _ = loop()
        return len(ids) / prefill_tok_s

    return run


# -- the parts (worker side) ------------------------------------------------------------------


def _other_cores(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``fn``; also return how many cores other processes kept busy meanwhile."""
    import resource

    def box() -> float:
        fields = Path("/proc/stat").read_text().split()[1:9]
        user, nice, system, _, _, irq, softirq, steal = map(int, fields)
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    def own() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    b0, o0, t0 = box(), own(), time.perf_counter()
    out = fn()
    b1, o1, t1 = box(), own(), time.perf_counter()
    return out, max(0.0, (b1 - b0) - (o1 - o0)) / (t1 - t0)


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement, described by ``spec`` (see ``main``)."""
    part, runner, threads = spec["part"], spec["runner"], spec["threads"]
    warmup = prompt_ids(64, 999)
    if part == "prefill":
        n = spec["tokens"]
        ids = prompt_ids(n)
        if runner.startswith("engine"):
            chunk = {"prefill_chunk_tokens": spec["chunk"]} if "chunk" in spec else {}
            run = engine_runner(Path(spec["model"]), threads, prefix_cache_mb=0, **chunk)
        elif runner == "llama":
            run = llama_runner(Path(spec["model"]), threads, n + 16)
        elif runner == "genai":
            run = genai_runner(Path(spec["model"]), threads)
        else:
            run = bare_runner(Path(spec["model"]), threads, n)
        run(warmup)
        seconds, other = _other_cores(lambda: run(ids))
        return {"seconds": seconds, "tok_s": n / seconds, "other_cores": other, "peak_rss_mb": _peak_rss_mb()}
    if part == "rss":
        n = spec["tokens"]
        run = engine_runner(
            Path(spec["model"]), threads, prefix_cache_mb=0, prefill_chunk_tokens=spec["chunk"]
        )
        seconds, other = _other_cores(lambda: run(prompt_ids(n)))
        return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb(), "other_cores": other}
    if part in ("ttft", "blocks"):
        model = Path(spec["model"])
        stage = spec["stage"]  # "first": cold then warm; "restart": warm from disk
        if runner == "engine":
            options: dict[str, Any] = {"cache_dir": spec["cache_dir"]}  # the default budget (256 MiB)
            if "block" in spec:
                options["prefix_block_tokens"] = spec["block"]
            t0 = time.perf_counter()
            run = engine_runner(model, threads, **options)
            load_s = time.perf_counter() - t0
            run(warmup)  # prepacking and first-touch, as a running daemon has done
            if stage == "first":
                run.engine.prefix_cache.clear()  # type: ignore[attr-defined]
                run.engine.release_kept()  # type: ignore[attr-defined]
                cold, other_c = _other_cores(lambda: run(job(0)))
                warm, other_w = _other_cores(lambda: run(job(1)))
                stats = run.engine.prefix_cache_stats()  # type: ignore[attr-defined]
                return {
                    "cold": cold,
                    "warm": warm,
                    "other_cores": max(other_c, other_w),
                    "load_s": load_s,
                    "cache_bytes": stats.bytes,
                    "cache_budget_bytes": stats.budget_bytes,
                    "cache_entries": stats.entries,
                    "peak_rss_mb": _peak_rss_mb(),
                }
            warm, other = _other_cores(lambda: run(job(2)))
            return {"restart": warm, "other_cores": other, "load_s": load_s}
        if runner == "llama":
            run = llama_runner(model, threads, INSTRUCTION_TOKENS + INPUT_TOKENS + 64)
            llm = run.llm  # type: ignore[attr-defined]
            run(warmup)
            state_file = Path(spec["cache_dir"]) / "llama-state.pickle"
            if stage == "first":
                cold, other_c = _other_cores(lambda: run(job(0)))
                warm, other_w = _other_cores(lambda: run(job(1)))
                t0 = time.perf_counter()
                state_file.write_bytes(pickle.dumps(llm.save_state()))
                save_s = time.perf_counter() - t0
                return {"cold": cold, "warm": warm, "other_cores": max(other_c, other_w), "save_s": save_s}

            def restore_then_run() -> float:
                started = time.perf_counter()
                llm.load_state(pickle.loads(state_file.read_bytes()))
                run(job(2))
                return time.perf_counter() - started

            warm, other = _other_cores(restore_then_run)
            return {"restart": warm, "other_cores": other}
        if runner == "genai":
            run = genai_runner(model, threads)
            run(warmup)
            cold, other_c = _other_cores(lambda: run(job(0)))
            warm, other_w = _other_cores(lambda: run(job(1)))
            return {"cold": cold, "warm": warm, "other_cores": max(other_c, other_w)}
    raise SystemExit(f"unknown measurement {spec}")


# -- the driver ----------------------------------------------------------------------------


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``spec`` in a fresh interpreter; its JSON result or the error."""
    print(
        f"  {spec['part']} {spec['runner']} {spec.get('tokens', spec.get('stage', ''))}",
        file=sys.stderr,
        flush=True,
    )
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=BENCH_DIR.parent)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}"}
    result = dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"    {result}", file=sys.stderr, flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Build what is missing, measure the parts asked for, print and save the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", nargs="+", type=int, default=[512, 1024, 4096])
    parser.add_argument("--parts", nargs="+", default=["ttft", "prefill", "chunks", "rss", "blocks"])
    parser.add_argument("--engine-variant", default="int4-pruned", choices=list(VARIANTS))
    parser.add_argument("--also-variants", nargs="*", default=["int4"], choices=list(VARIANTS))
    parser.add_argument("--gguf", default="Q4_0")
    parser.add_argument("--llama-src", type=Path, default=None, help="vendor/llama.cpp of the sdist")
    parser.add_argument("--prefill-runners", nargs="+", default=["engine", "llama", "bare", "genai"])
    parser.add_argument("--chunks", nargs="+", type=int, default=[256, 512, 1024])
    parser.add_argument(
        "--blocks-model", type=Path, default=None, help="model of the blocks part (default: the engine's)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    sys.path.insert(0, str(BENCH_DIR.parent))
    variant = ensure_onnx(args.engine_variant)
    others = {v: ensure_onnx(v) for v in args.also_variants}
    gguf = (
        ensure_gguf(args.gguf, args.llama_src) if args.llama_src or gguf_path(args.gguf).is_file() else None
    )
    common = {"threads": args.threads}
    report: dict[str, Any] = {"machine": _machine(), "threads": args.threads, "model": SHAPE, "results": {}}
    res = report["results"]
    if args.blocks_model is not None:
        report["blocks_model"] = str(args.blocks_model)
    with tempfile.TemporaryDirectory(prefix="prefill-bench-") as tmp:
        if "ttft" in args.parts:
            rows = {}
            for runner, model in (("engine", variant), ("llama", gguf), ("genai", variant)):
                if model is None:
                    continue
                cache_dir = Path(tmp) / runner
                cache_dir.mkdir()
                spec = {
                    **common,
                    "part": "ttft",
                    "runner": runner,
                    "model": str(model),
                    "cache_dir": str(cache_dir),
                }
                row = measure({**spec, "stage": "first"})
                if runner != "genai" and "error" not in row:
                    row |= measure({**spec, "stage": "restart"})
                rows[runner] = row
            res["ttft"] = rows
        if "prefill" in args.parts:
            rows = {}
            for n in args.prompts:
                for runner in args.prefill_runners:
                    model = gguf if runner == "llama" else variant
                    if model is None:
                        continue
                    rows[f"{runner}@{n}"] = measure(
                        {**common, "part": "prefill", "runner": runner, "model": str(model), "tokens": n}
                    )
                for name, path in others.items():
                    rows[f"engine-{name}@{n}"] = measure(
                        {**common, "part": "prefill", "runner": "engine", "model": str(path), "tokens": n}
                    )
            res["prefill"] = rows
        if "chunks" in args.parts:
            res["chunks"] = {
                str(chunk): measure(
                    {
                        **common,
                        "part": "prefill",
                        "runner": "engine",
                        "model": str(variant),
                        "tokens": 1024,
                        "chunk": chunk,
                    }
                )
                for chunk in args.chunks
            }
        if "rss" in args.parts:
            res["rss"] = {
                f"chunk {chunk}": measure(
                    {
                        **common,
                        "part": "rss",
                        "runner": "engine",
                        "model": str(others.get("int4", variant)),
                        "tokens": 4096,
                        "chunk": chunk,
                    }
                )
                for chunk in (512, 65536)
            }
        if "blocks" in args.parts:
            rows = {}
            for block in (8, 16, 32, 64):
                cache_dir = Path(tmp) / f"blocks-{block}"
                cache_dir.mkdir()
                rows[str(block)] = measure(
                    {
                        **common,
                        "part": "blocks",
                        "runner": "engine",
                        "model": str(args.blocks_model or variant),
                        "stage": "first",
                        "cache_dir": str(cache_dir),
                        "block": block,
                    }
                )
            res["blocks"] = rows
    text = markdown(report)
    print(text)
    save_report(args.out, "prefill_bench", report, text)
    return 0


def _machine() -> dict[str, Any]:
    import platform

    import onnxruntime

    flags = Path("/proc/cpuinfo").read_text()
    names = [ln.split(":", 1)[1].strip() for ln in flags.splitlines() if ln.startswith("model name")]
    try:
        import llama_cpp

        llama_version = llama_cpp.__version__
    except ImportError:
        llama_version = None
    return {
        "cpu": names[0] if names else platform.processor(),
        "logical_cores": os.cpu_count(),
        "avx512": "avx512f" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "onnxruntime": onnxruntime.__version__,
        "llama_cpp_python": llama_version,
        "load_average": os.getloadavg(),
    }


def _fmt(value: Any, scale: float = 1.0, digits: int = 2) -> str:
    return f"{value * scale:.{digits}f}" if isinstance(value, (int, float)) else "n/a"


def _table(
    header: list[str], rows: dict[str, dict[str, Any]], line: Callable[[str, dict[str, Any]], str]
) -> list[str]:
    """A Markdown table: ``header``, a line per row (an error where the runner failed), a blank line."""
    out = list(header)
    for key, row in rows.items():
        out.append(f"| {key} | error: {row['error'][-200:]} | | | | |" if "error" in row else line(key, row))
    return [*out, ""]


def markdown(report: dict[str, Any]) -> str:
    """Tables of the report, with ratios against llama.cpp."""
    m, res = report["machine"], report["results"]
    out = [
        f"Machine: {m['cpu']}, {m['logical_cores']} cores, AVX-512 {'yes' if m['avx512'] else 'no'} "
        f"(VNNI {'yes' if m['avx512_vnni'] else 'no'}); onnxruntime {m['onnxruntime']}, "
        f"llama-cpp-python {m['llama_cpp_python']}; {report['threads']} threads; "
        f"load average at start {', '.join(f'{x:.1f}' for x in m['load_average'])} (shared box).",
        "",
    ]
    if "ttft" in res:

        def ttft_line(runner: str, row: dict[str, Any]) -> str:
            ratio = row["warm"] / row["cold"] if row.get("cold") else None
            cache = (
                f"{row['cache_bytes'] / 2**20:.0f} / {row['cache_budget_bytes'] / 2**20:.0f} |"
                if "cache_bytes" in row
                else "n/a |"
            )
            return (
                f"| {runner} | {_fmt(row.get('cold'))} | {_fmt(row.get('warm'), digits=3)} | "
                f"{_fmt(row.get('restart'), digits=3)} | {_fmt(ratio, 100, 1)} % | {_fmt(row.get('other_cores'))} | "
                + cache
            )

        header = "| runner | cold s | warm (memory) s | warm (restart, disk) s | warm/cold | other cores | cache MiB / budget |"
        out += _table([header, "|---|---:|---:|---:|---:|---:|---:|"], res["ttft"], ttft_line)
    if "prefill" in res:

        def prefill_line(key: str, row: dict[str, Any]) -> str:
            llama = res["prefill"].get(f"llama@{key.split('@')[1]}", {}).get("tok_s")
            ratio = row["tok_s"] / llama if llama else None
            return (
                f"| {key} | {_fmt(row['seconds'])} | {_fmt(row['tok_s'], digits=1)} | {_fmt(ratio)} | "
                f"{_fmt(row['peak_rss_mb'], digits=0)} | {_fmt(row['other_cores'])} |"
            )

        header = "| runner@prompt | prefill s | tok/s | vs llama.cpp | peak RSS MB | other cores |"
        out += _table([header, "|---|---:|---:|---:|---:|---:|"], res["prefill"], prefill_line)
    if "chunks" in res:
        out += ["| prefill chunk (1,024 tokens) | tok/s | other cores |", "|---:|---:|---:|"]
        for chunk, row in res["chunks"].items():
            out.append(f"| {chunk} | {_fmt(row.get('tok_s'), digits=1)} | {_fmt(row.get('other_cores'))} |")
        out.append("")
    if "rss" in res:
        out += ["| 4,096-token prompt | peak RSS MB | prefill s |", "|---|---:|---:|"]
        for key, row in res["rss"].items():
            out.append(f"| {key} | {_fmt(row.get('peak_rss_mb'), digits=0)} | {_fmt(row.get('seconds'))} |")
        out.append("")
    if "blocks" in res:
        out += ["| block tokens | cached of 1,032 | warm s | cold s |", "|---:|---:|---:|---:|"]
        for block, row in res["blocks"].items():
            cached = INSTRUCTION_TOKENS // int(block) * int(block)
            out.append(
                f"| {block} | {cached} | {_fmt(row.get('warm'), digits=3)} | {_fmt(row.get('cold'))} |"
            )
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
