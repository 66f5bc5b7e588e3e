"""Telemetry: what the box and the agent are doing, measured every interval, and a health verdict.

Every ``[telemetry] interval_s`` the daemon publishes one ``Telemetry`` message
(QoS 0) to ``{prefix}/{device}/telemetry``.  The message and its parts live in
``edge_contract.telemetry``; this module holds ``assess`` (a message and ``HealthThresholds`` in, a ``Health`` verdict out)
and ``JobStats``, which accumulates what the worker finished.
``system_probe.SystemProbe`` measures the machine and fills the message.

A value the machine cannot report is ``null``, never a guess.  Sizes are MiB
(written ``_mb``), temperatures degrees Celsius, times seconds.  Every string
and dict is bounded so that a message stays well under 2 KB.
"""

from __future__ import annotations

import math
import threading
from collections import deque

from agent.health.options import HealthThresholds
from edge_contract.protocol import Health, HealthReason, JobStatus
from edge_contract.telemetry import JobCounts, JobsTelemetry, Telemetry, percentile

# -- health ------------------------------------------------------------------------------------


def assess(
    telemetry: Telemetry, thresholds: HealthThresholds, backlog: int | None, previous: Health | None = None
) -> Health:
    """The health verdict for ``telemetry``.

    ``previous`` (the last verdict) adds hysteresis: a box that was hot stays
    hot until it is ``temp_hysteresis_c`` below the limit, and low memory ends
    only ``mem_hysteresis_mb`` above it, so shedding does not flap.  Unknown
    values (null) never make a box degraded.
    """
    held = set(previous.reasons) if previous is not None else set()
    reasons: list[HealthReason] = []
    temp = telemetry.temperature.soc_c
    if temp is None:
        temp = telemetry.temperature.max_c
    if temp is not None:
        cool_by = thresholds.temp_hysteresis_c if "hot" in held else 0.0
        if temp >= thresholds.max_temp_c - cool_by:
            reasons.append("hot")
    if telemetry.throttling is not None:
        now = telemetry.throttling.now
        if now.throttled or now.freq_capped or now.soft_temp_limit:
            reasons.append("throttled")
        if now.under_voltage:
            reasons.append("under_voltage")
    available = telemetry.memory.available_mb
    if available is not None:
        margin = thresholds.mem_hysteresis_mb if "low_memory" in held else 0
        if available < thresholds.min_mem_available_mb + margin:
            reasons.append("low_memory")
    if telemetry.disk_free_mb is not None and telemetry.disk_free_mb < thresholds.min_disk_free_mb:
        reasons.append("low_disk")
    if backlog is not None and backlog > thresholds.max_backlog:
        reasons.append("broker_backlog")
    return Health(verdict="degraded" if reasons else "ok", reasons=reasons)


# -- job statistics -------------------------------------------------------------------------------


class JobStats:
    """Finished jobs, accumulated between telemetry messages. Thread-safe.

    Counters are kept both per interval and in total (see ``JobsTelemetry``).
    At most ``max_samples`` latencies and speeds are kept per interval (the
    most recent), which bounds memory whatever the job rate.
    """

    def __init__(self, max_samples: int = 4096, *, http: bool = False) -> None:
        """``http``: the HTTP API is on, its jobs are counted apart too (``record_http``)."""
        self._lock = threading.Lock()
        self._interval = JobCounts()
        self._total = JobCounts()
        self._http_total: int | None = 0 if http else None
        self._latencies: deque[float] = deque(maxlen=max_samples)
        self._speeds: deque[float] = deque(maxlen=max_samples)
        self._drafted = self._accepted = 0
        self._slot_steps = self._busy_slot_steps = 0

    def record(
        self, status: JobStatus, latency_s: float | None = None, decode_tok_s: float | None = None
    ) -> None:
        """Count one finished job.

        ``latency_s``: receipt to terminal result, for jobs that were accepted
        (None for those turned away at once, so they do not pull the
        percentiles down).  ``decode_tok_s``: the job's decode speed, when it
        generated more than one token.
        """
        with self._lock:
            for counts in (self._interval, self._total):
                setattr(counts, status, getattr(counts, status) + 1)
            if latency_s is not None and math.isfinite(latency_s) and latency_s >= 0:
                self._latencies.append(latency_s)
            if decode_tok_s is not None and math.isfinite(decode_tok_s) and decode_tok_s > 0:
                self._speeds.append(decode_tok_s)

    def record_http(self, status: JobStatus) -> None:
        """Count one finished job as an HTTP one too (``record`` counts it among all jobs)."""
        with self._lock:
            if self._http_total is not None:
                self._http_total += 1

    def record_speculation(self, drafted: int, accepted: int) -> None:
        """Count one job's draft tokens and the ones accepted (from its ``Usage``)."""
        with self._lock:
            self._drafted += max(0, drafted)
            self._accepted += max(0, min(accepted, drafted))

    def record_batch(self, busy_rows: int, passes: int, max_batch: int) -> None:
        """Count ``passes`` batched decode passes that ran ``busy_rows`` sequences in all."""
        with self._lock:
            self._busy_slot_steps += max(0, busy_rows)
            self._slot_steps += max(0, passes * max_batch)

    def snapshot_and_reset(self, queue_depth: int | None = None) -> JobsTelemetry:
        """The figures since the previous call; the interval starts afresh."""
        with self._lock:
            drafted, accepted = self._drafted, self._accepted
            busy, slots = self._busy_slot_steps, self._slot_steps
            self._drafted = self._accepted = self._slot_steps = self._busy_slot_steps = 0
            interval, self._interval = self._interval, JobCounts()
            total = self._total.model_copy()
            http_total = self._http_total
            latencies = sorted(self._latencies)
            speeds = list(self._speeds)
            self._latencies.clear()
            self._speeds.clear()
        return JobsTelemetry(
            queue_depth=queue_depth,
            interval=interval,
            total=total,
            latency_p50_s=_round(percentile(latencies, 0.50), 3),
            latency_p95_s=_round(percentile(latencies, 0.95), 3),
            decode_tok_s=_round(sum(speeds) / len(speeds) if speeds else None, 1),
            drafted_tokens=drafted,
            accepted_tokens=accepted,
            acceptance_rate=_round(accepted / drafted if drafted else None, 3),
            batch_occupancy=_round(busy / slots if slots else None, 3),
            http_total=http_total,
        )


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
