"""A float16 KV cache (``models.kv_dtype``): half the bytes, the engine follows the graph, and what still holds.

What holds with float16 KV, checked here on fixtures rewritten in a temporary folder:
the engine takes the cache type from the graph, the cache is half the bytes, and greedy
tokens equal onnxruntime-genai's on the same rewritten graph.  What does not hold (seen
on the phi3, qwen2 and llama fixtures, docs/memory.md), so float16 KV is not the
default and nothing here asserts it: tokens change with the prefill chunk size, and a
prefix-cache hit can change tokens (onnxruntime's kernel reads some rows' keys and
values unrounded and others rounded from the cache, depending on the chunking).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
import pytest

from agent import Engine, SamplingParams
from agent.engine.engine import EngineOptions
from agent.engine.memory_plan import model_shape
from models.kv_dtype import set_kv_dtype
from tests.support.models import fixture_path

FIXTURES = ["phi3-int4", "qwen2-int8", "llama-int4"]


def _kv16(name: str, tmp_path: Path) -> Path:
    folder = tmp_path / f"{name}-kv16"
    shutil.copytree(fixture_path(name), folder)
    assert set_kv_dtype(folder, "float16") > 0
    return folder


@pytest.mark.parametrize("name", FIXTURES)
def test_the_cache_is_half_the_size_and_tokens_match_onnxruntime_genai(name: str, tmp_path: Path) -> None:
    folder = _kv16(name, tmp_path)
    engine = Engine(folder, EngineOptions(prefix_cache_mb=0))
    assert np.dtype(engine._io.kv_dtype) == np.float16
    assert model_shape(folder).kv_bytes_per_token * 2 == model_shape(fixture_path(name)).kv_bytes_per_token

    reference = og.Model(str(folder))
    params = og.GeneratorParams(reference)
    ids = engine.prompt_ids("The quick brown fox")
    params.set_search_options(do_sample=False, max_length=len(ids) + 24)
    generator = og.Generator(reference, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    expected = [int(t) for t in generator.get_sequence(0)][len(ids) :]
    while expected and expected[-1] in engine.eos_ids:
        expected.pop()
    ours = engine.generate(ids, SamplingParams(max_tokens=24)).token_ids
    assert ours == expected[: len(ours)] and len(ours) >= min(len(expected), 1)
