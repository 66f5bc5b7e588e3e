"""The telemetry message: what a box publishes every ``[telemetry] interval_s`` to ``{prefix}/{device}/telemetry``.

A value the machine cannot report is ``null``, never a guess.  Sizes are MiB
(written ``_mb``), temperatures degrees Celsius, times seconds.  Every string
and dict is bounded so that a message stays well under 2 KB.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from edge_contract.protocol import Health

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
    http_total: int | None = Field(
        None,
        description=(
            "Of the jobs counted in total, those that came over the HTTP API, whatever their status "
            "(the rest came over MQTT); null when [http] listen is unset."
        ),
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


def percentile(ordered: list[float], q: float) -> float | None:
    """The ``q`` quantile (0-1) of sorted values, interpolating linearly between ranks; None if empty."""
    if not ordered:
        return None
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
