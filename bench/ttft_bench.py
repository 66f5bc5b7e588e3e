"""Warm time to first token, prefill and decode: the engine vs llama.cpp, same weights, one run.

Run as ``python bench/ttft_bench.py [--threads 2] [--rounds 2] [--instruction 1000] [--input 10]
[--model DIR]``.

Model: engine_bench's Phi-3-mini-shaped 4-layer checkpoint (random weights), ONNX int4
(engine_bench's export: full logits, block 32; ``--model`` another export of the same
checkpoint, e.g. ``prefill_levers.py``'s) against GGUF Q4_0 of the same checkpoint (``bench/models/``; build them with
``batch_bench.py --llama-src``).  Arms alternate round by round in one process; each
figure comes with the cores other processes kept busy meanwhile (``other_cores``).

* TTFT of a job = shared instruction + new input, ``max_tokens = 1``: cold (cache
  empty), warm (a new input after the same instruction) and, for the engine, warm
  after a restart (a new process reading the prefix cache from disk).  The engine's
  warm time is split into the cache copy (``restore_prefix``), the input's pass and
  the rest.  llama.cpp's warm: its KV cache keeps the instruction (what its server's
  slot does with ``cache_prompt``), the new input is decoded after it.
* prefill tok/s of a 1,024-token prompt and decode tok/s of 32 new tokens.

llama.cpp is driven through llama-cpp-python's low-level API with the engine's threads.
``--no-extra-bufts`` turns llama.cpp's extra weight buffers (repacking, AMX) off: the
native build on this VM crashes in them (its CPUID advertises AMX).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent))

from engine_bench import _cpu_seconds, machine, model_dir, prompt_ids

GGUF = Path(__file__).resolve().parent / "models" / "phi3-mini-shape-4l-q4_0.gguf"


def _other_cores(started: tuple[float, float], t0: float) -> float:
    (box0, own0), (box1, own1) = started, _cpu_seconds()
    return max(0.0, (box1 - box0) - (own1 - own0)) / (time.perf_counter() - t0)


def _fresh(n: int, salt: int) -> list[int]:
    """``n`` ordinary ids that no earlier round used (nothing of them is in any cache)."""
    return [7 + (i * 37 + salt * 101) % 441 for i in range(n)]


def _job(instruction: list[int], n_input: int, run: int) -> list[int]:
    """The instruction, then an input of ``n_input`` ids that differs run by run."""
    return instruction + [7 + (run * 131 + i * 53) % 441 for i in range(n_input)]


class Ours:
    """The engine, its prefix cache in memory and on disk (``cache_dir``)."""

    def __init__(self, threads: int, cache_dir: Path, model: Path | None = None) -> None:
        from agent.engine.engine import Engine, EngineOptions

        path = model or model_dir("int4")
        self.engine = Engine(path, EngineOptions(threads=threads), prefix_cache_dir=cache_dir)
        self.split: dict[str, float] = {}
        restore = self.engine.restore_prefix

        def timed_restore(*args: Any, **kwargs: Any) -> int:
            t0 = time.perf_counter()
            n = restore(*args, **kwargs)
            self.split["copy_ms"] = (time.perf_counter() - t0) * 1e3
            return n

        self.engine.restore_prefix = timed_restore  # type: ignore[method-assign]

    def ttft(self, ids: list[int]) -> tuple[float, int, dict[str, float]]:
        from agent.engine.sampling import SamplingParams

        self.split = {}
        out = self.engine.generate(ids, SamplingParams(max_tokens=1, ignore_eos=True))
        return out.timings.prefill_ms, out.cached_tokens, dict(self.split)

    def cold(self, ids: list[int]) -> float:
        ms, cached, _ = self.ttft(ids)
        assert cached == 0, "the cold job found its instruction cached"
        return ms

    def speeds(self, ids: list[int], new: int) -> tuple[float, float]:
        from agent.engine.sampling import SamplingParams

        out = self.engine.generate(ids, SamplingParams(max_tokens=new, ignore_eos=True))
        return out.timings.prefill_tokens_per_s, out.timings.decode_tokens_per_s


class Llama:
    """llama.cpp on the GGUF: one sequence, prompt cache kept in its KV cache."""

    def __init__(self, threads: int, ctx_tokens: int, no_extra_bufts: bool, gguf: Path = GGUF) -> None:
        import llama_cpp as lc

        self.lc = lc
        self._quiet = lc.llama_log_callback(lambda level, text, data: None)
        lc.llama_log_set(self._quiet, ctypes.c_void_p(0))
        lc.llama_backend_init()
        params = lc.llama_model_default_params()
        if no_extra_bufts:
            params.use_extra_bufts = False
        self.model = lc.llama_model_load_from_file(str(gguf).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        cp = lc.llama_context_default_params()
        cp.n_ctx = ctx_tokens
        cp.n_batch = cp.n_ubatch = 512
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, cp)
        self.batch = lc.llama_batch_init(512, 0, 1)
        self.cached: list[int] = []

    def _decode(self, ids: list[int], start: int) -> None:
        lc, b = self.lc, self.batch
        for begin in range(0, len(ids), 512):
            part = ids[begin : begin + 512]
            for i, token in enumerate(part):
                b.token[i], b.pos[i], b.n_seq_id[i] = token, start + begin + i, 1
                b.seq_id[i][0] = 0
                b.logits[i] = int(begin + i == len(ids) - 1)
            b.n_tokens = len(part)
            if lc.llama_decode(self.ctx, b) != 0:
                raise RuntimeError("llama_decode failed")
        lc.llama_synchronize(self.ctx)

    def ttft(self, ids: list[int]) -> tuple[float, int]:
        """Reuse the longest common prefix with the previous prompt (at least one token computed)."""
        lc = self.lc
        t0 = time.perf_counter()
        keep = 0
        while keep < min(len(ids) - 1, len(self.cached)) and ids[keep] == self.cached[keep]:
            keep += 1
        lc.llama_memory_seq_rm(lc.llama_get_memory(self.ctx), 0, keep, -1)
        self._decode(ids[keep:], keep)
        logits = lc.llama_get_logits_ith(self.ctx, -1)
        _ = logits[0]
        self.cached = list(ids)
        return (time.perf_counter() - t0) * 1e3, keep

    def cold(self, ids: list[int]) -> float:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        self.cached = []
        return self.ttft(ids)[0]

    def speeds(self, ids: list[int], new: int) -> tuple[float, float]:
        import numpy as np

        lc = self.lc
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        self.cached = []
        t0 = time.perf_counter()
        self._decode(ids, 0)
        prefill = len(ids) / (time.perf_counter() - t0)
        b = self.batch
        t1 = time.perf_counter()
        for step in range(new - 1):
            row = np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx, -1), shape=(self.vocab,))
            b.token[0], b.pos[0], b.n_seq_id[0], b.logits[0] = int(np.argmax(row)), len(ids) + step, 1, 1
            b.seq_id[0][0] = 0
            b.n_tokens = 1
            if lc.llama_decode(self.ctx, b) != 0:
                raise RuntimeError("llama_decode failed")
        lc.llama_synchronize(self.ctx)
        return prefill, (new - 1) / (time.perf_counter() - t1)


def restarted(threads: int, cache_dir: Path, ids: list[int], model: Path | None) -> dict[str, Any]:
    """In a fresh process: the first job after a restart, warm from the disk cache."""
    code = (
        "import json,sys,time; sys.path.insert(0,'bench'); sys.path.append('.');"
        "from ttft_bench import Ours, _cpu_seconds, _other_cores;"
        "from pathlib import Path;"
        f"o=Ours({threads}, Path({str(cache_dir)!r}), {None if model is None else f'Path({str(model)!r})'});"
        "s=_cpu_seconds(); t0=time.perf_counter();"
        f"ms,cached,split=o.ttft({ids!r});"
        "print(json.dumps({'ms':ms,'cached':cached,'split':split,'other_cores':_other_cores(s,t0)}))"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--instruction", type=int, default=1000)
    parser.add_argument("--input", type=int, default=10)
    parser.add_argument("--warm-runs", type=int, default=5)
    parser.add_argument("--no-extra-bufts", action="store_true")
    parser.add_argument("--no-llama", action="store_true")
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="the engine's model folder (default: engine_bench's int4 export)",
    )
    args = parser.parse_args()
    print(json.dumps(machine()), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(tmp)
        ours = Ours(args.threads, cache_dir, args.model)
        llama = None if args.no_llama else Llama(args.threads, 2048, args.no_extra_bufts)
        ours.ttft(prompt_ids(64))  # warm-up (allocations, prepacking)
        if llama is not None:
            llama.ttft(prompt_ids(64))
        arms: list[tuple[str, Any]] = [("engine", ours)] + ([("llama.cpp", llama)] if llama else [])
        for rnd in range(args.rounds):
            for name, arm in arms if rnd % 2 == 0 else arms[::-1]:
                salt = 2 * rnd + (name == "engine")
                instruction, long_prompt = _fresh(args.instruction, salt), _fresh(1024, 50 + salt)
                s, t0 = _cpu_seconds(), time.perf_counter()
                cold = arm.cold(_job(instruction, args.input, 0))
                warm = [arm.ttft(_job(instruction, args.input, run)) for run in range(1, args.warm_runs + 1)]
                prefill, decode = arm.speeds(long_prompt, 32)
                row: dict[str, Any] = {
                    "round": rnd,
                    "arm": name,
                    "cold_ms": round(cold, 1),
                    "warm_ms": round(statistics.median(w[0] for w in warm), 1),
                    "cached_tokens": min(w[1] for w in warm),
                    "prefill_tok_s": round(prefill, 1),
                    "decode_tok_s": round(decode, 1),
                }
                row["warm_vs_cold"] = round(row["warm_ms"] / cold, 4)
                if name == "engine":
                    splits = [w[2] for w in warm]
                    row["warm_copy_ms"] = round(statistics.median(x.get("copy_ms", 0.0) for x in splits), 1)
                    cache = ours.engine.prefix_cache
                    if cache is not None:  # as the daemon does at a clean stop: the queued blocks land first
                        cache.flush(30)
                    after = restarted(args.threads, cache_dir, _job(instruction, args.input, 77), args.model)
                    row["restart_ms"] = round(after["ms"], 1)
                    row["restart_vs_cold"] = round(after["ms"] / cold, 4)
                    row["restart_copy_ms"] = round(after["split"].get("copy_ms", 0.0), 1)
                    row["restart_cached_tokens"] = after["cached"]
                row["other_cores"] = round(_other_cores(s, t0), 2)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
