"""Where a cold prefill's time goes: onnxruntime's profiler, totals per operator type.

Run as ``python bench/prefill_profile.py MODEL_DIR [--tokens 1024] [--chunk 512] [--threads 2]
[--config KEY=VALUE ...] [--no-spin] [--by-node]``.

The session is set up as the engine sets it up (``Engine._open_session``), plus
``enable_profiling`` and any ``--config`` session entries, and the prompt is
prefilled through the engine's own chunked path.  One warm-up pass (prepacking)
is excluded from the profile's totals by taking only the last run's events.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--config", nargs="*", default=[], help="session config entries KEY=VALUE")
    parser.add_argument("--no-spin", action="store_true")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument(
        "--by-node",
        action="store_true",
        help="also totals per node kind (layers merged: qkv_proj, lm_head, ...)",
    )
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from agent.engine.engine import Engine, EngineOptions
    from agent.engine.sampling import SamplingParams

    extra = dict(kv.split("=", 1) for kv in args.config)

    class ProfiledEngine(Engine):
        def _open_session(self) -> ort.InferenceSession:
            so = ort.SessionOptions()
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.log_severity_level = 3
            spin = "0" if args.no_spin else "1"
            so.add_session_config_entry("session.intra_op.allow_spinning", spin)
            for key, value in extra.items():
                so.add_session_config_entry(key, value)
            so.enable_profiling = True
            so.profile_file_prefix = "/tmp/prefill_profile"
            return ort.InferenceSession(
                str(self.folder.onnx_path), sess_options=so, providers=["CPUExecutionProvider"]
            )

    engine = ProfiledEngine(
        args.model, EngineOptions(threads=args.threads, prefix_cache_mb=0, prefill_chunk_tokens=args.chunk)
    )
    ids = [7 + (i * 37) % 441 for i in range(args.tokens)]
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    engine.generate(ids[:64], params)  # warm-up: prepacking
    started = time.perf_counter()
    out = engine.generate(ids, params)
    seconds = time.perf_counter() - started
    path = engine.session.end_profiling()
    events: list[dict[str, Any]] = json.loads(Path(path).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    last_start = runs[-(len(range(0, args.tokens, args.chunk)))]["ts"] if runs else 0
    totals: collections.Counter[str] = collections.Counter()
    nodes: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last_start:
            totals[e["args"].get("op_name", "?")] += e["dur"]
            # "/model/layers.3/mlp/up_proj/MatMul_Q4_kernel_time" -> "mlp/up_proj/MatMul_Q4"
            parts = e["name"].removesuffix("_kernel_time").strip("/").split("/")
            nodes["/".join(p for p in parts if p != "model" and not p.startswith("layers."))] += e["dur"]
    whole = sum(totals.values())
    print(
        f"{args.tokens} tokens, chunk {args.chunk}, {args.threads} threads, config {extra or '-'}: "
        f"{seconds:.2f} s ({args.tokens / seconds:.1f} tok/s; engine prefill {out.timings.prefill_ms:.0f} ms)"
    )
    for op, us in totals.most_common(args.top):
        print(f"  {op:<28} {us / 1e6:8.3f} s  {100 * us / whole:5.1f} %")
    if args.by_node:
        print("  by node kind (all layers):")
        for node, us in nodes.most_common(args.top):
            print(f"    {node:<40} {us / 1e6:8.3f} s  {100 * us / whole:5.1f} %")
    Path(path).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
