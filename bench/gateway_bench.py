"""What the fleet's gateway adds over direct MQTT, and how many requests a second it routes.

Run as ``python bench/gateway_bench.py [--model models/demo] [--requests 40] [--max-tokens 32]
[--sim-devices 50] [--sim-requests 2000] [--sim-clients 32]``.

1. **Overhead**: one real ``edge-agent run`` on a real mosquitto (loopback) and a real
   ``edge-fleet server``; the same streamed, greedy chat request two ways, with 1 and with 8 at once:

   * **mqtt**: a job published straight to the box (``Collector`` of daemon_bench), chunks back;
   * **gateway**: ``POST /v1/chat/completions`` with ``stream: true`` to the server, which routes
     it over MQTT to the same box and relays the chunks as SSE.

   Latency is from sending to the last token (the result, or ``data: [DONE]``); TTFT from sending
   to the first text.  The two take turns, round by round, so a busy machine's swings hit both.

2. **Throughput**: ``edge-fleet simulate --devices 50`` (simulated boxes answer every job after
   0.1 s, without streaming) and the server; ``--sim-clients`` threads send non-streamed chat
   requests for the simulated model through the gateway, keep-alive connections; requests per
   second, latency, and how evenly the boxes were used (``X-Edge-Device``).

Prints Markdown tables with the machine.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from daemon_bench import Collector
from harness import MESSAGES, REPO, Sample, at_once, machine
from harness import pct_ms as _pct
from http_bench import read_stream

from tests.support.agent import AgentProcess
from tests.support.broker import Broker
from tests.support.fleet_server import FleetServer
from tests.support.wait import wait_until

_rounds = iter(range(1 << 30))


def _mqtt(collector: Collector, topic: str, concurrency: int, max_tokens: int) -> list[Sample]:
    round_ = next(_rounds)
    ids = [f"c{concurrency}-r{round_}-{i}" for i in range(concurrency)]
    job = {"messages": MESSAGES, "max_tokens": max_tokens, "stream": True}
    sent = {job_id: collector.publish(topic, {"id": job_id, **job}) for job_id in ids}
    collector.wait(ids)
    samples = []
    for job_id in ids:
        done = collector.result_at[job_id]
        samples.append((done - sent[job_id], collector.first_chunk.get(job_id, done) - sent[job_id]))
    return samples


def _post(conn: http.client.HTTPConnection, token: str, body: dict[str, object]) -> http.client.HTTPResponse:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(), headers=headers)
    return conn.getresponse()


def _gateway_one(port: int, token: str, model: str, max_tokens: int) -> Sample:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.connect()
    start = time.perf_counter()
    response = _post(
        conn, token, {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "stream": True}
    )
    return read_stream(conn, response, start)


def _gateway(port: int, token: str, model: str, concurrency: int, max_tokens: int) -> list[Sample]:
    return at_once(lambda: _gateway_one(port, token, model, max_tokens), concurrency)


def _throughput(
    server: FleetServer, requests: int, clients: int
) -> tuple[float, list[float], collections.Counter[str]]:
    port, token = server.port, server.tokens["operator"]
    latencies: list[float] = []
    boxes: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    left = [requests]
    failures: list[str] = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            while True:
                with lock:
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                start = time.perf_counter()
                response = _post(conn, token, {"model": "sim", "messages": MESSAGES, "max_tokens": 8})
                body = response.read()
                took = time.perf_counter() - start
                with lock:
                    if response.status != 200:
                        failures.append(f"{response.status} {body[:200]!r}")
                    latencies.append(took)
                    boxes[response.getheader("X-Edge-Device") or "?"] += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return requests / elapsed, latencies, boxes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "demo")
    parser.add_argument("--requests", type=int, default=40, help="per mode and concurrency (a multiple of 8)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--sim-devices", type=int, default=50)
    parser.add_argument("--sim-requests", type=int, default=2000)
    parser.add_argument("--sim-clients", type=int, default=32)
    args = parser.parse_args()
    model = args.model.resolve()
    results: dict[tuple[str, int], list[Sample]] = {}
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["EDGE_FLEET_DB"] = str(tmp / "fleet-state.sqlite3")
        broker = Broker(tmp / "broker")
        broker.start()
        agent = AgentProcess(broker, tmp / "agent", model, jobs={"max_queue": 64})
        server = FleetServer(str(tmp / "server.sqlite3"), broker, tmp / "server.log")
        sim: subprocess.Popen[bytes] | None = None
        collector = None
        try:
            agent.start()
            server.start()
            token = server.tokens["operator"]
            name = wait_until(lambda: _model_of(server), timeout=60, what="the box routable")
            collector = Collector(broker)
            topic = f"edge/{agent.device_id}/jobs"
            runs: list[tuple[str, Callable[[int], list[Sample]]]] = [
                ("mqtt", lambda c: _mqtt(collector, topic, c, args.max_tokens)),  # type: ignore[arg-type]
                ("gateway", lambda c: _gateway(server.port, token, name, c, args.max_tokens)),
            ]
            for _warm in range(3):
                for _mode, run in runs:
                    run(1)
            assert server.process is not None
            server_cpu = psutil.Process(server.process.pid)
            idle_at, idle_cpu = time.monotonic(), sum(server_cpu.cpu_times()[:2])
            time.sleep(5.0)  # the server's own background work (controller, broker link, dashboard)
            idle_rate = (sum(server_cpu.cpu_times()[:2]) - idle_cpu) / (time.monotonic() - idle_at)
            cpu_before, rounds_at = sum(server_cpu.cpu_times()[:2]), time.monotonic()
            for concurrency in (1, 8):
                for _round in range(args.requests // concurrency):
                    for mode, run in runs:
                        results.setdefault((mode, concurrency), []).extend(run(concurrency))
            background = idle_rate * (time.monotonic() - rounds_at)
            cpu_ms = (sum(server_cpu.cpu_times()[:2]) - cpu_before - background) * 1e3
            gateway_requests = sum(len(results["gateway", c]) for c in (1, 8))
            agent.stop()  # the simulated boxes alone from here
            sim = subprocess.Popen(
                [sys.executable, "-m", "edge_fleet.cli", "simulate", "--devices", str(args.sim_devices),
                 "--group", "sim", "--broker", f"{broker.host}:{broker.port}", "--plaintext"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            wait_until(
                lambda: len([m for m in _names(server) if m.startswith("device:sim-")]) == args.sim_devices,
                timeout=120, what=f"{args.sim_devices} simulated boxes routable",
            )  # fmt: skip
            _throughput(server, 100, args.sim_clients)  # warm up
            rps, latencies, boxes = _throughput(server, args.sim_requests, args.sim_clients)
        finally:
            if collector is not None:
                collector.client.loop_stop()
            if sim is not None:
                sim.terminate()
                sim.wait(timeout=30)
            server.stop()
            agent.stop()
            broker.stop()

    print(
        f"Machine: {machine()}; model {model.name}, "
        f"{args.max_tokens} new tokens at most, greedy, streamed; {args.requests} requests per row.\n"
    )
    print("| mode | streams | p50 ms | p95 ms | TTFT p50 ms | TTFT p95 ms | p50 added | TTFT p50 added |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for concurrency in (1, 8):
        base = results["mqtt", concurrency]
        for mode in ("mqtt", "gateway"):
            samples = results[mode, concurrency]
            lat, ttft = [s[0] for s in samples], [s[1] for s in samples]
            added = _pct(lat, 50) - _pct([s[0] for s in base], 50)
            added_ttft = _pct(ttft, 50) - _pct([s[1] for s in base], 50)
            print(
                f"| {mode} | {concurrency} | {_pct(lat, 50):.2f} | {_pct(lat, 95):.2f} | {_pct(ttft, 50):.2f} "
                f"| {_pct(ttft, 95):.2f} | {added:+.2f} | {added_ttft:+.2f} |"
            )
    print(
        f"\nThe server's CPU time (user + system) over those rounds, less its idle rate "
        f"({idle_rate * 1e3:.0f} ms/s: controller, broker link, dashboard): {cpu_ms / gateway_requests:.1f} ms "
        f"per gateway request of {args.max_tokens} streamed tokens — on a 2-core machine shared with the "
        "agent, CPU the agent could not use."
    )
    used = sorted(boxes.values())
    print(
        f"\nThrough the gateway to {args.sim_devices} simulated boxes (`edge-fleet simulate`, 0.1 s a job), "
        f"{args.sim_requests} non-streamed requests from {args.sim_clients} clients:\n"
    )
    print("| requests/s | p50 ms | p95 ms | boxes used | jobs per box (min-max) |\n|---:|---:|---:|---:|---|")
    print(
        f"| {rps:.0f} | {_pct(latencies, 50):.1f} | {_pct(latencies, 95):.1f} | {len(boxes)} "
        f"| {used[0]}-{used[-1]} |"
    )
    return 0


def _names(server: FleetServer) -> list[str]:
    return [m["id"] for m in server.get("/v1/models")["data"]]


def _model_of(server: FleetServer) -> str | None:
    names = [n for n in _names(server) if ":" not in n]
    return names[0] if names else None


if __name__ == "__main__":
    raise SystemExit(main())
