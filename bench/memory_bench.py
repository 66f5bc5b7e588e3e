"""Where the engine's memory goes: anonymous and file-backed resident memory by phase.

Each run is a child process that imports the runtime, loads the tokenizer,
opens the engine, prefills a prompt and decodes, printing a marker line after
each phase; the parent samples ``/proc/PID/status`` (RssAnon, RssFile, RssShmem)
every 50 ms and keeps, per phase, the peak and the value at the phase's end.
Anonymous memory is what the box must hold; file-backed pages (a memory-mapped
model) the kernel can drop and read again.

    python bench/memory_bench.py --layers 2 4 --variant default \
        --variant no-prepack:prepack_weights=false --prompt 512 --new 32 \
        --variant on-disk:prepacked_dir=bench/models/prepacked

``prepacked_dir``: the engine maps its weights repacked for this CPU from there
(``agent.engine.prepacked``); the first run makes the copy (its load is then the
repacking and the writing), the next ones map it.

Full size, the engine and llama.cpp on the same weights in one run (each ``--model`` is
measured in turn; a ``.gguf`` file runs llama.cpp): ``memory_deepen`` and ``gguf_deepen``
grow the 4-layer export and its Q4_0 GGUF to 32 layers (docs/memory.md, fifth round):

    python bench/memory_bench.py --model /work/cache/phi3-mini-shape-32l-int4-b128 \
        --model /work/cache/phi3-mini-shape-32l-q4_0.gguf \
        --variant on-disk:prepacked_dir=/work/cache/prepacked,prefix_cache_mb=0

Models are Phi-3-mini-shaped (full widths) with a few layers (``memory_models``);
the report fits ``a + b * layers`` through the layer counts measured and
extrapolates to 32 layers (every per-layer cost is linear in the layer count).
A child whose resident memory passes ``--limit-mb`` is killed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

PHASES = ("imports", "tokenizer", "load", "prefill", "decode")
FIELDS = ("RssAnon", "RssFile", "RssShmem")
_MiB = 1 << 20


def read_status(pid: int) -> dict[str, int] | None:
    """RssAnon, RssFile and RssShmem of ``pid`` in bytes (None once it has gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in FIELDS:
            values[key] = int(rest.split()[0]) * 1024
    return values if len(values) == len(FIELDS) else None


# -- the child ---------------------------------------------------------------------


def child(model: Path, options: dict[str, Any], prompt: int, new: int) -> None:
    """One measured run; prints a marker line after each phase."""

    def mark(phase: str, **extra: Any) -> None:
        print(json.dumps({"phase": phase, "t": time.time(), **extra}), flush=True)

    import numpy as np
    import onnxruntime  # noqa: F401

    from agent.engine.engine import Engine, EngineOptions
    from agent.engine.model_folder import ModelFolder
    from agent.engine.sampling import SamplingParams
    from agent.engine.tokenizer import Tokenizer

    mark("imports")
    folder = ModelFolder(model)
    tokenizer = Tokenizer(folder)
    mark("tokenizer")
    started, cpu = time.perf_counter(), time.process_time()
    prepacked = options.pop("prepacked_dir", None)  # the repacked copy's root (agent.engine.prepacked)
    engine = Engine(model, EngineOptions(**options), prepacked_dir=prepacked)
    mark("load", seconds=time.perf_counter() - started, cpu_seconds=time.process_time() - cpu)
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(7, engine._io.vocab, size=prompt)]
    del tokenizer

    def on_prefill(done: int, total: int) -> None:
        if done == total:
            mark("prefill")

    result = engine.generate(
        ids, SamplingParams(max_tokens=new, ignore_eos=True, temperature=0.0), on_prefill=on_prefill
    )
    mark(
        "decode",
        prefill_tok_s=result.timings.prefill_tokens_per_s,
        decode_tok_s=result.timings.decode_tokens_per_s,
        kv_dtype=str(np.dtype(engine._io.kv_dtype)),
    )


def llama_child(gguf: Path, prompt: int, new: int, threads: int, *, repack: bool = True) -> None:
    """The same run on llama.cpp (llama-cpp-python), for a GGUF file of the same weights.

    ``repack`` false: llama.cpp's "extra buffer types" off (``use_extra_bufts``: no repacked
    or AMX copy of the weights, which it then reads from the mapped file).
    """

    def mark(phase: str, **extra: Any) -> None:
        print(json.dumps({"phase": phase, "t": time.time(), **extra}), flush=True)

    import llama_cpp
    import llama_cpp.llama
    import numpy as np
    from llama_cpp import Llama

    if not repack:
        defaults = llama_cpp.llama_model_default_params

        def no_extra_buffers() -> Any:
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama.llama_cpp.llama_model_default_params = no_extra_buffers

    mark("imports")
    mark("tokenizer")
    started, cpu = time.perf_counter(), time.process_time()
    llm = Llama(model_path=str(gguf), n_ctx=prompt + new + 16, n_threads=threads, n_batch=512, verbose=False)
    mark("load", seconds=time.perf_counter() - started, cpu_seconds=time.process_time() - cpu)
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(7, llm.n_vocab(), size=prompt)]
    begun = time.perf_counter()
    tokens = llm.generate(ids, temp=0.0, reset=True)
    next(tokens)
    prefilled = time.perf_counter()
    mark("prefill")
    for _ in range(new - 1):
        next(tokens)
    done = time.perf_counter()
    mark(
        "decode",
        prefill_tok_s=prompt / (prefilled - begun),
        decode_tok_s=(new - 1) / (done - prefilled),
        kv_dtype="f16",
    )


# -- the parent --------------------------------------------------------------------


def measure(
    model: Path,
    options: dict[str, Any],
    prompt: int,
    new: int,
    limit_mb: int,
    *,
    preexec: Callable[[], None] | None = None,
    check: bool = True,
) -> dict[str, Any]:
    """Run one child and return per-phase peaks and end values (MiB), plus its markers.

    ``preexec`` runs in the child before it starts (``memory_fit`` puts it in a cgroup);
    ``check`` false: a failed child is reported (``exit``) instead of stopping the bench.
    """
    if model.suffix == ".gguf":
        cmd = [sys.executable, __file__, "--llama-child", str(model), "--threads", str(options["threads"])]
        cmd += [] if options.get("repack", True) else ["--llama-no-repack"]
    else:
        cmd = [sys.executable, __file__, "--child", str(model), "--options", json.dumps(options)]
    cmd += ["--prompt", str(prompt), "--new", str(new)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, preexec_fn=preexec)
    markers: list[dict[str, Any]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                markers.append(json.loads(line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peaks: dict[str, dict[str, int]] = {p: dict.fromkeys(FIELDS, 0) for p in PHASES}
    peak_total = {p: 0 for p in PHASES}
    ends: dict[str, dict[str, int]] = {}
    killed = False
    while proc.poll() is None:
        status = read_status(proc.pid)
        seen = len(markers)
        if status is not None and seen < len(PHASES):
            phase = PHASES[seen]
            for key in FIELDS:
                peaks[phase][key] = max(peaks[phase][key], status[key])
            peak_total[phase] = max(peak_total[phase], status["RssAnon"] + status["RssFile"])
            for done in PHASES[:seen]:
                ends.setdefault(done, status)
            if (status["RssAnon"] + status["RssFile"]) > limit_mb * _MiB:
                proc.kill()
                killed = True
        time.sleep(0.05)
    reader.join(timeout=5)
    if (proc.returncode != 0 or killed) and check:
        raise SystemExit(f"{model} {options}: child failed (exit {proc.returncode}, killed={killed})")
    out: dict[str, Any] = {"markers": markers, "exit": proc.returncode, "killed": killed}
    for phase in PHASES:
        out[phase] = {
            "peak_anon": peaks[phase]["RssAnon"] / _MiB,
            "peak_file": peaks[phase]["RssFile"] / _MiB,
            "peak_total": peak_total[phase] / _MiB,
            "end_anon": ends.get(phase, {}).get("RssAnon", 0) / _MiB,
            "end_file": ends.get(phase, {}).get("RssFile", 0) / _MiB,
        }
    return out


def fit(points: dict[int, float], layers: int) -> float:
    """``a + b * layers`` through the measured (layer count, value) points (least squares)."""
    xs, ys = list(points), list(points.values())
    if len(xs) == 1:
        return ys[0]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my + b * (layers - mx)


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``name:key=value,key=value`` as (name, engine options); values are JSON or plain strings."""
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name, options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--llama-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--llama-no-repack",
        action="store_true",
        help="llama.cpp without its repacked (extra buffer type) weights: it reads the mapped file",
    )
    parser.add_argument(
        "--gguf", default=None, help="also run llama.cpp on bench/models/<model>-<KIND>.gguf (e.g. q4_0)"
    )
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--precision", default="int4")
    parser.add_argument("--full-logits", action="store_true", help="the export with logits for every row")
    parser.add_argument("--model", type=Path, action="append", help="measure these folders instead")
    parser.add_argument(
        "--kv16", action="store_true", help="float16 KV (a copy rewritten by models.kv_dtype)"
    )
    parser.add_argument(
        "--kv8", action="store_true", help="calibrated int8 KV (a copy rewritten by models.kv_quant)"
    )
    parser.add_argument("--accuracy", type=int, default=4, help="the builder's int4_accuracy_level")
    parser.add_argument("--variant", action="append", default=[], help="name:key=value,... engine options")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit-mb", type=int, default=8000)
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument("--report", type=Path, nargs="+", help="print the table of earlier --json files")
    args = parser.parse_args(argv)
    if args.report:
        print(report(args.report, 32))
        return 0
    if args.child is not None:
        child(args.child, json.loads(args.options), args.prompt, args.new)
        return 0
    if args.llama_child is not None:
        llama_child(args.llama_child, args.prompt, args.new, args.threads, repack=not args.llama_no_repack)
        return 0
    import memory_models

    variants = [parse_variant(v) for v in args.variant or ["default"]]
    if args.model:
        models = {i: m for i, m in enumerate(args.model)}
    else:
        models = {
            n: memory_models.model(
                n,
                args.precision,
                pruned=not args.full_logits,
                kv16=args.kv16,
                kv8=args.kv8,
                accuracy=args.accuracy,
            )
            for n in args.layers
        }
    if args.gguf:  # llama.cpp on the same checkpoints (the GGUF files made by hf_export)
        import hf_export

        ggufs = {
            n: hf_export.gguf_path(memory_models.MODELS_DIR / f"phi3-mini-shape-{n}l", args.gguf)
            for n in models
        }
        name = f"llama.cpp {args.gguf}" + (" no repack" if args.llama_no_repack else "")
        variants.append((name, {"gguf": ggufs, "repack": not args.llama_no_repack}))
    results: dict[str, dict[int, Any]] = {}
    for name, options in variants:
        if "gguf" in options:
            for layers, path in options["gguf"].items():
                runner = {"threads": args.threads, "repack": options["repack"]}
                got = measure(path, runner, args.prompt, args.new, args.limit_mb)
                results.setdefault(name, {})[layers] = got
                print(f"{name} {path.name}: " + summary(got), flush=True)
            continue
        options.setdefault("threads", args.threads)
        for layers, path in models.items():
            got = measure(path, options, args.prompt, args.new, args.limit_mb)
            results.setdefault(name, {})[layers] = got
            print(f"{name} {path.name}: " + summary(got), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if not args.model and len(args.layers) > 1:
        print(table(results, 32))
    return 0


def summary(got: dict[str, Any]) -> str:
    parts = []
    for phase in PHASES:
        row = got[phase]
        parts.append(
            f"{phase} anon {row['peak_anon']:.0f} (end {row['end_anon']:.0f}) file {row['peak_file']:.0f}"
        )
    decode = got["markers"][-1]
    load = got["markers"][2].get("seconds", 0.0)
    cpu = got["markers"][2].get("cpu_seconds", 0.0)  # less sensitive than wall time to a busy box
    parts.append(
        f"load {load:.1f}s ({cpu:.1f}s CPU) prefill {decode['prefill_tok_s']:.1f} tok/s decode {decode['decode_tok_s']:.1f} tok/s"
    )
    return "; ".join(parts)


def table(results: dict[str, dict[int, Any]], layers: int) -> str:
    """MiB per variant: measured at each layer count, and fitted to ``layers`` layers.

    Columns: anonymous memory at the end of the load, its peak in prefill and in
    decode, the peak file-backed memory, and the peak of the two together.
    """
    keys = (("load", "end_anon"), ("prefill", "peak_anon"), ("decode", "peak_anon"))
    head = (
        "| variant | layers | load anon | prefill peak anon | decode peak anon | peak file | peak anon+file |"
    )
    lines = [head, "|---|---|---:|---:|---:|---:|---:|"]
    for name, by_layers in results.items():

        def row(values: dict[str, float]) -> str:
            cells = [values[f"{phase}.{key}"] for phase, key in keys]
            cells += [values["file"], values["total"]]
            return " | ".join(f"{v:.0f}" for v in cells)

        measured = {}
        for n, r in sorted(by_layers.items()):
            values = {f"{phase}.{key}": r[phase][key] for phase, key in keys}
            values["file"] = max(r[p]["peak_file"] for p in PHASES)
            values["total"] = max(r[p]["peak_total"] for p in PHASES)
            measured[n] = values
            lines.append(f"| {name} | {n} (measured) | {row(values)} |")
        if len(measured) > 1:
            fitted = {
                k: fit({n: v[k] for n, v in measured.items()}, layers) for k in next(iter(measured.values()))
            }
            lines.append(f"| {name} | **{layers} (fitted)** | {row(fitted)} |")
    return "\n".join(lines)


def report(paths: list[Path], layers: int) -> str:
    """The table of results written earlier with ``--json``."""
    results: dict[str, dict[int, Any]] = {}
    for path in paths:
        for name, by_layers in json.loads(path.read_text()).items():
            results.setdefault(name, {}).update({int(n): r for n, r in by_layers.items()})
    return table(results, layers)


if __name__ == "__main__":
    raise SystemExit(main())
