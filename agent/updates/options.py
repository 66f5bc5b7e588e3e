"""``[update]``: over-the-air model updates (composed by ``agent.config``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edge_contract.errors import SignatureError
from edge_contract.signing import PublicKey


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpdateConfig(_Section):
    """``[update]``: over-the-air model updates (see ``updater``)."""

    trusted_keys: list[str] = Field(
        default_factory=list,
        max_length=16,
        description=(
            "Public keys whose signed releases this box installs, one OpenSSH line each "
            "(edge-fleet keygen writes fleet.pub in this form). Empty: every update is refused."
        ),
    )
    keep_versions: int = Field(
        3, ge=2, le=20, description="Installed versions kept on disk (the active and previous included)."
    )
    bandwidth_kbps: int | None = Field(
        None, ge=8, le=10_000_000, description="Cap on download speed, in kilobytes per second."
    )
    ca: Path | None = Field(
        None, description="CA bundle that signs the HTTPS release servers (default: the system's CAs)."
    )
    memory_reserve_mb: int = Field(
        256,
        ge=0,
        le=1 << 20,
        description=(
            "Memory to keep free while a new model is loaded beside the old one; when that does not "
            "fit, the old model is unloaded first (a short pause in service)."
        ),
    )
    probation_jobs: int = Field(
        5, ge=1, le=1000, description="The first jobs on a new model that may trigger an automatic rollback."
    )
    max_failed_jobs: int = Field(
        2, ge=1, le=1000, description="This many failed jobs among the probation jobs roll the model back."
    )
    probation_s: float = Field(
        3600.0, ge=1.0, le=30 * 24 * 3600, description="Probation ends after this long even with few jobs."
    )

    @field_validator("trusted_keys")
    @classmethod
    def _keys_parse(cls, keys: list[str]) -> list[str]:
        for index, key in enumerate(keys):
            try:
                PublicKey.from_line(key)
            except SignatureError as exc:
                raise ValueError(f"entry {index}: {exc.message}") from exc
        return keys

    def public_keys(self) -> list[PublicKey]:
        """The trusted keys, parsed."""
        return [PublicKey.from_line(k) for k in self.trusted_keys]
