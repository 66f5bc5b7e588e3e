"""The daemon's own overhead on loopback: first-chunk latency and queue drain rate.

Run as ``python bench/daemon_bench.py [--model models/demo] [--jobs 200] [--drain 1000]``.

* Latency: ``--jobs`` streamed jobs one after another; for each,
  (first chunk received - job published - the engine's prefill time) — what
  MQTT, validation, the durable queue (SQLite, fsync) and the hand-over cost.
* Drain: the agent is frozen (SIGSTOP) while ``--drain`` tiny jobs
  (``max_tokens`` 1) are published, then thawed; jobs/s until the last result,
  and the agent's overhead per job next to the engine's own time.

A real mosquitto and a real ``edge-agent run`` process, started here on a free
port with throw-away state. Prints a Markdown table with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from harness import REPO, machine
from harness import pct as _pct
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.link.mqtt import no_delay
from tests.support.agent import AgentProcess  # the same process harness the tests use
from tests.support.broker import Broker


class Collector:
    """Receives replies and timestamps the first chunk and the result of each job."""

    def __init__(self, broker: Broker) -> None:
        self.first_chunk: dict[str, float] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.result_at: dict[str, float] = {}
        self.cond = threading.Condition()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="bench-caller", protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.on_socket_open = no_delay
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe("edge/replies/bench", qos=1)
        self.client.loop_start()
        time.sleep(0.3)

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        now = time.perf_counter()
        body = json.loads(msg.payload)
        with self.cond:
            if body["type"] == "chunk":
                self.first_chunk.setdefault(body["id"], now)
            else:
                self.results[body["id"]] = body
                self.result_at[body["id"]] = now
                self.cond.notify_all()

    def publish(self, topic: str, job: dict[str, Any]) -> float:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "edge/replies/bench"
        t = time.perf_counter()
        self.client.publish(topic, json.dumps(job).encode(), qos=1, properties=props)
        return t

    def wait(self, job_ids: list[str], timeout: float = 600) -> None:
        end = time.monotonic() + timeout
        with self.cond:
            while not all(j in self.results for j in job_ids):
                if not self.cond.wait(max(0.0, end - time.monotonic())):
                    raise SystemExit(
                        f"timed out: {sum(j in self.results for j in job_ids)}/{len(job_ids)} results"
                    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "demo")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--drain", type=int, default=1000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="daemon-bench-") as tmp:
        broker = Broker(Path(tmp) / "broker")
        broker.start()
        agent = AgentProcess(
            broker, Path(tmp) / "agent", args.model.resolve(), jobs={"max_queue": args.drain + 10}
        )
        agent.start()
        caller = Collector(broker)
        topic = f"edge/{agent.device_id}/jobs"
        try:
            overheads: list[float] = []
            for i in range(args.jobs):
                job_id = f"lat-{i}"
                sent = caller.publish(
                    topic, {"id": job_id, "prompt": "The edge agent", "max_tokens": 8, "stream": True}
                )
                caller.wait([job_id])
                if job_id in caller.first_chunk:
                    first_ms = (caller.first_chunk[job_id] - sent) * 1e3
                    overheads.append(first_ms - caller.results[job_id]["timings"]["prefill_ms"])

            assert agent.proc is not None
            os.kill(agent.proc.pid, signal.SIGSTOP)
            ids = [f"drain-{i}" for i in range(args.drain)]
            for job_id in ids:
                caller.publish(topic, {"id": job_id, "prompt": "hi", "max_tokens": 1})
            time.sleep(1.0)
            start = time.perf_counter()
            os.kill(agent.proc.pid, signal.SIGCONT)
            caller.wait(ids)
            wall = max(caller.result_at[j] for j in ids) - start
            engine_ms = statistics.mean(caller.results[j]["timings"]["total_ms"] for j in ids)
        finally:
            caller.client.loop_stop()
            agent.stop()
            broker.stop()

    per_job_ms = wall / args.drain * 1e3
    print(f"Machine: {machine()}; model {args.model.name}; mosquitto on loopback.\n")
    print("| measure | value |\n|---|---:|")
    print(f"| first chunk - publish - prefill, p50 ({len(overheads)} jobs) | {_pct(overheads, 50):.2f} ms |")
    print(f"| same, p95 | {_pct(overheads, 95):.2f} ms |")
    print(f"| drain rate, {args.drain} queued jobs (max_tokens 1) | {args.drain / wall:.0f} jobs/s |")
    print(f"| wall time per drained job | {per_job_ms:.2f} ms |")
    print(f"| engine time per drained job (tokenize excluded) | {engine_ms:.2f} ms |")
    print(f"| agent overhead per drained job | {per_job_ms - engine_ms:.2f} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
