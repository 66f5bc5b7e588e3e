"""How the engine's onnxruntime session and scheduler are set up (``[engine]``, composed by ``agent.config``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: ``[engine] kv_cache``: which KV cache the engine serves a model folder with (agent.engine.kv_choice).
KvCacheSetting = Literal["auto", "float32", "int8"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineOptions(_Section):
    """How the onnxruntime session is set up."""

    threads: int = Field(0, ge=0, le=256, description="Intra-op threads; 0 means one per physical core.")
    spin_us: int = Field(
        1000,
        ge=0,
        le=100_000,
        description=(
            "How long idle worker threads busy-wait for the next operator, in microseconds "
            "(0: never). A short spin keeps decode fast (the next token's work arrives within "
            "microseconds) while a bounded one never burns cores between requests."
        ),
    )
    context_tokens: int = Field(
        0,
        ge=0,
        le=1_048_576,
        description=(
            "Longest sequence served (prompt + reply), capped at the model's context. 0: the daemon "
            "takes the longest that fits the box's memory beside the model (docs/memory.md); "
            "other commands take the model's."
        ),
    )
    prefix_cache_mb: int = Field(
        256,
        ge=0,
        le=1_048_576,
        description=(
            "Memory for the keys and values of recent prompt prefixes, MiB (0: no prefix cache). "
            "Unset, the daemon sizes it to what the box's memory leaves after the model and the "
            "context (at least 256 MiB where that fits); other commands take 256. 256 MiB holds "
            "about 4,000 tokens of a Llama-3.2-1B or 340 of Phi-3-mini (float32 KV)."
        ),
    )
    prefix_cache_disk_mb: int = Field(
        1024,
        ge=0,
        le=1_048_576,
        description="Disk for prefixes kept across restarts (under state_dir/prefix_cache), MiB.",
    )
    prefix_block_tokens: int = Field(
        16,
        ge=2,
        le=4096,
        description="Granularity of the prefix cache: prefixes are reused in blocks this long.",
    )
    prefill_chunk_tokens: int = Field(
        512,
        ge=2,
        le=65_536,
        description=(
            "Longest prefill pass: a long prompt is prefilled in chunks this long, which bounds "
            "its memory and lets cancellation act between chunks. Unset, the daemon lowers it "
            "(to 64 at least) when the box's memory is tight."
        ),
    )
    kv_cache: KvCacheSetting = Field(
        "auto",
        description=(
            "The KV cache's element type, when the model folder offers both (models.convert writes a "
            "float32-KV and an int8-KV graph). auto: float32 when the model's context (or the set "
            "context_tokens) fits the box's memory with it, else int8 where its accuracy bound holds "
            "(x86-64), else float32 with a shorter context; other commands than the daemon take the "
            "folder's default graph. int8: a quarter of the bytes per token, tokens within 1 logit of "
            "the float32 cache's arg-max (docs/memory.md); refused at start on a folder without it."
        ),
    )
    speculate: bool = Field(
        False,
        description=(
            "Prompt-lookup speculative decoding (see agent.engine.speculate): fewer passes when the "
            "output copies spans of the prompt. Every pass then has two rows or more, so the output "
            "never depends on what was drafted; it equals plain decoding's except where two candidates "
            "tie within the float rounding that separates one-row from multi-row passes."
        ),
    )
    speculate_max_k: int = Field(8, ge=1, le=32, description="Most draft tokens verified in one pass.")
    max_batch: int = Field(
        1, ge=1, le=64, description="Most sequences decoded together in one pass (see agent.engine.batch)."
    )
    prepack_weights: bool = Field(
        True,
        description=(
            "Let onnxruntime repack the int4/int8 weights into its kernels' layout at load (anonymous "
            "memory, the fastest kernels). false: the kernels read the memory-mapped model file as "
            "it is (file-backed pages the kernel can reclaim; see docs/memory.md for what it costs)."
        ),
    )
    prepacked_on_disk: bool = Field(
        True,
        description=(
            "Keep the repacked weights in a file made for this CPU at the first start "
            "(state_dir/prepacked, about twice the model's size on disk) and memory-map it at load: "
            "the weights become file-backed pages instead of anonymous memory and later loads skip "
            "the repacking. false: repack in memory at every load."
        ),
    )
    cpu_arena: bool = Field(
        True,
        description=(
            "onnxruntime's CPU memory arena: keeps the largest activations of any pass allocated. "
            "false: activations are freed after each pass (a lower peak between requests)."
        ),
    )
