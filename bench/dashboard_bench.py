"""The dashboard's weight and speed: the fleet view of 1,000 (``--devices N``) simulated devices.

Run as ``python bench/dashboard_bench.py [--devices 1000] [--runs 5]``.

One mosquitto, ``edge-fleet simulate`` (its own process; telemetry every 10 s) and ``edge-fleet
server`` as a process; Debian's chromium (``/usr/bin/chromium``) driven by Playwright.  Each run
opens the fleet view in a fresh browser context (an empty cache, the session cookie of one
sign-in) and measures:

* **transfer**: bytes on the wire for the whole view (HTML, CSS, JS, icon, the fleet JSON; headers
  included), from Chromium's own accounting (DevTools ``Network.loadingFinished``);
* **time to a rendered fleet view**: from ``goto`` to every device's row in the table;
* **each refresh** (the page polls ``/api/v1/fleet`` every 5 s): its bytes on the wire.

Also: ``/api/v1/fleet``'s size as JSON and gzipped, and its server time (median of 10).
Prints a Markdown table with the machine.
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.broker import Broker  # noqa: E402  (the harness the tests use)
from tests.support.browser import ARGS, CHROMIUM  # noqa: E402
from tests.support.fleet_server import FleetServer  # noqa: E402
from tests.support.wait import wait_until  # noqa: E402


def _simulate(broker: Broker, count: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_fleet.cli", "simulate", "--devices", str(count), "--group", "shop",
         "--broker", f"{broker.host}:{broker.port}", "--plaintext", "--seed", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "simulating N devices" once every one is connected
    if "simulating" not in line:
        raise SystemExit(f"the simulator did not start: {line!r}")
    return proc


def _fleet_json(server: FleetServer) -> tuple[int, int, float]:
    """(bytes of JSON, bytes the server sends gzipped, median time in s) of GET /api/v1/fleet."""
    times = []
    body = b""
    for _ in range(10):
        request = urllib.request.Request(server.url + "/api/v1/fleet", headers={
            "Authorization": f"Bearer {server.tokens['viewer']}", "Accept-Encoding": "gzip"})  # fmt: skip
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=30) as answer:
            body = answer.read()
            assert answer.headers.get("Content-Encoding") == "gzip", "the server did not compress"
        times.append(time.perf_counter() - start)
    return len(gzip.decompress(body)), len(body), statistics.median(times)


class _Wire:
    """Bytes on the wire of a page, as Chromium counts them."""

    def __init__(self, page: Any) -> None:
        self.total = 0
        self.requests = 0
        self.urls: dict[str, str] = {}
        self.sizes: list[tuple[str, int]] = []
        cdp = page.context.new_cdp_session(page)
        cdp.send("Network.enable")
        cdp.on("Network.requestWillBeSent", self._sent)
        cdp.on("Network.loadingFinished", self._finished)

    def _sent(self, event: dict[str, Any]) -> None:
        self.urls[event["requestId"]] = event["request"]["url"].split("/", 3)[-1]

    def _finished(self, event: dict[str, Any]) -> None:
        self.total += int(event["encodedDataLength"])
        self.requests += 1
        self.sizes.append((self.urls.get(event["requestId"], "?"), int(event["encodedDataLength"])))


def _run(browser: Any, url: str, cookie: dict[str, Any], devices: int) -> tuple[float, int, int, int]:
    """One cold load: (seconds to the rendered view, bytes, requests, bytes of one refresh)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.add_cookies([cookie])
    page = context.new_page()
    wire = _Wire(page)
    start = time.perf_counter()
    page.goto(url + "/#/fleet")
    page.locator("#fleet tbody tr").nth(devices - 1).wait_for(state="attached", timeout=120_000)
    rendered = time.perf_counter() - start
    page.wait_for_load_state("networkidle")  # (Playwright's waits also deliver the DevTools events)
    first, requests = wire.total, wire.requests
    deadline = time.monotonic() + 15
    while wire.requests == requests:
        if time.monotonic() > deadline:
            raise SystemExit("the page did not refresh within 15 s")
        page.wait_for_timeout(100)
    refresh = wire.total - first
    print("requests:", ", ".join(f"/{url} {size / 1024:.1f} KiB" for url, size in wire.sizes), flush=True)
    context.close()
    return rendered, first, requests, refresh


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="dashboard-bench-") as tmp:
        work = Path(tmp)
        os.environ["EDGE_FLEET_DB"] = str(work / "fleet-state.sqlite3")
        os.environ["EDGE_FLEET_PROFILE"] = str(work / "no-profile.toml")
        broker = Broker(work / "broker")
        broker.start()
        sim = server = None
        try:
            sim = _simulate(broker, args.devices)
            server = FleetServer(str(work / "server.sqlite3"), broker, work / "server.log").start()
            wait_until(lambda: len(server.get("/api/v1/devices")) == args.devices, timeout=120,
                       what=f"{args.devices} devices in the inventory")  # fmt: skip
            wait_until(lambda: all(d["temp_c"] is not None for d in server.get("/api/v1/devices")), timeout=60,
                       what="every device's telemetry (the view's steady state)")  # fmt: skip
            size, zipped, api_s = _fleet_json(server)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                page = browser.new_page()
                page.goto(server.url + "/")
                page.fill("#token", server.tokens["viewer"])
                page.click("#signin button[type=submit]")
                page.wait_for_selector("#nav:not([hidden])")
                cookie = next(c for c in page.context.cookies() if c["name"] == "efs_session")
                runs = [_run(browser, server.url, cookie, args.devices) for _ in range(args.runs)]
                browser.close()
        finally:
            if sim is not None:
                sim.terminate()
                sim.wait(timeout=30)
            if server is not None:
                server.stop()
            broker.stop()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    times = sorted(r[0] for r in runs)
    print(f"\nMachine: {cpu}, {os.cpu_count()} vCPU, load average {os.getloadavg()[0]:.1f} at the end; "
          f"{args.devices} simulated devices, {args.runs} cold loads\n")  # fmt: skip
    print("| measure | value |\n|---|---|")
    print(
        f"| fleet view, total transfer (cold, headers included) | {statistics.median(r[1] for r in runs) / 1024:.1f} KiB in {runs[0][2]} requests |"
    )
    print(f"| each refresh (every 5 s) | {statistics.median(r[3] for r in runs) / 1024:.1f} KiB |")
    print(
        f"| time to a rendered fleet view | median {times[len(times) // 2]:.2f} s (min {times[0]:.2f}, max {times[-1]:.2f}) |"
    )
    print(f"| GET /api/v1/fleet | {size / 1024:.0f} KiB of JSON, sent as {zipped / 1024:.1f} KiB gzipped; {api_s * 1000:.0f} ms median (10 calls) |")  # fmt: skip


if __name__ == "__main__":
    main()
