"""Telemetry history in the server's database, for the dashboard's charts.

``Recorder`` samples the broker link's latest telemetry of every box (every ``every_s``; a box
publishes every ``[telemetry] interval_s``, 10 s by default) and appends one row per new
message.  Retention is bounded: rows at full resolution are kept for ``full_s`` (a day),
then averaged into ``bucket_s`` buckets (5 minutes), which are dropped after ``keep_s``
(30 days).  Prometheus (``/metrics``) is the way to keep years.

Jobs per minute come from the difference of the box's ``jobs.total`` counters between two
recorded messages (so a message the sampler missed loses no jobs); after an agent restart
(totals go down) from the message's ``interval`` counts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edge_contract.telemetry import JobCounts, Telemetry

from ..db import Database

log = logging.getLogger("edge_fleet.server.dashboard")

FULL_S = 24 * 3600.0
BUCKET_S = 300
KEEP_S = 30 * 24 * 3600.0
#: The series a chart can show, as stored (``jobs`` is a count over ``span`` seconds).
COLUMNS = ("tok_s", "temp_c", "mem_mb", "queue", "jobs", "cert_expires_at")
_MAX_COMPACT = 200_000  # raw rows downsampled per pass (the rest waits for the next pass)


@dataclass(frozen=True)
class Point:
    """One stored row."""

    device: str
    at: float
    span: float
    res: int
    tok_s: float | None
    temp_c: float | None
    mem_mb: float | None
    queue: float | None
    jobs: float | None
    cert_expires_at: float | None

    def row(self) -> tuple[Any, ...]:
        """The values in the table's column order."""
        return (self.device, self.at, self.span, self.res, self.tok_s, self.temp_c, self.mem_mb,
                self.queue, self.jobs, self.cert_expires_at)  # fmt: skip


_INSERT = (
    "INSERT INTO telemetry_history (device, at, span, res, tok_s, temp_c, mem_mb, queue, jobs, "
    "cert_expires_at) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (device, at) DO NOTHING"
)  # (several servers on one database record the same messages: one row each)


def _finished(counts: JobCounts) -> int:
    return counts.succeeded + counts.failed + counts.rejected + counts.canceled + counts.expired


def point_of(telemetry: Telemetry, previous: Telemetry | None) -> Point:
    """The row for one telemetry message (``previous``: the device's last recorded one)."""
    total = _finished(telemetry.jobs.total)
    if previous is not None and previous.ts < telemetry.ts and total >= _finished(previous.jobs.total):
        jobs, span = float(total - _finished(previous.jobs.total)), telemetry.ts - previous.ts
    else:
        jobs, span = float(_finished(telemetry.jobs.interval)), telemetry.interval_s
    temp = telemetry.temperature
    return Point(
        device=telemetry.device_id, at=telemetry.ts, span=span, res=0, tok_s=telemetry.jobs.decode_tok_s,
        temp_c=temp.soc_c if temp.soc_c is not None else temp.max_c,
        mem_mb=None if telemetry.memory.available_mb is None else float(telemetry.memory.available_mb),
        queue=None if telemetry.jobs.queue_depth is None else float(telemetry.jobs.queue_depth),
        jobs=jobs, cert_expires_at=telemetry.cert_expires_at,
    )  # fmt: skip


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def merge(points: Sequence[Point], at: float, res: int) -> Point:
    """Several rows as one: means of the gauges, the sum of jobs and spans, the last expiry."""
    return Point(
        device=points[0].device, at=at, span=sum(p.span for p in points), res=res,
        tok_s=_mean([p.tok_s for p in points]), temp_c=_mean([p.temp_c for p in points]),
        mem_mb=_mean([p.mem_mb for p in points]), queue=_mean([p.queue for p in points]),
        jobs=sum(p.jobs or 0.0 for p in points),
        cert_expires_at=next((p.cert_expires_at for p in reversed(points) if p.cert_expires_at), None),
    )  # fmt: skip


class History:
    """The ``telemetry_history`` table."""

    def __init__(
        self, db: Database, *, full_s: float = FULL_S, bucket_s: int = BUCKET_S, keep_s: float = KEEP_S
    ) -> None:
        if not 0 < full_s < keep_s or bucket_s < 1:
            raise ValueError("telemetry history needs 0 < full_s < keep_s and bucket_s >= 1")
        self.db = db
        self.full_s, self.bucket_s, self.keep_s = full_s, bucket_s, keep_s

    def add(self, points: Sequence[Point]) -> None:
        """Append rows."""
        self.db.executemany(_INSERT, [p.row() for p in points])

    def points(self, device: str, since: float, until: float | None = None) -> list[Point]:
        """A device's rows in ``[since, until]``, oldest first."""
        rows = self.db.query(
            "SELECT device, at, span, res, tok_s, temp_c, mem_mb, queue, jobs, cert_expires_at "
            "FROM telemetry_history WHERE device = ? AND at >= ? AND at <= ? ORDER BY at",
            (device, since, until if until is not None else time.time() + 3600),
        )
        return [Point(*r) for r in rows]

    def series(self, device: str, since: float, *, max_points: int = 360) -> dict[str, Any]:
        """The charts' data: columns ``at``, ``tok_s``, ``temp_c``, ``mem_mb``, ``queue``,
        ``jobs_per_min`` (at most ``max_points``: rows are averaged into equal time slices)."""
        points = self.points(device, since)
        step = 0.0
        if len(points) > max_points:
            step = (time.time() - since) / max_points
            slices: dict[int, list[Point]] = {}
            for p in points:
                slices.setdefault(int((p.at - since) // step), []).append(p)
            points = [
                merge(group, since + (i + 0.5) * step, int(step)) for i, group in sorted(slices.items())
            ]
        return {
            "device": device,
            "since": since,
            "slice_s": round(step, 1),
            "at": [round(p.at, 1) for p in points],
            "tok_s": [p.tok_s for p in points],
            "temp_c": [p.temp_c for p in points],
            "mem_mb": [p.mem_mb for p in points],
            "queue": [p.queue for p in points],
            "jobs_per_min": [
                None if p.jobs is None or p.span <= 0 else round(p.jobs * 60.0 / p.span, 2) for p in points
            ],
            "cert_expires_at": next((p.cert_expires_at for p in reversed(points) if p.cert_expires_at), None),
        }

    def compact(self, now: float | None = None) -> tuple[int, int]:
        """Downsample full-resolution rows older than ``full_s`` into buckets and drop rows older than
        ``keep_s``; returns (rows downsampled, rows dropped)."""
        now = time.time() if now is None else now
        cutoff = (now - self.full_s) // self.bucket_s * self.bucket_s  # whole buckets only
        with self.db.transaction():
            rows = self.db.query(
                "SELECT device, at, span, res, tok_s, temp_c, mem_mb, queue, jobs, cert_expires_at "
                "FROM telemetry_history WHERE res = 0 AND at < ? ORDER BY at LIMIT ?",
                (cutoff, _MAX_COMPACT),
            )
            old = [Point(*r) for r in rows]
            if old:
                last = old[-1].at
                buckets: dict[tuple[str, float], list[Point]] = {}
                for p in old:
                    start = p.at // self.bucket_s * self.bucket_s
                    buckets.setdefault((p.device, start), []).append(p)
                self.db.execute("DELETE FROM telemetry_history WHERE res = 0 AND at <= ?", (last,))
                self.add(
                    [merge(g, start + self.bucket_s / 2, self.bucket_s) for (_d, start), g in buckets.items()]
                )
            dropped = self.db.execute("DELETE FROM telemetry_history WHERE at < ?", (now - self.keep_s,))
        return len(old), dropped


class Recorder:
    """Samples the broker link's telemetry into ``History`` from a thread of its own."""

    def __init__(self, history: History, link: Any, *, every_s: float = 2.0, compact_every_s: float = 600.0):
        self.history = history
        self.link = link
        self.every_s = every_s
        self.compact_every_s = compact_every_s
        self._last: dict[str, Telemetry] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.recorded = 0
        self.last_error: str | None = None

    def sample(self) -> int:
        """Record every message newer than the last recorded one of its device; returns how many."""
        with self.link.lock:
            latest = [d.telemetry for d in self.link.view.devices.values() if d.telemetry is not None]
        fresh = []
        for telemetry in latest:
            previous = self._last.get(telemetry.device_id)
            if previous is not None and telemetry.ts <= previous.ts:
                continue
            fresh.append(point_of(telemetry, previous))
            self._last[telemetry.device_id] = telemetry
        self.history.add(fresh)
        self.recorded += len(fresh)
        return len(fresh)

    def run(self) -> None:
        """Sample until ``stop``; an error is logged and kept for ``/healthz``-style reporting, and
        the loop goes on (the database may come back)."""
        next_compact = time.monotonic() + 5.0
        while not self._stop.wait(self.every_s):
            try:
                self.sample()
                if time.monotonic() >= next_compact:
                    next_compact = time.monotonic() + self.compact_every_s
                    merged, dropped = self.history.compact()
                    if merged or dropped:
                        log.info("telemetry history: %d rows downsampled, %d dropped", merged, dropped)
                self.last_error = None
            except Exception as exc:  # one failed pass must not end the history
                self.last_error = str(exc)
                log.exception("telemetry history: recording failed (will retry)")

    def start(self) -> None:
        """Start the thread."""
        self._thread = threading.Thread(target=self.run, name="telemetry-history", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
