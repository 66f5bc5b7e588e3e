"""Which KV cache the daemon serves a model with (``agent.engine.kv_choice``: pure), and the folder's variants file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.engine.kv_choice import INT8_KV_TRUSTED, choose, int8_kv_trusted, release_kv_options
from agent.engine.kv_variants import VARIANTS_FILE, KvVariants, offered, read_variants, variant_shapes
from agent.engine.memory_plan import KV_CALIBRATION_KEY, fit
from agent.engine.model_folder import ModelFolder
from agent.engine.options import EngineOptions
from edge_contract.errors import MemoryFitError, ModelConfigError
from tests.support.models import fixture_path
from tests.unit.test_memory_plan import PHI3

GiB = 1 << 30
PHI3_INT8 = PHI3.model_copy(
    update={"kv_bytes_per_token": PHI3.kv_bytes_per_token // 4, "kv_element_bytes": 1.0}
)
BOTH = {"float32": PHI3, "int8": PHI3_INT8}
X86, ARM = "x86_64", "aarch64"
#: What ``models.kv_quant.calibrate`` records in the graph, with and without the sweep.
SWEPT_CALIBRATION = "per-channel, margin 1.25, 1024 tokens of text, vocabulary sweep in sequences of 256"
TEXT_CALIBRATION = "per-channel, margin 1.25, 1024 tokens of text, no vocabulary sweep"
#: A box where Phi-3-mini's float32 cache cuts the context (4.5 GiB; tests/unit/test_memory_plan.py).
TIGHT = 9 << 29


def test_a_box_that_holds_the_context_with_float32_keeps_float32() -> None:
    choice = choose(BOTH, EngineOptions(), 12 * GiB, machine=X86)
    assert choice.cache == "float32" and choice.options.kv_cache == "float32"
    assert choice.options.context_tokens == PHI3.context_length
    assert "4096-token context fits" in choice.reason and choice.warning is None


def test_float32_is_preferred_even_where_the_folder_s_default_graph_is_int8() -> None:
    int8_default = {"int8": PHI3_INT8, "float32": PHI3}  # models.convert --int8-kv
    assert choose(int8_default, EngineOptions(), 12 * GiB, machine=X86).cache == "float32"
    assert choose(int8_default, EngineOptions(), TIGHT, machine=X86).cache == "int8"  # the control
    assert choose(int8_default, EngineOptions(), TIGHT, machine=ARM).cache == "float32"


def test_where_float32_cuts_the_context_the_int8_cache_holds_more_on_x86() -> None:
    cut = fit(PHI3, EngineOptions(), TIGHT).context_tokens
    assert cut < PHI3.context_length  # the control: float32 cuts the context on this box
    choice = choose(BOTH, EngineOptions(), TIGHT, machine=X86)
    assert choice.cache == "int8" and choice.options.kv_cache == "int8"
    assert (choice.options.context_tokens or 0) > cut
    assert choice.shape == PHI3_INT8 and choice.peak.kv == PHI3_INT8.kv_bytes_per_token * (
        choice.options.context_tokens or 0
    )
    assert f"float32 would cut the context to {cut} of 4096 tokens" in choice.reason
    assert choice.warning is None


def test_on_aarch64_auto_keeps_float32_where_the_int8_scales_came_from_text_alone() -> None:
    choice = choose(BOTH, EngineOptions(), TIGHT, machine=ARM)
    assert choice.cache == "float32"
    assert choice.options.context_tokens == fit(PHI3, EngineOptions(), TIGHT).context_tokens
    assert "not trusted on aarch64" in choice.reason and "issue 23" in choice.reason


def test_a_folder_without_the_int8_graph_keeps_today_s_cut_and_names_the_re_export() -> None:
    choice = choose({"float32": PHI3}, EngineOptions(), TIGHT, machine=X86)
    assert choice.cache == "float32" and choice.options.context_tokens < PHI3.context_length  # type: ignore[operator]
    assert "the only cache the model folder has" in choice.reason
    assert "python -m models.convert" in choice.reason and "768 KiB per token" in choice.reason


def test_a_set_context_float32_cannot_hold_is_served_with_int8() -> None:
    options = EngineOptions(context_tokens=4096)
    with pytest.raises(MemoryFitError, match=r"engine\.context_tokens"):  # the control: float32 alone fails
        choose({"float32": PHI3}, options, TIGHT, machine=X86)
    choice = choose(BOTH, options, TIGHT, machine=X86)
    assert (choice.cache, choice.options.context_tokens) == ("int8", 4096)
    assert "float32 does not fit (engine.context_tokens)" in choice.reason
    # Where int8 is not trusted, the float32 refusal stands.
    with pytest.raises(MemoryFitError, match=r"engine\.context_tokens"):
        choose(BOTH, options, TIGHT, machine=ARM)


def test_a_model_that_fits_with_neither_cache_is_refused() -> None:
    with pytest.raises(MemoryFitError, match=r"model\.path"):
        choose(BOTH, EngineOptions(), 1 * GiB, machine=X86)


def test_an_explicit_cache_is_kept_and_one_the_folder_lacks_is_refused_naming_the_fix() -> None:
    floating = choose(BOTH, EngineOptions(kv_cache="float32"), TIGHT, machine=X86)
    assert floating.cache == "float32" and floating.reason == "set in [engine] kv_cache"
    assert floating.options.context_tokens < PHI3.context_length  # type: ignore[operator]
    assert choose(BOTH, EngineOptions(kv_cache="int8"), 12 * GiB, machine=X86).cache == "int8"
    with pytest.raises(ModelConfigError) as refused:
        choose({"float32": PHI3}, EngineOptions(kv_cache="int8"), 12 * GiB, machine=X86, name="phi3")
    message = refused.value.message
    assert message.startswith("engine.kv_cache: model phi3 has no int8 KV cache (it has float32)")
    assert "python -m models.convert" in message and "\n" not in message


def test_an_explicit_int8_on_aarch64_is_served_with_a_warning_naming_the_issue() -> None:
    choice = choose(BOTH, EngineOptions(kv_cache="int8"), 12 * GiB, machine=ARM)
    assert choice.cache == "int8" and choice.warning is not None and "issue 23" in choice.warning
    assert choose(BOTH, EngineOptions(kv_cache="int8"), 12 * GiB, machine=X86).warning is None  # control
    # An older folder whose only graph is int8 is served as before, with the same warning there.
    only = choose({"int8": PHI3_INT8}, EngineOptions(), 12 * GiB, machine=ARM)
    assert only.cache == "int8" and only.warning is not None


def test_the_cpu_families_trusted_with_int8_kv() -> None:
    assert int8_kv_trusted("x86_64") and int8_kv_trusted("AMD64")
    assert not int8_kv_trusted("aarch64") and not int8_kv_trusted("arm64")
    assert "aarch64" not in INT8_KV_TRUSTED
    # Scales calibrated with the vocabulary sweep meet the bound on emulated aarch64 too (issue 23).
    assert int8_kv_trusted("aarch64", SWEPT_CALIBRATION) and int8_kv_trusted("x86_64", SWEPT_CALIBRATION)
    assert not int8_kv_trusted("aarch64", TEXT_CALIBRATION)


def test_on_aarch64_auto_serves_an_int8_cache_whose_scales_carry_the_vocabulary_sweep() -> None:
    swept = {"float32": PHI3, "int8": PHI3_INT8.model_copy(update={"kv_calibration": SWEPT_CALIBRATION})}
    choice = choose(swept, EngineOptions(), TIGHT, machine=ARM)
    assert choice.cache == "int8" and choice.warning is None
    assert (choice.options.context_tokens or 0) > fit(PHI3, EngineOptions(), TIGHT).context_tokens
    assert choose(swept, EngineOptions(kv_cache="int8"), 12 * GiB, machine=ARM).warning is None
    text_only = {"float32": PHI3, "int8": PHI3_INT8.model_copy(update={"kv_calibration": TEXT_CALIBRATION})}
    assert choose(text_only, EngineOptions(), TIGHT, machine=ARM).cache == "float32"  # the control


def test_the_calibration_metadata_key_is_the_one_models_kv_quant_writes() -> None:
    from models import kv_quant

    assert kv_quant.CALIBRATION_KEY == KV_CALIBRATION_KEY


def test_a_release_is_checked_with_the_caches_the_box_may_serve_it_with() -> None:
    auto = EngineOptions()
    assert release_kv_options(400, 100, auto) == {"default": 400, "int8": 100}
    assert release_kv_options(400, None, auto) == {"default": 400}
    assert release_kv_options(400, 100, EngineOptions(kv_cache="int8")) == {"int8": 100}
    assert release_kv_options(400, 100, EngineOptions(kv_cache="float32")) == {"default": 400}


def test_a_folder_offers_its_variants_and_an_old_one_its_graph(tmp_path: Path) -> None:
    old = ModelFolder(fixture_path("phi3-int4"))
    assert offered(old) == {"float32": old.onnx_path}
    assert read_variants(old.path) is None
    folder = tmp_path / "m"
    shutil.copytree(old.path, folder)
    shutil.copy(folder / "model.onnx", folder / "model.kv-int8.onnx")  # a float32 graph listed as int8
    (folder / VARIANTS_FILE).write_text(
        '{"format": 1, "variants": {"float32": {"graph": "model.onnx"}, "int8": {"graph": "model.kv-int8.onnx"}}}'
    )
    assert list(offered(ModelFolder(folder))) == ["float32", "int8"]
    with pytest.raises(ModelConfigError, match="the graph of its int8 entry has a float32 KV cache"):
        variant_shapes(folder)
    for bad in (
        '{"format": 1, "variants": {"int8": {"graph": "../model.onnx"}}}',
        '{"format": 1, "variants": {"float32": {"graph": "model.onnx"}}, "extra": 1}',
        '{"format": 2, "variants": {"float32": {"graph": "model.onnx"}}}',
        '{"format": 1, "variants": {"int4": {"graph": "model.onnx"}}}',
        '{"format": 1, "variants": {"float16": {"graph": "model.onnx"}}}',
    ):
        (folder / VARIANTS_FILE).write_text(bad)
        with pytest.raises(ModelConfigError, match="re-export the model"):
            offered(ModelFolder(folder))
    assert KvVariants.model_validate_json('{"format": 1, "variants": {"float32": {"graph": "model.onnx"}}}')
