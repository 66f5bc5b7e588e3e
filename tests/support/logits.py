"""Logits-level helpers shared by the bit-exactness tests (``test_even_rows.py``, ``test_logits_rows.py``)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from agent import Engine, SamplingParams
from agent.engine.batch import Batcher
from agent.engine.sequence import ForcedSampler
from agent.engine.speculate import DraftPolicy

Rows = list[npt.NDArray[Any]]


def forced(engine: Engine, prompt: list[int], tokens: list[int], **batcher: Any) -> Rows:
    """The logits each of ``tokens`` is chosen from after ``prompt``, one sequence in a one-slot batcher."""
    seq = engine.sequence(prompt, SamplingParams(max_tokens=len(tokens), ignore_eos=True))
    sampler = seq.sampler = ForcedSampler(tokens, engine.graph.vocab)
    run = Batcher(engine, max_batch=1, slot_tokens=seq.capacity, **batcher)
    run.submit_sequence(seq)
    run.run()
    run.close()
    return sampler.rows


def assert_same(got: Rows, want: Rows, what: str) -> None:
    """Every row of ``got`` equals ``want``'s bit for bit (the message says by how much they differ)."""
    assert len(got) == len(want), what
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert np.array_equal(a, b), f"{what}: logits of token {step} differ by {np.abs(a - b).max():.3g}"


def drafting(mode: str) -> Callable[[DraftPolicy, int], int]:
    """A ``DraftPolicy.choose`` that drafts ``never``, ``always`` (``max_k``) or at ``random`` (seeded)."""
    rng = random.Random(7)

    def choose(self: DraftPolicy, limit: int) -> int:
        if mode == "never":
            return 0
        return min(limit, self.max_k if mode == "always" else rng.randint(0, self.max_k))

    return choose


def speculating(engine: Engine, prompt: list[int], tokens: list[int]) -> tuple[Rows, int]:
    """``forced`` with speculation on: the logits and how many tokens were drafted."""
    seq = engine.sequence(prompt, SamplingParams(max_tokens=len(tokens), ignore_eos=True))
    sampler = seq.sampler = ForcedSampler(tokens, engine.graph.vocab)
    run = Batcher(engine, max_batch=1, slot_tokens=seq.capacity, speculate=True)
    job = run.submit_sequence(seq)
    run.run()
    assert job.completion is not None
    return sampler.rows, job.completion.drafted_tokens


def batched(engine: Engine, prompts: list[list[int]], tokens: list[list[int]], **batcher: Any) -> list[Rows]:
    """``forced`` for every prompt at once, in one batcher of ``len(prompts)`` slots; asserts passes were shared."""
    run = Batcher(engine, max_batch=len(prompts), **batcher)
    samplers = []
    for prompt, wanted in zip(prompts, tokens, strict=True):
        seq = engine.sequence(prompt, SamplingParams(max_tokens=len(wanted), ignore_eos=True))
        sampler = seq.sampler = ForcedSampler(wanted, engine.graph.vocab)
        samplers.append(sampler)
        run.submit_sequence(seq)
    run.run()
    assert run.rows > run.passes * (len(prompts) - 1)  # positive control: passes of several sequences ran
    return [sampler.rows for sampler in samplers]


def assert_batched_as_solo(solo: Engine, engine: Engine, prompts: list[list[int]], what: str) -> None:
    """``engine`` running ``prompts`` together (chunks of 5) gives ``solo``'s logits for each alone.

    The tokens forced are ``solo``'s greedy choices: 20, 13, 17, ... new tokens per prompt.
    """
    news = [20, 13, 17, 11, 9][: len(prompts)]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in news]
    wanted = [solo.generate(p, q).token_ids for p, q in zip(prompts, params, strict=True)]
    want = [forced(solo, p, t) for p, t in zip(prompts, wanted, strict=True)]
    got = batched(engine, prompts, wanted, prefill_chunk=5, slot_tokens=64)
    for i, (rows, solo_rows) in enumerate(zip(got, want, strict=True)):
        assert_same(rows, solo_rows, f"{what}, sequence {i} of {len(prompts)} batched")
