"""What the HTTP API adds on the box: per-request latency and time to first token, engine vs MQTT vs HTTP.

Run as ``python bench/http_bench.py [--model models/demo] [--requests 40] [--max-tokens 32]``.

The same chat request (greedy, streamed) three ways, with 1 and with 8 at once:

* **engine**: ``Engine.generate`` in this process, no daemon in the way (8 at
  once: run back to back from one start time, the best a one-at-a-time queue
  can do);
* **mqtt**: a job published to a real ``edge-agent run`` through a real
  mosquitto on loopback, chunks streamed back (``Collector`` of daemon_bench);
* **http**: ``POST /v1/chat/completions`` with ``stream: true`` to the same
  agent (``[http] listen`` on loopback), one connection per client thread.

* **transport**: the HTTP server alone, in this process, over an intake that
  answers at once (no queue, no engine): what parsing, relaying and writing
  an answer cost, for ``stream`` false and for ``--max-tokens`` chunks.

Latency is from sending to the last token (the result, or ``data: [DONE]``);
TTFT from sending to the first text.  The engine runs first, alone (its
thread pool would compete with the agent's); then MQTT and HTTP take turns,
round by round, so that a busy machine's swings hit them alike.  Prints a Markdown
table with the machine.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from daemon_bench import Collector
from harness import MESSAGES, REPO, Sample, at_once, machine
from harness import pct_ms as _pct

from agent.engine.engine import Engine
from edge_contract.params import SamplingParams
from tests.support.agent import AgentProcess
from tests.support.broker import Broker


def _engine(engine: Engine, rounds: int, concurrency: int, max_tokens: int) -> list[Sample]:
    params = SamplingParams(max_tokens=max_tokens)
    samples: list[Sample] = []
    for _round in range(rounds):
        start = time.perf_counter()
        for _ in range(concurrency):  # back to back from one start: a perfect one-at-a-time queue
            first: list[float] = []

            def on_text(_text: str, first: list[float] = first) -> None:
                if not first:
                    first.append(time.perf_counter())

            engine.generate(engine.prompt_ids(messages=MESSAGES), params, on_text=on_text)
            done = time.perf_counter()
            samples.append((done - start, (first[0] if first else done) - start))
    return samples


_rounds = iter(range(1 << 30))


def _mqtt(collector: Collector, topic: str, rounds: int, concurrency: int, max_tokens: int) -> list[Sample]:
    samples: list[Sample] = []
    for _ in range(rounds):
        round_ = next(_rounds)
        ids = [f"c{concurrency}-r{round_}-{i}" for i in range(concurrency)]
        sent = {
            job_id: collector.publish(
                topic, {"id": job_id, "messages": MESSAGES, "max_tokens": max_tokens, "stream": True}
            )
            for job_id in ids
        }
        collector.wait(ids)
        for job_id in ids:
            done = collector.result_at[job_id]
            first = collector.first_chunk.get(job_id, done)
            samples.append((done - sent[job_id], first - sent[job_id]))
    return samples


def _http_one(port: int, model: str, max_tokens: int) -> Sample:
    body = json.dumps(
        {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "stream": True}
    ).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.connect()
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    return read_stream(conn, conn.getresponse(), start)


def read_stream(conn: http.client.HTTPConnection, response: http.client.HTTPResponse, start: float) -> Sample:
    """Read an SSE answer to its ``data: [DONE]``: (total, time to the first content) since ``start``."""
    assert response.status == 200, response.read()
    first = None
    tail = b""
    while True:  # big reads, no parsing: the client must cost the server as little as MQTT's does
        data = response.read1(65536)
        if not data:
            raise SystemExit("the stream ended without data: [DONE]")
        if first is None and b'"content": "' in tail + data:
            first = time.perf_counter()
        tail = (tail + data)[-64:]
        if b"data: [DONE]" in tail:
            break
    done = time.perf_counter()
    conn.close()
    return done - start, (first or done) - start


def _http(port: int, model: str, rounds: int, concurrency: int, max_tokens: int) -> list[Sample]:
    samples: list[Sample] = []
    for _round in range(rounds):
        samples += at_once(lambda: _http_one(port, model, max_tokens), concurrency)
    return samples


def _transport(max_tokens: int, requests: int) -> dict[bool, list[float]]:
    """The HTTP server over an intake that answers at once: its own cost per request, seconds."""
    from agent.config import HTTPConfig
    from agent.daemon import intake
    from agent.daemon.http.server import HTTPServer
    from agent.health.telemetry import JobStats
    from edge_contract.protocol import Chunk, ModelRef, Result

    class Instant:
        server: HTTPServer

        def submit(self, submission: intake.Submission) -> intake.Decision:
            def answer() -> None:
                sink, address = self.server.sink, submission.reply_address
                if submission.data.get("stream"):
                    for seq in range(max_tokens):
                        sink.chunk(
                            address,
                            Chunk(id=submission.job_id, seq=seq, text="ab ").model_dump_json().encode(),
                        )
                result = Result(
                    id=submission.job_id, status="succeeded", text="ab " * max_tokens, finish_reason="length"
                )
                sink.result(address, result.model_dump_json(exclude_none=True))

            threading.Thread(target=answer).start()  # as the worker thread would
            return intake.Accept(submission.job_id, None, submission.reply_address, None, None, 0.0)  # type: ignore[arg-type]

        def cancel(self, job_id: str) -> None:
            pass

    fake = Instant()
    server = HTTPServer(
        HTTPConfig(listen="127.0.0.1:0"),
        inbox=fake,
        model=lambda: ModelRef(name="demo"),
        stats=JobStats(),
        max_body_bytes=65536,
        max_tokens_limit=2048,
        overloaded_retry_s=10,
    )
    fake.server = server
    server.start()
    port = server.address[1]
    times: dict[bool, list[float]] = {False: [], True: []}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for stream in (False, True):
            body = json.dumps({"model": "demo", "messages": MESSAGES, "stream": stream}).encode()
            for _ in range(requests):
                start = time.perf_counter()
                conn.request("POST", "/v1/chat/completions", body=body)
                conn.getresponse().read()
                times[stream].append(time.perf_counter() - start)
    finally:
        conn.close()
        server.stop_accepting()
        server.close()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "demo")
    parser.add_argument("--requests", type=int, default=40, help="per mode and concurrency (a multiple of 8)")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    model = args.model.resolve()
    results: dict[tuple[str, int], list[Sample]] = {}
    engine = Engine(model)
    for concurrency in (1, 8):
        results["engine", concurrency] = _engine(
            engine, args.requests // concurrency, concurrency, args.max_tokens
        )
    del engine  # its threads must not compete with the agent's
    gc.collect()
    transport = _transport(args.max_tokens, 5 * args.requests)

    with tempfile.TemporaryDirectory(prefix="http-bench-") as tmp:
        broker = Broker(Path(tmp) / "broker")
        broker.start()
        agent = AgentProcess(
            broker, Path(tmp) / "agent", model, jobs={"max_queue": 64}, http={"listen": "127.0.0.1:0"}
        )
        agent.start()
        port = agent.http_port()
        collector = Collector(broker)
        name = json.loads(_get(port, "/v1/models"))["data"][0]["id"]
        try:
            topic = f"edge/{agent.device_id}/jobs"
            runs: list[tuple[str, Callable[[int], list[Sample]]]] = [
                ("mqtt", lambda c: _mqtt(collector, topic, 1, c, args.max_tokens)),
                ("http", lambda c: _http(port, name, 1, c, args.max_tokens)),
            ]
            for _warm in range(3):
                for _mode, run in runs:
                    run(1)
            for concurrency in (1, 8):
                for _round in range(args.requests // concurrency):
                    for mode, run in runs:
                        results.setdefault((mode, concurrency), []).extend(run(concurrency))
        finally:
            collector.client.loop_stop()
            agent.stop()
            broker.stop()

    print(
        f"Machine: {machine()}; model {model.name}, "
        f"{args.max_tokens} new tokens at most, greedy, streamed; {args.requests} requests per row.\n"
    )
    print("| mode | streams | p50 ms | p95 ms | TTFT p50 ms | TTFT p95 ms | p50 added over engine |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for concurrency in (1, 8):
        base = _pct([s[0] for s in results["engine", concurrency]], 50)
        for mode in ("engine", "mqtt", "http"):
            samples = results[mode, concurrency]
            lat = [s[0] for s in samples]
            ttft = [s[1] for s in samples]
            print(
                f"| {mode} | {concurrency} | {_pct(lat, 50):.2f} | {_pct(lat, 95):.2f} | {_pct(ttft, 50):.2f} "
                f"| {_pct(ttft, 95):.2f} | {_pct(lat, 50) - base:+.2f} |"
            )
    print(
        f"\nThe HTTP server alone (an intake that answers at once; client in the same process), {5 * args.requests} requests:\n"
    )
    print("| answer | p50 ms | p95 ms |\n|---|---:|---:|")
    print(f"| one JSON object | {_pct(transport[False], 50):.2f} | {_pct(transport[False], 95):.2f} |")
    print(
        f"| SSE, {args.max_tokens} chunks | {_pct(transport[True], 50):.2f} | {_pct(transport[True], 95):.2f} |"
    )
    return 0


def _get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    data = conn.getresponse().read()
    conn.close()
    return data


if __name__ == "__main__":
    raise SystemExit(main())
