"""A batch of boxes enrolling at once on one claim (one shared client id) vs one after another.

Run as ``python bench/enroll_bench.py [--boxes 10,30]``.

For each N: a real mosquitto from ``edge-fleet broker init``, one claim for N boxes, one
``edge-fleet enroll serve``; then

* **burst**: N ``agent.enroll.enroll`` calls started together (each its own link, all
  with the claim's identity, so the broker gives each new connection the session of
  the one before): wall time until every box holds its certificate, and how many
  connections were taken from a box meanwhile;
* **sequential** (first): N boxes one after another on a fresh claim (no contention: the best
  case a batch could hope for).

Prints a Markdown table with the ratio burst/sequential and the machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "deploy"))

from agent.enroll import enroll  # noqa: E402
from edge_fleet.cli import main as fleet_cli  # noqa: E402
from tests.support.broker import Broker  # noqa: E402  (the same broker harness the tests use)
from tests.support.pki import Fleet  # noqa: E402


class _Drops(logging.Handler):
    """Counts the links' "disconnected from broker" warnings (a connection taken by another box)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "disconnected from broker" in record.getMessage():
            self.count += 1


def _claim(broker: Broker, fleet: Fleet, name: str, out: Path, count: int) -> Path:
    create = ["claim", "create", name, "--ca", str(fleet.ca_dir), "--out", str(out), "--count", str(count)]
    assert fleet_cli([*create, "--group", "g1", *broker.admin_flags()]) == 0
    return out


def _serve(broker: Broker, fleet: Fleet) -> threading.Thread:
    """One `edge-fleet enroll serve` for the whole run (a daemon thread: it ends with the bench)."""
    argv = ["enroll", "serve", "--ca", str(fleet.ca_dir), *broker.admin_flags()]
    thread = threading.Thread(target=fleet_cli, args=(argv,), daemon=True)
    thread.start()
    return thread


def _run(broker: Broker, fleet: Fleet, work: Path, n: int, *, burst: bool) -> tuple[float, int]:
    tag = f"{'b' if burst else 's'}{n}"
    claim = _claim(broker, fleet, tag, work / f"claim-{tag}", n)
    enrolled: list[str] = []

    def box(name: str) -> None:
        enroll(name, claim, (broker.host, broker.port), work / name, timeout_s=300)
        enrolled.append(name)

    names = [f"{tag}-box-{i}" for i in range(n)]
    start = time.monotonic()
    if burst:
        threads = [threading.Thread(target=box, args=(name,)) for name in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    else:
        for name in names:
            box(name)
    wall = time.monotonic() - start
    assert sorted(enrolled) == sorted(names), f"{n - len(enrolled)} box(es) did not enroll"
    return wall, 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", default="10,30", help="batch sizes, comma-separated")
    args = parser.parse_args()
    drops = _Drops()
    logging.getLogger("agent.link").addHandler(drops)
    logging.getLogger("agent.link").propagate = False
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fleet = Fleet(work / "pki")
        broker = Broker(work / "broker", fleet)
        broker.start()
        _serve(broker, fleet)
        try:
            for n in (int(x) for x in args.boxes.split(",")):
                sequential, _ = _run(broker, fleet, work, n, burst=False)
                drops.count = 0
                burst, _ = _run(broker, fleet, work, n, burst=True)
                taken = drops.count
                rows.append((n, burst, taken, sequential))
                print(
                    f"{n} boxes: burst {burst:.1f} s ({taken} taken), sequential {sequential:.1f} s",
                    flush=True,
                )
        finally:
            broker.cleanup()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    print(f"\nMachine: {cpu}, {os.cpu_count()} vCPU, load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| boxes | burst (all at once) | connections taken | sequential | burst / sequential |")
    print("|---|---|---|---|---|")
    for n, burst, taken, sequential in rows:
        print(f"| {n} | {burst:.1f} s | {taken} | {sequential:.1f} s | {burst / sequential:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
