"""An int8 embedding table (``models.embedding``, ``models.convert``'s default): smaller, served, tokens within the bound.

Checked on fixtures rewritten in a temporary folder: the float32 ``Gather`` becomes an
int8 ``GatherBlockQuantized`` (0.28x the table's bytes at block 32, what the memory
estimate counts), the engine serves it with onnxruntime-genai's tokens on the same
rewritten graph, and each of its greedy tokens is the float table's arg-max or within
``NEAR_TIE`` logits of it (teacher-forced on the float model: the rounding moves logits
slightly, so tokens differ where two are nearly tied; docs/memory.md says how often).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime_genai as og
import pytest

from agent import Engine, SamplingParams
from agent.engine.engine import EngineOptions
from agent.engine.memory_plan import model_shape
from models import embedding
from tests.integration.test_speculative_parity import NEAR_TIE
from tests.support.genai import genai_greedy
from tests.support.models import convert_fixture, fixture_path, rewritten_fixture

FIXTURES = ["phi3-int4", "qwen2-int8", "llama-int4", "qwen3-int4"]
PROMPTS = ["The quick brown fox", "Hello, world! 你好", "def main():\n    return"]
NEW_TOKENS = 24


def _int8(name: str, tmp_path: Path) -> Path:
    return rewritten_fixture(name, tmp_path, embedding.quantize_embedding, "q8")


def _prompt_logits(model: og.Model, ids: list[int]) -> np.ndarray:
    """Every position's logits of one prompt pass (the fixtures return every row)."""
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + 1)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    return np.asarray(generator.get_output("logits"))[0]


@pytest.mark.parametrize("name", FIXTURES)
def test_int8_table_is_served_like_onnxruntime_genai_within_the_near_tie_bound(
    name: str, tmp_path: Path
) -> None:
    folder = _int8(name, tmp_path)
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in graph.graph.node]
    assert "GatherBlockQuantized" in ops and not any(
        n.op_type == "Gather" and n.input[1] == "input_ids" for n in graph.graph.node
    )
    before, after = model_shape(fixture_path(name)), model_shape(folder)
    # int8 values plus a float32 scale per 32: 1.125 bytes per value against 4.
    assert after.embedding_bytes * 32 == before.embedding_bytes * 9
    assert after.file_bytes < before.file_bytes

    engine = Engine(folder, EngineOptions(prefix_cache_mb=0))
    reference, float_model = og.Model(str(folder)), og.Model(str(fixture_path(name)))
    for prompt in PROMPTS:
        ids = engine.prompt_ids(prompt)
        ours = engine.generate(ids, SamplingParams(max_tokens=NEW_TOKENS)).token_ids
        assert ours == genai_greedy(reference, engine.eos_ids, ids, NEW_TOKENS)[: len(ours)] and ours
        logits = _prompt_logits(float_model, ids + ours)[len(ids) - 1 : len(ids) - 1 + len(ours)]
        gaps = logits.max(axis=-1) - logits[np.arange(len(ours)), ours]
        assert float(gaps.max()) <= NEAR_TIE, (prompt, gaps.tolist())
        # The positive control of the bound: the two models' logits do differ (the table was rounded).
        assert not np.array_equal(_prompt_logits(reference, ids), _prompt_logits(float_model, ids))


def test_rewriting_twice_changes_nothing(tmp_path: Path) -> None:
    folder = _int8("phi3-int4", tmp_path)
    graph = (folder / "model.onnx").read_bytes()
    assert embedding.quantize_embedding(folder) == 0
    assert (folder / "model.onnx").read_bytes() == graph


def test_rounding_is_what_the_operator_returns() -> None:
    table = np.random.default_rng(0).standard_normal((40, 64)).astype(np.float32)
    table[3] = 0.0  # an all-zero block keeps a usable scale
    values, scales = embedding.quantize_rows(table, 32)
    back = embedding.dequantize_rows(values, scales, 32)
    step = np.repeat(scales, 32, axis=1)
    assert np.all(np.abs(back - table) <= step / 2 + 1e-7) and np.all(back[3] == 0.0)


@pytest.mark.parametrize("float_embedding", [False, True])
def test_convert_writes_the_int8_table_unless_told(
    float_embedding: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = convert_fixture(tmp_path, monkeypatch, *(["--float-embedding"] if float_embedding else []))
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert ("GatherBlockQuantized" in ops) is not float_embedding
    engine = Engine(out)
    assert engine.generate(engine.prompt_ids("The edge agent"), SamplingParams(max_tokens=4)).token_ids


def test_a_table_tied_to_another_node_is_refused_untouched(tmp_path: Path) -> None:
    folder = tmp_path / "tied"
    shutil.copytree(fixture_path("phi3-int4"), folder)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    # A second reader of the table (as a tied lm_head would be): an Identity to a spare output.
    model.graph.node.append(onnx.helper.make_node("Identity", ["model.embed_tokens.weight"], ["tied_copy"]))
    model.graph.output.append(onnx.helper.make_tensor_value_info("tied_copy", onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(folder / "model.onnx"))
    data = (folder / "model.onnx.data").read_bytes()
    with pytest.raises(SystemExit, match="read by 2 nodes"):
        embedding.quantize_embedding(folder)
    assert (folder / "model.onnx.data").read_bytes() == data
    _int8("phi3-int4", tmp_path)  # the positive control: the untied fixture is rewritten
