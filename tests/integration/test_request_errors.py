"""A request's own faults are InvalidRequestError-family, and extreme admitted knobs run on a real model.

The daemon answers InvalidRequestError (and its subclasses) as the request's fault; anything else
counts against the model (an update's probation). So every way a request alone can make the engine
fail must raise from that family, and every value the schema admits must run.
"""

from __future__ import annotations

import pytest

from agent import Engine, InvalidRequestError
from edge_contract import params
from edge_contract.errors import ContextOverflowError
from edge_contract.protocol import JobRequest


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda e: e.prompt_ids("lone \ud800 surrogate"), id="lone surrogate in the prompt"),
        pytest.param(
            lambda e: e.prompt_ids(messages=[{"role": "user", "content": "x\udfff"}]),
            id="lone surrogate in chat",
        ),
        pytest.param(lambda e: e.prompt_ids(), id="neither prompt nor messages"),
        pytest.param(lambda e: e.generate([]), id="no prompt tokens"),
        pytest.param(lambda e: e.generate([10**9]), id="token id out of range"),
        pytest.param(lambda e: e.generate([1] * e.context_length), id="context overflow"),
    ],
)
def test_request_faults_are_invalid_request_errors(phi3_engine: Engine, make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequestError) as caught:
        make(phi3_engine)
    assert caught.value.code in ("invalid_request", "context_overflow")


def test_context_overflow_keeps_its_code_and_is_a_request_error() -> None:
    exc = ContextOverflowError(10, 8)
    assert isinstance(exc, InvalidRequestError) and exc.code == "context_overflow"


@pytest.mark.parametrize(
    "knobs",
    [
        {"temperature": params.TEMPERATURE_MIN},
        {"temperature": params.TEMPERATURE_MAX, "top_p": 5e-324},
        {"temperature": 1.0, "repetition_penalty": params.REPETITION_PENALTY_MIN},
        {"temperature": 1.0, "repetition_penalty": params.REPETITION_PENALTY_MAX, "top_k": params.TOP_K_MAX},
        {"repetition_penalty": params.REPETITION_PENALTY_MIN},
        {"temperature": 0.7, "top_k": 1, "seed": params.SEED_MAX},
    ],
)
def test_extreme_admitted_knobs_run_on_a_real_model(phi3_engine: Engine, knobs: dict[str, float]) -> None:
    request = JobRequest.model_validate({"id": "j", "prompt": "The box reports", "max_tokens": 12, **knobs})
    out = phi3_engine.generate(phi3_engine.prompt_ids(request.prompt), request.sampling_params())
    assert out.finish_reason in ("stop", "length") and out.completion_tokens <= 12
