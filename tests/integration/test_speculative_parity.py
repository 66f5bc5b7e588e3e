"""Speculative decoding emits what plain decoding would, on every fixture and on the copy model.

A speculating engine feeds at least two rows in every pass (a step with nothing to
draft feeds the previous token again), and rows of multi-row passes come out
bit-identical whatever the pass boundaries.  So its output must not depend on what
was drafted: drafting never, always, or at random gives the same tokens, bit for
bit, on every fixture family at int4 and int8.  That rule holds for onnxruntime's
x86-64 kernels; on aarch64 (checked under emulation) some passes round differently
by pass size, so there drafts may change a near-tie, and the test checks only the
near-tie bound below, for every drafting mode.

Against an engine that does not speculate (one-row passes) the attention kernels
order their float sums differently (about 1e-6), and the int8 activation
quantization of these models can turn that into one quantization step (up to
~0.15 in a logit on the tiny fixtures).  So on random-weight fixtures, whose top
two logits are often within a few tenths, every emitted token is checked against
plain greedy decoding of the same prefix (one-token passes, teacher-forced): it
must be the arg-max, or within ``NEAR_TIE`` of it.  On trained models, whose
choices are clear, the outputs must be identical.  The verification rule itself
is checked exactly, with exact arithmetic, in tests/unit/test_speculate.py.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest

from agent import Engine, SamplingParams
from agent.engine.engine import EngineOptions
from agent.engine.speculate import DraftPolicy, Speculator
from tests.support import cpu
from tests.support.models import ALL_FIXTURES, PRECISIONS, ROOT, fixture_path
from tests.support.tiers import matrix

NEAR_TIE = 0.3  # logits; about twice the largest kernel-path difference seen on the fixtures
# Guarantee DRAFT_EXACT (tests/support/cpu.py): on x86-64 (AVX2, AVX-512) rows of multi-row passes
# come out bit-identical whatever the pass boundaries, so drafting cannot change a token.  On aarch64
# (emulated Cortex-A76, NEON dot product kernels) it can, at near-ties: measured, 3 of the 10
# fixtures diverged there, so there the near-tie bound (guarantee NEAR_TIE) is what is checked.
MULTI_ROW_EXACT = cpu.family() in cpu.DRAFT_EXACT
TEXTS = [
    "The quick brown fox",
    "a b a b a b a b",
    "Grüße aus Köln 🎉 日本語",
    "hello world hello",
    "x",
    "Once upon a time there was",
    "1 2 3 4 5 6",
    "the the the",
]


def _plain_logits(engine: Engine, prompt: list[int], tokens: list[int]) -> list[npt.NDArray[np.float32]]:
    """Logits plain decoding computes before each of ``tokens`` (prefill, then decode steps)."""
    return engine.teacher_forced_logits(prompt, tokens)


def _copy_prompt(engine: Engine, text: str) -> list[int]:
    """A prompt with something to copy: the model's own continuation, then the text again."""
    ids = engine.prompt_ids(text)
    own = engine.generate(ids, SamplingParams(max_tokens=40, ignore_eos=True)).token_ids
    return ids + own + ids


def _drafting(mode: str) -> Callable[[DraftPolicy, int], int]:
    """A DraftPolicy.choose that drafts never, always (as much as allowed) or a random amount."""
    rng = random.Random(7)

    def choose(self: DraftPolicy, limit: int) -> int:
        if mode == "never":
            return 0
        return min(self.max_k if mode == "always" else rng.randint(0, self.max_k), limit)

    return choose


@pytest.mark.parametrize(
    ("name", "rests"),
    matrix(
        [
            (name, rests)
            for rests in ("never-rests", "rests-often")
            for name in [*ALL_FIXTURES, "llama-int4-b128"]
        ],
        fast=[("mistral-int4", "never-rests"), ("qwen3-int8", "rests-often")],
    ),
)
def test_speculative_output_does_not_depend_on_the_drafts(
    name: str, rests: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Random weights accept few drafts, and the adaptive policy would soon stop drafting:
    # force the drafting instead, so that verify passes (and accepted drafts) are many.
    # Resting (plain steps while nothing matches) depends on the tokens alone: checked both
    # switched off (the most verify passes) and after 2 dry steps (the most transitions).
    monkeypatch.setattr(Speculator, "REST_AFTER", 10**9 if rests == "never-rests" else 2)
    rested = [0]
    original_step = Speculator.step

    def counting_step(self: Speculator, token: int, past: int, limit: int) -> list[int]:
        chosen = original_step(self, token, past, limit)
        rested[0] += not chosen
        return chosen

    monkeypatch.setattr(Speculator, "step", counting_step)
    path = fixture_path(name)
    plain = Engine(path, EngineOptions(threads=1))
    spec = Engine(path, EngineOptions(threads=1, speculate=True, speculate_max_k=6))
    params = SamplingParams(max_tokens=80, ignore_eos=True)
    drafted = accepted = exact = total = 0
    for text in TEXTS:
        prompt = _copy_prompt(plain, text)
        # Plain decoding is deterministic: outputs with the same tokens share one teacher-forced run.
        forced: dict[tuple[int, ...], list[npt.NDArray[np.float32]]] = {}
        outputs = {}
        for mode in ("never", "always", "random"):
            monkeypatch.setattr(DraftPolicy, "choose", _drafting(mode))
            outputs[mode] = spec.generate(prompt, params)
        got = outputs["always"]
        assert got.completion_tokens == len(got.token_ids) == 80
        assert outputs["never"].drafted_tokens == 0
        for mode, out in outputs.items():
            if MULTI_ROW_EXACT:
                assert out.token_ids == outputs["never"].token_ids, (
                    f"{text!r}: drafting {mode} changed the output"
                )
            drafted += out.drafted_tokens
            accepted += out.accepted_tokens
            # Against one-row decoding: the same choice, or a near-tie.
            key = tuple(out.token_ids)
            if key not in forced:
                forced[key] = _plain_logits(plain, prompt, out.token_ids)
            for step, row in enumerate(forced[key]):
                token = out.token_ids[step]
                gap = float(row.max() - row[token])
                assert gap <= NEAR_TIE, f"{text!r}, {mode}: token {step} is {gap:.3f} below plain greedy's"
                exact += gap == 0.0
                total += 1
    # Positive controls: drafts were verified (and some accepted when drafting is not resting);
    # the resting variant rested; nearly every token is the exact arg-max.
    assert drafted > 0 and 0 <= accepted <= drafted
    assert accepted > 0 if rests == "never-rests" else rested[0] > 0
    assert exact >= 0.95 * total


def test_last_position_logits_exports_do_not_speculate(caplog: pytest.LogCaptureFixture) -> None:
    path = fixture_path("phi3-int4-pruned")
    with caplog.at_level(logging.WARNING, logger="agent.engine.engine"):
        spec = Engine(path, EngineOptions(speculate=True))
    assert "speculative decoding is off; re-export it with `python -m models.convert`" in caplog.text
    ids = _copy_prompt(spec, "a b a b")
    out = spec.generate(ids, SamplingParams(max_tokens=30, ignore_eos=True))
    assert out.drafted_tokens == 0
    assert (
        out.token_ids == Engine(path).generate(ids, SamplingParams(max_tokens=30, ignore_eos=True)).token_ids
    )


def test_a_trained_model_reciting_its_prompt_speculates_exactly_and_saves_passes() -> None:
    # The demo model knows its training text by heart; asked to repeat it from its prompt,
    # its output copies the prompt: drafts are accepted, and choices are clear (trained weights).
    from models.demo_corpus import EDGE_TEXT

    path = ROOT / "models" / "demo"
    plain = Engine(path, EngineOptions(threads=1))
    spec = Engine(path, EngineOptions(threads=1, speculate=True))
    lines = EDGE_TEXT.splitlines()
    drafted = accepted = tokens = 0
    for line in lines[:6]:
        start = " ".join(line.split()[:4])
        ids = plain.prompt_ids(f"Here is a text:\n{EDGE_TEXT}\nThe same text again:\n{start}")
        want = plain.generate(ids, SamplingParams(max_tokens=100))
        got = spec.generate(ids, SamplingParams(max_tokens=100))
        assert got.token_ids == want.token_ids and got.text == want.text
        drafted += got.drafted_tokens
        accepted += got.accepted_tokens
        tokens += got.completion_tokens
    assert tokens >= 100, "the demo model stopped at once: nothing was compared"
    assert accepted >= 0.25 * drafted > 0


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_copy_model_speculates_exactly_and_accepts_most_drafts(precision: str) -> None:
    # The copy model (python -m models.copy_task) answers jobs by copying spans of its prompt.
    from models.copy_task import KINDS, job

    path = ROOT / "models" / "copy" / precision
    if not (path / "genai_config.json").is_file():
        pytest.fail(f"{path} is missing: run `python -m models.copy_task`")
    plain = Engine(path, EngineOptions(threads=1))
    spec = Engine(path, EngineOptions(threads=1, speculate=True))
    rng = random.Random(5)
    drafted = accepted = tokens = correct = 0
    for i in range(12):
        prompt, answer = job(rng, KINDS[i % len(KINDS)])
        ids = [1, *plain.tokenizer.encode(prompt, add_special_tokens=False)]
        want = plain.generate(ids, SamplingParams(max_tokens=120))
        got = spec.generate(ids, SamplingParams(max_tokens=120))
        assert got.token_ids == want.token_ids, f"job {i}: speculation changed the answer"
        correct += want.text.strip() == answer.strip()
        drafted += got.drafted_tokens
        accepted += got.accepted_tokens
        tokens += got.completion_tokens
    # Positive controls: the model does copy (its answers are right), and drafts pay.
    assert correct >= 6, f"the copy model answered {correct}/12 jobs right: it does not copy"
    assert accepted >= 0.4 * drafted > 0
    assert accepted >= 0.5 * tokens, "fewer than half the tokens came from accepted drafts"
