"""Fleet operations at scale: 1,000 (or --devices N) simulated devices on one mosquitto.

Run as ``python bench/fleet_bench.py [--devices 1000] [--delay 2] [--watch-s 60] [--quick]``.

0. **Inventory**: ``edge-fleet devices`` reads every retained status into the
   state file and lists it (wall, CPU, peak RSS); after the rollout,
   ``edge-fleet status`` (the one-shot table) likewise.  ``--quick`` stops there.

1. **Rollout**: ``edge-fleet rollout`` over 1%,10%,50%,100% waves of
   ``--devices`` simulated devices whose updates take ``--delay`` s (±20 %).
   Reports the wall time, the controller's time beyond the simulated delays
   (wall time - 4 waves x the slowest possible device, 1.2 x delay) and the
   controller's CPU time.
2. **Failures**: the same with 20 % of updates failing and
   ``--max-failure-rate 0.1``: in which wave the rollout halted, and whether
   that is the first wave whose devices crossed the threshold.
3. **Watch**: ``edge-fleet watch`` for ``--watch-s`` seconds while every device
   reports telemetry every 10 s; its CPU time as a share of one core.  Its
   output goes to a file, so every frame renders all rows (a terminal would
   show only what fits): the worst case.

The simulator (``edge-fleet simulate``, test tooling) runs in its own process,
so the figures are the controller's and the view's alone.  Prints a Markdown
table with the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


from edge_contract import signing  # noqa: E402
from tests.support.broker import Broker  # noqa: E402  (the same broker harness the tests use)
from tests.support.releases import placeholder_release  # noqa: E402

FLEET = [sys.executable, "-m", "edge_fleet.cli"]


def _simulate(
    broker: Broker, count: int, group: str, prefix: str, trust: Path, **options: float
) -> subprocess.Popen[str]:
    args = [*FLEET, "simulate", "--devices", str(count), "--group", group, "--name-prefix", prefix]
    args += ["--trust", str(trust), "--broker", f"{broker.host}:{broker.port}", "--plaintext", "--seed", "1"]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "simulating N devices" once every one is connected
    if "simulating" not in line:
        raise SystemExit(f"the simulator did not start: {line!r}")
    return proc


class _Done(Exception):
    """--quick: the remaining measurements are skipped."""


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run_timed(args: list[str]) -> tuple[subprocess.CompletedProcess[str], float, float]:
    done, wall, cpu, _rss = _run_measured(args)
    return done, wall, cpu


def _run_measured(args: list[str]) -> tuple[subprocess.CompletedProcess[str], float, float, float]:
    """Run a command; its result, wall time, CPU time and peak resident memory (MiB, sampled)."""
    import psutil

    cpu_before = _children_cpu()
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, text=True)
        peak = 0
        watched = psutil.Process(proc.pid)
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, watched.memory_info().rss)
            time.sleep(0.05)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(args, proc.returncode, out.read(), err.read())
    return done, wall, _children_cpu() - cpu_before, peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--delay", type=float, default=2.0, help="seconds a simulated update takes")
    parser.add_argument("--watch-s", type=float, default=60.0)
    parser.add_argument(
        "--quick", action="store_true", help="only inventory, rollout and status (no watch, no failures)"
    )
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (min(hard, 3 * args.devices + 256), hard)
    )  # mosquitto inherits it

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Broker(work / "broker")
        broker.start()
        key = signing.generate()
        trust = work / "fleet.pub"
        trust.write_text(signing.PublicKey(key.public_key(), signing.key_id(key.public_key())).to_line())
        rows: list[tuple[str, str]] = []
        try:
            # 1. A clean rollout.
            sim = _simulate(
                broker, args.devices, "bench", "dev", trust, update_delay=args.delay, telemetry_interval=10
            )
            db = work / "rollouts.sqlite3"
            where = ["--db", str(db), "--broker", f"{broker.host}:{broker.port}", "--plaintext"]
            done, wall, cpu, rss = _run_measured([*FLEET, "devices", "--json", "--wait", "30", *where])
            listed = len(done.stdout.splitlines())
            rows.append(
                ("`edge-fleet devices` (inventory from the retained statuses)", f"{listed} devices recorded and listed in {wall:.1f} s, CPU {cpu:.1f} s, peak RSS {rss:.0f} MiB")
            )  # fmt: skip
            done, wall, cpu, rss = _run_measured(
                [*FLEET, "rollout", str(placeholder_release(key, "2.0.0", work)), "--group", "bench", "--waves",
                 "1%,10%,50%,100%", *where]
            )  # fmt: skip
            if done.returncode != 0:
                raise SystemExit(f"rollout failed:\n{done.stdout}\n{done.stderr}")
            rollout_rss = rss
            with sqlite3.connect(db) as conn:
                states = dict(conn.execute("SELECT state, COUNT(*) FROM targets GROUP BY state").fetchall())
            simulated = 4 * 1.2 * args.delay
            rows += [
                ("devices online", str(args.devices)),
                ("rollout 1%,10%,50%,100%: final states", ", ".join(f"{n} {s}" for s, n in states.items())),
                (
                    "rollout wall time",
                    f"{wall:.1f} s (simulated updates: 4 waves of at most {1.2 * args.delay:.1f} s)",
                ),
                ("controller time beyond the simulated delays", f"{wall - simulated:.1f} s"),
                ("controller CPU time", f"{cpu:.1f} s"),
                ("controller peak RSS", f"{rollout_rss:.0f} MiB"),
            ]
            done, wall, cpu, rss = _run_measured([*FLEET, "status", "--wait", "30", *where])
            shown = sum(1 for line in done.stdout.splitlines() if line.startswith("dev-"))
            rows.append(
                ("`edge-fleet status` (one-shot table)", f"{shown} rows in {wall:.1f} s, CPU {cpu:.1f} s, peak RSS {rss:.0f} MiB")
            )  # fmt: skip
            if args.quick:
                sim.terminate()
                sim.wait(timeout=60)
                raise _Done

            # 3. The live view over the same fleet (telemetry every 10 s from every device),
            # less what starting Python and connecting cost (measured alone).
            _done, _wall, startup = _run_timed(
                [
                    *FLEET,
                    "watch",
                    "--duration",
                    "0",
                    "--broker",
                    f"{broker.host}:{broker.port}",
                    "--plaintext",
                ]
            )
            done, wall, cpu = _run_timed(
                [*FLEET, "watch", "--duration", str(args.watch_s), "--broker", f"{broker.host}:{broker.port}", "--plaintext"]
            )  # fmt: skip
            frames = done.stdout.count("\x1b[H\x1b[2J")
            rows.append(
                ("watch: CPU share of one core", f"{100 * (cpu - startup) / args.watch_s:.1f} % over {args.watch_s:.0f} s ({frames} frames of {args.devices} rows; start-up's {startup:.1f} s CPU excluded)")
            )  # fmt: skip
            sim.terminate()
            sim.wait(timeout=30)

            # 2. A rollout into 20 % failures.
            sim = _simulate(
                broker, args.devices, "flaky", "flaky", trust, update_delay=args.delay, failure_rate=0.2
            )
            done, wall, _cpu = _run_timed(
                [*FLEET, "rollout", str(placeholder_release(key, "3.0.0", work)), "--group", "flaky", "--waves",
                 "1%,10%,50%,100%", "--max-failure-rate", "0.1", "--db", str(db), "--broker",
                 f"{broker.host}:{broker.port}", "--plaintext"]
            )  # fmt: skip
            with sqlite3.connect(db) as conn:
                state, wave = conn.execute("SELECT state, wave FROM rollouts WHERE grp = 'flaky'").fetchone()
                targets = conn.execute(
                    "SELECT wave, state FROM targets WHERE rollout LIKE '%/flaky'"
                ).fetchall()
            crossing = None
            for k in range(4):
                failed = sum(1 for w, s in targets if w <= k and s in ("failed", "timed_out"))
                size = sum(1 for w, _s in targets if w <= k)
                if failed > 0.1 * size:
                    crossing = k
                    break
            sent = sum(1 for _w, s in targets if s != "pending")
            rows.append(
                (
                    "rollout with 20 % failing updates",
                    f"{state} in wave {wave + 1} after {wall:.1f} s; first wave over 10 %: "
                    f"{'none' if crossing is None else crossing + 1}; {sent} of {len(targets)} devices were sent it",
                )
            )
            sim.terminate()
            sim.wait(timeout=30)
        except _Done:
            pass
        finally:
            broker.stop()

    cpu_name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    print(
        f"\nMachine: {cpu_name}, {os.cpu_count()} logical cores, Python {platform.python_version()}, one mosquitto\n"
    )
    print("| measure | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
