"""Admission of incoming messages: a pure function from a message to a decision.

``decide`` looks at one message (topic, payload, MQTT 5 properties) and a
small read-only ``View`` of the agent's state (queue length, load shedding, a
known job) and returns what to do: ``Accept`` it, ``Reply`` with an error,
``Resend`` a stored result, ``Drop`` or ``Ignore`` it, ``Cancel`` a job, or hand
a manifest to the updater.  It does no I/O of its own: the intake thread
(``agent.daemon.inbox``) carries the decision out and acknowledges the message.

A job climbs ``LADDER``, one rule per rung, first match wins; each rung reads
what the rungs below it established (the parsed JSON, the id, the reply topic,
the request).  The order matters where it says who gets the answer: nothing
can be answered before an id is read, and nothing is answered outside the
reply subtree.

A transport that parses its requests itself (the HTTP API, ``agent.daemon.http``)
hands admission a ``Submission`` instead: ``admit`` starts it on the rung
where the JSON object is checked as a ``JobRequest`` (``REQUEST_RUNGS``), so
it meets exactly the rules an MQTT job meets from there on (schema, repeats,
expiry, token limit, load shedding, a full queue).  Its answers go to its
reply address, a local one (see ``agent.daemon.replies``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import ValidationError

from agent.daemon.replies import LOCAL_SCHEME, is_local
from agent.link.mqtt import Message
from edge_contract.protocol import CancelRequest, JobErrorCode, JobRequest, JobStatus, Topics

# Only the head of an oversized or unparsable payload is searched for the job
# id, so a hostile message costs bounded work.
_ID_PATTERN = re.compile(rb'"id"\s*:\s*"([A-Za-z0-9_.:@-]{1,128})"')
_JOB_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
_ID_SCAN_BYTES = 4096
#: A cancel request is {"id": "<at most 128 characters>"}: anything much larger is not one.
CANCEL_MAX_BYTES = 1024
#: A response topic is published to as given; it must be a plain topic name this long at most.
MAX_TOPIC_BYTES = 1024
#: Correlation data is echoed on every chunk of a streamed job: 256 bytes hold any UUID or token
#: a caller needs, while 64 KiB echoed on each of hundreds of chunks would amplify traffic 1000-fold.
MAX_CORRELATION_BYTES = 256


class KnownJob(Protocol):
    """What admission needs of a stored job."""

    @property
    def state(self) -> str: ...
    @property
    def request(self) -> str: ...
    @property
    def result(self) -> str | None: ...


class View(Protocol):
    """Read-only state admission consults (only as far as a message gets up the ladder)."""

    def queued(self) -> int:
        """Jobs waiting or running."""
        ...

    def known(self, job_id: str) -> KnownJob | None:
        """The stored job with this id, if any."""
        ...

    def shedding(self) -> list[str] | None:
        """The reasons the box turns new jobs away now (``shed_load = "reject"``), or None."""
        ...


@dataclass(frozen=True)
class Submission:
    """A job from a transport that parsed it itself: its id, its JSON object and where replies go."""

    job_id: str
    data: Any
    reply_address: str


@dataclass(frozen=True)
class Rules:
    """The limits and topics admission applies (from the config)."""

    topics: Topics
    reply_prefix: str  # response topics must start with it, e.g. "edge/replies/"
    max_payload_bytes: int
    max_tokens_limit: int
    max_queue: int
    max_manifest_bytes: int


# -- decisions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accept:
    """Store the job durably (then acknowledge it)."""

    job_id: str
    request: JobRequest
    reply_topic: str
    correlation: bytes | None
    deadline: float | None
    received_at: float


@dataclass(frozen=True)
class Reply:
    """Answer at once with a terminal result carrying an error; nothing is stored (a retry may succeed)."""

    job_id: str
    reply_topic: str
    correlation: bytes | None
    status: JobStatus
    code: JobErrorCode
    message: str


@dataclass(frozen=True)
class Resend:
    """A repeat of a finished job: send its stored result again, to this request's reply topic."""

    job_id: str
    reply_topic: str
    correlation: bytes | None
    result: str


@dataclass(frozen=True)
class Drop:
    """Nobody can be answered (no readable id): log a warning and acknowledge."""

    reason: str


@dataclass(frozen=True)
class Ignore:
    """Nothing to do (e.g. a repeat of a job still queued): acknowledge."""

    reason: str


@dataclass(frozen=True)
class Cancel:
    """Cancel this job if it is queued or running."""

    job_id: str


@dataclass(frozen=True)
class Manifest:
    """Hand a desired-state message to the updater (``payload`` empty: the desired state was cleared)."""

    source: Literal["device", "group"]
    payload: bytes


@dataclass(frozen=True)
class RefuseManifest:
    """A desired-state message too large to read."""

    reason: str


Decision = Accept | Reply | Resend | Drop | Ignore | Cancel | Manifest | RefuseManifest


def decide(msg: Message, view: View, rules: Rules, now: float) -> Decision:
    """What to do with ``msg``; ``now`` is the Unix time of its receipt."""
    topics = rules.topics
    if msg.topic == topics.cancel:
        return _cancel(msg)
    if msg.topic in (topics.model_desired, topics.group_model_desired):
        if msg.truncated:
            return RefuseManifest(f"manifest is {msg.size} bytes; the limit is {rules.max_manifest_bytes}")
        return Manifest("device" if msg.topic == topics.model_desired else "group", msg.payload)
    return _climb(_Climb(msg.correlation, view, rules, now, msg=msg), LADDER)


def admit(submission: Submission, view: View, rules: Rules, now: float) -> Decision:
    """What to do with a job a local transport parsed itself: the ladder from ``REQUEST_RUNGS`` up."""
    job = _Climb(None, view, rules, now, data=submission.data)
    job.job_id = submission.job_id
    job.reply_topic = submission.reply_address
    return _climb(job, REQUEST_RUNGS)


def _climb(job: _Climb, rungs: tuple[Callable[[_Climb], Decision | None], ...]) -> Decision:
    for rung in rungs:
        decision = rung(job)
        if decision is not None:
            return decision
    raise AssertionError("unreachable: the last rung accepts")


def _cancel(msg: Message) -> Decision:
    if msg.truncated or len(msg.payload) > CANCEL_MAX_BYTES:
        return Drop(f"a cancel request of {max(msg.size, len(msg.payload))} bytes")
    try:
        cancel = CancelRequest.model_validate(_loads(msg.payload))
    except ValidationError as exc:
        return Drop(f"an invalid cancel request: {describe(exc)}")
    except ValueError as exc:
        return Drop(f"an invalid cancel request: {exc}")
    return Cancel(cancel.id)


# -- the ladder of a job ---------------------------------------------------------------------


@dataclass
class _Climb:
    """A job on its way up the ladder: what the rungs passed so far established."""

    correlation: bytes | None
    view: View
    rules: Rules
    now: float
    msg: Message | None = None  # None: a Submission, whose transport read the payload itself
    data: Any = None
    job_id: str = ""
    reply_topic: str = ""
    request: JobRequest | None = field(default=None)

    def reply(self, code: JobErrorCode, message: str, status: JobStatus = "rejected") -> Reply:
        """An error answer to this job, on its reply topic (or the default one)."""
        job_id = self.job_id
        reply_topic = self.reply_topic or self.rules.topics.result(job_id)
        return Reply(job_id, reply_topic, _echoable(self.correlation), status, code, message)

    @property
    def message(self) -> Message:
        """The MQTT message (only the rungs below ``REQUEST_RUNGS`` read it)."""
        assert self.msg is not None
        return self.msg


def _too_large(job: _Climb) -> Decision | None:
    msg, limit = job.message, job.rules.max_payload_bytes
    if msg.truncated or len(msg.payload) > limit:
        size = max(msg.size, len(msg.payload))
        return _unreadable(job, "payload_too_large", f"payload is {size} bytes; the limit is {limit}")
    return None


def _not_json(job: _Climb) -> Decision | None:
    try:
        job.data = _loads(job.message.payload)
    except ValueError as exc:
        return _unreadable(job, "invalid_json", f"payload is not valid JSON: {exc}")
    return None


def _no_id(job: _Climb) -> Decision | None:
    job_id = job.data.get("id") if isinstance(job.data, dict) else None
    if not _valid_id(job_id):
        return Drop(f"a job without a readable id on {job.message.topic}")
    assert isinstance(job_id, str)
    job.job_id = job_id
    return None


def _bad_reply_topic(job: _Climb) -> Decision | None:
    topic = job.message.response_topic
    if topic is None:
        job.reply_topic = job.rules.topics.result(job.job_id)
        return None
    problem = _reply_topic_problem(topic, job.rules.reply_prefix)
    if problem is not None:
        return job.reply("invalid_request", problem)  # answered on the default results topic
    job.reply_topic = topic
    return None


def _correlation_too_large(job: _Climb) -> Decision | None:
    size = len(job.correlation or b"")
    if size > MAX_CORRELATION_BYTES:
        return job.reply(
            "invalid_request", f"correlation data is {size} bytes; the limit is {MAX_CORRELATION_BYTES}"
        )
    return None


def _invalid(job: _Climb) -> Decision | None:
    try:
        job.request = JobRequest.model_validate(job.data)
    except ValidationError as exc:
        return job.reply("invalid_request", describe(exc))
    return None


def _repeated(job: _Climb) -> Decision | None:
    known = job.view.known(job.job_id)
    if known is None:
        return None
    if not _same_request(known.request, job.request):
        return job.reply(
            "duplicate_id",
            f"job id {job.job_id} is taken by a different request: give each job its own id",
        )
    if known.state == "done" and known.result is not None:
        return Resend(job.job_id, job.reply_topic, _echoable(job.correlation), known.result)
    return Ignore(f"job {job.job_id} is already {known.state}")


def _expired(job: _Climb) -> Decision | None:
    assert job.request is not None
    deadline = job.request.deadline(job.now)
    if deadline is not None and deadline <= job.now:
        return job.reply("expired", "the job expired before it arrived", status="expired")
    return None


def _over_token_limit(job: _Climb) -> Decision | None:
    assert job.request is not None
    limit = job.rules.max_tokens_limit
    if job.request.max_tokens > limit:
        return job.reply(
            "invalid_request", f"max_tokens: {job.request.max_tokens} exceeds this agent's limit of {limit}"
        )
    return None


def _shedding(job: _Climb) -> Decision | None:
    reasons = job.view.shedding()
    if reasons is not None:
        return job.reply(
            "overloaded", f"the box is shedding load ({', '.join(reasons)}); retry later or elsewhere"
        )
    return None


def _queue_full(job: _Climb) -> Decision | None:
    if job.view.queued() >= job.rules.max_queue:
        return job.reply("busy", f"the queue is full ({job.rules.max_queue} jobs)")
    return None


def _accept(job: _Climb) -> Decision:
    assert job.request is not None
    return Accept(
        job.job_id,
        job.request,
        job.reply_topic,
        job.correlation,
        job.request.deadline(job.now),
        job.now,
    )


#: The rungs a parsed request climbs, whichever transport brought it (``admit`` starts here).
REQUEST_RUNGS: tuple[Callable[[_Climb], Decision | None], ...] = (
    _invalid,  # invalid_request naming the fields
    _repeated,  # the stored result again, nothing (still running), or duplicate_id
    _expired,  # expired
    _over_token_limit,  # invalid_request
    _shedding,  # overloaded
    _queue_full,  # busy
    _accept,
)

#: The admission ladder of an MQTT job, bottom rung first: (rule, what it answers).
LADDER: tuple[Callable[[_Climb], Decision | None], ...] = (
    _too_large,  # payload_too_large, answered when an id shows in the head
    _not_json,  # invalid_json (also nesting too deep to parse), likewise
    _no_id,  # dropped: nobody to answer
    _bad_reply_topic,  # invalid_request on the default results topic
    _correlation_too_large,  # invalid_request
    _invalid,  # invalid_request naming the fields
    _repeated,  # the stored result again, nothing (still running), or duplicate_id
    _expired,  # expired
    _over_token_limit,  # invalid_request
    _shedding,  # overloaded
    _queue_full,  # busy
    _accept,
)


# -- helpers -----------------------------------------------------------------------------------------


def _loads(payload: bytes) -> Any:
    """JSON, with every way of not being JSON as a ValueError (deep nesting included)."""
    try:
        return json.loads(payload)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 ({exc.reason})") from None


def _valid_id(value: object) -> bool:
    return isinstance(value, str) and _JOB_ID.fullmatch(value) is not None


def _unreadable(job: _Climb, code: JobErrorCode, message: str) -> Decision:
    """Answer a payload that cannot be read, if its head shows an id; else drop it."""
    msg = job.message
    found = _ID_PATTERN.search(msg.payload[:_ID_SCAN_BYTES])
    if found is None:
        return Drop(f"a message on {msg.topic} with no readable id: {message}")
    job.job_id = found.group(1).decode()
    topic = msg.response_topic
    if topic is not None and _reply_topic_problem(topic, job.rules.reply_prefix) is None:
        job.reply_topic = topic
    return job.reply(code, message)


def _reply_topic_problem(topic: str, prefix: str) -> str | None:
    """Why the agent must not publish to ``topic``, or None when it may."""
    if not (
        0 < len(topic.encode()) <= MAX_TOPIC_BYTES
        and not topic.startswith("$")
        and not any(ch in topic for ch in "+#\0")
    ):
        return (
            "response topic: must be a topic name (no wildcards, no '$' start, "
            f"at most {MAX_TOPIC_BYTES} bytes)"
        )
    if not topic.startswith(prefix) or len(topic) == len(prefix):
        return f"response topic: must lie under {prefix} (e.g. {prefix}<your id>)"
    if is_local(topic):  # a reply address of the HTTP API, not a topic (a very odd reply_topic_prefix)
        return f"response topic: must not start with {LOCAL_SCHEME}"
    return None


def _echoable(correlation: bytes | None) -> bytes | None:
    """Correlation data to echo on a reply: none when it is over the limit."""
    return correlation if correlation is not None and len(correlation) <= MAX_CORRELATION_BYTES else None


def _same_request(stored: str, request: JobRequest | None) -> bool:
    try:
        return JobRequest.model_validate_json(stored) == request
    except ValidationError:
        return False


def describe(exc: ValidationError) -> str:
    """A short, precise message naming each invalid field."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "request"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
