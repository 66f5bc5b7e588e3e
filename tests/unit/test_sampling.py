"""Token choice: greedy, seeded sampling, and the knobs' effects and bounds."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from agent.engine.sampling import Sampler, SamplingParams


def _logits(seed: int = 0, vocab: int = 1000) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=vocab).astype(np.float32) * 3


def test_greedy_is_argmax() -> None:
    logits = _logits()
    assert Sampler(SamplingParams(), 1000, [])(logits) == int(np.argmax(logits))


def test_same_seed_same_tokens_different_seed_different_tokens() -> None:
    params = SamplingParams(temperature=1.0, seed=42)
    draws = [[Sampler(params, 1000, [])(_logits(s)) for s in range(30)] for _ in range(2)]
    assert draws[0] == draws[1]
    other = [Sampler(SamplingParams(temperature=1.0, seed=43), 1000, [])(_logits(s)) for s in range(30)]
    assert other != draws[0]


def test_top_k_restricts_to_the_k_best() -> None:
    logits = _logits()
    best = set(np.argsort(logits)[-3:].tolist())
    sampler = Sampler(SamplingParams(temperature=5.0, top_k=3, seed=1), 1000, [])
    assert {sampler(logits) for _ in range(200)} <= best


def test_top_p_small_is_greedy() -> None:
    logits = _logits()
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=1e-6, seed=1), 1000, [])
    assert {sampler(logits) for _ in range(50)} == {int(np.argmax(logits))}


def test_sampling_follows_the_distribution() -> None:
    logits = np.log(np.array([0.7, 0.2, 0.1], dtype=np.float32))
    sampler = Sampler(SamplingParams(temperature=1.0, seed=7), 3, [])
    counts = np.bincount([sampler(logits) for _ in range(4000)], minlength=3) / 4000
    assert np.allclose(counts, [0.7, 0.2, 0.1], atol=0.03)


def test_repetition_penalty_demotes_seen_tokens() -> None:
    logits = np.array([2.0, 1.9, 0.0], dtype=np.float32)
    assert Sampler(SamplingParams(), 3, [0])(logits) == 0
    assert Sampler(SamplingParams(repetition_penalty=1.5), 3, [0])(logits) == 1
    # A token chosen during generation counts as seen too.
    sampler = Sampler(SamplingParams(repetition_penalty=1.5), 3, [])
    assert [sampler(logits), sampler(logits)] == [0, 1]


@pytest.mark.parametrize(
    "field,value",
    [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("max_tokens", 0), ("seed", -1)],
)
def test_out_of_range_parameters_are_rejected(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=field):
        SamplingParams(**{field: value})


def test_unknown_parameter_is_rejected() -> None:
    with pytest.raises(ValidationError, match="extra"):
        SamplingParams(temprature=0.5)  # type: ignore[call-arg]
