"""Telemetry: what the box and the agent are doing, measured every interval, and a health verdict.

Every ``[telemetry] interval_s`` the daemon publishes one ``Telemetry`` message
(QoS 0) to ``{prefix}/{device}/telemetry``.  This module holds the message
and its parts (the ``[telemetry]`` and ``[health]`` configuration sections live in
``agent.config`` and are re-exported here), ``assess`` (a message and ``HealthThresholds`` in, a ``Health`` verdict out)
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
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.config import HealthThresholds as HealthThresholds
from agent.config import TelemetryConfig as TelemetryConfig
from edge_contract.protocol import Health, HealthReason, JobStatus

#: At most this many temperature sensors are reported (the hottest).
MAX_SENSORS = 8


# -- the message ------------------------------------------------------------------------------


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CPU(_Part):
    """Whole-machine CPU use."""

    percent: float | None = Field(None, description="Busy share of all cores since the last reading, 0-100.")
    load: tuple[float, float, float] | None = Field(None, description="Load average over 1, 5, 15 minutes.")
    cores: int | None = Field(None, description="Logical cores.")


class Memory(_Part):
    """RAM and swap, in MiB."""

    total_mb: int | None = None
    available_mb: int | None = Field(None, description="What new allocations can get without swapping.")
    swap_used_mb: int | None = None


class Temperature(_Part):
    """Temperature sensors, in degrees Celsius."""

    soc_c: float | None = Field(None, description="The SoC / CPU package, when a sensor is known to be it.")
    max_c: float | None = Field(None, description="The hottest sensor.")
    sensors: dict[Annotated[str, Field(max_length=40)], float] = Field(
        default_factory=dict, max_length=MAX_SENSORS, description="Sensor name to reading (at most 8)."
    )


class ThrottleFlags(_Part):
    """The Raspberry Pi firmware's throttling conditions; null where unreadable."""

    under_voltage: bool | None = None
    freq_capped: bool | None = Field(None, description="ARM frequency capped.")
    throttled: bool | None = None
    soft_temp_limit: bool | None = Field(None, description="Soft temperature limit active.")


class Throttling(_Part):
    """Throttling now and since boot (``vcgencmd get_throttled``, read from sysfs)."""

    now: ThrottleFlags
    since_boot: ThrottleFlags
    raw: str | None = Field(None, max_length=10, description="The firmware's bit field, in hex.")


class ProcessUsage(_Part):
    """The agent process itself."""

    rss_mb: float | None = None
    cpu_percent: float | None = Field(
        None, description="Since the last reading, in percent of one core (like top): 200 is two cores busy."
    )
    threads: int | None = None


class ModelInfo(_Part):
    """The model being served."""

    name: str = Field(max_length=64)
    version: str | None = Field(None, max_length=64)
    precision: str | None = Field(None, max_length=16, description="e.g. int4 or int8, when it is known.")
    prefix_cache: PrefixCacheTelemetry | None = Field(None, description="Null when the cache is off.")


class PrefixCacheTelemetry(_Part):
    """The engine's prefix cache: what it holds in memory and how often it helped."""

    bytes: int = Field(description="Keys and values held in memory.")
    budget_bytes: int = Field(description="[engine] prefix_cache_mb, in bytes.")
    entries: int = Field(description="Blocks of prompt tokens held.")
    lookups: int = Field(description="Prompts looked up since the model was loaded.")
    hits: int = Field(description="Lookups that reused a cached prefix.")
    hit_rate: float | None = Field(None, description="hits / lookups; null before the first job.")
    cached_tokens: int = Field(description="Prompt tokens served from the cache since the model was loaded.")

    @classmethod
    def of(cls, stats: BaseModel | None) -> PrefixCacheTelemetry | None:
        """From the engine's ``prefix_cache_stats()`` (None when the cache is off)."""
        return None if stats is None else cls.model_validate(stats.model_dump(include=set(cls.model_fields)))


class JobCounts(_Part):
    """Finished jobs by terminal status."""

    succeeded: int = 0
    failed: int = 0
    rejected: int = 0
    canceled: int = 0
    expired: int = 0


class JobsTelemetry(_Part):
    """Inference counters.

    ``interval`` counts the jobs finished since the previous message, ``total``
    those finished since the agent started: a lost QoS 0 message loses no
    counts, and a restart shows as ``total`` going down.  Latency and decode
    speed cover the interval; null when no job reported one.
    """

    queue_depth: int | None = Field(None, description="Jobs stored and waiting to run.")
    interval: JobCounts = Field(default_factory=JobCounts)
    total: JobCounts = Field(default_factory=JobCounts)
    latency_p50_s: float | None = Field(None, description="Median time from receipt to result.")
    latency_p95_s: float | None = None
    decode_tok_s: float | None = Field(None, description="Mean of the jobs' decode speeds, tokens/s.")
    drafted_tokens: int = Field(
        0, description="Draft tokens verified (speculative decoding) in the interval."
    )
    accepted_tokens: int = Field(0, description="Of those, the ones the model agreed with.")
    acceptance_rate: float | None = Field(None, description="accepted / drafted; null without drafts.")
    batch_occupancy: float | None = Field(
        None, description="Mean share of the batch's slots busy per decode pass; null without batching."
    )
    store_errors: int = Field(
        0, description="Job store errors (a full or failing disk) since the agent started."
    )
    store_resets: int = Field(
        0, description="Corrupt job databases moved aside in state_dir (and not deleted since)."
    )


class SystemReading(_Part):
    """Everything ``SystemProbe`` measures about the machine and the agent process."""

    uptime_s: float | None = Field(None, description="Since the machine booted.")
    agent_uptime_s: float | None = Field(None, description="Since the agent process started.")
    cpu: CPU = Field(default_factory=CPU)
    memory: Memory = Field(default_factory=Memory)
    disk_free_mb: int | None = Field(None, description="Free space where state_dir lives, MiB.")
    temperature: Temperature = Field(default_factory=Temperature)
    throttling: Throttling | None = Field(None, description="Raspberry Pi firmware flags; null elsewhere.")
    agent: ProcessUsage = Field(default_factory=ProcessUsage)


class _Header(_Part):
    type: Literal["telemetry"] = "telemetry"
    device_id: str = Field(max_length=64)
    ts: float = Field(description="Unix time of the reading.")
    interval_s: float = Field(description="Seconds the interval figures cover.")


# The header comes first in the JSON: pydantic orders fields from the last base to the first.
class Telemetry(SystemReading, _Header):
    """One telemetry message, published to ``{prefix}/{device}/telemetry``."""

    model: ModelInfo | None = None
    jobs: JobsTelemetry = Field(default_factory=JobsTelemetry)
    broker_backlog: int | None = Field(None, description="Publications the broker has not acknowledged yet.")
    cert_expires_at: float | None = Field(
        None, description="Unix time the agent's client certificate expires; null without one."
    )
    health: Health | None = Field(None, description="Set by assess(); every published message carries it.")


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

    def __init__(self, max_samples: int = 4096) -> None:
        self._lock = threading.Lock()
        self._interval = JobCounts()
        self._total = JobCounts()
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
        )


def percentile(ordered: list[float], q: float) -> float | None:
    """The ``q`` quantile (0-1) of sorted values, interpolating linearly between ranks; None if empty."""
    if not ordered:
        return None
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
