"""The prefix cache and chunked prefill on real models: a hit never changes a token.

Guarantee checked: ``PREFIX_EXACT`` (tests/support/cpu.py), claimed on every CPU family
CI runs (natively, AVX2-only and aarch64 emulated): prefill chunks have two rows or more,
whose bits do not depend on the chunk's size.

References are computed here, on this machine, by the same engine (cold) or by an
engine with the cache off: never compared across instruction sets.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import Engine, SamplingParams
from agent.engine.engine import Completion, EngineOptions
from tests.support import cpu
from tests.support.models import ALL_FIXTURES, fixture_path
from tests.support.tiers import matrix

# Small blocks and chunks so that a 100-token prompt crosses many of both.
SMALL = EngineOptions(prefix_block_tokens=8, prefill_chunk_tokens=16)
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.9, top_p=0.95, top_k=50, seed=7)


def ids_of(n: int, salt: int = 0) -> list[int]:
    """``n`` ordinary token ids of the fixture tokenizer (specials are below 7)."""
    return [7 + (i * 37 + salt * 101) % 441 for i in range(n)]


@pytest.mark.parametrize(
    "name", matrix([*ALL_FIXTURES, "phi3-int4-pruned", "llama-int4-b128"], fast=["phi3-int4", "qwen2-int8"])
)
def test_a_hit_gives_the_cold_runs_tokens(name: str) -> None:
    assert cpu.family() in cpu.PREFIX_EXACT, f"the prefix cache claims no exactness on {cpu.family()}"
    engine = Engine(fixture_path(name), SMALL)
    instruction = ids_of(90)
    for params in (GREEDY, SEEDED):
        engine.prefix_cache.clear()  # type: ignore[union-attr]
        for salt in range(3):
            prompt = instruction + ids_of(5 + salt, salt + 1)
            cold = Engine(fixture_path(name), SMALL.model_copy(update={"prefix_cache_mb": 0}))
            reference = cold.generate(prompt, params)
            engine.release_kept()  # the prefix cache's copy, not the last run's buffer in place
            warm = engine.generate(prompt, params)
            assert warm.token_ids == reference.token_ids, f"{name} salt {salt}"
            # The first prompt fills the cache; every later one reuses the instruction to its last
            # token (11 whole blocks of 8, then 2 of the 7 positions of the first prompt's tail).
            assert warm.cached_tokens == (0 if salt == 0 else len(instruction))
        again = engine.generate(prompt, params)  # the whole prompt is cached but two positions
        assert again.token_ids == reference.token_ids
        assert again.cached_tokens == len(prompt) - 2


@pytest.mark.parametrize(
    "name",
    matrix([*ALL_FIXTURES, "phi3-int4-pruned", "llama-int4-b128"], fast=["llama-int8", "phi3-int4-pruned"]),
)
def test_the_last_runs_buffer_reused_in_place_gives_the_cold_runs_tokens(name: str) -> None:
    # The prefix cache is emptied before each run: whatever is reused comes from the last run's
    # buffer, in place.
    assert cpu.family() in cpu.PREFIX_EXACT, f"the prefix cache claims no exactness on {cpu.family()}"
    options = SMALL.model_copy(update={"prefix_cache_mb": 0})  # the cold references
    engine = Engine(fixture_path(name), SMALL)
    cache = engine.prefix_cache
    assert cache is not None

    def generate(prompt: list[int], params: SamplingParams) -> Completion:
        cache.clear()
        return engine.generate(prompt, params)

    instruction = ids_of(90)
    for params in (GREEDY, SEEDED):
        engine.release_kept()
        for salt in range(3):
            prompt = instruction + ids_of(5 + salt, salt + 1)
            reference = Engine(fixture_path(name), options).generate(prompt, params)
            warm = generate(prompt, params)
            assert warm.token_ids == reference.token_ids, f"{name} salt {salt}"
            assert warm.cached_tokens == (0 if salt == 0 else len(instruction))  # to the token
        again = generate(prompt, params)  # the whole prompt is held but two positions
        assert (again.token_ids, again.cached_tokens) == (reference.token_ids, len(prompt) - 2)
        # The next turn of a chat: the positions decoding wrote are never reused, only the prompt's.
        follow = prompt + again.token_ids + ids_of(4, 9)
        turn = generate(follow, params)
        assert turn.token_ids == Engine(fixture_path(name), options).generate(follow, params).token_ids
        assert turn.cached_tokens == len(prompt)
    engine.release_kept()  # a model swap or memory pressure: nothing held, nothing reused
    assert generate(prompt, params).cached_tokens == 0


def test_chat_turns_reuse_the_previous_prompt(phi3_dir: Path) -> None:
    engine = Engine(phi3_dir, SMALL)
    first = [{"role": "user", "content": "The edge agent reads a sensor log line and answers."}]
    ids = engine.prompt_ids(messages=first)
    answer = engine.generate(ids, GREEDY)
    second = [*first, {"role": "assistant", "content": answer.text}, {"role": "user", "content": "And then?"}]
    ids2 = engine.prompt_ids(messages=second)
    warm = engine.generate(ids2, GREEDY)
    cold = Engine(phi3_dir, SMALL.model_copy(update={"prefix_cache_mb": 0})).generate(ids2, GREEDY)
    assert warm.token_ids == cold.token_ids
    assert warm.cached_tokens >= len(ids) // 8 * 8 - 8 > 0


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shared=st.integers(0, 120),
    tails=st.lists(st.integers(1, 40), min_size=2, max_size=4),
    salt=st.integers(0, 1000),
    block=st.sampled_from([2, 4, 8, 32]),
    chunk=st.sampled_from([2, 3, 16, 64]),
)
def test_property_random_prompts_sharing_random_prefixes(
    shared: int, tails: list[int], salt: int, block: int, chunk: int
) -> None:
    options = EngineOptions(prefix_block_tokens=block, prefill_chunk_tokens=chunk)
    warm = _engines("llama-int4", options)
    cold = _engines("llama-int4", options.model_copy(update={"prefix_cache_mb": 0}))
    warm.prefix_cache.clear()  # type: ignore[union-attr]
    prefix = ids_of(shared, salt)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    for i, tail in enumerate(tails):
        prompt = prefix + ids_of(tail, salt + i + 1)
        assert warm.generate(prompt, params).token_ids == cold.generate(prompt, params).token_ids


_ENGINES: dict[tuple[str, EngineOptions], Engine] = {}


def _engines(name: str, options: EngineOptions) -> Engine:
    """One engine per (model, options) for the property test: loading is the slow part."""
    key = (name, options)
    if key not in _ENGINES:
        _ENGINES[key] = Engine(fixture_path(name), options)
    return _ENGINES[key]


# -- across restarts -------------------------------------------------------------------------


def test_a_restarted_engine_loads_the_prefix_from_disk(tmp_path: Path) -> None:
    prompt = ids_of(80) + ids_of(6, 3)
    first = Engine(fixture_path("qwen2-int8"), SMALL, prefix_cache_dir=tmp_path / "pc")
    cold = first.generate(prompt, GREEDY)
    assert cold.cached_tokens == 0
    assert first.prefix_cache is not None and first.prefix_cache.flush(30)  # written behind the job
    restarted = Engine(fixture_path("qwen2-int8"), SMALL, prefix_cache_dir=tmp_path / "pc")
    # Read back at start (10 whole blocks and the tail) beside serving, so the first job waits for no disk.
    assert restarted.prefix_read_back is not None
    restarted.prefix_read_back.join(60)
    at_start = restarted.prefix_cache_stats()
    assert at_start is not None and at_start.disk_loads == 11 and at_start.hits == 0
    warm = restarted.generate(prompt, GREEDY)
    assert warm.token_ids == cold.token_ids
    assert warm.cached_tokens == len(prompt) - 2  # token-exact from disk too: the tail block was saved
    stats = restarted.prefix_cache_stats()
    assert stats is not None and stats.disk_loads == 11 and stats.hits == 1


def _flushed(engine: Engine, prompt: list[int]) -> Completion:
    """``engine``'s answer to ``prompt``, once the blocks written behind it are on disk."""
    out = engine.generate(prompt, GREEDY)
    assert engine.prefix_cache is not None and engine.prefix_cache.flush(30)
    return out


def test_a_model_update_invalidates_the_cache(tmp_path: Path) -> None:
    """The same folder path, new weights: nothing of the old cache may be used."""
    folder = tmp_path / "model"
    shutil.copytree(fixture_path("llama-int4"), folder)
    prompt = ids_of(64) + ids_of(4, 9)
    _flushed(Engine(folder, SMALL, prefix_cache_dir=tmp_path / "pc"), prompt)
    control = _flushed(Engine(folder, SMALL, prefix_cache_dir=tmp_path / "pc"), prompt)
    assert control.cached_tokens == len(prompt) - 2  # positive control: the same model hits
    shutil.rmtree(folder)
    shutil.copytree(fixture_path("mistral-int4"), folder)  # the "update": same shapes, other weights
    updated = Engine(folder, SMALL, prefix_cache_dir=tmp_path / "pc")
    out = updated.generate(prompt, GREEDY)
    assert out.cached_tokens == 0
    reference = Engine(folder, SMALL.model_copy(update={"prefix_cache_mb": 0})).generate(prompt, GREEDY)
    assert out.token_ids == reference.token_ids
    assert [p.name for p in (tmp_path / "pc").iterdir()] == [updated.prefix_cache.identity]  # type: ignore[union-attr]


def test_a_corrupt_cache_file_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prompt = ids_of(40) + ids_of(4, 2)
    cold = _flushed(Engine(fixture_path("phi3-int4"), SMALL, prefix_cache_dir=tmp_path), prompt)
    files = sorted(tmp_path.glob("*/*.kv"))
    assert len(files) == 6  # 5 whole blocks of 8 and the 4-token tail
    for f in files:  # flip one byte in the middle of each block's keys and values
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x40
        f.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        out = Engine(fixture_path("phi3-int4"), SMALL, prefix_cache_dir=tmp_path).generate(prompt, GREEDY)
    assert out.cached_tokens == 0 and out.token_ids == cold.token_ids
    assert "checksum mismatch" in caplog.text


# -- chunked prefill ---------------------------------------------------------------------------


def test_prefill_reports_progress_and_stops_between_chunks() -> None:
    engine = Engine(fixture_path("llama-int8"), EngineOptions(prefill_chunk_tokens=16, prefix_cache_mb=0))
    prompt = ids_of(100)
    progress: list[tuple[int, int]] = []
    out = engine.generate(prompt, GREEDY, on_prefill=lambda done, total: progress.append((done, total)))
    assert progress == [(d, 100) for d in (0, 16, 32, 48, 64, 80, 96, 100)]
    assert out.completion_tokens == GREEDY.max_tokens

    polls: list[int] = []

    def stop_after_three_chunks() -> bool:
        polls.append(1)
        return len(polls) > 3

    seen: list[int] = []
    canceled = engine.generate(
        prompt, GREEDY, should_stop=stop_after_three_chunks, on_prefill=lambda d, _t: seen.append(d)
    )
    assert canceled.finish_reason == "canceled" and canceled.token_ids == []
    assert seen == [0, 16, 32, 48, 64]  # polled before chunks 2 to 5


def test_chunk_size_does_not_change_tokens() -> None:
    prompt = ids_of(200)
    outs = [
        Engine(fixture_path("qwen3-int4"), EngineOptions(prefill_chunk_tokens=c, prefix_cache_mb=0))
        .generate(prompt, GREEDY)
        .token_ids
        for c in (2, 7, 64, 512)
    ]
    assert outs[0] == outs[1] == outs[2] == outs[3]
