"""``[telemetry]`` and ``[health]``: how often the box reports and when it counts as degraded."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TelemetryConfig(_Section):
    """``[telemetry]``: how often the agent reports."""

    interval_s: float = Field(
        10.0, ge=1.0, le=3600.0, description="Seconds between telemetry messages (and health checks)."
    )
    sysfs_root: Path = Field(
        Path("/sys"),
        description=(
            "Where sysfs is mounted. Only containers with a bind-mounted host sysfs, and tests that "
            "simulate a thermal sensor on machines without one, change it."
        ),
    )


class HealthThresholds(_Section):
    """``[health]``: when the box counts as degraded, and what the agent does about it."""

    max_temp_c: float = Field(
        80.0,
        ge=30.0,
        le=125.0,
        description="At or above this SoC temperature the box is hot (a Raspberry Pi throttles at 80-85).",
    )
    temp_hysteresis_c: float = Field(
        5.0, ge=0.0, le=30.0, description="A hot box counts as cool again only this far below max_temp_c."
    )
    min_mem_available_mb: int = Field(
        200, ge=0, le=1 << 20, description="Below this much available memory (MiB) memory is low."
    )
    mem_hysteresis_mb: int = Field(
        50, ge=0, le=1 << 20, description="Low memory ends only this far above min_mem_available_mb."
    )
    min_disk_free_mb: int = Field(
        500, ge=0, le=1 << 30, description="Below this much free space (MiB) in state_dir disk is low."
    )
    max_backlog: int = Field(
        1000, ge=1, le=10_000_000, description="More unacknowledged publications than this is a backlog."
    )
    shed_load: Literal["reject", "queue"] = Field(
        "reject",
        description=(
            "While hot or short of memory: 'reject' answers new jobs at once with code 'overloaded' "
            "(a caller can go elsewhere); 'queue' stores them and starts none until the box recovers."
        ),
    )
