"""The wire contract: strict types, names that cannot smuggle a newline, and docs that match the code."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import ValidationError

from edge_contract import errors
from edge_contract.protocol import (
    REPLY,
    CancelRequest,
    FinishReason,
    JobErrorCode,
    JobRequest,
    JobStatus,
    Result,
    Timings,
    UpdateErrorCode,
)

DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text(encoding="utf-8")
INT_FIELDS = ["max_tokens", "top_k", "seed"]
NOT_INTS: list[Any] = ["3", True, 3.0, 3.5, None, [3]]


def _job(**fields: Any) -> dict[str, Any]:
    return {"id": "job-1", "prompt": "hi", **fields}


@pytest.mark.parametrize("field", INT_FIELDS)
def test_int_fields_take_json_integers(field: str) -> None:
    parsed = JobRequest.model_validate_json(json.dumps(_job(**{field: 3})))
    assert getattr(parsed, field) == 3
    assert JobRequest.model_validate(_job(**{field: 3})) == parsed, "the daemon parses json.loads output"


@pytest.mark.parametrize(
    "field,value",
    # seed is the one nullable int field: null means a random seed.
    [(f, v) for f in INT_FIELDS for v in NOT_INTS if not (f == "seed" and v is None)],
    ids=repr,
)
def test_int_fields_refuse_strings_bools_and_floats(field: str, value: Any) -> None:
    payload = json.dumps(_job(**{field: value}))
    with pytest.raises(ValidationError) as caught:
        JobRequest.model_validate(json.loads(payload))
    assert caught.value.errors()[0]["loc"] == (field,)
    with pytest.raises(ValidationError):
        JobRequest.model_validate_json(payload)


@pytest.mark.parametrize(
    "fields",
    [{"temperature": "0.5"}, {"temperature": True}, {"stream": 1}, {"stream": "true"}, {"ttl_s": "60"}],
    ids=repr,
)
def test_other_scalars_are_not_coerced_either(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        JobRequest.model_validate(_job(**fields))


def test_a_float_field_takes_a_json_integer() -> None:
    """JSON does not tell 1 from 1.0: an integer is a valid float."""
    assert JobRequest.model_validate_json(json.dumps(_job(temperature=1, ttl_s=60))).temperature == 1.0


@pytest.mark.parametrize("job_id", ["job-1\n", "job-1\r\n", "\njob-1", "job 1", "job/1", "job+1", "#", ""])
def test_job_ids_refuse_newlines_and_topic_characters(job_id: str) -> None:
    with pytest.raises(ValidationError):
        JobRequest.model_validate(_job(id=job_id))
    with pytest.raises(ValidationError):
        CancelRequest.model_validate({"id": job_id})
    assert JobRequest.model_validate(_job(id="job-1.a:b@c_d")).id == "job-1.a:b@c_d", "positive control"


def test_result_timings_are_typed_and_absent_when_the_engine_did_not_run() -> None:
    timings = Timings(prefill_ms=1, decode_ms=2, total_ms=3, prefill_tokens_per_s=4, decode_tokens_per_s=5)
    done = Result(id="j", status="succeeded", finish_reason="stop", timings=timings)
    parsed = REPLY.validate_json(done.model_dump_json(exclude_none=True))
    assert isinstance(parsed, Result) and parsed.timings == timings
    refused = Result.model_validate(
        {"id": "j", "status": "rejected", "error": {"code": "busy", "message": "m"}}
    )
    assert "timings" not in json.loads(refused.model_dump_json(exclude_none=True))
    with pytest.raises(ValidationError):
        Result.model_validate({"id": "j", "status": "succeeded", "timings": {"prefill_ms": 1.0}})


@pytest.mark.parametrize(
    "reply",
    [
        {"type": "result", "id": "j", "status": "succeeded", "finish_reason": "eos"},
        {"type": "result", "id": "j", "status": "failed", "error": {"code": "oops", "message": "m"}},
        {"type": "result", "id": "j", "status": "done"},
    ],
    ids=["finish_reason", "error_code", "status"],
)
def test_replies_with_unknown_enumerations_do_not_parse(reply: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        REPLY.validate_python(reply)


# -- the docs and the Literals list the same values -------------------------------------------


def _table_codes(header: str) -> set[str]:
    """Backticked words of the first column of the markdown table under ``header``."""
    lines = DOC[DOC.index(header) :].splitlines()[2:]
    rows = [line for line in lines[: next(i for i, x in enumerate(lines) if not x.startswith("|"))]]
    return {code for row in rows for code in re.findall(r"`([a-z0-9_]+)`", row.split("|")[1])}


def _sentence_values(start: str) -> set[str]:
    """Backticked words of the sentence that starts with ``start``, outside parentheses."""
    sentence = DOC[DOC.index(start) :].split(".\n")[0].split(". ")[0]
    return set(re.findall(r"`([a-z0-9_]+)`", re.sub(r"\([^)]*\)", "", sentence[len(start) :])))


def test_job_error_codes_match_the_docs() -> None:
    assert _table_codes("| error code | status | when |") == set(get_args(JobErrorCode))


def test_update_error_codes_match_the_docs() -> None:
    assert _table_codes("| update error code | when |") == set(get_args(UpdateErrorCode))


def test_finish_reasons_and_statuses_match_the_docs() -> None:
    assert _sentence_values("`finish_reason` is") == set(get_args(FinishReason))
    assert _sentence_values("`status` is one of") == set(get_args(JobStatus))


def _subclasses(base: type) -> list[type]:
    return [base, *(c for sub in base.__subclasses__() for c in _subclasses(sub))]


def test_every_error_the_engine_or_an_update_raises_has_a_wire_code() -> None:
    """A code that is not in the Literal would fail building the reply: the job would go unanswered."""
    for cls in _subclasses(errors.ModelError) + _subclasses(errors.GenerationError):
        assert cls.code in get_args(JobErrorCode), cls
    for cls in _subclasses(errors.UpdateError):
        assert cls.code in get_args(UpdateErrorCode), cls
    assert errors.AgentError.code in get_args(JobErrorCode), "the daemon's catch-all code"
