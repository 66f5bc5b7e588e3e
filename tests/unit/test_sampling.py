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


# -- every admitted value works ------------------------------------------------------------------

import math  # noqa: E402

from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from edge_contract import params as P  # noqa: E402
from edge_contract.protocol import JobRequest  # noqa: E402


def _admitted_or_not(low: float, high: float, *, extra: tuple[float, ...] = ()) -> st.SearchStrategy[float]:
    """Mostly values in [low, high] (the bounds and their float neighbours included); sometimes
    anything at all (NaN and inf too), which the schema must refuse or the sampler take."""
    edges = [v for b in (low, high) for v in (b, math.nextafter(b, -math.inf), math.nextafter(b, math.inf))]
    kinds = [
        st.floats(low, high),
        st.sampled_from([*edges, *extra]),
        st.sampled_from([5e-324, 1e-310, 1e-45, 1e-300, 1e300]),
        st.floats(allow_nan=True, allow_infinity=True),
    ]
    # 7 in 10 inside, then an edge, a tiny or huge value, or anything: most examples are
    # admitted, and every edge is visited.
    return st.integers(0, 9).flatmap(lambda i: kinds[0 if i < 7 else i - 6])


def _admitted(**values: object) -> SamplingParams:
    """The parameters if the schema admits ``values``; otherwise the example is discarded."""
    try:
        request = JobRequest.model_validate({"id": "j", "prompt": "x", **values})
    except ValidationError:
        assume(False)
        raise AssertionError("unreachable") from None
    return request.sampling_params()


_LOGIT = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.sampled_from([3.4e38, -3.4e38, 1e-45, -1e-45, 0.0, 88.0, -88.0, 1e30, -1e30]),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    temperature=_admitted_or_not(P.TEMPERATURE_MIN, P.TEMPERATURE_MAX, extra=(0.0, -0.0)),
    top_p=_admitted_or_not(0.0, 1.0),
    top_k=st.one_of(st.integers(0, 8), st.integers(0, P.TOP_K_MAX), st.integers(-1, P.TOP_K_MAX + 1)),
    repetition_penalty=_admitted_or_not(P.REPETITION_PENALTY_MIN, P.REPETITION_PENALTY_MAX, extra=(1.0,)),
    seed=st.one_of(st.none(), st.integers(0, P.SEED_MAX)),
    logits=hnp.arrays(np.float32, st.integers(1, 48), elements=_LOGIT),
    prompt=st.lists(st.integers(-2, 60), max_size=8),
)
def test_the_sampler_returns_a_valid_token_for_every_admitted_request(
    temperature: float,
    top_p: float,
    top_k: int,
    repetition_penalty: float,
    seed: int | None,
    logits: np.ndarray,
    prompt: list[int],
) -> None:
    params = _admitted(
        temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, seed=seed
    )
    vocab = logits.shape[0]
    sampler = Sampler(params, vocab, prompt)
    # No overflow, no invalid operation, no division by zero anywhere in the sampler.
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        for step in range(3):
            token = sampler(np.roll(logits, step))
            assert isinstance(token, int) and 0 <= token < vocab


@settings(max_examples=200, deadline=None)
@given(
    temperature=st.floats(P.TEMPERATURE_MIN, P.TEMPERATURE_MAX),
    logits=hnp.arrays(
        np.float32, st.integers(2, 32), elements=st.floats(width=32, allow_nan=False, allow_infinity=False)
    ),
    seed=st.integers(0, 2**32),
)
def test_finite_logits_never_yield_a_token_far_below_the_best(
    temperature: float, logits: np.ndarray, seed: int
) -> None:
    # A positive control for the property above: the draw is a real draw from the top.
    token = Sampler(SamplingParams(temperature=temperature, seed=seed), logits.shape[0], [])(logits)
    best = float(logits.max())
    assert (best - float(logits[token])) / temperature <= 40.0


@pytest.mark.parametrize(
    "values",
    [
        {"temperature": 5e-324},
        {"temperature": 1e-310},
        {"temperature": 1, "repetition_penalty": 1e-45},
    ],
)
def test_the_issue_s_parameters_are_refused_and_would_not_break_the_sampler_anyway(
    values: dict[str, float],
) -> None:
    field = next(k for k in values if k != "temperature" or len(values) == 1)
    with pytest.raises(ValidationError, match=field):
        JobRequest.model_validate({"id": "j", "prompt": "x", **values})
    # Built past validation (as a bug elsewhere might), the sampler still gives a token.
    forced = SamplingParams.model_construct(**{**SamplingParams().model_dump(), **values})
    sampler = Sampler(forced, 1000, list(range(50)))
    for seed in range(20):
        assert 0 <= sampler(_logits(seed) * 1e4) < 1000


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", 0),
        ("max_tokens", P.MAX_TOKENS_MAX + 1),
        ("temperature", -0.1),
        ("temperature", 5e-324),
        ("temperature", P.TEMPERATURE_MAX * 1.01),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("top_k", P.TOP_K_MAX + 1),
        ("repetition_penalty", 1e-45),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 11.0),
        ("seed", -1),
        ("seed", 2**63),
    ],
)
def test_wire_engine_and_command_line_share_the_bounds(
    field: str, value: float, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import _parser

    with pytest.raises(ValidationError, match=field) as wire:
        JobRequest.model_validate({"id": "j", "prompt": "x", field: value})
    with pytest.raises(ValidationError, match=field):
        SamplingParams(**{field: value})
    flag = "--" + field.replace("_", "-")
    with pytest.raises(SystemExit):
        _parser().parse_args(["generate", "m", "p", flag, str(value)])
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err
    assert (
        wire.value.errors()[0]["msg"].removeprefix("Value error, ") in err
    )  # the same bound, the same words


def test_the_command_line_takes_what_the_wire_takes() -> None:
    from agent.cli import _parser

    args = _parser().parse_args(
        [
            *("generate", "m", "p", "--temperature", "0.001", "--top-p", "0.5", "--top-k", "40"),
            *("--repetition-penalty", "0.1", "--seed", str(P.SEED_MAX), "--max-tokens", "7"),
        ]
    )
    assert (args.temperature, args.top_p, args.top_k, args.repetition_penalty) == (0.001, 0.5, 40, 0.1)
    assert (args.seed, args.max_tokens) == (P.SEED_MAX, 7)
    defaults = _parser().parse_args(["generate", "m", "p"])
    assert (defaults.temperature, defaults.max_tokens, defaults.seed) == (0.0, 256, None)


@pytest.mark.parametrize("value", ["3", True, 3.0])
def test_wire_integers_are_integers(value: object) -> None:
    with pytest.raises(ValidationError, match="max_tokens"):
        JobRequest.model_validate({"id": "j", "prompt": "x", "max_tokens": value})
    with pytest.raises(ValidationError, match="temperature"):
        JobRequest.model_validate({"id": "j", "prompt": "x", "temperature": "0.5"})


@pytest.mark.e2e  # a subprocess: a fresh interpreter shows what importing loads
def test_the_bounds_module_is_light() -> None:
    import subprocess
    import sys

    code = "import sys, edge_contract.params, edge_contract.protocol; print(sorted(m for m in ('numpy', 'onnxruntime', 'tokenizers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@settings(max_examples=60, deadline=None)
@given(
    vocab=st.integers(1, 6000),
    spread=st.floats(0.01, 30.0),
    top_p=st.floats(1e-6, 0.999999),
    seed=st.integers(0, 2**16),
)
def test_top_p_sorting_only_the_likeliest_keeps_what_a_full_sort_keeps(
    vocab: int, spread: float, top_p: float, seed: int
) -> None:
    from agent.engine.sampling import _nucleus

    scores = -np.abs(np.random.default_rng(seed).normal(size=vocab)) * spread
    scores[0] = 0.0
    ids = np.arange(vocab)
    weights = np.exp(scores)
    order = np.lexsort((ids, -scores))  # the reference: everything sorted
    mass = np.cumsum(weights[order]) / weights.sum()
    expected = order[: min(vocab, int(np.searchsorted(mass, top_p)) + 1)]
    assert _nucleus(scores, ids, weights, top_p).tolist() == expected.tolist()


def test_the_protocol_document_states_the_bounds_params_defines() -> None:
    from pathlib import Path

    dash = "\u2013"  # the document's ranges use an en dash
    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in doc.splitlines() if line.startswith("| `")}
    assert f"{P.TEMPERATURE_MIN:g}{dash}{P.TEMPERATURE_MAX:g}" in rows["temperature"]
    assert f"{P.REPETITION_PENALTY_MIN:g}{dash}{P.REPETITION_PENALTY_MAX:g}" in rows["repetition_penalty"]
    assert f"0{dash}{P.TOP_K_MAX:,}" in rows["top_k"]
    assert f"up to {P.STOP_MAX} of 1{dash}{P.STOP_LENGTH_MAX}" in rows["stop"]
