"""The update record (``state_dir/models/updates.json``): typed state the updater keeps across restarts.

It holds the last update's status (as published on ``model/state``), the
probation of a freshly activated release, and the digests of refused
manifests (``Manifest.digest``) so that a retained bad release is not
downloaded again at every reconnect.  The model store reads and writes it
(atomically); the updater owns it; ``doctor`` reads it.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_contract.manifest import Sha256
from edge_contract.protocol import UpdateErrorCode, UpdateStatus

log = logging.getLogger(__name__)

#: Every error code of a model update, as reported in ``model/state`` (the wire's Literal;
#: docs/protocol.md has the table).
UpdateCode = UpdateErrorCode
UPDATE_CODES: frozenset[str] = frozenset(get_args(UpdateCode))

#: Refusals remembered by the manifest's digest: those the manifest itself earns whatever the box,
#: its configuration or its clock, and that cost a download or a model load to find out.
#: Others are checked again, cheaply, whenever the desired state is next offered: a signature
#: (``bad_signature``, ``untrusted_key``: a key may be added to ``trusted_keys``), the clock
#: (``expired``: a clock that jumped ahead comes back), and what the box runs (``downgrade``,
#: ``other_model``, ``version_conflict``: a rollback can change it).
REMEMBERED: frozenset[UpdateCode] = frozenset(
    {
        "unsafe_path",
        "size_mismatch",
        "sha256_mismatch",
        "model_load",
        "smoke_test_failed",
        "probation_failed",
        "update_failed",
        "internal",
    }
)
#: Refused manifests remembered, the oldest forgotten first.
MAX_REFUSED = 32
_DIGEST = re.compile(r"[0-9a-f]{64}")


class Probation(BaseModel):
    """The first jobs of a freshly activated release; too many failures roll it back."""

    model_config = ConfigDict(extra="forbid")

    release: str = Field(description="The release on probation (name@version).")
    until: float = Field(description="Unix time when the probation ends even with few jobs.")
    jobs: int = Field(0, ge=0)
    failures: int = Field(0, ge=0)
    last_error: str = Field("", max_length=200)


class UpdateRecord(BaseModel):
    """Everything the updater persists besides the store's pointer."""

    model_config = ConfigDict(extra="forbid")

    update: UpdateStatus | None = None
    probation: Probation | None = None
    refused: list[Sha256] = Field(
        default_factory=list, max_length=MAX_REFUSED, description="Digests of refused manifests."
    )

    def remember_refused(self, digest: str) -> None:
        """Add a refused manifest's digest (moved to the end when already there)."""
        self.refused = [*(d for d in self.refused if d != digest), digest][-MAX_REFUSED:]

    @classmethod
    def load(cls, data: bytes) -> UpdateRecord:
        """Parse ``updates.json``; what is unreadable is dropped (logged), never fatal.

        A record from before this format remembered refusals by signature string; those
        entries are dropped, since a signature that did not verify could stand for a
        genuine release (the reason for the change).
        """
        try:
            return cls.model_validate_json(data)
        except ValidationError:
            pass
        try:
            raw = json.loads(data)
        except ValueError:
            log.warning("the update record is not JSON: starting a new one")
            return cls()
        if not isinstance(raw, dict):
            return cls()
        record = cls(
            update=_valid(UpdateStatus, raw.get("update")),
            probation=_valid(Probation, raw.get("probation")),
        )
        refused = raw.get("refused")
        refused = refused if isinstance(refused, list) else []
        record.refused = [d for d in refused if isinstance(d, str) and _DIGEST.fullmatch(d)][-MAX_REFUSED:]
        dropped = len(refused) - len(record.refused)
        if dropped:
            log.warning("update record: %d refusals in an older form forgotten", dropped)
        return record


def _valid(model: type[BaseModel], value: Any) -> Any:
    if value is None:
        return None
    try:
        return model.model_validate(value)
    except ValidationError:
        log.warning("update record: an unreadable %s entry dropped", model.__name__)
        return None
