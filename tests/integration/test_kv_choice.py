"""A converted folder offers both KV caches, and the daemon serves the int8 one where float32 would cut the context.

``models.convert`` (its builder stood in for by the phi3-int4 fixture: ``convert_fixture``)
writes an int8-KV graph beside the float32-KV one over one weights file; the updater (the
daemon's loader, in-process) chooses between them from the box's memory, injected as
``psutil.virtual_memory().available`` (no cgroup), and ``edge-agent doctor``'s memory check
says the same from its reading. The fixture's context (256 tokens) is raised in the copy's
genai_config.json so that a context can be cut at all (the sizing never goes below 512 tokens);
only short prompts are run. The int8 variant's tokens obey ``KV_INT8_GAP`` (x86-64, where the
daemon trusts it: ``kv_choice.INT8_KV_TRUSTED``).
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
from pathlib import Path
from types import SimpleNamespace

import onnx
import onnxruntime_genai as og
import psutil
import pytest

from agent import SamplingParams
from agent.config import AgentConfig
from agent.doctor import _memory, check_memory, check_model
from agent.engine.engine import Engine, EngineOptions
from agent.engine.kv_choice import choose, int8_kv_trusted
from agent.engine.kv_variants import VARIANTS_FILE, read_variants, variant_shapes
from agent.engine.memory_plan import KV_CALIBRATION_KEY, Budgets, estimate, peak_need
from agent.engine.prepacked import read_manifest, source_key
from agent.health.options import HealthThresholds
from agent.updates.updater import Updater
from edge_contract.errors import ModelFileError
from edge_contract.telemetry import Memory, SystemReading
from models.kv_variants import INT8_GRAPH
from tests.integration.test_int8_embedding import NEW_TOKENS, PROMPTS
from tests.integration.test_kv_quant import KV_INT8_GAP, worst_gap
from tests.integration.test_updater_decisions import _code, _offer, _updater
from tests.support.models import convert_fixture
from tests.support.releases import Releases, payload

MiB = 1 << 20
LONG_CONTEXT = 65536
MARGIN_MB = 200
#: Sized with 2-row prefill chunks and no prefix cache: at this tiny width a context token's column
#: of attention scores in a 512-row chunk would outweigh its KV (tests/integration/test_kv_quant.py).
ENGINE = {"prefix_cache_mb": 0, "prefill_chunk_tokens": 2}


def _converted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *flags: str) -> Path:
    out = convert_fixture(tmp_path, monkeypatch, *flags)
    config = json.loads((out / "genai_config.json").read_text())
    config["model"]["context_length"] = LONG_CONTEXT
    (out / "genai_config.json").write_text(json.dumps(config))
    return out


def _tight_box(folder: Path) -> int:
    """Bytes where the float32 cache cuts the context to about a third and the int8 one holds all of it."""
    shape = variant_shapes(folder)["float32"]
    alone = Budgets(context_tokens=512, max_batch=1, prefix_cache_mb=0, prefill_chunk_tokens=2)
    return (peak_need(estimate(shape, alone, weights_mapped=True)) // MiB + 16) * MiB


def test_convert_without_the_int8_graph_offers_float32_and_the_graph_can_be_added_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models import kv_variants

    out = convert_fixture(tmp_path, monkeypatch, "--no-int8-kv-graph")
    assert read_variants(out) is None and not (out / INT8_GRAPH).exists()
    assert list(variant_shapes(out)) == ["float32"]
    kv_variants.main([str(out)])  # the positive control: the same folder with the graph added
    assert list(variant_shapes(out)) == ["float32", "int8"]
    both = tmp_path / "both"
    both.mkdir()
    with pytest.raises(SystemExit):  # the two flags contradict each other: argparse refuses them
        convert_fixture(both, monkeypatch, "--no-int8-kv-graph", "--int8-kv")


def test_a_damaged_int8_graph_leaves_the_float32_cache_served_and_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder = convert_fixture(tmp_path, monkeypatch)
    assert list(variant_shapes(folder)) == ["float32", "int8"]  # the control: both intact
    int8 = folder / INT8_GRAPH
    int8.write_bytes(int8.read_bytes()[:1000])  # truncated after install (bad luck on the disk)
    with caplog.at_level(logging.WARNING, logger="agent.engine.kv_variants"):
        shapes = variant_shapes(folder)
    assert list(shapes) == ["float32"]
    warned = [r.getMessage() for r in caplog.records]
    assert any(str(int8) in w and "python -m models.kv_variants" in w for w in warned), warned
    choice = choose(shapes, EngineOptions(), 64 << 30, machine=platform.machine())
    assert choice.cache == "float32"
    # The default graph damaged is still a refusal naming the file: nothing else can be served.
    graph = folder / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match=r"model\.onnx: not a readable ONNX model"):
        variant_shapes(folder)


@pytest.mark.parametrize("int8_default", [False, True])
def test_convert_writes_both_caches_over_one_weights_file(
    int8_default: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = convert_fixture(tmp_path, monkeypatch, *(["--int8-kv"] if int8_default else []))
    variants = read_variants(out)
    assert variants is not None and {c: v.graph for c, v in variants.variants.items()} == {
        "float32": "model.onnx",
        "int8": INT8_GRAPH,
    }
    assert [p.name for p in out.glob("*.data")] == ["model.onnx.data"]
    for graph in ("model.onnx", INT8_GRAPH):
        model = onnx.load(str(out / graph), load_external_data=False)
        locations = {
            entry.value
            for tensor in model.graph.initializer
            for entry in tensor.external_data
            if entry.key == "location"
        }
        assert locations == {"model.onnx.data"}, graph
    shapes = variant_shapes(out)
    assert shapes["float32"].kv_bytes_per_token == 4 * shapes["int8"].kv_bytes_per_token
    # The folder's default graph (what onnxruntime-genai and other commands open) is float32 unless
    # --int8-kv; an explicit kv_cache opens its graph either way.
    default = Engine(out, EngineOptions(prefix_cache_mb=0))
    assert default.kv_cache == ("int8" if int8_default else "float32")
    for cache, graph in (("float32", "model.onnx"), ("int8", INT8_GRAPH)):
        engine = Engine(out, EngineOptions(prefix_cache_mb=0, kv_cache=cache))
        assert (engine.kv_cache, engine.graph_file.name) == (cache, graph)
        assert engine.generate(engine.prompt_ids("The edge agent"), SamplingParams(max_tokens=4)).token_ids


def test_the_daemon_serves_the_int8_cache_where_float32_would_cut_the_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _converted(tmp_path, monkeypatch)
    tight = _tight_box(folder)
    # The control, decided alone: on this box float32 cuts the context and int8 holds all of it.
    shapes, options = variant_shapes(folder), EngineOptions(**ENGINE)
    float32 = choose(shapes, options.model_copy(update={"kv_cache": "float32"}), tight, machine="x86_64")
    assert (float32.options.context_tokens or 0) < LONG_CONTEXT

    def updater(machine: str, memory: int) -> Updater:
        monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=memory))
        monkeypatch.setattr("agent.updates.updater.platform", SimpleNamespace(machine=lambda: machine))
        config = AgentConfig(
            device_id="box-1",
            state_dir=tmp_path / f"state-{machine}-{memory}",
            model={"path": folder},
            mqtt={"allow_plaintext": True},
            engine=ENGINE,
            health={"min_mem_available_mb": MARGIN_MB},
        )
        return Updater(config, publish=lambda _state: None, between_jobs=lambda _task: None)  # type: ignore[arg-type,return-value]

    with caplog.at_level(logging.INFO, logger="agent.updates.updater"):
        engine = updater("x86_64", tight + MARGIN_MB * MiB).serving.engine
    assert (engine.kv_cache, engine.graph_file.name, engine.context_length) == (
        "int8",
        INT8_GRAPH,
        LONG_CONTEXT,
    )
    assert engine.kv_reason is not None
    assert (
        f"float32 would cut the context to {float32.options.context_tokens} of {LONG_CONTEXT}"
        in engine.kv_reason
    )
    started = [r.getMessage() for r in caplog.records if "expected peak" in r.getMessage()]
    assert started and f"int8 KV cache ({engine.kv_reason})" in started[-1], started
    assert f"context {LONG_CONTEXT} tokens" in started[-1]
    ids = engine.prompt_ids(PROMPTS[0])
    assert engine.generate(ids, SamplingParams(max_tokens=4)).token_ids

    # On aarch64 the same: its scales carry the vocabulary sweep (models.convert's calibration).
    arm = updater("aarch64", tight + MARGIN_MB * MiB).serving.engine
    assert (arm.kv_cache, arm.context_length) == ("int8", LONG_CONTEXT)
    # Positive controls: scales from text alone are not trusted on aarch64 (float32, the cut
    # context); a roomy box keeps float32 with the whole context.
    graph = onnx.load(str(folder / INT8_GRAPH), load_external_data=False)
    onnx.helper.set_model_props(graph, {KV_CALIBRATION_KEY: "per-channel, margin 1.25, no vocabulary sweep"})
    onnx.save(graph, str(folder / INT8_GRAPH))
    arm = updater("aarch64", tight + MARGIN_MB * MiB).serving.engine
    assert (arm.kv_cache, arm.context_length) == ("float32", float32.options.context_tokens)
    assert arm.kv_reason is not None and "not trusted on aarch64" in arm.kv_reason
    roomy = updater("x86_64", tight + (MARGIN_MB + 64) * MiB).serving.engine
    assert (roomy.kv_cache, roomy.context_length) == ("float32", LONG_CONTEXT)


def test_doctor_reports_the_cache_it_would_choose_beside_the_box_s_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _converted(tmp_path, monkeypatch)
    tight_mb = _tight_box(folder) // MiB
    config = AgentConfig(
        device_id="box-1",
        state_dir=tmp_path / "state",
        model={"path": folder},
        mqtt={"allow_plaintext": True},
        engine=ENGINE,
    )
    thresholds = HealthThresholds(min_mem_available_mb=MARGIN_MB)

    def doctor(available_mb: int) -> tuple[str, str]:
        check = check_memory(config, SystemReading(memory=Memory(available_mb=available_mb)), thresholds)
        return check.status, check.detail

    status, detail = doctor(tight_mb + MARGIN_MB)
    assert "MiB available" in detail and "float32 would cut the context to" in detail, detail
    # models.convert calibrates with the vocabulary sweep, trusted on every CPU family: the int8
    # cache holds the whole context (x86-64 and aarch64 alike).
    assert int8_kv_trusted(platform.machine(), variant_shapes(folder)["int8"].kv_calibration)
    assert status == "ok" and f"at a {LONG_CONTEXT}-token context" in detail
    assert "int8 KV cache (float32 would cut" in detail
    # Its load check opens the graph the daemon would: the int8 one.
    _check, options = _memory(
        config, SystemReading(memory=Memory(available_mb=tight_mb + MARGIN_MB)), thresholds
    )
    loaded = check_model(config, options)
    assert loaded.status == "ok", loaded
    assert "int8 KV" in loaded.detail, loaded.detail
    status, detail = doctor(tight_mb + MARGIN_MB + 64)  # the positive control: room for float32
    assert status == "ok" and f"float32 KV cache (its {LONG_CONTEXT}-token context fits with it)" in detail
    # An explicit int8 on a folder without it: one line naming the fix.
    (folder / VARIANTS_FILE).unlink()
    refused = check_memory(
        config.model_copy(update={"engine": EngineOptions(kv_cache="int8")}),
        SystemReading(memory=Memory(available_mb=tight_mb + MARGIN_MB)),
        thresholds,
    )
    assert refused.status == "fail" and refused.detail.startswith("engine.kv_cache: model out has no int8")
    assert "python -m models.convert" in refused.detail


def test_the_repacked_copy_follows_the_cache_in_use_and_only_one_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = convert_fixture(tmp_path, monkeypatch)
    root = tmp_path / "prepacked"
    for cache, graph in (("float32", "model.onnx"), ("int8", INT8_GRAPH), ("float32", "model.onnx")):
        engine = Engine(folder, EngineOptions(prefix_cache_mb=0, kv_cache=cache), prepacked_dir=root)
        copies = [p for p in root.iterdir()]
        assert len(copies) == 1, copies  # the other cache's copy was replaced, not kept beside it
        manifest = read_manifest(copies[0])
        assert manifest is not None and manifest.key == source_key(folder, folder / graph)
        assert engine.kv_cache == cache
        assert engine.generate(engine.prompt_ids("The edge agent"), SamplingParams(max_tokens=4)).token_ids


def test_the_int8_variant_s_tokens_stay_within_the_bound_of_the_float32_variant_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = convert_fixture(tmp_path, monkeypatch)
    engine = Engine(folder, EngineOptions(prefix_cache_mb=0, kv_cache="int8"))
    float_model = og.Model(str(folder))  # genai_config.json names the float32-KV graph
    for prompt in PROMPTS:
        ids = engine.prompt_ids(prompt)
        ours = engine.generate(ids, SamplingParams(max_tokens=NEW_TOKENS)).token_ids
        assert ours
        assert worst_gap(float_model, ids, ours) <= KV_INT8_GAP, prompt


def test_an_update_is_checked_before_its_download_with_the_int8_cache_it_offers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, releases: Releases
) -> None:
    folder = convert_fixture(tmp_path, monkeypatch)
    genuine = releases.make("2.0.0", source=folder)
    assert (genuine.kv_bytes_per_token, genuine.kv_int8_bytes_per_token) == (512, 128)
    assert releases.make("2.0.1").kv_int8_bytes_per_token is None  # a folder with one graph
    # A release whose float32 cache no box holds at the set context, and whose int8 cache fits.
    offer = releases.resign(genuine, kv_bytes_per_token=1 << 30, kv_int8_bytes_per_token=1)
    engine = {"context_tokens": 1 << 20}

    # The figure names a graph calibrated with the vocabulary sweep, trusted on every CPU family.
    for machine in ("aarch64", "x86_64"):
        monkeypatch.setattr("agent.updates.updater.platform", SimpleNamespace(machine=lambda m=machine: m))
        updater, _states = _updater(tmp_path / machine, releases, engine, version="1.0.0")
        state = _offer(updater, payload(offer))
        assert state.update is not None and state.update.phase == "active", (machine, state.update)
    # Positive control on the same box: without the int8 figure the release is refused before its download.
    updater, _states = _updater(tmp_path / "arm-old", releases, engine, version="1.0.0")
    without = releases.resign(
        genuine, version="2.0.2", kv_bytes_per_token=1 << 30, kv_int8_bytes_per_token=None
    )
    state = _offer(updater, payload(without))
    assert _code(state) == "insufficient_memory"
    assert state.update is not None and state.update.error is not None
    assert not [path for path, _range in releases.server.requests if path.startswith("assistant-2.0.2/")]
    # Scales calibrated on text alone get no int8 figure: a box on aarch64 would not trust them.
    text_only = tmp_path / "text-only"
    shutil.copytree(folder, text_only)
    graph = onnx.load(str(text_only / INT8_GRAPH), load_external_data=False)
    onnx.helper.set_model_props(graph, {KV_CALIBRATION_KEY: "per-channel, margin 1.25, no vocabulary sweep"})
    onnx.save(graph, str(text_only / INT8_GRAPH))
    assert releases.make("2.0.3", source=text_only).kv_int8_bytes_per_token is None
