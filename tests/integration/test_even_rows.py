"""Logits, bit for bit, on a model whose kernels compute rows in pairs (``Engine.even_rows``).

``llama-int4-b128`` is int4 in blocks of 128: on AVX-512 VNNI onnxruntime's kernels round a row
without a partner (the last row of a pass with an odd row count) otherwise, by ~1e-6, so tokens
could only differ at near-ties and token-level tests would not notice.  These tests compare the
logits every token is chosen from: the engine gives every pass an even number of rows (a filler
slot in decode passes, a recomputed position in prefill chunks and verify passes), and the
guarantees hold bit for bit on it:

* chunk-size independence (chunks of 7, 8, 128 or the whole prompt), ``PREFIX_EXACT`` (a
  prefix-cache hit or the kept buffer resuming at odd and even positions gives the cold run's
  logits), ``BATCH_EXACT`` (three sequences batched give their solo logits) and ``DRAFT_EXACT``
  (a speculating engine's logits do not depend on what it drafted).

The same tests run on ``llama-int4`` (block 32) with the even passes forced, so the extra rows are
shown not to change a result where they are not needed.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from agent import Engine, SamplingParams
from agent.engine.batch import Batcher
from agent.engine.engine import EngineOptions
from agent.engine.sequence import ForcedSampler
from agent.engine.speculate import DraftPolicy
from tests.support import cpu
from tests.support.models import fixture_path

PAIRED = "llama-int4-b128"
NAMES = [PAIRED, "llama-int4"]
TEXT = "The quick brown fox jumps over the lazy dog; the dog sleeps, the fox runs on and on."
Rows = list[npt.NDArray[Any]]


def _engine(name: str, **options: Any) -> Engine:
    engine = Engine(fixture_path(name), EngineOptions(threads=1, **options))
    if name != PAIRED:
        engine.even_rows = True  # the even passes, forced where they are not needed
    return engine


def _forced(engine: Engine, prompt: list[int], tokens: list[int], **batcher: Any) -> Rows:
    """The logits each of ``tokens`` is chosen from after ``prompt``, one sequence in a one-slot batcher."""
    seq = engine.sequence(prompt, SamplingParams(max_tokens=len(tokens), ignore_eos=True))
    sampler = seq.sampler = ForcedSampler(tokens, engine.graph.vocab)
    run = Batcher(engine, max_batch=1, slot_tokens=seq.capacity, **batcher)
    run.submit_sequence(seq)
    run.run()
    run.close()
    return sampler.rows


def _assert_same(got: Rows, want: Rows, what: str) -> None:
    assert len(got) == len(want), what
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert np.array_equal(a, b), f"{what}: logits of token {step} differ by {np.abs(a - b).max():.3g}"


def _prompt(engine: Engine, length: int) -> list[int]:
    ids = engine.prompt_ids(TEXT * 3)
    assert len(ids) >= length
    return ids[:length]


def _tokens(engine: Engine, prompt: list[int], n: int) -> list[int]:
    return engine.generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True)).token_ids


def test_the_paired_fixture_is_measured_as_paired_where_its_kernels_pair_rows() -> None:
    # Block 128 on AVX-512 VNNI pairs rows; on AVX2 one row differs from many: both need even passes.
    assert _engine(PAIRED).even_rows == (cpu.family() in (cpu.X86_AVX512, cpu.X86_AVX2))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("length", [37, 38])
def test_logits_do_not_depend_on_the_prefill_chunk_size(name: str, length: int) -> None:
    assert cpu.family() in cpu.PREFIX_EXACT
    whole = _engine(name, prefix_cache_mb=0)
    prompt = _prompt(whole, length)
    tokens = _tokens(whole, prompt, 12)
    want = _forced(whole, prompt, tokens)
    for chunk in (2, 7, 8, 128):
        engine = _engine(name, prefix_cache_mb=0, prefill_chunk_tokens=chunk)
        _assert_same(_forced(engine, prompt, tokens), want, f"{name}, {length} tokens in chunks of {chunk}")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("in_place", [False, True], ids=["prefix-cache", "kept-buffer"])
def test_a_hit_at_an_odd_or_even_position_gives_the_cold_logits(name: str, in_place: bool) -> None:
    assert cpu.family() in cpu.PREFIX_EXACT
    cold = _engine(name, prefix_cache_mb=0, prefill_chunk_tokens=8)
    prompt = _prompt(cold, 40)
    tokens = _tokens(cold, prompt, 10)
    want = _forced(cold, prompt, tokens)
    for split in (13, 14, 21, 38):
        warm = _engine(name, prefill_chunk_tokens=8, prefix_block_tokens=4)
        _forced(warm, prompt[:split], [prompt[split]])
        if not in_place:
            warm.release_kept()
        before = warm.prefix_cache_stats()
        assert before is not None
        got = _forced(warm, prompt, tokens)
        after = warm.prefix_cache_stats()
        assert after is not None
        if not in_place:  # positive control: the second run started from the cache
            assert after.cached_tokens - before.cached_tokens >= min(split, len(prompt) - 2) - 3
        _assert_same(got, want, f"{name}, resumed after {split} of {len(prompt)} tokens")


@pytest.mark.parametrize("name", NAMES)
def test_three_sequences_batched_give_their_solo_logits(name: str) -> None:
    assert cpu.family() in cpu.BATCH_EXACT
    engine = _engine(name, prefix_cache_mb=0)
    prompts = [_prompt(engine, n) for n in (9, 14, 23)]
    wanted = [_tokens(engine, p, n) for p, n in zip(prompts, (20, 13, 17), strict=True)]
    solo = [_forced(engine, p, t) for p, t in zip(prompts, wanted, strict=True)]
    batcher = Batcher(engine, max_batch=3, prefill_chunk=5, slot_tokens=64)
    samplers = []
    for prompt, tokens in zip(prompts, wanted, strict=True):
        seq = engine.sequence(prompt, SamplingParams(max_tokens=len(tokens), ignore_eos=True))
        sampler = seq.sampler = ForcedSampler(tokens, engine.graph.vocab)
        samplers.append(sampler)
        batcher.submit_sequence(seq)
    batcher.run()
    for i, (sampler, want) in enumerate(zip(samplers, solo, strict=True)):
        _assert_same(sampler.rows, want, f"{name}, sequence {i} of 3 batched")
    assert batcher.rows > batcher.passes * 2  # positive control: passes of three sequences ran


def _drafting(mode: str) -> Any:
    rng = random.Random(7)

    def choose(self: DraftPolicy, limit: int) -> int:
        if mode == "never":
            return 0
        return min(limit, self.max_k if mode == "always" else rng.randint(0, self.max_k))

    return choose


@pytest.mark.parametrize("name", NAMES)
def test_a_speculating_engines_logits_do_not_depend_on_the_drafts(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cpu.family() in cpu.DRAFT_EXACT
    engine = _engine(name, prefix_cache_mb=0, speculate_max_k=5)
    prompt = engine.prompt_ids(TEXT * 2)
    tokens = engine.prompt_ids(TEXT)[:30]  # a copy of the prompt: drafts get accepted
    rows: dict[str, Rows] = {}
    drafted: dict[str, int] = {}
    for mode in ("never", "always", "random"):
        monkeypatch.setattr(DraftPolicy, "choose", _drafting(mode))
        seq = engine.sequence(prompt, SamplingParams(max_tokens=len(tokens), ignore_eos=True))
        sampler = seq.sampler = ForcedSampler(tokens, engine.graph.vocab)
        run = Batcher(engine, max_batch=1, slot_tokens=seq.capacity, speculate=True)
        job = run.submit_sequence(seq)
        run.run()
        rows[mode] = sampler.rows
        assert job.completion is not None
        drafted[mode] = job.completion.drafted_tokens
    for mode in ("always", "random"):
        _assert_same(rows[mode], rows["never"], f"{name}, drafting {mode}")
    assert drafted["never"] == 0 and drafted["always"] > 10 and drafted["random"] > 0  # positive control
