"""Prompt-lookup drafting, the draft-length policy, and the verification rule (on a fake model).

The fake model's logits are a deterministic function of the last two tokens, so
it is exact arithmetic: speculative output must equal plain output bit for bit,
greedy and seeded sampling alike.  (The real-model parity tests are in
tests/integration/test_speculative_parity.py.)
"""

from __future__ import annotations

import hashlib

import numpy as np
import numpy.typing as npt
import pytest

from agent.engine.sampling import Sampler, SamplingParams
from agent.engine.speculate import DraftPolicy, NgramDrafter, Speculator

VOCAB = 50


def test_drafts_the_continuation_of_the_latest_match() -> None:
    drafter = NgramDrafter([1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 7])
    drafter.extend([1, 2, 3])
    # Suffix (1, 2, 3) occurred twice; the latest one was followed by 5, 6, 7.
    assert drafter.draft(3) == [5, 6, 7]
    assert drafter.draft(1) == [5]
    assert drafter.draft(0) == []


def test_prefers_the_longest_matching_suffix() -> None:
    # Unigram 3 last occurred before 8, but the trigram (1, 2, 3) before 4.
    drafter = NgramDrafter([1, 2, 3, 4, 4, 7, 3, 8, 1, 2, 3])
    assert drafter.draft(2) == [4, 4]


def test_no_match_no_draft_and_the_suffix_never_matches_itself() -> None:
    drafter = NgramDrafter([10, 11, 12])
    assert drafter.draft(4) == []
    assert NgramDrafter([5]).draft(2) == []
    # Positive control: once 12 has a successor, it drafts.
    drafter.extend([13, 12])
    assert drafter.draft(4) == [13, 12]


def test_min_ngram_bounds_the_match() -> None:
    assert NgramDrafter([1, 2, 1], min_ngram=2).draft(3) == []
    assert NgramDrafter([1, 2, 1], min_ngram=1).draft(3) == [2, 1]
    with pytest.raises(ValueError):
        NgramDrafter([], min_ngram=3, max_ngram=2)


def _feed(policy: DraftPolicy, passes: int, *, k: int, accepted: int, cost_one: float, cost_k: float) -> None:
    for _ in range(passes):
        policy.choose(k)
        policy.record(1, cost_one, 0, 0)
        policy.record(k + 1, cost_k, k, accepted)


def test_policy_drafts_long_when_drafts_are_accepted_and_verifying_is_cheap() -> None:
    policy = DraftPolicy(max_k=8)
    _feed(policy, 20, k=8, accepted=8, cost_one=0.010, cost_k=0.011)
    assert policy.acceptance > 0.9
    assert policy.choose(8) == 8
    assert policy.choose(3) == 3  # never more than the room left


def test_policy_stops_drafting_when_nothing_is_accepted_then_probes_rarely() -> None:
    policy = DraftPolicy(max_k=8)
    _feed(policy, 10, k=4, accepted=0, cost_one=0.010, cost_k=0.013)
    choices = [policy.choose(8) for _ in range(200)]
    probes = [k for k in choices if k]
    assert probes, "it must still probe now and then"
    assert all(k == 2 for k in probes)
    assert len(probes) <= 8, "back-off between probes must grow"


def test_policy_does_not_draft_when_a_verify_pass_costs_as_much_as_the_tokens_it_may_save() -> None:
    policy = DraftPolicy(max_k=8)
    # Compute-bound: a pass over k+1 tokens costs k+1 one-token passes; half the drafts accepted.
    for k in range(1, 9):
        policy.record(k + 1, 0.010 * (k + 1), k, k // 2)
    policy.record(1, 0.010, 0, 0)
    assert policy.choose(8) == 0
    # Positive control: the same acceptance with cheap passes drafts.
    cheap = DraftPolicy(max_k=8)
    for k in range(1, 9):
        cheap.record(k + 1, 0.0105, k, k // 2)
    cheap.record(1, 0.010, 0, 0)
    assert cheap.choose(8) > 0


def test_the_first_pass_is_plain_so_the_one_token_cost_is_known() -> None:
    assert DraftPolicy(max_k=4).choose(4) == 0


@pytest.mark.parametrize("max_k", [1, 2, 8])
def test_the_policy_never_asks_for_more_than_max_k(max_k: int) -> None:
    # Drafts that never pay send the policy into its cool-down and probes; a probe too must
    # respect max_k, which sizes the verify buffers (a probe of 2 with max_k 1 crashed a job).
    policy = DraftPolicy(max_k=max_k)
    policy.record(1, 1.0, 0, 0)
    asked = []
    for _ in range(400):
        k = policy.choose(8)
        asked.append(k)
        policy.record(k + 1, 1.0 + 0.5 * k, k, 0)
    assert max(asked) >= 1  # positive control: it did draft
    assert all(k <= max_k for k in asked)


class _BigramModel:
    """Logits that depend on the last two tokens of the context only, like a copying model."""

    def __init__(self, prompt: list[int]) -> None:
        self.cache: list[int] = list(prompt)
        self.rows: list[int] = []  # rows fed per pass
        self.kept: list[int] = []  # rows of logits returned per pass (a row-keeping export: the last ones)

    def logits(self, context: list[int]) -> npt.NDArray[np.float32]:
        seed = int.from_bytes(hashlib.sha256(bytes(str(context[-2:]), "ascii")).digest()[:8], "little")
        return np.random.default_rng(seed).normal(0.0, 3.0, VOCAB).astype(np.float32)

    def forward(self, ids: npt.NDArray[np.int64], past: int, out: npt.NDArray[np.float32]) -> None:
        assert past <= len(self.cache), "fed past the end of the cache"
        del self.cache[past:]  # rejected drafts are overwritten
        n, kept = ids.shape[1], out.shape[1]
        assert kept <= n
        self.rows.append(n)
        self.kept.append(kept)
        for j, token in enumerate(ids[0]):
            self.cache.append(int(token))
            if j >= n - kept:
                out[0, j - (n - kept)] = self.logits(self.cache)


def _plain(prompt: list[int], params: SamplingParams, new: int) -> list[int]:
    model = _BigramModel(prompt)
    sampler = Sampler(params, VOCAB, prompt)
    out = [sampler(model.logits(prompt))]
    while len(out) < new:
        out.append(sampler(model.logits([*prompt, *out])))
    return out


def _speculative(
    prompt: list[int], params: SamplingParams, new: int, *, even: bool = False, keep_rows: bool = False
) -> tuple[list[int], Speculator]:
    model = _BigramModel(prompt)
    sampler = Sampler(params, VOCAB, prompt)
    ticks = iter(range(10**6))  # every pass "takes" one tick: the policy's choices are reproducible
    spec = Speculator(
        model.forward,
        sampler,
        prompt,
        vocab=VOCAB,
        logits_dtype=np.float32,
        max_k=6,
        even=even,
        keep_rows=keep_rows,
        clock=lambda: next(ticks),
    )
    out = [sampler(model.logits(prompt))]
    one = np.empty((1, 1, VOCAB), dtype=np.float32)
    drafted = 0
    while len(out) < new:
        past = len(prompt) + len(out) - 1
        passes = len(model.rows)
        chosen = spec.step(out[-1], past, min(6, new - len(out) - 1))
        # Every pass of the speculator has two rows or more (a step without drafts feeds the previous
        # token again): onnxruntime's one-row attention path rounds differently from the multi-row one.
        assert all(rows >= 2 for rows in model.rows[passes:])
        # Where the kernels pair rows (Engine.even_rows) every pass is even, the fed tokens still right.
        assert not even or all(rows % 2 == 0 for rows in model.rows[passes:])
        # A row-keeping export returns the rows verified only (an even count of them where rows pair).
        if chosen and keep_rows:
            verified = spec.drafted - drafted + 1  # the token and its drafts
            assert model.kept[passes:] == [verified + (verified % 2 if even else 0)]
        elif chosen:
            assert model.kept[passes:] == model.rows[passes:]
        drafted = spec.drafted
        if not chosen:  # resting: the caller's plain one-token step
            model.forward(np.asarray([[out[-1]]], dtype=np.int64), past, one)
            chosen = [sampler(one[0, 0])]
        out += chosen
    assert model.rows
    return out[:new], spec


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.5, seed=3),
        SamplingParams(temperature=0.5, top_k=5, top_p=0.9, repetition_penalty=1.05, seed=11),
    ],
    ids=["greedy", "sampled", "sampled-penalized"],
)
@pytest.mark.parametrize("even", [False, True], ids=["any-rows", "even-rows"])
@pytest.mark.parametrize("keep_rows", [False, True], ids=["every-row", "rows-kept"])
def test_speculative_output_is_plain_output(params: SamplingParams, even: bool, keep_rows: bool) -> None:
    rng = np.random.default_rng(0)
    drafted = accepted = passes = 0
    for trial in range(6):
        start = [int(t) for t in rng.integers(0, VOCAB, 8)]
        # Something to copy: the model's own greedy text, then its start again.
        prompt = [*start, *_plain(start, SamplingParams(), 40), *start]
        plain = _plain(prompt, params, 80)
        spec, speculator = _speculative(prompt, params, 80, even=even, keep_rows=keep_rows)
        assert spec == plain, f"trial {trial}"
        drafted += speculator.drafted
        accepted += speculator.accepted
        passes += speculator.passes
    # Positive control: drafts were made, some accepted, and passes saved.
    assert 0 < accepted <= drafted
    assert passes < 6 * 80


def test_with_nothing_to_copy_the_speculator_rests_and_the_output_is_still_plain() -> None:
    # A prompt of distinct tokens and a model whose text does not repeat it: no two-token suffix
    # matches, so after REST_AFTER dry steps the caller decodes plainly (one-row passes).
    prompt = list(range(10, 40))
    plain = _plain(prompt, SamplingParams(), 60)
    spec, speculator = _speculative(prompt, SamplingParams(), 60)
    assert spec == plain
    assert speculator.rests > 0, "nothing to copy, yet the speculator never rested"
    _, busy = _speculative([*prompt, *plain, *prompt[:3]], SamplingParams(), 60)
    assert busy.accepted > 0  # positive control: with something to copy it drafts
