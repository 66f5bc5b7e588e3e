"""The real daemon draining queued jobs with batching off (``max_batch`` 1) and on.

Run as ``python bench/daemon_batch_bench.py [--model models/demo] [--jobs 64] [--max-batch 4]
[--max-tokens 48] [--copy-jobs]``.  ``--copy-jobs`` sends the copy-task jobs of
``models.copy_task`` (for ``models/copy/*`` and its padded, edge-sized version) instead
of short text prompts.

Per setting: a fresh mosquitto and ``edge-agent run`` (daemon_bench's harness), the agent
frozen (SIGSTOP) while ``--jobs`` jobs are published, then thawed; jobs/s until the last
result and p50/p95 of each job's latency (publish to result).  Batched jobs produce the
same tokens as solo ones (agent/engine/batch.py), so both settings do the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from daemon_bench import AgentProcess, Broker, Collector
from harness import REPO
from harness import pct as _pct
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPLIES = "edge/replies/bench"  # the agent answers only under edge/replies/


class _Caller(Collector):
    """daemon_bench's collector, with a response topic the agent accepts."""

    def __init__(self, broker: Broker) -> None:
        super().__init__(broker)
        self.client.subscribe(REPLIES, qos=1)
        time.sleep(0.3)

    def publish(self, topic: str, job: dict[str, Any]) -> float:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = REPLIES
        t = time.perf_counter()
        self.client.publish(topic, json.dumps(job).encode(), qos=1, properties=props)
        return t


PROMPTS = ("The edge agent", "The device", "This function", "Return the", "The model", "A small")


def copy_prompts(count: int) -> tuple[str, ...]:
    """Prompts of copy-task jobs, each after ``<s>`` as the copy model was trained."""
    import random

    from models.copy_task import job  # the repository is on sys.path (harness)

    rng = random.Random(11)
    return tuple("<s>" + job(rng)[0] for _ in range(count))


def drain(model: Path, jobs: int, max_batch: int, max_tokens: int) -> dict[str, float]:
    """Jobs/s and latency percentiles of ``jobs`` queued jobs at ``max_batch``."""
    with tempfile.TemporaryDirectory(prefix="daemon-batch-bench-") as tmp:
        broker = Broker(Path(tmp) / "broker")
        broker.start()
        agent = AgentProcess(
            broker, Path(tmp) / "agent", model, jobs={"max_queue": jobs + 10}, engine={"max_batch": max_batch}
        )
        agent.start()
        caller = _Caller(broker)
        topic = f"edge/{agent.device_id}/jobs"
        try:
            assert agent.proc is not None
            os.kill(agent.proc.pid, signal.SIGSTOP)
            ids = [f"d-{i}" for i in range(jobs)]
            sent = {
                job_id: caller.publish(
                    topic, {"id": job_id, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens}
                )
                for i, job_id in enumerate(ids)
            }
            time.sleep(1.0)
            start = time.perf_counter()
            os.kill(agent.proc.pid, signal.SIGCONT)
            caller.wait(ids)
            wall = max(caller.result_at[j] for j in ids) - start
            latency = [caller.result_at[j] - max(sent[j], start) for j in ids]
            tokens = sum(caller.results[j]["usage"]["completion_tokens"] for j in ids)
        finally:
            caller.client.loop_stop()
            agent.stop()
            broker.stop()
    return {
        "jobs_per_s": jobs / wall,
        "tokens_per_s": tokens / wall,
        "p50_s": _pct(latency, 50),
        "p95_s": _pct(latency, 95),
        "tokens": tokens,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "demo")
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--copy-jobs", action="store_true", help="copy-task jobs (for the copy model)")
    args = parser.parse_args()
    if args.copy_jobs:
        global PROMPTS
        PROMPTS = copy_prompts(args.jobs)
    off = drain(args.model.resolve(), args.jobs, 1, args.max_tokens)
    on = drain(args.model.resolve(), args.jobs, args.max_batch, args.max_tokens)
    assert off["tokens"] == on["tokens"], "batched and solo jobs must generate the same tokens"
    print(
        f"| {args.jobs} queued jobs, model {args.model.name} | batching off | max_batch {args.max_batch} | ratio |"
    )
    print("|---|---:|---:|---:|")
    for key, unit in (("jobs_per_s", "jobs/s"), ("tokens_per_s", "tokens/s"), ("p50_s", "s"), ("p95_s", "s")):
        print(f"| {key.split('_')[0]} {unit} | {off[key]:.2f} | {on[key]:.2f} | {on[key] / off[key]:.2f}x |")
    print(f"(tokens generated: {on['tokens']}; load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
