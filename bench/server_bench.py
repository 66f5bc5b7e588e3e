"""The fleet server at scale: simulated devices' telemetry, API latency, a fleet-wide rollout.

Run as ``python bench/server_bench.py [--devices 1000] [--telemetry-interval 1] [--db sqlite|postgresql|both]``.

For each database: one mosquitto, ``--devices`` simulated devices (``edge-fleet simulate``, in
its own process) sending telemetry every ``--telemetry-interval`` s, and ``edge-fleet server``
as a process.  Measured: the server's CPU (share of one core) and RSS over ``--window`` s of
telemetry; the p50/p95 latency of ``GET /api/v1/devices`` and ``GET /metrics`` (sequential
requests while the telemetry flows); and the wall time of a rollout to every device in
1%,10%,50%,100% waves (updates take ``--delay`` s ±20 %), with the controller's own time
beyond the simulated delays.  Prints a Markdown table with the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402

from edge_contract import signing  # noqa: E402
from tests.support.broker import Broker  # noqa: E402  (the harness the tests use)
from tests.support.fleet_server import FleetServer, fleet_cli  # noqa: E402
from tests.support.postgres import Postgres  # noqa: E402
from tests.support.releases import placeholder_release  # noqa: E402


def _latencies(server: FleetServer, path: str, count: int) -> tuple[float, float]:
    times = []
    request = urllib.request.Request(
        server.url + path, headers={"Authorization": f"Bearer {server.tokens['viewer']}"}
    )
    for _ in range(count):
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=60) as answer:
            answer.read()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def _bench(kind: str, args: argparse.Namespace, work: Path) -> dict[str, str]:
    broker = Broker(work / f"broker-{kind}")
    broker.start()
    cluster = Postgres() if kind == "postgresql" else None
    db = cluster.dsn() if cluster else str(work / "server.sqlite3")
    key = signing.generate()
    sim = subprocess.Popen(
        [sys.executable, "-m", "edge_fleet.cli", "simulate", "--devices", str(args.devices), "--group", "shop",
         "--broker", f"{broker.host}:{broker.port}", "--plaintext", "--update-delay", str(args.delay),
         "--telemetry-interval", str(args.telemetry_interval), "--seed", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert sim.stdout is not None
    sim.stdout.readline()  # every device connected
    server = FleetServer(db, broker, work / f"server-{kind}.log").start()
    try:
        deadline = time.monotonic() + 300
        while len(server.get("/api/v1/devices")) < args.devices:
            assert time.monotonic() < deadline, "the inventory never filled"
            time.sleep(1)
        assert server.process is not None
        proc = psutil.Process(server.process.pid)
        before = proc.cpu_times()
        time.sleep(args.window)
        after = proc.cpu_times()
        cpu = (after.user + after.system - before.user - before.system) / args.window
        rss = proc.memory_info().rss / 2**20
        devices_p50, devices_p95 = _latencies(server, "/api/v1/devices", args.requests)
        metrics_p50, metrics_p95 = _latencies(server, "/metrics", args.requests)
        manifest = placeholder_release(key, "2.0.0", work)
        start = time.monotonic()
        started = fleet_cli("rollout", str(manifest), "--select", "group=shop", env=server.env())
        assert started.returncode == 0, started.stderr
        rollout_id = started.stdout.splitlines()[0]
        done = server.wait_state(rollout_id, "done", "halted", timeout=3600)
        wall = time.monotonic() - start
        assert done["state"] == "done", done
        return {
            "database": kind,
            "devices": str(args.devices),
            "telemetry msg/s": f"{args.devices / args.telemetry_interval:.0f}",
            "server CPU (1 core)": f"{cpu:.0%}",
            "server RSS": f"{rss:.0f} MiB",
            "/api/v1/devices p50/p95": f"{devices_p50:.0f}/{devices_p95:.0f} ms",
            "/metrics p50/p95": f"{metrics_p50:.0f}/{metrics_p95:.0f} ms",
            "rollout (4 waves)": f"{wall:.1f} s",
            "beyond the delays": f"{wall - 4 * 1.2 * args.delay:.1f} s",
        }
    finally:
        server.stop()
        sim.terminate()
        sim.wait(timeout=30)
        broker.stop()
        if cluster is not None:
            cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--telemetry-interval", type=float, default=1.0)
    parser.add_argument("--delay", type=float, default=2.0)
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    args = parser.parse_args()
    os.environ.setdefault("EDGE_FLEET_PROFILE", "/nonexistent/profile.toml")
    rows = []
    for kind in ("sqlite", "postgresql") if args.db == "both" else (args.db,):
        with tempfile.TemporaryDirectory(prefix="server-bench-") as work:
            rows.append(_bench(kind, args, Path(work)))
    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}\n"
    )
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(row[k] for k in keys) + " |")


if __name__ == "__main__":
    main()
