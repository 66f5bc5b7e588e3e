"""Engine vs onnxruntime-genai vs a bare onnxruntime loop on a Phi-3-mini-shaped model.

Run as ``python bench/engine_bench.py [--out bench/out] [--precisions int4 int8]
[--prompts 64 1024] [--new-tokens 128] [--threads 2] [--rounds 3]``.

The model has Phi-3-mini's layer shapes but 4 layers and random weights, built
once per precision with the models tool's builder and cached in ``bench/models/``.
Its tokenizer is the fixture tokenizer (448 ids): prompts use ids below 448 and
generated ids beyond it decode to nothing -- speed, not text, is measured.

Each measurement is a fresh subprocess (so peak RSS is one runner's): load, one
warm-up generation, ``--repeat`` measured ones; a run during which other
processes kept more than ``--max-other`` cores busy is redone.  The matrix is
measured ``--rounds`` times with the runner order rotating; speeds are medians
over all kept runs.  Greedy, eos never ends a run early.  Decode tok/s counts
single-token passes, (new tokens - 1) / decode time, for every runner.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hf_export
from harness import save_report

BENCH_DIR = Path(__file__).resolve().parent
MODELS_DIR = BENCH_DIR / "models"
RUNNERS: tuple[str, ...] = ("engine", "genai", "bare")
EXTRA_RUNNERS: tuple[str, ...] = ("engine-nospin", "genai-defaults")  # for investigations
SHAPE: dict[str, Any] = {
    **hf_export.PHI3_MINI_WIDTHS,
    "num_hidden_layers": 4,
    "max_position_embeddings": 4096,
}
SEED = 20240501
RunResult = tuple[float, float, int]  # prefill tok/s, decode tok/s, new tokens
RUN_KEYS = ("prefill_tok_s", "decode_tok_s", "new_tokens", "other_cpu_cores", "kept")
Runner = Callable[[], RunResult]


# -- model -------------------------------------------------------------------------


def model_dir(precision: str) -> Path:
    """Cached model folder for ``precision``."""
    return MODELS_DIR / f"phi3-mini-shape-{SHAPE['num_hidden_layers']}l-{precision}"


def checkpoint_dir() -> Path:
    """Cached Hugging Face checkpoint every export of this bench is built from."""
    return MODELS_DIR / f"phi3-mini-shape-{SHAPE['num_hidden_layers']}l-hf"


def ensure_checkpoint() -> Path:
    """The random-weight checkpoint (built once; GGUF exports for llama.cpp come from it too)."""

    def config() -> Any:
        from transformers import Phi3Config

        from models import fixtures, tokenizer

        # original == max keeps the builder off the LongRoPE path (it crashes there).
        return Phi3Config(
            **SHAPE,
            original_max_position_embeddings=SHAPE["max_position_embeddings"],
            tie_word_embeddings=False,
            bos_token_id=tokenizer.BOS_ID,
            eos_token_id=fixtures.EOS_IDS,
            pad_token_id=tokenizer.PAD_ID,
        )

    return hf_export.ensure_checkpoint(checkpoint_dir(), config, SEED)


def ensure_models(precisions: Sequence[str]) -> dict[str, Path]:
    """Build the missing (or older than the checkpoint) model folders, all from one checkpoint."""
    import shutil

    from models import builder, fixtures

    checkpoint = ensure_checkpoint()
    for precision in precisions:
        out = model_dir(precision)
        if hf_export.fresh(out / "genai_config.json", checkpoint):
            continue
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        print(f"building {out.name} ...", file=sys.stderr, flush=True)
        builder.build(checkpoint, partial, precision, quiet=True)
        builder.set_eos(partial, fixtures.EOS_IDS)
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
    return {p: model_dir(p) for p in precisions}


def prompt_ids(n: int) -> list[int]:
    """A fixed prompt of ``n`` ordinary (non-special) ids of the fixture tokenizer."""
    return [7 + (i * 37) % 441 for i in range(n)]


# -- runners (each in its own subprocess) -----------------------------------------


def run_engine(path: Path, prompt: list[int], new: int, threads: int, spin: bool = True) -> Runner:
    """agent.Engine with its default options (``spin=False``: no spinning), driven as ``bench`` does."""
    from agent.engine.engine import Engine, EngineOptions
    from agent.engine.sampling import SamplingParams

    engine = Engine(path, EngineOptions(threads=threads, **({} if spin else {"spin_us": 0})))
    params = SamplingParams(max_tokens=new, ignore_eos=True)

    def once() -> RunResult:
        t = engine.generate(prompt, params)
        return t.timings.prefill_tokens_per_s, t.timings.decode_tokens_per_s, t.completion_tokens

    return once


def run_genai(path: Path, prompt: list[int], new: int, threads: int | None) -> Runner:
    """onnxruntime-genai with its own session defaults, except ``threads`` unless None."""
    import onnxruntime_genai as og

    config = og.Config(str(path))
    if threads is not None:
        options = {"intra_op_num_threads": threads}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    model = og.Model(config)
    total, tokens = len(prompt) + new, np.asarray(prompt, dtype=np.int32)

    def once() -> RunResult:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        gen = og.Generator(model, params)
        started = time.perf_counter()
        gen.append_tokens(tokens)  # the prompt's forward pass
        prefilled = time.perf_counter()
        count = 0
        while not gen.is_done():
            gen.generate_next_token()  # the first call only picks from the prefill's logits
            gen.get_next_tokens()
            count += 1
        decode_s = time.perf_counter() - prefilled
        return len(prompt) / (prefilled - started), (count - 1) / decode_s, count

    return once


class BareLoop:
    """The fastest honest loop: one session, every buffer preallocated and bound once, argmax."""

    def __init__(self, path: Path, prompt: list[int], new: int, threads: int) -> None:
        import onnxruntime as ort

        from agent.engine.engine import EngineOptions
        from agent.engine.model_folder import ModelFolder

        self.dec = dec = ModelFolder(path).config.model.decoder
        so = ort.SessionOptions()  # the engine's values: keep in step with Engine._open_session
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        spin_us = EngineOptions().spin_us
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_us else "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if spin_us:
            so.add_session_config_entry("session.intra_op.spin_duration_us", str(spin_us))
        self.sess = ort.InferenceSession(str(path / dec.filename), so, providers=["CPUExecutionProvider"])
        self.n_prompt, self.new = len(prompt), new
        logits_shape = next(o.shape for o in self.sess.get_outputs() if o.name == dec.outputs.logits)
        vocab, pruned = logits_shape[-1], logits_shape[1] == 1  # pruned: last position's logits only
        assert isinstance(vocab, int), "logits need a static vocab dimension"
        kv_shape = (1, dec.num_key_value_heads, self.n_prompt + new, dec.head_size)
        # Every buffer lives as long as the loop: the binding holds raw pointers into them.
        self.kv = np.zeros((dec.num_hidden_layers, 2, *kv_shape), dtype=np.float32)
        self.ones = np.ones(self.n_prompt + new, dtype=np.int64)
        self.ids = np.asarray([prompt], dtype=np.int64)
        self.token = np.zeros((1, 1), dtype=np.int64)
        self.prefill_logits = np.zeros((1, 1 if pruned else self.n_prompt, vocab), dtype=np.float32)
        self.step_logits = np.zeros((1, 1, vocab), dtype=np.float32)
        self.io = self.sess.io_binding()
        for layer in range(dec.num_hidden_layers):
            for slot, past, present in (
                (0, dec.inputs.past_key_names, dec.outputs.present_key_names),
                (1, dec.inputs.past_value_names, dec.outputs.present_value_names),
            ):
                ptr = self.kv[layer, slot].ctypes.data
                self.io.bind_input(past % layer, "cpu", 0, np.float32, kv_shape, ptr)
                self.io.bind_output(present % layer, "cpu", 0, np.float32, kv_shape, ptr)

    def _bind(self, name: str, arr: np.ndarray, shape: tuple[int, ...], output: bool = False) -> None:
        fn = self.io.bind_output if output else self.io.bind_input
        fn(name, "cpu", 0, arr.dtype, shape, arr.ctypes.data)

    def __call__(self) -> RunResult:
        """One generation: the prompt's pass, then ``new - 1`` single-token passes."""
        dec, io, n_prompt, sess = self.dec, self.io, self.n_prompt, self.sess
        started = time.perf_counter()
        self._bind(dec.inputs.input_ids, self.ids, self.ids.shape)
        self._bind(dec.inputs.attention_mask, self.ones, (1, n_prompt))
        self._bind(dec.outputs.logits, self.prefill_logits, self.prefill_logits.shape, output=True)
        sess.run_with_iobinding(io)
        self.token[0, 0] = int(np.argmax(self.prefill_logits[0, -1]))
        prefilled = time.perf_counter()
        self._bind(dec.inputs.input_ids, self.token, self.token.shape)
        self._bind(dec.outputs.logits, self.step_logits, self.step_logits.shape, output=True)
        logits, token, ones_ptr = self.step_logits[0, 0], self.token, self.ones.ctypes.data
        mask = dec.inputs.attention_mask
        for length in range(n_prompt + 1, n_prompt + self.new):
            io.bind_input(mask, "cpu", 0, np.int64, (1, length), ones_ptr)
            sess.run_with_iobinding(io)
            token[0, 0] = int(np.argmax(logits))
        decode_s = time.perf_counter() - prefilled
        return n_prompt / (prefilled - started), (self.new - 1) / decode_s, self.new


FACTORIES: dict[str, Callable[[Path, list[int], int, int], Runner]] = {
    "engine": run_engine,
    "engine-nospin": lambda path, prompt, new, threads: run_engine(path, prompt, new, threads, spin=False),
    "genai": run_genai,
    "genai-defaults": lambda path, prompt, new, threads: run_genai(path, prompt, new, None),
    "bare": BareLoop,
}


# -- one measurement (in the worker process) --------------------------------------


def _memory_mb() -> dict[str, float]:
    status = Path("/proc/self/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}


def _cpu_seconds() -> tuple[float, float]:
    """(CPU time the whole box was busy, CPU time of this process), in seconds."""
    import resource

    user, nice, system, _, _, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    box = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    own = resource.getrusage(resource.RUSAGE_SELF)
    return box, own.ru_utime + own.ru_stime


def _timed(once: Runner) -> tuple[RunResult, float]:
    """Run once; also return how many cores other processes kept busy meanwhile."""
    (box0, own0), t0 = _cpu_seconds(), time.perf_counter()
    result = once()
    (box1, own1), t1 = _cpu_seconds(), time.perf_counter()
    return result, max(0.0, (box1 - box0) - (own1 - own0)) / (t1 - t0)


def worker(runner: str, path: Path, n_prompt: int, args: argparse.Namespace) -> dict[str, Any]:
    """Load, warm up, then measure until ``repeat`` clean runs (at most ``4 * repeat`` runs)."""
    once = FACTORIES[runner](path, prompt_ids(n_prompt), args.new_tokens, args.threads)
    loaded = _memory_mb()["VmRSS"]
    once()  # warm-up: prepacking, arena growth, first touch of buffers
    runs: list[tuple[RunResult, float]] = []
    while len(runs) < 4 * args.repeat and sum(o <= args.max_other for _, o in runs) < args.repeat:
        runs.append(_timed(once))
    keep = sorted(sorted(range(len(runs)), key=lambda i: runs[i][1])[: args.repeat])
    mem = _memory_mb()
    return {
        "runs": [dict(zip(RUN_KEYS, (*r, o, i in keep), strict=True)) for i, (r, o) in enumerate(runs)],
        "peak_rss_mb": mem["VmHWM"],
        "rss_after_load_mb": loaded,
        "rss_end_anon_mb": mem["RssAnon"],
        "rss_end_file_mb": mem["RssFile"],
    }


# -- driver ------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """CPU, cores and library versions of this box."""
    import onnxruntime
    import onnxruntime_genai
    import psutil

    names = [
        ln.split(":", 1)[1].strip()
        for ln in Path("/proc/cpuinfo").read_text().splitlines()
        if ln.startswith("model name")
    ]
    return {
        "cpu": names[0] if names else platform.processor(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_genai": onnxruntime_genai.__version__,
    }


def measure(runner: str, path: Path, n_prompt: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and return its JSON (or an error)."""
    flags = f"--prompts {n_prompt} --new-tokens {args.new_tokens} --threads {args.threads} "
    flags += f"--repeat {args.repeat} --max-other {args.max_other}"
    cmd = [sys.executable, __file__, "--worker", runner, "--model", str(path), *flags.split()]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=BENCH_DIR.parent)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def summarize(measurements: list[dict[str, Any]], new_tokens: int) -> dict[str, Any]:
    """One runner's rounds of one cell: medians over all kept runs, worst RSS."""
    ok = [m for m in measurements if "error" not in m]
    if not ok:
        return {"error": measurements[0]["error"]}
    kept = [r for m in ok for r in m["runs"] if r["kept"]]
    decode = [r["decode_tok_s"] for r in kept]
    return {
        "prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in kept),
        "decode_tok_s": statistics.median(decode),
        "decode_min": min(decode),
        "decode_max": max(decode),
        "peak_rss_mb": max(m["peak_rss_mb"] for m in ok),
        "new_tokens": min(r["new_tokens"] for m in ok for r in m["runs"]),
        "early_stop": any(r["new_tokens"] < new_tokens for m in ok for r in m["runs"]),
        "other_cpu_cores": max(r["other_cpu_cores"] for r in kept),
        "discarded_runs": sum(not r["kept"] for m in ok for r in m["runs"]),
        "errors": len(measurements) - len(ok),
        "rounds": measurements,
    }


# ratio name: (other runner, field, target bound, "min" | "max" | "" for no target)
RATIOS: dict[str, tuple[str, str, float, str]] = {
    "decode_vs_bare": ("bare", "decode_tok_s", 0.95, "min"),
    "prefill_vs_bare": ("bare", "prefill_tok_s", 0.95, "min"),
    "decode_vs_genai": ("genai", "decode_tok_s", 1.5, "min"),  # at the longest prompt
    "prefill_vs_genai": ("genai", "prefill_tok_s", 0.0, ""),
    "rss_vs_genai": ("genai", "peak_rss_mb", 1.05, "max"),
}


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Engine / other runner for each of :data:`RATIOS` (None when a side is missing)."""
    out: dict[str, float | None] = {}
    for name, (other, key, _, _) in RATIOS.items():
        a, b = rows.get("engine", {}).get(key), rows.get(other, {}).get(key)
        out[name] = a / b if a and b else None
    return out


def _verdict(name: str, value: float | None, prompt: int, longest: int) -> str:
    _, _, bound, kind = RATIOS[name]
    if value is None:
        return "n/a"
    if not kind or (name == "decode_vs_genai" and prompt != longest):
        return f"{value:.2f}"
    ok = value >= bound if kind == "min" else value <= bound
    return f"{value:.2f} {'ok' if ok else 'MISS'}"


def markdown(report: dict[str, Any]) -> str:
    """The machine line, the measurements table and the ratios table."""
    m, c, results = report["machine"], report["config"], report["results"]
    out = [
        f"Machine: {m['cpu']}, {m['logical_cores']} cores ({m['physical_cores']} physical), "
        f"{m['memory_gb']} GB; onnxruntime {m['onnxruntime']}, onnxruntime-genai {m['onnxruntime_genai']}. "
        f"{c['threads']} threads, {c['new_tokens']} new tokens, greedy; "
        f"{c['rounds']} rounds x {c['repeat']} runs after 1 warm-up.",
        "",
        "| precision | prompt | runner | prefill tok/s | decode tok/s | decode min-max | peak RSS MB "
        "| new | other CPU | redone |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in results:
        for name, row in cell["runners"].items():
            head = f"| {cell['precision']} | {cell['prompt']} | {name} |"
            if "error" in row:
                out.append(f"{head} error (see JSON) | | | | | | |")
                continue
            out.append(
                f"{head} {row['prefill_tok_s']:.1f} | {row['decode_tok_s']:.2f} | "
                f"{row['decode_min']:.1f}-{row['decode_max']:.1f} | {row['peak_rss_mb']:.0f} | "
                f"{row['new_tokens']}{' EARLY STOP' if row['early_stop'] else ''} | "
                f"{row['other_cpu_cores']:.2f} | {row['discarded_runs']} |"
            )
    longest = max(cell["prompt"] for cell in results)
    out += ["", "| precision | prompt | " + " | ".join(RATIOS) + " |", "|---|---:|" + "---:|" * len(RATIOS)]
    for cell in results:
        vals = [_verdict(k, v, cell["prompt"], longest) for k, v in cell["ratios"].items()]
        out.append(f"| {cell['precision']} | {cell['prompt']} | " + " | ".join(vals) + " |")
    targets = ", ".join(
        f"{k} {'>=' if kind == 'min' else '<='} {b}" for k, (_, _, b, kind) in RATIOS.items() if kind
    )
    out += ["", f"Targets: {targets} (decode_vs_genai at prompt {longest}).", "", report["note"]]
    return "\n".join(out)


NOTE = (
    "Random weights; fixture tokenizer (448 ids): prompt ids are below 448, generated ids beyond it decode "
    "to empty text. Ratios are engine / other. genai runs with its own session defaults except "
    "intra_op_num_threads (genai-defaults changes nothing). other CPU = most cores other processes used "
    "during a kept run; runs above --max-other were redone."
)


def main(argv: Sequence[str] | None = None) -> int:
    """Build the models if needed, measure every cell, print and save the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out")
    parser.add_argument("--precisions", nargs="+", default=["int4", "int8"], choices=["int4", "int8"])
    parser.add_argument("--prompts", nargs="+", type=int, default=[64, 1024])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="measured runs per process")
    parser.add_argument("--rounds", type=int, default=3, help="times the whole matrix is measured")
    parser.add_argument("--max-other", type=float, default=0.1, help="redo runs while others use more cores")
    parser.add_argument("--runners", nargs="+", default=list(RUNNERS), choices=RUNNERS + EXTRA_RUNNERS)
    parser.add_argument("--worker", choices=RUNNERS + EXTRA_RUNNERS, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.prompts[0], args)))
        return 0

    sys.path.insert(0, str(BENCH_DIR.parent))  # the models package, when run as a script
    paths = ensure_models(args.precisions)
    cells = [(p, n) for p in args.precisions for n in args.prompts]
    raw: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for rnd in range(args.rounds):
        for precision, n_prompt in cells:
            k = rnd % len(args.runners)
            for runner in args.runners[k:] + args.runners[:k]:
                note = f"round {rnd + 1}/{args.rounds} {precision} prompt {n_prompt}: {runner}"
                print(note, file=sys.stderr, flush=True)
                raw.setdefault((precision, n_prompt, runner), []).append(
                    measure(runner, paths[precision], n_prompt, args)
                )
    results = []
    for precision, n_prompt in cells:
        rows = {r: summarize(raw[(precision, n_prompt, r)], args.new_tokens) for r in args.runners}
        results.append({"precision": precision, "prompt": n_prompt, "runners": rows, "ratios": ratios(rows)})
    config = {k: getattr(args, k) for k in ("threads", "new_tokens", "repeat", "rounds", "max_other")}
    report = {"machine": machine(), "config": config | {"model": SHAPE}, "results": results, "note": NOTE}
    text = markdown(report)
    print(text)
    save_report(args.out, "engine_bench", report, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
