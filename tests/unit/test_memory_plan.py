"""The memory estimate and the budgets sized from it (pure), and a model folder's shape (real fixtures)."""

from __future__ import annotations

import pytest

from agent.config import EngineOptions
from agent.engine.memory_plan import (
    MIN_CONTEXT,
    RUNTIME_BYTES,
    Budgets,
    ModelShape,
    estimate,
    fit,
    model_shape,
    release_need,
    shortened_context,
    weights_bytes,
)
from edge_contract.errors import MemoryFitError
from tests.support.models import fixture_path

MiB = 1 << 20
#: Phi-3-mini int4 as onnxruntime-genai's builder exports it (pruned lm_head), float32 KV.
PHI3 = ModelShape(
    file_bytes=2_720_000_000,
    embedding_bytes=32064 * 3072 * 4,
    kv_bytes_per_token=32 * 2 * 32 * 96 * 4,
    hidden_size=3072,
    attention_heads=32,
    vocab_size=32064,
    context_length=4096,
    full_logits=False,
)


def test_the_estimate_adds_its_parts() -> None:
    budgets = Budgets(context_tokens=2048, max_batch=2, prefix_cache_mb=100, prefill_chunk_tokens=512)
    peak = estimate(PHI3, budgets)
    assert peak.kv == 768 * 1024 * 2048 * 2
    assert peak.prefix_cache == 100 * MiB
    assert peak.weights == weights_bytes(PHI3) > PHI3.file_bytes - PHI3.embedding_bytes
    assert peak.anonymous == peak.weights + peak.runtime + peak.activations + peak.kv + peak.prefix_cache
    # The float32 embedding table is read from the mapped file, never repacked.
    assert peak.mapped >= PHI3.embedding_bytes and peak.total == peak.anonymous + peak.mapped
    assert "MiB anonymous (weights" in peak.describe()
    # A longer context costs its attention scores in every prefill chunk.
    longer = estimate(PHI3, budgets.model_copy(update={"context_tokens": 4096}))
    assert longer.activations - peak.activations == 512 * 2048 * 32 * 4
    # Every row's logits cost memory that a pruned export does not spend.
    full = estimate(PHI3.model_copy(update={"full_logits": True}), budgets)
    assert full.activations - peak.activations > 512 * 32064 * 4


def test_a_roomy_box_gets_the_model_s_context_and_a_prefix_cache_of_one_context() -> None:
    budgets = fit(PHI3, EngineOptions(), 12 << 30)
    assert budgets.context_tokens == 4096
    assert budgets.prefix_cache_mb == PHI3.kv_bytes_per_token * 4096 // MiB
    assert budgets.prefill_chunk_tokens == 512
    assert estimate(PHI3, budgets).anonymous <= 12 << 30


@pytest.mark.parametrize("gib", [3.6, 4.0, 5.0, 7.5])
def test_a_tight_box_gets_a_shorter_context_and_what_is_left_for_prefixes(gib: float) -> None:
    memory = int(gib * (1 << 30))
    budgets = fit(PHI3, EngineOptions(), memory)
    assert MIN_CONTEXT <= budgets.context_tokens <= 4096
    assert budgets.context_tokens % 256 == 0 or budgets.context_tokens == 4096
    assert estimate(PHI3, budgets).anonymous <= memory
    # A larger box never gets less.
    more = fit(PHI3, EngineOptions(), memory + (1 << 30))
    assert more.context_tokens >= budgets.context_tokens
    assert more.prefix_cache_mb + more.context_tokens >= budgets.prefix_cache_mb + budgets.context_tokens


def test_set_budgets_are_kept_and_refused_with_the_setting_to_lower_when_they_cannot_fit() -> None:
    chosen = EngineOptions(context_tokens=1024, prefix_cache_mb=64, prefill_chunk_tokens=128)
    budgets = fit(PHI3, chosen, 8 << 30)
    assert (budgets.context_tokens, budgets.prefix_cache_mb, budgets.prefill_chunk_tokens) == (1024, 64, 128)

    with pytest.raises(MemoryFitError) as too_big:
        fit(PHI3, EngineOptions(prefix_cache_mb=4096), 5 << 30)
    assert too_big.value.message.startswith("engine.prefix_cache_mb: ")
    assert "lower [engine] prefix_cache_mb" in too_big.value.message
    with pytest.raises(MemoryFitError) as too_long:
        fit(PHI3, EngineOptions(context_tokens=4096), 4 << 30)
    assert "lower [engine] context_tokens" in too_long.value.message
    # Positive control: the same settings fit a larger box.
    fit(PHI3, EngineOptions(prefix_cache_mb=4096), 12 << 30)
    fit(PHI3, EngineOptions(context_tokens=4096), 8 << 30)


def test_the_prefill_chunk_shrinks_only_when_memory_is_tight_and_it_was_not_set() -> None:
    floor = estimate(
        PHI3, Budgets(context_tokens=MIN_CONTEXT, max_batch=1, prefix_cache_mb=0, prefill_chunk_tokens=64)
    ).anonymous
    tight = fit(PHI3, EngineOptions(), floor)
    assert tight.prefill_chunk_tokens < 512 and tight.context_tokens == MIN_CONTEXT
    with pytest.raises(MemoryFitError, match="prefill_chunk_tokens"):
        fit(PHI3, EngineOptions(prefill_chunk_tokens=512), floor)


def test_a_model_that_cannot_fit_at_all_names_the_model() -> None:
    with pytest.raises(MemoryFitError) as refused:
        fit(PHI3, EngineOptions(), 3 << 30)
    assert refused.value.message.startswith("model.path: the model needs ")
    assert "serve a smaller model" in refused.value.message


def test_the_shape_of_model_folders() -> None:
    full = model_shape(fixture_path("phi3-int4"))
    pruned = model_shape(fixture_path("phi3-int4-pruned"))
    assert full.full_logits and not pruned.full_logits
    # 2 layers x (key, value) x 2 KV heads x head size 16 x float32.
    assert full.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    assert (full.hidden_size, full.vocab_size, full.context_length) == (64, 448, 256)
    folder = fixture_path("phi3-int4")
    assert (
        full.file_bytes
        == (folder / "model.onnx").stat().st_size + (folder / "model.onnx.data").stat().st_size
    )


def test_what_a_release_needs_counts_its_memory_a_context_and_set_budgets() -> None:
    base = release_need(1000 * MiB, 768 * 1024, EngineOptions())
    assert base == 1000 * MiB + RUNTIME_BYTES + 768 * 1024 * MIN_CONTEXT
    assert release_need(1000 * MiB, None, EngineOptions()) == 1000 * MiB + RUNTIME_BYTES
    longer = release_need(1000 * MiB, 768 * 1024, EngineOptions(context_tokens=2048, prefix_cache_mb=10))
    assert longer == 1000 * MiB + RUNTIME_BYTES + 768 * 1024 * 2048 + 10 * MiB


def test_weights_mapped_from_their_repacked_copy_leave_anonymous_memory_but_are_still_needed() -> None:
    budgets = Budgets(context_tokens=2048, max_batch=1, prefix_cache_mb=100, prefill_chunk_tokens=512)
    in_memory = estimate(PHI3, budgets)
    on_disk = estimate(PHI3, budgets, weights_mapped=True)
    assert on_disk.anonymous == in_memory.anonymous - in_memory.weights
    # Every pass reads them: what must stay resident, and so the sizing, does not change.
    assert on_disk.needed == in_memory.needed == in_memory.anonymous
    assert on_disk.total == in_memory.total
    assert "weights mapped from their repacked copy" in on_disk.describe()
    assert "(weights" not in on_disk.describe() and "(weights" in in_memory.describe()
    # Making the copy at the first start holds the repacked weights and the embedding table.
    assert on_disk.first_load == on_disk.weights + PHI3.embedding_bytes + RUNTIME_BYTES
    assert in_memory.first_load == 0
    on, off = (
        fit(PHI3, EngineOptions(), 12 << 30),
        fit(PHI3, EngineOptions(prepacked_on_disk=False), 12 << 30),
    )
    assert on.prepacked_on_disk and not off.prepacked_on_disk
    assert on.model_copy(update={"prepacked_on_disk": False}) == off


def test_a_first_start_that_cannot_make_the_repacked_copy_repacks_in_memory_or_names_the_setting() -> None:
    # A large float embedding table (Llama-3.2-3B's is 1.6 GB): making the copy weighs more than serving.
    big = PHI3.model_copy(update={"file_bytes": 4_000_000_000, "embedding_bytes": 2_000_000_000})
    smallest = Budgets(context_tokens=MIN_CONTEXT, max_batch=1, prefix_cache_mb=0, prefill_chunk_tokens=64)
    peak = estimate(big, smallest, weights_mapped=True)
    room = peak.needed + 64 * MiB
    assert room < peak.first_load
    # Unset: the daemon repacks in memory at every load instead.
    sized = fit(big, EngineOptions(), room)
    assert not sized.prepacked_on_disk and sized.context_tokens == MIN_CONTEXT
    with pytest.raises(MemoryFitError, match=r"^engine\.prepacked_on_disk: .*prepacked_on_disk = false"):
        fit(big, EngineOptions(prepacked_on_disk=True), room)
    assert fit(big, EngineOptions(prepacked_on_disk=False), room).context_tokens == MIN_CONTEXT
    # Positive control: with room for the first start, the copy is kept.
    assert fit(big, EngineOptions(), peak.first_load + 64 * MiB).prepacked_on_disk


def test_a_context_cut_to_fit_names_the_int8_cache_that_would_hold_more() -> None:
    small_box = fit(PHI3, EngineOptions(), 9 << 29)  # 4.5 GiB
    assert small_box.context_tokens < PHI3.context_length  # the control: this box cuts the context
    hint = shortened_context(PHI3, EngineOptions(), small_box.context_tokens)
    assert hint is not None
    assert "python -m models.convert" in hint and "768 KiB per token" in hint
    assert f"about {min(4096, small_box.context_tokens * 4)} tokens" in hint
    # Nothing to say when the operator chose the context, when the model's whole context fits, or
    # when the cache is already int8.
    assert shortened_context(PHI3, EngineOptions(context_tokens=1024), 1024) is None
    assert shortened_context(PHI3, EngineOptions(), 4096) is None
    int8 = PHI3.model_copy(
        update={"kv_bytes_per_token": PHI3.kv_bytes_per_token // 4, "kv_element_bytes": 1.0}
    )
    assert shortened_context(int8, EngineOptions(), 1024) is None


@pytest.mark.parametrize("kv_value_bytes", [4, 1])
def test_what_the_box_sizes_fits_the_memory_it_was_sized_for(kv_value_bytes: int) -> None:
    # An int8 cache makes a context token cheap, so its column of attention scores in every
    # prefill chunk row weighs: the sizing counts both.
    shape = PHI3.model_copy(
        update={
            "kv_bytes_per_token": PHI3.kv_bytes_per_token * kv_value_bytes // 4,
            "kv_element_bytes": float(kv_value_bytes),
        }
    )
    sized = 0
    for memory_mib in range(3_200, 9_000, 97):
        try:
            budgets = fit(shape, EngineOptions(), memory_mib * MiB)
        except MemoryFitError:
            continue
        sized += 1
        assert estimate(shape, budgets, weights_mapped=budgets.prepacked_on_disk).needed <= memory_mib * MiB
    assert sized > 40  # the control: most of these boxes fit the model
