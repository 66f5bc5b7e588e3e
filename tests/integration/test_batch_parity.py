"""Continuous batching gives every sequence exactly its solo output, on every fixture.

Guarantee checked: ``BATCH_EXACT`` (tests/support/cpu.py), claimed on x86-64 AVX-512,
x86-64 AVX2-only (the engine decodes with a filler row there: agent.engine.rows) and
aarch64; CI runs it natively, under ``qemu-x86_64 -cpu Haswell`` and under
``qemu-aarch64 -cpu cortex-a76``.  Batched rows are computed as solo one-token steps
are (see agent.engine.batch), so the comparison is token for token, text and finish
reason included, with prompts of mixed lengths, chunked prefill, sampled rows beside
greedy ones, and sequences joining and leaving mid-batch.  Both sides run here, on
the same machine and kernels.
"""

from __future__ import annotations

import random

import pytest

from agent import Engine, SamplingParams
from agent.engine.batch import JOIN_CHUNK_TOKENS, Batcher
from agent.engine.engine import Completion
from agent.engine.options import EngineOptions
from agent.engine.speculate import DraftPolicy, Speculator
from edge_contract.errors import AgentError, InvalidRequestError
from tests.support import cpu
from tests.support.models import ALL_FIXTURES, fixture_path
from tests.support.tiers import matrix


def _requests(engine: Engine, seed: int) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    texts = ["The quick brown fox", "Grüße aus Köln 🎉 日本語", "a", "Once upon a time, far away"]
    out: list[tuple[list[int], SamplingParams]] = []
    for i, length in enumerate((1, 2, 3, 7, 19, 60, 5, 33)):
        ids = (engine.prompt_ids(texts[i % len(texts)]) * 30)[:length]
        extra: dict[str, object] = {}
        if i % 3 == 1:
            extra = {"temperature": 0.9, "seed": seed + i, "top_p": 0.95}
        if i == 4:
            extra["stop"] = (engine.tokenizer.decode([7 + i]),)
        params = SamplingParams(max_tokens=rng.randint(1, 40), ignore_eos=i % 2 == 0, **extra)  # type: ignore[arg-type]
        out.append((ids, params))
    return out


@pytest.mark.parametrize(
    "name", matrix([*ALL_FIXTURES, "llama-int4-b128"], fast=["qwen3-int4", "mistral-int8"])
)
def test_batched_output_is_solo_output(name: str) -> None:
    assert cpu.family() in cpu.BATCH_EXACT, f"batching claims no exactness on {cpu.family()}"
    _batched_is_solo(Engine(fixture_path(name)), name)


@pytest.mark.parametrize("name", ["llama-int4", "qwen2-int8"])
def test_batched_output_is_solo_output_with_filler_rows(name: str) -> None:
    # The path AVX2-only hosts take at int4 (a lone decoding sequence beside a filler row,
    # also while others prefill), forced here so that every CI host runs it.
    engine = Engine(fixture_path(name))
    engine.even_rows = True
    _batched_is_solo(engine, name)


def _batched_is_solo(engine: Engine, name: str) -> None:
    requests = _requests(engine, seed=len(name))
    solo = [engine.generate(ids, params) for ids, params in requests]
    batcher = Batcher(engine, max_batch=4, prefill_chunk=4, slot_tokens=128)
    _assert_batched_is_solo(batcher, requests, solo)
    # Positive controls: the batch really ran several sequences per pass, and the outputs vary.
    assert batcher.occupancy * batcher.max_batch > 1.5
    assert len({tuple(c.token_ids) for c in solo}) > 4


def _assert_batched_is_solo(
    batcher: Batcher, requests: list[tuple[list[int], SamplingParams]], solo: list[Completion]
) -> list[Completion]:
    """Run ``requests`` through ``batcher``, joining while others run; each equals its solo run."""
    streamed: list[list[str]] = [[] for _ in requests]
    jobs = []
    for i, (ids, params) in enumerate(requests):
        jobs.append(batcher.submit(ids, params, on_text=streamed[i].append))
        for _ in range(i % 3):  # the others join while earlier ones run (and some leave)
            batcher.step()
    batcher.run()
    out = []
    for i, (job, want) in enumerate(zip(jobs, solo, strict=True)):
        got = job.completion
        assert got is not None
        assert got.token_ids == want.token_ids, f"request {i}"
        assert (got.text, got.finish_reason) == (want.text, want.finish_reason), f"request {i}"
        assert "".join(streamed[i]) == got.text
        out.append(got)
    return out


@pytest.mark.parametrize(
    ("name", "rests"),
    matrix(
        [
            (name, rests)
            for rests in ("never-rests", "rests-often")
            for name in ("llama-int4", "qwen3-int4", "phi3-int8", "llama-int4-b128")
        ],
        fast=[("llama-int4", "never-rests"), ("phi3-int8", "rests-often")],
    ),
)
def test_speculating_sequences_batched_give_their_solo_speculating_output(
    name: str, rests: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Guarantee BATCH_DRAFT_EXACT. Each sequence drafts as much as it may (random weights accept
    # few drafts and the adaptive policy would stop); resting never, or after 2 dry steps, so that
    # steps mix resting rows (one batched one-token pass) with verify passes (one per sequence).
    assert cpu.family() in cpu.BATCH_DRAFT_EXACT, f"batched speculation claims no exactness on {cpu.family()}"
    monkeypatch.setattr(Speculator, "REST_AFTER", 10**9 if rests == "never-rests" else 2)
    monkeypatch.setattr(DraftPolicy, "choose", lambda self, limit: min(self.max_k, limit))
    engine = Engine(fixture_path(name), EngineOptions(speculate=True, speculate_max_k=4))
    requests = _requests(engine, seed=len(name))
    for text in ("The quick brown fox", "a b a b"):  # something to copy: the model's own text, then its start
        ids = engine.prompt_ids(text)
        own = engine.generate(ids, SamplingParams(max_tokens=30, ignore_eos=True)).token_ids
        requests.append((ids + own + ids, SamplingParams(max_tokens=30, ignore_eos=True)))
    solo = [engine.generate(ids, params) for ids, params in requests]
    batcher = Batcher(engine, max_batch=4, prefill_chunk=4, slot_tokens=128, speculate=True)
    got = _assert_batched_is_solo(batcher, requests, solo)
    # Positive controls: drafts were verified (never resting), resting rows shared passes.
    if rests == "never-rests":
        assert sum(c.drafted_tokens for c in got) > 0
    else:
        assert batcher.occupancy * batcher.max_batch > 1.5, "resting rows share one-token passes"


@pytest.mark.parametrize("name", ["llama-int4", "qwen3-int4", "phi3-int8"])
def test_a_long_prompt_joining_running_sequences_gives_its_solo_tokens(name: str) -> None:
    # While others decode, a joining prompt prefills in chunks of JOIN_CHUNK_TOKENS, alone in
    # chunks of prefill_chunk_tokens (512): chunk boundaries must not change a token.
    engine = Engine(fixture_path(name), EngineOptions(prefix_cache_mb=0))
    requests = _requests(engine, seed=len(name))[:3]
    long_prompt = (engine.prompt_ids("Once upon a time, far away") * 60)[:200]  # the context is 256
    requests.append((long_prompt, SamplingParams(max_tokens=12, ignore_eos=True)))
    solo = [engine.generate(ids, params) for ids, params in requests]
    batcher = Batcher(engine, max_batch=4, slot_tokens=256)
    assert batcher.prefill_chunk == 512 > JOIN_CHUNK_TOKENS
    jobs = [batcher.submit(ids, params) for ids, params in requests[:3]]
    for _ in range(3):
        batcher.step()  # the three run
    progress: list[int] = []
    seq = engine.sequence(*requests[3])
    jobs.append(batcher.submit_sequence(seq, on_prefill=lambda done, _total: progress.append(done)))
    batcher.run()
    for i, (job, want) in enumerate(zip(jobs, solo, strict=True)):
        assert job.completion is not None and job.completion.token_ids == want.token_ids, f"request {i}"
    # Positive control: the joiner's chunks were capped while others decoded.
    assert progress == [0, JOIN_CHUNK_TOKENS, len(long_prompt)], progress


def test_a_canceled_sequence_leaves_without_disturbing_the_others() -> None:
    engine = Engine(fixture_path("llama-int4"))
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    prompts = [engine.prompt_ids(t) for t in ("The quick brown fox", "a", "Grüße aus Köln")]
    solo = [engine.generate(ids, params).token_ids for ids in prompts]
    batcher = Batcher(engine, max_batch=3)
    counts = [0]

    def stop_after_five() -> bool:
        counts[0] += 1
        return counts[0] > 5

    jobs = [
        batcher.submit(prompts[0], params),
        batcher.submit(prompts[1], params, should_stop=stop_after_five),
        batcher.submit(prompts[2], params),
    ]
    batcher.run()
    canceled = jobs[1].completion
    assert canceled is not None and canceled.finish_reason == "canceled"
    assert canceled.token_ids == solo[1][: len(canceled.token_ids)]
    assert len(canceled.token_ids) < len(solo[1])
    for job, want in ((jobs[0], solo[0]), (jobs[2], solo[2])):
        assert job.completion is not None and job.completion.token_ids == want
        assert job.completion.finish_reason == "length"


def test_a_sequence_canceled_while_queued_never_runs() -> None:
    engine = Engine(fixture_path("qwen2-int8"))
    batcher = Batcher(engine, max_batch=1)
    first = batcher.submit(engine.prompt_ids("a"), SamplingParams(max_tokens=5))
    queued = batcher.submit(engine.prompt_ids("b"), SamplingParams(max_tokens=5), should_stop=lambda: True)
    batcher.run()
    assert queued.completion is not None and queued.completion.finish_reason == "canceled"
    assert queued.completion.token_ids == []
    assert first.completion is not None and first.completion.token_ids  # positive control


def test_a_request_larger_than_a_slot_runs_alone_after_the_batch_drains() -> None:
    engine = Engine(fixture_path("phi3-int8"))
    big = (engine.prompt_ids("The quick brown fox"), SamplingParams(max_tokens=60, ignore_eos=True))
    small = (engine.prompt_ids("a"), SamplingParams(max_tokens=8, ignore_eos=True))
    batcher = Batcher(engine, max_batch=2, slot_tokens=32)
    jobs = [batcher.submit(*small), batcher.submit(*big), batcher.submit(*small)]
    batcher.run()
    assert [j.completion.token_ids for j in jobs if j.completion] == [
        engine.generate(*small).token_ids,
        engine.generate(*big).token_ids,
        engine.generate(*small).token_ids,
    ]


def test_the_memory_budget_caps_the_batch_and_says_what_one_slot_needs() -> None:
    engine = Engine(fixture_path("mistral-int4"))
    one_slot = Batcher(engine, max_batch=1, slot_tokens=64).nbytes
    capped = Batcher(engine, max_batch=8, slot_tokens=64, budget_bytes=2 * one_slot + 1)
    assert capped.max_batch == 2 and capped.nbytes == 2 * one_slot
    assert Batcher(engine, max_batch=8, slot_tokens=64, budget_bytes=100 * one_slot).max_batch == 8
    with pytest.raises(AgentError, match="raise the budget"):
        Batcher(engine, max_batch=2, slot_tokens=64, budget_bytes=one_slot - 1)


def test_bad_prompts_are_refused_at_submit() -> None:
    batcher = Batcher(Engine(fixture_path("phi3-int4")), max_batch=2)
    with pytest.raises(InvalidRequestError):
        batcher.submit([])
    with pytest.raises(InvalidRequestError):
        batcher.submit([10**6])
    assert batcher.idle
