"""The wire contract: topics and every message, as pydantic models.

These models are the single source of truth for what travels over MQTT;
``docs/protocol.md`` describes them for people (a test checks that the two
list the same finish reasons and error codes).  Requests are untrusted: they
are parsed strictly (unknown fields rejected, every number bounded, no
coercion: ``"3"``, ``true`` and ``3.0`` are not integers).

This module is a light leaf: it imports pydantic and nothing that loads
onnxruntime, numpy or tokenizers, so ``edge-fleet`` can use it cheaply.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from edge_contract.params import (
    DEFAULTS,
    STOP_MAX,
    SamplingParams,
    StopString,
    WireMaxTokens,
    WireRepetitionPenalty,
    WireSeed,
    WireTemperature,
    WireTopK,
    WireTopP,
)

JobStatus = Literal["succeeded", "failed", "rejected", "canceled", "expired"]
#: Why generation ended: eos or a stop string, ``max_tokens`` or the context end, a cancel.
FinishReason = Literal["stop", "length", "canceled"]

#: Codes of a job's error (``Result.error.code``); ``docs/protocol.md`` has the table.
JobErrorCode = Literal[
    "invalid_json",
    "payload_too_large",
    "invalid_request",
    "duplicate_id",
    "context_overflow",
    "busy",
    "expired",
    "canceled",
    "interrupted",
    "overloaded",
    "internal",
    "generation_error",
    "model_error",
    "model_file",
    "model_config",
]
#: Codes of a refused or failed model update (``UpdateStatus.error.code``).
UpdateErrorCode = Literal[
    "invalid_manifest",
    "bad_signature",
    "untrusted_key",
    "expired",
    "downgrade",
    "other_model",
    "version_conflict",
    "unsafe_path",
    "size_mismatch",
    "sha256_mismatch",
    "disk_full",
    "insufficient_memory",
    "download_interrupted",
    "model_load",
    "smoke_test_failed",
    "probation_failed",
    "update_failed",
    "internal",
]
ErrorCode = JobErrorCode | UpdateErrorCode


class _Wire(BaseModel):
    # strict: no coercion from the wire ("3" is not 3, true is not 1, 3.0 is not an int); a float
    # field still takes an integer, as JSON does not tell 1 from 1.0.
    model_config = ConfigDict(extra="forbid", strict=True)


class ChatMessage(_Wire):
    """One turn of a chat."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=1_000_000)


# pydantic matches ``pattern`` with Rust's regex, where ``$`` is the end of the text (a trailing
# newline does not match, unlike Python's ``re``); a test pins that.
JobId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@-]+$")]


class JobRequest(_Wire):
    """An inference job, as published to ``{prefix}/{device}/jobs`` or a group's jobs topic."""

    id: JobId = Field(description="Caller-chosen id; a repeated id is answered from the stored result.")
    prompt: str | None = Field(None, max_length=1_000_000)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=256)
    # The sampling knobs and their bounds come from edge_contract.params (shared with the config and CLI).
    max_tokens: WireMaxTokens = DEFAULTS.max_tokens
    temperature: WireTemperature = DEFAULTS.temperature
    top_p: WireTopP = DEFAULTS.top_p
    top_k: WireTopK = DEFAULTS.top_k
    repetition_penalty: WireRepetitionPenalty = DEFAULTS.repetition_penalty
    seed: WireSeed | None = None
    stop: list[StopString] = Field(default_factory=list, max_length=STOP_MAX)
    stream: bool = False
    expires_at: float | None = Field(None, ge=0, description="Unix time after which the job must not start.")
    ttl_s: float | None = Field(None, gt=0, le=30 * 24 * 3600, description="Seconds from receipt to expiry.")

    @model_validator(mode="after")
    def _one_input(self) -> JobRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.expires_at is not None and self.ttl_s is not None:
            raise ValueError("give at most one of expires_at and ttl_s")
        return self

    def sampling_params(self) -> SamplingParams:
        """The engine's parameters for this job."""
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=tuple(self.stop),
        )

    def deadline(self, received_at: float) -> float | None:
        """Unix time after which the job is expired, if it has one."""
        if self.expires_at is not None:
            return self.expires_at
        if self.ttl_s is not None:
            return received_at + self.ttl_s
        return None


class CancelRequest(_Wire):
    """Published to ``{prefix}/{device}/jobs/cancel``."""

    id: JobId


class ErrorInfo(_Wire):
    """Why a job did not succeed: a stable ``code`` and a message for people."""

    code: ErrorCode
    message: str


class Usage(_Wire):
    """Token counts of one job."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = Field(0, description="Prompt tokens served from the prefix cache, not computed.")
    drafted_tokens: int | None = Field(
        None, ge=0, description="Draft tokens verified by speculative decoding; absent when none were."
    )
    accepted_tokens: int | None = Field(None, ge=0, description="Of those, the ones the model agreed with.")


class Timings(_Wire):
    """Where the time of one request went (the engine measures it; a result carries it)."""

    prefill_ms: float = Field(
        description="Prompt forward passes actually run (cached positions are copied, not computed), "
        "including picking the first token."
    )
    decode_ms: float = Field(description="All later tokens.")
    total_ms: float
    prefill_tokens_per_s: float = Field(description="Prompt tokens computed (not cached) per second.")
    decode_tokens_per_s: float


class ModelRef(_Wire):
    """Which model answered."""

    name: str
    version: str | None = None


class Chunk(_Wire):
    """A piece of streamed text; ``seq`` counts from 0 with no gaps."""

    type: Literal["chunk"] = "chunk"
    id: str
    seq: int
    text: str


class Result(_Wire):
    """The one terminal reply to a job."""

    type: Literal["result"] = "result"
    id: str
    status: JobStatus
    text: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage = Field(default_factory=Usage)
    timings: Timings | None = Field(None, description="Set when the engine ran the job.")
    model: ModelRef | None = None
    error: ErrorInfo | None = None
    device_id: str | None = Field(None, description="The box that answered (absent from older agents).")


Reply = Annotated[Chunk | Result, Field(discriminator="type")]
#: Parses any reply a caller receives for a job: ``REPLY.validate_json(payload)``.
REPLY: TypeAdapter[Chunk | Result] = TypeAdapter(Reply)


#: Why a box is ``degraded``.  ``hot`` and ``low_memory`` also make the agent shed load.
HealthReason = Literal[
    "hot", "throttled", "under_voltage", "low_memory", "low_disk", "broker_backlog", "storage"
]
_SHEDDING_REASONS: frozenset[str] = frozenset({"hot", "low_memory"})


class Health(_Wire):
    """``ok``, or ``degraded`` with the reasons."""

    verdict: Literal["ok", "degraded"]
    reasons: list[HealthReason] = Field(default_factory=list)

    @property
    def overloaded(self) -> bool:
        """Whether the agent should stop starting new jobs (too hot, or memory short)."""
        return any(reason in _SHEDDING_REASONS for reason in self.reasons)


class Status(_Wire):
    """Retained presence at ``{prefix}/{device}/status``; the Last Will sets ``online`` false.

    ``revoked``: published (retained) by the operator's ``edge-fleet revoke``, never by the box:
    the box's own status and Last Will are refused from then on, so this one stays.
    """

    online: bool
    revoked: bool = False
    device_id: str | None = None
    group: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    agent_version: str | None = None
    model: ModelRef | None = None
    context_tokens: int | None = Field(
        None, ge=1, description="The longest sequence served (sized to the box)."
    )
    kv_cache: str | None = Field(
        None, max_length=16, description="The model's KV cache element type served: float32, float16 or int8."
    )
    kv_cache_reason: str | None = Field(
        None, max_length=400, description="Why that cache ([engine] kv_cache, agent.engine.kv_choice)."
    )
    capabilities: list[str] = Field(default_factory=list)
    health: Health | None = None
    since: float = Field(default_factory=time.time)


#: Where a model update is.  ``failed``: refused or broken before it went live (the old model
#: kept serving); ``rolled_back``: it went live, or was about to, and the agent went back.
UpdatePhase = Literal["downloading", "verifying", "testing", "activating", "active", "failed", "rolled_back"]


class UpdateStatus(_Wire):
    """The last or current model update of a box."""

    name: str
    version: str
    phase: UpdatePhase
    progress: float | None = Field(None, ge=0.0, le=1.0, description="Share of the phase done.")
    detail: str | None = Field(None, max_length=512, description="What else an operator should know.")
    error: ErrorInfo | None = None
    at: float = Field(default_factory=time.time, description="When this phase was reported.")


class ModelState(_Wire):
    """Retained at ``{prefix}/{device}/model/state``: what the box runs and how its update goes."""

    device_id: str
    active: ModelRef | None = None
    previous: ModelRef | None = None
    update: UpdateStatus | None = None


_LEVEL = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class Membership(_Wire):
    """Retained at ``{prefix}/{device}/membership``: the box's group and labels, desired by the fleet.

    Published by an operator (``edge-fleet move``); the broker lets no device publish there, so
    the box takes it as the control plane's word and applies it without a restart.  An empty
    retained message clears it: the box falls back to the group of its ``agent.toml``.
    """

    device_id: str
    group: str | None = Field(None, pattern=_LEVEL)
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    at: float = Field(default_factory=time.time)


class EnrollRequest(_Wire):
    """A box asking for its certificate: its name and a CSR for the key it made (``docs/identity.md``)."""

    name: str = Field(pattern=_LEVEL)
    csr: str = Field(max_length=8192, description="PEM certificate signing request, CN = name.")


class EnrollAnswer(_Wire):
    """The approver's answer: the certificate and the fleet CA, or why not — or, under a claim that
    needs an operator's approval, ``pending`` until ``edge-fleet approve``/``reject`` replaces it."""

    name: str
    cert: str | None = None
    ca: str | None = None
    error: str | None = None
    pending: bool = False


def enroll_topics(prefix: str, claim: str, nonce: str) -> tuple[str, str]:
    """``(request, answer)`` topics of one enrollment under claim identity ``claim``."""
    base = f"{prefix}/enroll/{claim}"
    return f"{base}/csr/{nonce}", f"{base}/answer/{nonce}"


class GroupTopics:
    """The topics of a group: its jobs (taken through a shared subscription) and its desired model."""

    def __init__(self, prefix: str, group: str) -> None:
        self.jobs = f"{prefix}/groups/{group}/jobs"
        self.model_desired = f"{prefix}/groups/{group}/model/desired"
        self.shared_jobs = f"$share/{group}/{self.jobs}"


class Topics:
    """Every topic of one device, from the prefix, device id and group: the only place one is spelled."""

    def __init__(self, prefix: str, device_id: str, group: str | None = None) -> None:
        base = f"{prefix}/{device_id}"
        self.membership = f"{base}/membership"
        self.renew_csr = f"{base}/renew/csr"
        self.renew_answer = f"{base}/renew/answer"
        self.jobs = f"{base}/jobs"
        self.cancel = f"{base}/jobs/cancel"
        self.status = f"{base}/status"
        self.telemetry = f"{base}/telemetry"
        self.results_prefix = f"{base}/results/"
        self.results = f"{base}/results/#"
        self.model_desired = f"{base}/model/desired"
        self.model_state = f"{base}/model/state"
        self.replies = FleetTopics(prefix).replies
        of_group = GroupTopics(prefix, group) if group else None
        self.group_model_desired = of_group.model_desired if of_group else None
        self.group_jobs = of_group.jobs if of_group else None
        self.shared_group_jobs = of_group.shared_jobs if of_group else None

    def result(self, job_id: str) -> str:
        """Default reply topic of a job that names no response topic."""
        return self.results_prefix + job_id


class FleetTopics:
    """The fleet's view: any device's topics as filters, the replies subtree, a device's or group's topics."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.replies_prefix = f"{prefix}/replies/"
        self.replies = f"{prefix}/replies/#"
        self.any_status = f"{prefix}/+/status"
        self.any_telemetry = f"{prefix}/+/telemetry"
        self.any_model_state = f"{prefix}/+/model/state"
        self.any_model_desired = f"{prefix}/+/model/desired"
        self.any_results = f"{prefix}/+/results/#"
        self.any_renew_csr = f"{prefix}/+/renew/csr"
        self.enroll_requests = f"{prefix}/enroll/+/csr/+"

    def claim(self, claim: str) -> tuple[str, str]:
        """The filters a claim identity may use: ``(requests, answers)`` (``enroll_topics`` spells one)."""
        return enroll_topics(self.prefix, claim, "+")

    def device(self, device_id: str, group: str | None = None) -> Topics:
        return Topics(self.prefix, device_id, group)

    def group(self, group: str) -> GroupTopics:
        return GroupTopics(self.prefix, group)

    def reply(self, token: str) -> str:
        """A reply topic under the subtree the shipped ACL opens to every identity."""
        return self.replies_prefix + token
