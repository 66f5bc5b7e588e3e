"""Does the engine fit a memory limit? One run inside a cgroup v1 memory limit, one without, compared.

    python bench/memory_fit.py --model /work/cache/phi3-mini-shape-32l-int4-kv8 \
        --prepacked-dir /work/cache/prepacked --limit-mb 3147 --prompt 2016 --new 16

Resident-set figures (``memory_bench``) say how much a run touches; they do not say
whether it needs all of it at once.  Here the same run (``memory_bench``'s child:
load, prefill a random prompt, decode) is made twice, first without a limit (which
also makes the repacked copy if it is missing), then inside a fresh cgroup v1
memory cgroup whose ``memory.limit_in_bytes`` is the limit: the kernel must then
reclaim file-backed pages (the mapped model, its repacked copy) to keep the
anonymous ones, with no swap on a box like this.  Reported per run: whether it
completed (or was OOM-killed), the cgroup's peak charge (anonymous + page cache
charged to it), major page faults (pages read back from disk), load time and
tokens/s.  A run that completes with few major faults and the same speed fits;
many faults and a lower speed mean the working set does not fit and the pages
are re-read every pass (thrashing).  Needs root and the cgroup v1 memory
controller at ``/sys/fs/cgroup/memory``.

Before each run the model's files and its repacked copy are evicted from the page
cache (``posix_fadvise`` DONTNEED on those files only, not the whole cache, which
other jobs share): cgroup v1 charges a cached page to the cgroup that first read
it, so pages left cached by an earlier run would not count against the limit.
Both runs therefore start cold, and their major faults include the first read of
the weights; what the limited run adds beyond the unlimited one is re-reading.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import memory_bench  # noqa: E402

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
_MiB = 1 << 20


def verdict(completed: bool, faults: int, speed: float, unlimited_speed: float) -> str:
    """One word for a limited run against the unlimited one: fits, slower (thrashing) or fails."""
    if not completed:
        return "fails"
    if faults > 10_000 or speed < 0.8 * unlimited_speed:
        return "thrashes"
    return "fits"


def _stat(group: Path) -> dict[str, int]:
    lines = (group / "memory.stat").read_text().splitlines()
    return {k: int(v) for k, v in (line.split() for line in lines)}


def evict(*folders: Path) -> int:
    """Drop the page-cache pages of every file under ``folders`` (unmapped ones); returns the bytes advised."""
    advised = 0
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
                advised += path.stat().st_size
    return advised


def _kill_group(group: Path, timed_out: list[bool]) -> None:
    timed_out.append(True)
    for pid in (group / "cgroup.procs").read_text().split():
        os.kill(int(pid), signal.SIGKILL)


def run(
    model: Path,
    options: dict[str, Any],
    prompt: int,
    new: int,
    limit_mb: int | None,
    timeout_s: float = 1800.0,
) -> dict[str, Any]:
    """One ``memory_bench`` child in a new memory cgroup (limited to ``limit_mb`` unless None).

    A run still going after ``timeout_s`` (thrashing) is killed and reported as not completed.
    """
    group = CGROUP_ROOT / f"edge_agent_fit_{os.getpid()}_{time.monotonic_ns()}"
    group.mkdir()
    try:
        if limit_mb is not None:
            (group / "memory.limit_in_bytes").write_text(str(limit_mb * _MiB))

        def enter() -> None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

        evict(model, *([Path(options["prepacked_dir"])] if "prepacked_dir" in options else []))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        timed_out: list[bool] = []
        timer = threading.Timer(timeout_s, _kill_group, (group, timed_out))
        timer.start()
        try:
            got = memory_bench.measure(model, dict(options), prompt, new, 1 << 30, preexec=enter, check=False)
        finally:
            timer.cancel()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        stat = _stat(group)
        got.update(
            limit_mb=limit_mb,
            timed_out=bool(timed_out),
            completed=got["exit"] == 0 and len(got["markers"]) == len(memory_bench.PHASES),
            major_faults=after.ru_majflt - before.ru_majflt,
            cgroup_peak_mb=int((group / "memory.max_usage_in_bytes").read_text()) / _MiB,
            cgroup_failcnt=int((group / "memory.failcnt").read_text()),
            oom_kills=int(
                dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines()).get(
                    "oom_kill", 0
                )
            ),
            pgmajfault=stat.get("total_pgmajfault", stat.get("pgmajfault", 0)),
        )
        return got
    finally:
        time.sleep(0.5)
        group.rmdir()


def describe(name: str, got: dict[str, Any]) -> str:
    markers = got["markers"]
    speeds = markers[-1] if got["completed"] else {}
    load = markers[2].get("seconds", 0.0) if len(markers) > 2 else 0.0
    outcome = "completed" if got["completed"] else f"FAILED exit {got['exit']}"
    outcome += ", killed after the timeout" if got["timed_out"] else ""
    return (
        f"{name}: {outcome}; "
        f"cgroup peak {got['cgroup_peak_mb']:.0f} MiB (failcnt {got['cgroup_failcnt']}, oom kills {got['oom_kills']}); "
        f"peak anon {got['decode']['peak_anon']:.0f} file {max(got[p]['peak_file'] for p in memory_bench.PHASES):.0f} MiB; "
        f"major faults {got['major_faults']}; load {load:.1f}s; "
        f"prefill {speeds.get('prefill_tok_s', 0):.2f} tok/s decode {speeds.get('decode_tok_s', 0):.2f} tok/s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--prepacked-dir", type=Path, help="the repacked copy's root (made by the first run)")
    parser.add_argument("--limit-mb", type=int, default=3147, help="3,147 MiB = 3.3 GB")
    parser.add_argument("--prompt", type=int, default=2016)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument(
        "--prefix-cache-mb", type=int, default=0, help="the prefix cache's budget (the daemon's default: 256)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-unlimited", action="store_true")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="a run still going then is killed")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not (CGROUP_ROOT / "memory.limit_in_bytes").is_file():
        raise SystemExit(f"no cgroup v1 memory controller at {CGROUP_ROOT}")
    options: dict[str, Any] = {
        "threads": args.threads,
        "prefill_chunk_tokens": args.chunk,
        "prefix_cache_mb": args.prefix_cache_mb,
    }
    if args.prepacked_dir:
        options["prepacked_dir"] = str(args.prepacked_dir)
    results: dict[str, Any] = {}
    limits = ([None] if not args.skip_unlimited else []) + [args.limit_mb]
    for limit in limits:
        name = "unlimited" if limit is None else f"limit {limit} MiB"
        results[name] = run(args.model, options, args.prompt, args.new, limit, args.timeout_s)
        print(describe(name, results[name]), flush=True)
    if "unlimited" in results and results["unlimited"]["completed"]:
        limited = results[f"limit {args.limit_mb} MiB"]
        speed = limited["markers"][-1].get("decode_tok_s", 0.0) if limited["completed"] else 0.0
        base = results["unlimited"]["markers"][-1]["decode_tok_s"]
        print(f"verdict: {verdict(limited['completed'], limited['major_faults'], speed, base)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
