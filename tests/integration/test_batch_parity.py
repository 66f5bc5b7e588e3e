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
from agent.engine.batch import Batcher
from edge_contract.errors import AgentError, InvalidRequestError
from tests.support import cpu
from tests.support.models import ALL_FIXTURES, fixture_path


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


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_batched_output_is_solo_output(name: str) -> None:
    assert cpu.family() in cpu.BATCH_EXACT, f"batching claims no exactness on {cpu.family()}"
    engine = Engine(fixture_path(name))
    requests = _requests(engine, seed=len(name))
    solo = [engine.generate(ids, params) for ids, params in requests]
    batcher = Batcher(engine, max_batch=4, prefill_chunk=4, slot_tokens=128)
    streamed: list[list[str]] = [[] for _ in requests]
    jobs = []
    for i, (ids, params) in enumerate(requests):
        jobs.append(batcher.submit(ids, params, on_text=streamed[i].append))
        for _ in range(i % 3):  # the others join while earlier ones run (and some leave)
            batcher.step()
    batcher.run()
    for i, (job, want) in enumerate(zip(jobs, solo, strict=True)):
        got = job.completion
        assert got is not None
        assert got.token_ids == want.token_ids, f"request {i}"
        assert (got.text, got.finish_reason) == (want.text, want.finish_reason), f"request {i}"
        assert "".join(streamed[i]) == got.text
    # Positive controls: the batch really ran several sequences per pass, and the outputs vary.
    assert batcher.occupancy * batcher.max_batch > 1.5
    assert len({tuple(c.token_ids) for c in solo}) > 4


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
