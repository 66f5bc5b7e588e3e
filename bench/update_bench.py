"""A model update of realistic size, phase by phase, and what serving sees of it.

Run as ``python bench/update_bench.py [--jobs-gap-ms 0]`` (needs the ``models`` extra the
first time: the Phi-3-mini-shaped int4 model of ``engine_bench.py`` is built and cached).

A real mosquitto, a real HTTP server (loopback) and a real ``edge-agent run``
serving the demo model with a stream of small jobs, one after another.  The
agent is sent a signed release of the Phi-3-mini-shaped 4-layer int4 model, twice:

* with memory for both models: the new one is loaded and smoke-tested beside
  the old one, then switched in between two jobs;
* with ``memory_reserve_mb`` so high that the old model must be unloaded first.

Reported: each phase's duration (from the retained ``model/state`` timestamps),
download and verify throughput, and the longest job latency while updating
next to the median before it: what the update costs the jobs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from engine_bench import ensure_models  # noqa: E402

from edge_contract import signing  # noqa: E402
from tests.support.agent import AgentProcess  # noqa: E402  (the harnesses the tests use)
from tests.support.broker import Broker  # noqa: E402
from tests.support.http import FileServer  # noqa: E402
from tests.support.mqtt_client import Caller  # noqa: E402
from tests.support.releases import Releases, payload  # noqa: E402

PHASES = ("downloading", "verifying", "testing", "activating", "active")


class JobStream:
    """Small jobs one after another until stopped; records each one's latency and finish time."""

    def __init__(self, caller: Caller, device: str) -> None:
        self.caller = caller
        self.topic = f"edge/{device}/jobs"
        self.done: list[tuple[float, float, str]] = []  # (finished at, latency, model version)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            job_id = f"j{n}-{time.monotonic_ns()}"
            sent = time.monotonic()
            self.caller.send(
                self.topic,
                {"id": job_id, "prompt": "Is the device hot?", "max_tokens": 8},
                response_topic=None,
            )
            result = self.caller.wait_result(job_id, timeout=120)
            now = time.monotonic()
            self.done.append((now, now - sent, (result.get("model") or {}).get("version") or "?"))

    def stop(self) -> None:
        """Finish the job in flight and stop."""
        self._stop.set()
        self._thread.join(timeout=130)


def _update(
    caller: Caller, agent: AgentProcess, releases: Releases, version: str, model: Path
) -> dict[str, Any]:
    manifest = releases.make(version, source=model, replaces=("demo",))  # the agents run models/demo
    jobs = JobStream(caller, agent.device_id)
    time.sleep(3.0)  # a baseline of jobs before the update
    started = time.monotonic()
    seen = caller.state_count(agent.device_id)
    caller.publish_retained(f"edge/{agent.device_id}/model/desired", payload(manifest))
    final = caller.wait_model_state(
        agent.device_id,
        lambda s: (
            (s.get("update") or {}).get("version") == version
            and s["update"]["phase"] in ("active", "failed", "rolled_back")
        ),
        timeout=600,
        since=seen,
    )
    ended = time.monotonic()
    time.sleep(3.0)
    jobs.stop()
    if final["update"]["phase"] != "active":
        raise SystemExit(f"update failed: {final['update']}")
    at: dict[str, float] = {}
    for state in caller.model_states[agent.device_id][seen:]:
        update = state.get("update") or {}
        if update.get("version") == version and update.get("phase") not in at:
            at[update["phase"]] = update["at"]
    baseline = [lat for t, lat, _v in jobs.done if t < started]
    during = [lat for t, lat, _v in jobs.done if started <= t <= ended + 0.5]
    finish_times = [t for t, _lat, _v in jobs.done]
    gaps = [b - a for a, b in itertools.pairwise(finish_times) if started <= b <= ended + 1]
    return {
        "bytes": manifest.total_bytes,
        "phases": {p: at[n] - at[p] for p, n in itertools.pairwise(PHASES) if p in at and n in at},
        "total_s": ended - started,
        "baseline_p50_ms": 1e3 * statistics.median(baseline) if baseline else None,
        "during_max_ms": 1e3 * max(during) if during else None,
        "max_gap_ms": 1e3 * max(gaps) if gaps else None,
        "jobs_during": len(during),
        "versions_after": sorted({v for t, _l, v in jobs.done if t > ended + 0.5}),
        "detail": final["update"].get("detail"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args()
    model = ensure_models(["int4"])["int4"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Broker(work / "broker")
        broker.start()
        (work / "www").mkdir()
        server = FileServer(work / "www")
        releases = Releases(server, signing.generate())
        caller = Caller(broker.host, broker.port, reply_filter=["edge/+/results/#", "edge/+/model/state"])
        try:
            for label, reserve, version in (
                ("both models in memory", 256, "2.0.0"),
                ("old model unloaded first", 1 << 20, "3.0.0"),
            ):
                agent = AgentProcess(
                    broker, work / f"agent-{version}", REPO / "models" / "demo", device_id=f"box-{version[0]}",
                    model_version="1.0.0", update={"trusted_keys": [releases.public_line], "memory_reserve_mb": reserve},
                )  # fmt: skip
                agent.start()
                try:
                    result = _update(caller, agent, releases, version, model)
                finally:
                    agent.stop()
                rows.append((label, result))
        finally:
            caller.close()
            server.stop()
            broker.stop()

    cpu = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    size_mb = rows[0][1]["bytes"] / 2**20
    print(
        f"\nMachine: {cpu}, {os.cpu_count()} logical cores; release: {model.name}, {size_mb:.0f} MiB; loopback HTTP\n"
    )
    print("| | " + " | ".join(label for label, _r in rows) + " |")
    print("| --- | " + " | ".join("---" for _ in rows) + " |")
    for phase in PHASES[:-1]:
        cells = []
        for _label, r in rows:
            seconds = r["phases"].get(phase)
            extra = ""
            if seconds and phase in ("downloading", "verifying"):
                extra = f" ({r['bytes'] / 2**20 / seconds:.0f} MiB/s)"
            cells.append("-" if seconds is None else f"{seconds:.2f} s{extra}")
        print(f"| {phase} | " + " | ".join(cells) + " |")
    for key, name in (
        ("total_s", "desired → active"),
        ("baseline_p50_ms", "job latency before (p50)"),
        ("during_max_ms", "longest job while updating"),
        ("max_gap_ms", "longest gap between answers while updating"),
    ):
        print(
            f"| {name} | "
            + " | ".join(
                "-" if r[key] is None else (f"{r[key]:.1f} s" if key == "total_s" else f"{r[key]:.0f} ms")
                for _l, r in rows
            )
            + " |"
        )
    print("| jobs answered while updating | " + " | ".join(str(r["jobs_during"]) for _l, r in rows) + " |")
    print(
        "| model of the jobs after | " + " | ".join(", ".join(r["versions_after"]) for _l, r in rows) + " |"
    )
    print()
    print(json.dumps({label: r for label, r in rows}, indent=1))


if __name__ == "__main__":
    main()
