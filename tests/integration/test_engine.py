"""Generation on a real model: limits, stops, streaming, sampling, cancellation."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import ContextOverflowError, Engine, InvalidRequestError, SamplingParams
from agent.engine.engine import EngineOptions


def test_max_tokens_and_length_finish(phi3_engine: Engine) -> None:
    ids = phi3_engine.prompt_ids("The quick brown fox")
    out = phi3_engine.generate(ids, SamplingParams(max_tokens=7, ignore_eos=True))
    assert out.completion_tokens == len(out.token_ids) == 7
    assert out.finish_reason == "length"
    assert out.prompt_tokens == len(ids)
    assert out.timings.prefill_ms > 0 and out.timings.decode_tokens_per_s > 0


def test_streamed_pieces_add_up_to_the_text(phi3_engine: Engine) -> None:
    pieces: list[str] = []
    ids = phi3_engine.prompt_ids("Grüße aus Köln")
    out = phi3_engine.generate(ids, SamplingParams(max_tokens=40, ignore_eos=True), on_text=pieces.append)
    assert "".join(pieces) == out.text
    assert out.text == phi3_engine.tokenizer.decode(out.token_ids)


def test_stop_string_ends_generation_and_is_not_returned(phi3_engine: Engine) -> None:
    ids = phi3_engine.prompt_ids("The quick brown fox")
    full = phi3_engine.generate(ids, SamplingParams(max_tokens=40, ignore_eos=True))
    # Pick a stop string from the middle of what greedy decoding produces.
    assert len(full.text) >= 6, "fixture output too short for this test"
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    cut = full.text.index(stop)
    pieces: list[str] = []
    out = phi3_engine.generate(
        ids, SamplingParams(max_tokens=40, stop=(stop,), ignore_eos=True), on_text=pieces.append
    )
    assert out.finish_reason == "stop"
    assert out.text == full.text[:cut]
    assert "".join(pieces) == out.text
    assert out.completion_tokens < full.completion_tokens


def test_eos_ends_generation(phi3_engine: Engine) -> None:
    ids = phi3_engine.prompt_ids("The quick brown fox")
    full = phi3_engine.generate(ids, SamplingParams(max_tokens=200, ignore_eos=True))
    eos_positions = [i for i, t in enumerate(full.token_ids) if t in phi3_engine.eos_ids]
    out = phi3_engine.generate(ids, SamplingParams(max_tokens=200))
    if eos_positions:
        assert out.finish_reason == "stop"
        assert out.token_ids == full.token_ids[: eos_positions[0]]
    else:
        assert out.token_ids == full.token_ids


def test_context_overflow_is_a_clear_error(phi3_engine: Engine) -> None:
    ids = [10] * phi3_engine.context_length
    with pytest.raises(
        ContextOverflowError, match=r"prompt has 256 tokens but the model's context holds 256"
    ):
        phi3_engine.generate(ids, SamplingParams(max_tokens=4))


def test_generation_stops_at_the_context_edge(phi3_engine: Engine) -> None:
    ids = [10] * (phi3_engine.context_length - 5)
    out = phi3_engine.generate(ids, SamplingParams(max_tokens=50, ignore_eos=True))
    assert out.completion_tokens == 5
    assert out.finish_reason == "length"


def test_empty_and_out_of_vocab_prompts_are_rejected(phi3_engine: Engine) -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        phi3_engine.generate([], SamplingParams())
    with pytest.raises(InvalidRequestError, match="token ids"):
        phi3_engine.generate([10**6], SamplingParams())


def test_seeded_sampling_is_reproducible(phi3_engine: Engine) -> None:
    ids = phi3_engine.prompt_ids("The quick brown fox")
    params = SamplingParams(max_tokens=30, temperature=1.0, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    first = phi3_engine.generate(ids, params)
    again = phi3_engine.generate(ids, params)
    other = phi3_engine.generate(ids, params.model_copy(update={"seed": 99}))
    greedy = phi3_engine.generate(ids, SamplingParams(max_tokens=30, ignore_eos=True))
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids
    assert first.token_ids != greedy.token_ids


def test_cancellation_between_tokens(phi3_engine: Engine) -> None:
    ids = phi3_engine.prompt_ids("The quick brown fox")
    polls = 0

    def should_stop() -> bool:
        nonlocal polls
        polls += 1
        return polls >= 3

    out = phi3_engine.generate(ids, SamplingParams(max_tokens=100, ignore_eos=True), should_stop=should_stop)
    assert out.finish_reason == "canceled"
    assert out.completion_tokens == 3


def test_chat_messages_use_the_template(phi3_engine: Engine) -> None:
    ids = phi3_engine.prompt_ids(messages=[{"role": "user", "content": "hi"}])
    text = phi3_engine.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|user|>") and text.endswith("<|assistant|>\n")
    with pytest.raises(InvalidRequestError, match="exactly one"):
        phi3_engine.prompt_ids("x", messages=[{"role": "user", "content": "hi"}])


def test_requests_do_not_leak_state_into_each_other(phi3_engine: Engine) -> None:
    short = phi3_engine.prompt_ids("a")
    long = phi3_engine.prompt_ids("The quick brown fox jumps over the lazy dog " * 3)
    first = phi3_engine.generate(short, SamplingParams(max_tokens=20, ignore_eos=True))
    phi3_engine.generate(long, SamplingParams(max_tokens=60, ignore_eos=True))
    again = phi3_engine.generate(short, SamplingParams(max_tokens=20, ignore_eos=True))
    assert again.token_ids == first.token_ids
    assert again.text == first.text


def test_token_ranks_score_recorded_tokens_teacher_forced(phi3_engine: Engine) -> None:
    ids = phi3_engine.prompt_ids("The box")
    greedy = phi3_engine.generate(ids, SamplingParams(max_tokens=10, ignore_eos=True)).token_ids
    assert phi3_engine.token_ranks(ids, greedy) == [0] * 10
    # Tokens the model would never pick rank far down, at every step.
    shifted = [(t + 7) % 448 for t in greedy]
    assert all(rank > 5 for rank in phi3_engine.token_ranks(ids, shifted))
    with pytest.raises(ContextOverflowError):
        phi3_engine.token_ranks(ids, [1] * phi3_engine.context_length)


def test_memory_options_reach_the_session(phi3_dir: Path) -> None:
    prompt = [7 + i * 13 % 400 for i in range(40)]
    greedy = SamplingParams(max_tokens=16, ignore_eos=True)
    default = Engine(phi3_dir)
    no_arena = Engine(phi3_dir, EngineOptions(cpu_arena=False))
    unpacked = Engine(phi3_dir, EngineOptions(prepack_weights=False))
    assert default.session.get_session_options().enable_cpu_mem_arena
    assert not no_arena.session.get_session_options().enable_cpu_mem_arena
    with pytest.raises(RuntimeError, match="does not have configuration"):  # unset: prepacking on
        default.session.get_session_options().get_session_config_entry("session.disable_prepacking")
    assert (
        unpacked.session.get_session_options().get_session_config_entry("session.disable_prepacking") == "1"
    )
    # The arena does not change the arithmetic; unpacked weights take other kernels (other
    # roundings: the tokens may differ, so only that it generates is checked).
    assert no_arena.generate(prompt, greedy).token_ids == default.generate(prompt, greedy).token_ids
    assert len(unpacked.generate(prompt, greedy).token_ids) == 16


def test_context_tokens_caps_the_context(phi3_dir: Path) -> None:
    capped = Engine(phi3_dir, EngineOptions(context_tokens=64))
    assert capped.context_length == 64
    with pytest.raises(ContextOverflowError):
        capped.generate([7] * 64)
    assert len(capped.generate([7] * 60, SamplingParams(max_tokens=10, ignore_eos=True)).token_ids) == 4
    # Larger than the model's: the model's.
    assert Engine(phi3_dir, EngineOptions(context_tokens=100_000)).context_length == 256
