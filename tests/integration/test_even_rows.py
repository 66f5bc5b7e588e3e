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

from typing import Any

import pytest

from agent import Engine, SamplingParams
from agent.engine.engine import EngineOptions
from agent.engine.speculate import DraftPolicy
from tests.support import cpu
from tests.support.logits import Rows, assert_batched_as_solo, assert_same, drafting, forced, speculating
from tests.support.models import fixture_path

PAIRED = "llama-int4-b128"
NAMES = [PAIRED, "llama-int4"]
TEXT = "The quick brown fox jumps over the lazy dog; the dog sleeps, the fox runs on and on."


def _engine(name: str, **options: Any) -> Engine:
    engine = Engine(fixture_path(name), EngineOptions(threads=1, **options))
    if name != PAIRED:
        engine.even_rows = True  # the even passes, forced where they are not needed
    return engine


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
    want = forced(whole, prompt, tokens)
    for chunk in (2, 7, 8, 128):
        engine = _engine(name, prefix_cache_mb=0, prefill_chunk_tokens=chunk)
        assert_same(forced(engine, prompt, tokens), want, f"{name}, {length} tokens in chunks of {chunk}")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("in_place", [False, True], ids=["prefix-cache", "kept-buffer"])
def test_a_hit_at_an_odd_or_even_position_gives_the_cold_logits(name: str, in_place: bool) -> None:
    assert cpu.family() in cpu.PREFIX_EXACT
    cold = _engine(name, prefix_cache_mb=0, prefill_chunk_tokens=8)
    prompt = _prompt(cold, 40)
    tokens = _tokens(cold, prompt, 10)
    want = forced(cold, prompt, tokens)
    for split in (13, 14, 21, 38):
        warm = _engine(name, prefill_chunk_tokens=8, prefix_block_tokens=4)
        forced(warm, prompt[:split], [prompt[split]])
        if not in_place:
            warm.release_kept()
        before = warm.prefix_cache_stats()
        assert before is not None
        got = forced(warm, prompt, tokens)
        after = warm.prefix_cache_stats()
        assert after is not None
        if not in_place:  # positive control: the second run started from the cache
            assert after.cached_tokens - before.cached_tokens >= min(split, len(prompt) - 2) - 3
        assert_same(got, want, f"{name}, resumed after {split} of {len(prompt)} tokens")


@pytest.mark.parametrize("name", NAMES)
def test_three_sequences_batched_give_their_solo_logits(name: str) -> None:
    assert cpu.family() in cpu.BATCH_EXACT
    engine = _engine(name, prefix_cache_mb=0)
    assert_batched_as_solo(engine, engine, [_prompt(engine, n) for n in (9, 14, 23)], name)


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
        monkeypatch.setattr(DraftPolicy, "choose", drafting(mode))
        rows[mode], drafted[mode] = speculating(engine, prompt, tokens)
    for mode in ("always", "random"):
        assert_same(rows[mode], rows["never"], f"{name}, drafting {mode}")
    assert drafted["never"] == 0 and drafted["always"] > 10 and drafted["random"] > 0  # positive control
