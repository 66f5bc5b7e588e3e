"""The admission ladder, decision by decision: pure, no broker, no store (a dict stands in for the view)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from agent.daemon import intake
from agent.daemon.intake import Accept, Cancel, Drop, Ignore, Manifest, RefuseManifest, Reply, Resend, Rules
from agent.link.mqtt import Message
from edge_contract.protocol import Topics

TOPICS = Topics("edge", "box-1", "pool")
RULES = Rules(
    topics=TOPICS,
    reply_prefix="edge/replies/",
    max_payload_bytes=4096,
    max_tokens_limit=100,
    max_queue=2,
    max_manifest_bytes=65536,
)
NOW = 1_800_000_000.0


@dataclass(frozen=True)
class Known:
    state: str
    request: str
    result: str | None = None


@dataclass
class View:
    jobs: dict[str, Known] = field(default_factory=dict)
    depth: int = 0
    shed: list[str] | None = None

    def queued(self) -> int:
        return self.depth

    def known(self, job_id: str) -> Known | None:
        return self.jobs.get(job_id)

    def shedding(self) -> list[str] | None:
        return self.shed


def msg(
    payload: bytes | dict,  # type: ignore[type-arg]
    *,
    topic: str = TOPICS.jobs,
    response_topic: str | None = "edge/replies/r1",
    correlation: bytes | None = b"c",
    truncated: bool = False,
) -> Message:
    data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
    return Message(
        topic, data, 1, 7, False, response_topic, correlation, 1, size=len(data), truncated=truncated
    )


def decide(m: Message, view: View | None = None) -> intake.Decision:
    return intake.decide(m, view or View(), RULES, NOW)


JOB = {"id": "j-1", "prompt": "hi", "max_tokens": 5}


def test_a_valid_job_is_accepted_with_its_reply_topic_correlation_and_deadline() -> None:
    decision = decide(msg({**JOB, "ttl_s": 10}))
    assert isinstance(decision, Accept)
    assert (decision.job_id, decision.reply_topic, decision.correlation) == ("j-1", "edge/replies/r1", b"c")
    assert decision.deadline == NOW + 10 and decision.received_at == NOW


def test_without_a_response_topic_the_default_results_topic_is_used() -> None:
    decision = decide(msg(JOB, response_topic=None))
    assert isinstance(decision, Accept) and decision.reply_topic == "edge/box-1/results/j-1"


def _reply(decision: intake.Decision) -> Reply:
    assert isinstance(decision, Reply), decision
    return decision


@pytest.mark.parametrize(
    "message,code,words,topic",
    [
        # every rung that answers, with the topic the answer goes to
        (
            msg(b'{"id": "j-1", "prompt": "' + b"x" * 5000 + b'"}'),
            "payload_too_large",
            "4096",
            "edge/replies/r1",
        ),
        (
            msg(b'{"id": "j-1", "prompt": "x" ', truncated=True),
            "payload_too_large",
            "limit",
            "edge/replies/r1",
        ),
        (msg(b'{"id": "j-1", "prompt": "unterminated'), "invalid_json", "not valid JSON", "edge/replies/r1"),
        (
            msg(b'{"id": "j-1", "z": ' + b"[" * 2000 + b"]" * 2000 + b"}"),
            "invalid_json",
            "nested",
            "edge/replies/r1",
        ),
        (msg(b'{"id": "j-1", "p": "\xff"}'), "invalid_json", "UTF-8", "edge/replies/r1"),
        (
            msg(JOB, response_topic="edge/box-1/model/desired"),
            "invalid_request",
            "edge/replies/",
            "edge/box-1/results/j-1",
        ),
        (
            msg(JOB, response_topic="edge/box-2/jobs"),
            "invalid_request",
            "under edge/replies/",
            "edge/box-1/results/j-1",
        ),
        (msg(JOB, response_topic="edge/replies/"), "invalid_request", "under", "edge/box-1/results/j-1"),
        (msg(JOB, response_topic="edge/replies/+"), "invalid_request", "wildcards", "edge/box-1/results/j-1"),
        (msg(JOB, response_topic="$SYS/x"), "invalid_request", "'$'", "edge/box-1/results/j-1"),
        (
            msg(JOB, correlation=b"x" * 65535),
            "invalid_request",
            "correlation data is 65535 bytes",
            "edge/replies/r1",
        ),
        (msg({**JOB, "temprature": 1}), "invalid_request", "temprature", "edge/replies/r1"),
        (msg({"id": "j-1"}), "invalid_request", "prompt or messages", "edge/replies/r1"),
        (msg({**JOB, "max_tokens": 101}), "invalid_request", "limit of 100", "edge/replies/r1"),
        (msg({**JOB, "expires_at": NOW - 1}), "expired", "before it arrived", "edge/replies/r1"),
    ],
)
def test_each_rung_answers_with_a_precise_error(message: Message, code: str, words: str, topic: str) -> None:
    reply = _reply(decide(message))
    assert (reply.job_id, reply.code, reply.reply_topic) == ("j-1", code, topic)
    assert words in reply.message
    assert reply.status == ("expired" if code == "expired" else "rejected")


def test_oversized_correlation_data_is_never_echoed_but_small_data_is() -> None:
    big = _reply(decide(msg({**JOB, "temprature": 1}, correlation=b"x" * 257)))
    small = _reply(decide(msg({**JOB, "temprature": 1}, correlation=b"x" * 256)))
    assert big.correlation is None and big.code == "invalid_request"
    assert small.correlation == b"x" * 256 and "temprature" in small.message


def test_a_configured_reply_prefix_replaces_the_default() -> None:
    rules = Rules(**{**RULES.__dict__, "reply_prefix": "acme/answers/"})
    assert isinstance(intake.decide(msg(JOB, response_topic="acme/answers/x"), View(), rules, NOW), Accept)
    refused = intake.decide(msg(JOB, response_topic="edge/replies/x"), View(), rules, NOW)
    assert isinstance(refused, Reply) and "acme/answers/" in refused.message


@pytest.mark.parametrize(
    "payload", [b"", b"\xff\xfe", b"[1,2]", b"null", b'{"prompt": "no id"}', b'{"id": 5}', b'{"id": "a/b#"}']
)
def test_messages_without_a_readable_id_are_dropped(payload: bytes) -> None:
    assert isinstance(decide(msg(payload)), Drop)


def test_a_deep_payload_without_a_readable_id_is_dropped_not_raised() -> None:
    assert isinstance(decide(msg(b"[" * 100_000)), Drop)


def test_load_shedding_and_a_full_queue_turn_jobs_away() -> None:
    shed = _reply(decide(msg(JOB), View(shed=["hot"])))
    assert shed.code == "overloaded" and "hot" in shed.message
    busy = _reply(decide(msg(JOB), View(depth=2)))
    assert busy.code == "busy" and "2 jobs" in busy.message
    assert isinstance(decide(msg(JOB), View(depth=1)), Accept)  # one below the limit still fits


def _stored(payload: dict, state: str = "done", result: str | None = '{"stored": 1}') -> Known:  # type: ignore[type-arg]
    accepted = decide(msg(payload))
    assert isinstance(accepted, Accept)
    return Known(state, accepted.request.model_dump_json(exclude_none=True), result)


def test_a_repeat_of_a_finished_job_resends_its_result_to_the_new_reply_topic() -> None:
    view = View(jobs={"j-1": _stored(JOB)})
    decision = decide(msg(JOB, response_topic="edge/replies/other", correlation=b"k"), view)
    assert decision == Resend("j-1", "edge/replies/other", b"k", '{"stored": 1}')


def test_a_repeat_of_a_queued_job_is_ignored() -> None:
    view = View(jobs={"j-1": _stored(JOB, state="queued", result=None)})
    assert isinstance(decide(msg(JOB), view), Ignore)


@pytest.mark.parametrize("state", ["queued", "running", "done"])
def test_the_same_id_with_other_content_gets_duplicate_id_on_its_own_reply_topic(state: str) -> None:
    view = View(jobs={"j-1": _stored(JOB, state=state)})
    reply = _reply(decide(msg({**JOB, "prompt": "other"}, response_topic="edge/replies/second"), view))
    assert (reply.code, reply.reply_topic) == ("duplicate_id", "edge/replies/second")
    # The same id with the same content is not a duplicate: the positive control.
    assert not isinstance(decide(msg(JOB, response_topic="edge/replies/second"), view), Reply)


def test_cancel_requests() -> None:
    assert decide(msg({"id": "j-1"}, topic=TOPICS.cancel)) == Cancel("j-1")
    for bad in (b"not json", b'{"id": "a/b"}', b'{"id": "x", "more": 1}', b'{"id": "x"' + b" " * 2000 + b"}"):
        assert isinstance(decide(msg(bad, topic=TOPICS.cancel)), Drop)


def test_manifests_go_to_the_updater_by_source() -> None:
    assert decide(msg(b"{}", topic=TOPICS.model_desired)) == Manifest("device", b"{}")
    assert TOPICS.group_model_desired is not None
    assert decide(msg(b"", topic=TOPICS.group_model_desired)) == Manifest("group", b"")
    refused = decide(msg(b"{", topic=TOPICS.model_desired, truncated=True))
    assert isinstance(refused, RefuseManifest) and "65536" in refused.reason
