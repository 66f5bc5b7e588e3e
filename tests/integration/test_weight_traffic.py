"""Weights read per generated token: ``agent.engine.onnx_graph`` against the ``onnx`` package, and ``bench``.

The figure must agree with what the model files hold, counted independently
here with ``onnx`` (a dev dependency): every initializer's bytes, less the
token-embedding table and the rotary caches, of which one row is read per token.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from agent.engine.onnx_graph import read_graph
from agent.engine.weight_traffic import model_weight_traffic
from edge_contract.errors import ModelFileError
from tests.support.models import ALL_FIXTURES, ROOT, fixture_path

MODELS = [*ALL_FIXTURES, "phi3-int4-pruned", "llama-long"]


def _model_dir(name: str) -> Path:
    return ROOT / "models" / "demo" if name == "demo" else fixture_path(name)


def _onnx_bytes(model: onnx.ModelProto) -> dict[str, int]:
    return {t.name: numpy_helper.to_array(t).nbytes for t in model.graph.initializer}


@pytest.mark.parametrize("name", [*MODELS, "demo"])
def test_initializer_sizes_match_the_onnx_package(name: str) -> None:
    path = _model_dir(name) / "model.onnx"
    expected = _onnx_bytes(onnx.load(str(path)))  # loads the external data too
    graph = read_graph(path)
    assert {i.name: i.nbytes for i in graph.initializers} == expected
    data = path.with_name("model.onnx.data")
    assert sum(expected.values()) == sum(i.nbytes for i in graph.initializers)
    # Every byte of the external data file is some initializer's (the builder aligns nothing here).
    assert sum(expected.values()) <= data.stat().st_size + path.stat().st_size


@pytest.mark.parametrize("name", [*MODELS, "demo"])
def test_bytes_per_token_is_everything_but_the_embedding_and_rotary_tables(name: str) -> None:
    path = _model_dir(name) / "model.onnx"
    model = onnx.load(str(path))
    sizes = _onnx_bytes(model)
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    # Found independently: the table that input_ids index, and GroupQueryAttention's cos/sin caches.
    embedding = [n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids"]
    rotary = {n.input[i] for n in model.graph.node if n.op_type == "GroupQueryAttention" for i in (7, 8)}
    assert len(embedding) == 1 and len(rotary) == 2
    row_read = {embedding[0], *rotary}
    expected = sum(b for n, b in sizes.items() if n not in row_read)
    expected += sum(-(-sizes[n] // shapes[n][0]) for n in row_read)
    traffic = model_weight_traffic(path)
    assert traffic.total_bytes == sum(sizes.values())
    assert traffic.bytes_per_token == expected
    assert set(traffic.row_read_tensors) == row_read
    # The lm_head (a MatMulNBits over the whole vocabulary) is read in full.
    lm_head = [n for n in sizes if n.startswith("lm_head")]
    assert lm_head and sum(sizes[n] for n in lm_head) < traffic.bytes_per_token


def _save(tmp_path: Path, nodes: list[onnx.NodeProto], inits: list[TensorProto], external: bool) -> Path:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(graph)
    path = tmp_path / "model.onnx"
    onnx.save(
        model, str(path), save_as_external_data=external, all_tensors_to_one_file=True, size_threshold=0
    )
    return path


@pytest.mark.parametrize("external", [False, True])
def test_tied_embeddings_count_in_full_and_small_types_round_up(tmp_path: Path, external: bool) -> None:
    table = numpy_helper.from_array(np.zeros((10, 4), np.float16), "embed")  # also the lm_head
    norm = numpy_helper.from_array(np.ones(4, np.float32), "norm")
    packed = helper.make_tensor("int4", TensorProto.INT4, [3, 3], np.zeros(9, np.int8).tolist())
    words = helper.make_tensor("words", TensorProto.STRING, [2], [b"no", b"size"])  # counted as 0
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["h"]),
        helper.make_node("Mul", ["h", "norm"], ["n"]),
        helper.make_node("MatMul", ["n", "embed"], ["logits"]),
        helper.make_node("Identity", ["int4"], ["unused"]),
        helper.make_node("Identity", ["words"], ["unused_words"]),
    ]
    traffic = model_weight_traffic(_save(tmp_path, nodes, [table, norm, packed, words], external))
    assert traffic.total_bytes == 80 + 16 + 5  # 9 int4 values take 5 bytes
    assert traffic.bytes_per_token == traffic.total_bytes and traffic.row_read_tensors == ()


def test_an_untied_embedding_counts_one_row(tmp_path: Path) -> None:
    table = numpy_helper.from_array(np.zeros((10, 4), np.float32), "embed")
    head = numpy_helper.from_array(np.zeros((4, 10), np.float32), "head")
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["h"]),
        helper.make_node("MatMul", ["h", "head"], ["logits"]),
    ]
    traffic = model_weight_traffic(_save(tmp_path, nodes, [table, head], external=False))
    assert traffic.total_bytes == 320 and traffic.bytes_per_token == 160 + 16
    assert traffic.row_read_tensors == ("embed",)
    assert traffic.max_tokens_per_s(9.0) == pytest.approx(9e9 / 176)


def test_a_file_that_is_not_onnx_is_a_model_file_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelFileError, match="not a readable ONNX model"):
        read_graph(bad)
    with pytest.raises(ModelFileError, match="cannot read it"):
        read_graph(tmp_path / "absent.onnx")


@pytest.mark.e2e  # runs the command line as a subprocess
def test_bench_json_reports_weights_per_token_and_the_projection() -> None:
    path = fixture_path("phi3-int4")
    flags = ["--prompt-tokens", "8", "--new-tokens", "8", "--repeat", "1", "--bandwidth-gbs", "9", "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "bench", str(path), *flags],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    # The fields other tools rely on are all still there.
    for key in ("model", "threads", "prompt_tokens", "new_tokens", "prefill_tokens_per_s"):
        assert key in out
    assert {"decode_tokens_per_s", "peak_rss_mb"} <= set(out)
    traffic = model_weight_traffic(path / "model.onnx")
    assert out["weight_bytes_per_token"] == traffic.bytes_per_token
    assert out["weight_bytes_total"] == traffic.total_bytes
    assert out["bandwidth_gbs"] == 9
    assert out["max_decode_tokens_per_s"] == pytest.approx(9e9 / traffic.bytes_per_token)
    assert out["weight_read_gbs"] == pytest.approx(out["decode_tokens_per_s"] * traffic.bytes_per_token / 1e9)


@pytest.mark.e2e  # runs the command line as a subprocess
def test_bench_refuses_a_bandwidth_that_is_not_positive() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "bench", str(fixture_path("phi3-int4")), "--bandwidth-gbs", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1 and "--bandwidth-gbs must be positive" in proc.stderr


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=18_000), flip=st.integers(min_value=0, max_value=18_000))
def test_a_damaged_file_gives_a_graph_or_a_model_file_error(tmp_path: Path, cut: int, flip: int) -> None:
    data = bytearray((fixture_path("phi3-int4") / "model.onnx").read_bytes()[:cut])
    if flip < len(data):
        data[flip] ^= 0xFF
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(bytes(data))
    with contextlib.suppress(ModelFileError):  # anything else escaping is the failure
        read_graph(damaged)
