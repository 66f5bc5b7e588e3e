"""What the benches share: the repository on ``sys.path``, the machine in one line, percentiles, the chat.

A bench runs as ``python bench/NAME.py`` (so ``bench/`` is on ``sys.path`` and this module imports
as ``harness``); importing it puts the repository first on the path too, for ``tests.support``'s
process harness (a real mosquitto, a real ``edge-agent run``) and the ``models`` package.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: The chat the request benches send (greedy, streamed), the same for MQTT and HTTP.
MESSAGES = [
    {"role": "system", "content": "You are the till's assistant."},
    {"role": "user", "content": "Is the device hot?"},
]

Sample = tuple[float, float]  # (latency, time to first token), seconds


def at_once(request: Callable[[], Sample], concurrency: int) -> list[Sample]:
    """Run ``request`` in ``concurrency`` threads started together; their samples."""
    samples: list[Sample] = []
    lock = threading.Lock()

    def client() -> None:
        sample = request()
        with lock:
            samples.append(sample)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return samples


def save_report(out: Path, name: str, report: dict[str, object], text: str) -> None:
    """Keep a run: ``out/NAME-STAMP.json`` (the figures) and ``.md`` (the table printed)."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"{name}-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}-{stamp}.md").write_text(text + "\n")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else (platform.processor() or platform.machine())


def machine() -> str:
    """The machine in words, with how busy it is now: ``CPU, N cores, arch; load average L``."""
    load = os.getloadavg()[0]
    return f"{cpu_name()}, {os.cpu_count()} cores, {platform.machine()}; load average {load:.1f}"


def pct(values: list[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` (inclusive method)."""
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def pct_ms(values: list[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` in seconds, as milliseconds."""
    return pct(values, q) * 1e3
