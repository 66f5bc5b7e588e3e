"""The API's request and response bodies (the OpenAPI document at ``/openapi.json`` is built from them)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class DeviceOut(_Body):
    """One device: inventory, labels and what the broker says of it now."""

    device_id: str
    online: bool | None = Field(description="null: never seen")
    revoked: bool = Field(
        False, description="its identity was revoked (`edge-fleet revoke`): it may not connect"
    )
    group: str | None
    labels: dict[str, str]
    model: str | None
    version: str | None
    health: str | None
    last_seen: float | None = Field(description="Unix time it was last seen online")
    offline_since: float | None = None
    agent_version: str | None = None
    previous: str | None = None
    update_phase: str | None = None
    update_progress: float | None = None
    update_message: str | None = None
    update_version: str | None = None
    update_error: str | None = None
    temp_c: float | None = None
    mem_available_mb: int | None = None
    queue: int | None = None
    tok_s: float | None = None


class LabelsIn(_Body):
    """Labels of a device (PATCH: a null value removes the key)."""

    labels: dict[str, str | None]


class RolloutIn(_Body):
    """A new rollout: a signed manifest to a group or to the devices a selector matches."""

    manifest: dict[str, Any] = Field(description="The signed manifest.json, as an object")
    group: str | None = None
    select: str | None = Field(
        None, description="e.g. region=north,hw=pi5 (terms: K=V, K!=V, K, !K; group=G)"
    )
    waves: list[float] = Field(default_factory=lambda: [1.0, 10.0, 50.0, 100.0], min_length=1)
    canary: int = Field(
        0, ge=0, description="Devices of a canary set before the waves; any failure there halts"
    )
    wave_timeout: float = Field(
        600.0, gt=0, description="Seconds a device may take after it was sent the release"
    )
    max_failure_rate: float = Field(0.1, ge=0, le=1)
    max_parallel: int = Field(0, ge=0, description="Devices updating at once at most (0: a whole wave)")
    min_devices: int = Field(1, ge=1)
    defer_offline: bool = Field(
        False, description="Devices offline when their wave starts are sent the release, not waited for"
    )
    resume_on_recovery: bool = Field(
        False, description="A halted rollout continues when its failing devices recover"
    )


class RollbackIn(_Body):
    """Signed rollback manifests (one per earlier release; edge-fleet signs them with the fleet key)."""

    manifests: list[dict[str, Any]] = Field(min_length=1)
    waves: list[float] = Field(default_factory=lambda: [50.0, 100.0], min_length=1)


class RolloutOut(_Body):
    """A rollout: its row, its targets by state, whom it waits for and its failures."""

    id: str
    state: str
    release: str
    selector: str
    group: str | None
    wave: int = Field(description="1-based current wave (the canary set is wave 1 when there is one)")
    waves: int
    canary: bool
    reason: str | None
    targets: dict[str, int]
    waiting_for: list[str]
    failures: dict[str, str]
    befores: dict[str, int] = Field(description="Releases the touched devices ran before, with counts")
    rollback_of: str | None
    created: float
    created_by: str
    leader: str | None


class DeployIn(_Body):
    """A release as the desired state of one device or a group (no waves: see rollouts for those)."""

    device: str | None = None
    group: str | None = None
    manifest: dict[str, Any] | None = Field(
        None, description="The signed manifest; null clears the desired state"
    )
    override: bool = Field(False, description="Group: clear its devices' own desired states first")


class TokenIn(_Body):
    """A token to make."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    role: Literal["viewer", "operator", "admin"]


class JobIn(_Body):
    """A job for one device or a group's shared queue."""

    device: str | None = None
    group: str | None = None
    prompt: str = Field(max_length=1_000_000)
    max_tokens: int = Field(128, ge=1, le=32768)
    timeout: float = Field(300.0, gt=0, le=3600)
    raw: bool = Field(False, description="Send the prompt as is, not as a user chat message")
