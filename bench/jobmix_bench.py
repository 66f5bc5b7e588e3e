"""A job mix through the real daemon, prefix cache on vs off: jobs/s and time to first token.

Run as ``python bench/jobmix_bench.py [--model models/fixtures/llama-long] [--instructions 3]
[--inputs 10] [--instruction-tokens 1000]``.

A few long instructions, many short inputs each (the edge pattern: a system
prompt and a log line), sent one after another in a shuffled order to a real
``edge-agent run`` on a real mosquitto, once with ``[engine] prefix_cache_mb``
at its default and once at 0.  Time to first token = first streamed chunk -
publish.  The default model is the ``llama-long`` fixture (4,096-token context,
tiny, random weights): the cache's effect on the daemon's whole path, not the
kernels' speed (``prefill_bench.py`` measures those).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from daemon_bench import Collector
from harness import REPO, machine

from tests.support.agent import AgentProcess
from tests.support.broker import Broker

WORDS = [
    "pump",
    "valve",
    "pressure",
    "flow",
    "sensor",
    "alarm",
    "reading",
    "normal",
    "warning",
    "fault",
    "motor",
    "temperature",
]


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def run(model: Path, cache_mb: int, jobs: list[str], tmp: Path) -> dict[str, float]:
    broker = Broker(tmp / f"broker-{cache_mb}")
    broker.start()
    agent = AgentProcess(broker, tmp / f"agent-{cache_mb}", model.resolve())
    agent.config.write_text(agent.config.read_text() + f"[engine]\nprefix_cache_mb = {cache_mb}\n")
    agent.start()
    caller = Collector(broker)
    topic = f"edge/{agent.device_id}/jobs"
    ttft: list[float] = []
    cached: list[int] = []
    try:
        started = time.perf_counter()
        for i, prompt in enumerate(jobs):
            job_id = f"mix-{i}"
            sent = caller.publish(topic, {"id": job_id, "prompt": prompt, "max_tokens": 8, "stream": True})
            caller.wait([job_id])
            ttft.append((caller.first_chunk.get(job_id, caller.result_at[job_id]) - sent) * 1e3)
            cached.append(caller.results[job_id]["usage"].get("cached_tokens", 0))
        wall = time.perf_counter() - started
    finally:
        caller.client.loop_stop()
        agent.stop()
        broker.stop()
    q = statistics.quantiles(ttft, n=20, method="inclusive")
    return {
        "jobs_s": len(jobs) / wall,
        "ttft_p50_ms": statistics.median(ttft),
        "ttft_p95_ms": q[18],
        "cached_mean": statistics.mean(cached),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "fixtures" / "llama-long")
    parser.add_argument("--instructions", type=int, default=3)
    parser.add_argument("--inputs", type=int, default=10)
    parser.add_argument("--instruction-words", type=int, default=700)
    args = parser.parse_args()
    rng = random.Random(15)
    instructions = [_text(rng, args.instruction_words) for _ in range(args.instructions)]
    jobs = [f"{ins} Log line: {_text(rng, 12)}" for ins in instructions for _ in range(args.inputs)]
    rng.shuffle(jobs)
    with tempfile.TemporaryDirectory(prefix="jobmix-bench-") as tmp:
        on = run(args.model, 256, jobs, Path(tmp))
        off = run(args.model, 0, jobs, Path(tmp))
    print(
        f"Machine: {machine()} (shared); model "
        f"{args.model.name}; {len(jobs)} jobs = {args.instructions} instructions x {args.inputs} inputs, "
        f"max_tokens 8, one at a time.\n"
    )
    print(
        "| prefix cache | jobs/s | TTFT p50 ms | TTFT p95 ms | mean cached tokens |\n|---|---:|---:|---:|---:|"
    )
    for name, r in (("on (256 MiB)", on), ("off", off)):
        print(
            f"| {name} | {r['jobs_s']:.2f} | {r['ttft_p50_ms']:.1f} | {r['ttft_p95_ms']:.1f} | {r['cached_mean']:.0f} |"
        )
    print(
        f"\non/off: jobs/s {on['jobs_s'] / off['jobs_s']:.2f}x, TTFT p50 {on['ttft_p50_ms'] / off['ttft_p50_ms']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
