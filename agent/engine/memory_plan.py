"""What a model needs in memory, and the budgets that make it fit a box: pure decisions.

The estimate (docs/memory.md has the measurements behind every constant):

    needed    = weights + runtime + activations(prefill chunk) + KV per token x context x max_batch
                + the prefix cache's budget                 (anonymous, but the weights when mapped)
    mapped    = the pages of the memory-mapped model file read while serving

* **weights**: onnxruntime repacks the int4/int8 matrices into its kernels'
  layout (1.24x their file bytes measured): at every load into anonymous memory,
  or once into a file the daemon maps afterwards (``agent.engine.prepacked``:
  then they are file-backed, but read by every pass, so they must stay resident
  all the same); the embedding table (float32 as the builder exports it, int8
  blocks as ``models.convert`` leaves it) and parts of the rest are read from
  the memory-mapped file (**mapped**: file-backed pages the kernel can drop, and
  must then read again). Making that file at the first start holds the repacked
  weights and the embedding table in anonymous memory for a moment (**first load**).
* **runtime**: Python, onnxruntime's libraries and arena, the tokenizer.
* **activations**: a prefill chunk's intermediates, per row, and its attention
  scores (rows x context x heads, float32); plus the logits of every row when the
  export computes them (a pruned export returns one row).
* **KV**: layers x 2 x KV heads x head size x the cache's element size, per
  token (float32, float16 when the graph declares it: ``models.kv_dtype``, or int8 with
  calibrated scales: ``models.kv_quant``, a quarter of float32's bytes).

``fit`` keeps what is needed (and the first load) within the box's memory (the mapped pages are
reported beside it: doctor warns when they do not fit too), and turns it into budgets: what the operator set is kept (and
refused, with the setting to change, when it cannot fit), what they left unset
is sized: the context first (up to the model's), then the prefix cache (up to
one context's worth of prompts), the prefill chunk shrunk when memory is tight.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from agent.engine.options import EngineOptions
from edge_contract.errors import MemoryFitError

_MiB = 1 << 20
#: Anonymous bytes per byte of repacked weights file: onnxruntime's repacked copy (1.24 measured on
#: Phi-3-mini-shaped int4 layers, docs/memory.md).
WEIGHTS_FACTOR = 1.25
#: File-backed bytes per byte of repacked weights file still read from the mapped model (fitted 0.16
#: over 2-6 layers; the issue saw less at full size).
MAPPED_FACTOR = 0.18
#: Python, onnxruntime, tokenizer and libraries beyond the above (fitted: 36 MiB).
RUNTIME_BYTES = 64 * _MiB
#: A prefill row's intermediates, per unit of hidden size (fitted: 68 bytes at hidden 3072).
ACTIVATION_BYTES_PER_HIDDEN = 80
#: The shortest context worth serving; below it a model does not fit.
MIN_CONTEXT = 512
#: Auto-sized contexts are multiples of this.
CONTEXT_STEP = 256
#: The prefix cache the daemon gives when memory allows (EngineOptions' default).
DEFAULT_PREFIX_CACHE_MB = 256
#: Prefill chunks the sizing may fall back to when memory is tight (never below 64 rows).
CHUNK_CHOICES = (512, 256, 128, 64)
#: The graph metadata ``models.kv_quant`` writes: how an int8 cache's scales were calibrated.
KV_CALIBRATION_KEY = "edge_agent.kv_int8_calibration"


class ModelShape(BaseModel):
    """What the estimate needs to know of a model (from its folder, or a release manifest)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    file_bytes: int = Field(ge=0, description="Bytes of the graph and its external weights.")
    embedding_bytes: int = Field(
        0,
        ge=0,
        description="Bytes of the token-embedding table (read from the mapped file, not repacked).",
    )
    kv_bytes_per_token: int = Field(ge=0, description="KV cache bytes per token of context.")
    quantized_bytes: int = Field(
        0, ge=0, description="Bytes of the file in MatMulNBits matrices (packed values, scales, zero points)."
    )
    repacked_bytes: int = Field(
        0,
        ge=0,
        description="Those matrices as onnxruntime repacks them (0: unknown, estimated from the file's size).",
    )
    kv_element_bytes: float = Field(
        4.0, gt=0, description="Bytes per cached value: 4 float32, 2 float16, 1 int8 (models.kv_quant)."
    )
    hidden_size: int = Field(ge=1, description="Width of the residual stream.")
    attention_heads: int = Field(
        ge=1, description="Query heads (a prefill chunk scores rows x context per head)."
    )
    vocab_size: int = Field(ge=1, description="Rows of logits per position.")
    context_length: int = Field(ge=1, description="The model's longest sequence.")
    full_logits: bool = Field(description="The prompt pass returns logits for every row (no pruned lm_head).")
    kv_calibration: str = Field(
        "",
        description=f"How an int8 cache's scales were made (the graph's {KV_CALIBRATION_KEY}; '' if unrecorded).",
    )


class Budgets(BaseModel):
    """The engine settings that decide its memory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    context_tokens: int = Field(ge=1, description="Longest sequence served.")
    max_batch: int = Field(ge=1, description="Sequences decoded together.")
    prefix_cache_mb: int = Field(ge=0, description="The prefix cache's memory budget, MiB.")
    prefill_chunk_tokens: int = Field(ge=2, description="Longest prefill pass.")
    prepacked_on_disk: bool = Field(
        True, description="Map the weights from their repacked copy on disk (agent.engine.prepacked)."
    )


class PeakEstimate(BaseModel):
    """The expected peak resident memory by part, in bytes: anonymous parts and the mapped file's pages."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: int = Field(description="The repacked weights (anonymous, or file-backed when mapped).")
    runtime: int = Field(description="Python, onnxruntime, tokenizer (anonymous).")
    activations: int = Field(description="A prefill chunk's intermediates (anonymous).")
    kv: int = Field(description="The requests' KV caches (anonymous).")
    prefix_cache: int = Field(description="The prefix cache's budget (anonymous).")
    mapped: int = Field(description="Pages of the memory-mapped model read while serving (file-backed).")
    weights_mapped: bool = Field(
        False, description="The repacked weights are mapped from a copy on disk (agent.engine.prepacked)."
    )
    first_load: int = Field(
        0, description="Anonymous peak while the repacked copy is made at the first start (0: none made)."
    )

    @property
    def anonymous(self) -> int:
        """What the kernel cannot drop: the OOM killer's measure."""
        weights = 0 if self.weights_mapped else self.weights
        return weights + self.runtime + self.activations + self.kv + self.prefix_cache

    @property
    def needed(self) -> int:
        """What must stay resident to serve at full speed: anonymous memory and the weights every pass reads."""
        return self.weights + self.runtime + self.activations + self.kv + self.prefix_cache

    @property
    def total(self) -> int:
        """The whole working set: anonymous and file-backed (dropped pages are read again from disk)."""
        return self.needed + self.mapped

    def describe(self) -> str:
        """One line: the peaks and the parts in MiB."""
        parts: tuple[str, ...] = ("runtime", "activations", "kv", "prefix_cache")
        if not self.weights_mapped:
            parts = ("weights", *parts)
        detail = ", ".join(f"{p.replace('_', ' ')} {getattr(self, p) / _MiB:.0f}" for p in parts)
        on_disk = (
            f" + ~{self.weights / _MiB:.0f} MiB of weights mapped from their repacked copy"
            if self.weights_mapped
            else ""
        )
        return (
            f"~{self.anonymous / _MiB:.0f} MiB anonymous ({detail}){on_disk} + ~{self.mapped / _MiB:.0f} MiB "
            "of the mapped model"
        )


def weights_bytes(shape: ModelShape) -> int:
    """The repacked weights: every matrix but the embedding table.

    From the graph when it is known (``repacked_bytes``, plus the file's other weights as
    they are), else from the file's size (``WEIGHTS_FACTOR``: a manifest's shape).
    """
    rest = shape.file_bytes - min(shape.embedding_bytes, shape.file_bytes)
    if shape.repacked_bytes:
        return shape.repacked_bytes + max(0, rest - shape.quantized_bytes)
    return int(rest * WEIGHTS_FACTOR)


def repacked_matrix_bytes(rows: int, blocks: int, blob: int) -> int:
    """One MatMulNBits matrix repacked by onnxruntime's CPU kernels (int8 activations).

    ``rows`` x ``blocks`` blocks of ``blob`` packed bytes each (the initializer's dims): the
    packed values plus a float32 scale and a float32 block sum per block (measured on
    onnxruntime 1.32 x86: 0.75 / 0.625 / 0.5625 bytes per int4 weight at blocks of 32 / 64 / 128).
    """
    return rows * blocks * (blob + 8)


def mapped_bytes(shape: ModelShape) -> int:
    """Pages of the mapped model file read while serving: the embedding table and parts of the rest."""
    embedding = min(shape.embedding_bytes, shape.file_bytes)
    return int((shape.file_bytes - embedding) * MAPPED_FACTOR) + embedding


def activation_bytes(shape: ModelShape, chunk: int, context: int) -> int:
    """A prefill chunk's intermediates: per row, its attention scores over the context (float32,
    every head), and its logits when the export returns every row's."""
    rows = max(2, chunk)
    logits = rows * shape.vocab_size * 4 * 2 if shape.full_logits else shape.vocab_size * 4
    scores = rows * context * shape.attention_heads * 4
    return rows * shape.hidden_size * ACTIVATION_BYTES_PER_HIDDEN + scores + logits


def estimate(shape: ModelShape, budgets: Budgets, *, weights_mapped: bool = False) -> PeakEstimate:
    """The expected peak of ``shape`` served with ``budgets``.

    ``weights_mapped``: the repacked weights come from their copy on disk (made at the first
    start, which holds them and the embedding table in anonymous memory once: ``first_load``).
    """
    weights = weights_bytes(shape)
    return PeakEstimate(
        weights=weights,
        runtime=RUNTIME_BYTES,
        activations=activation_bytes(
            shape, min(budgets.prefill_chunk_tokens, budgets.context_tokens), budgets.context_tokens
        ),
        kv=shape.kv_bytes_per_token * budgets.context_tokens * budgets.max_batch,
        prefix_cache=budgets.prefix_cache_mb * _MiB,
        mapped=mapped_bytes(shape),
        weights_mapped=weights_mapped,
        first_load=weights + min(shape.embedding_bytes, shape.file_bytes) + RUNTIME_BYTES
        if weights_mapped
        else 0,
    )


def weights_on_disk(options: EngineOptions) -> bool:
    """Whether the daemon serves these options' weights from their repacked copy (agent.engine.prepacked)."""
    return options.prepack_weights and options.prepacked_on_disk


def peak_need(peak: PeakEstimate) -> int:
    """The most the box must hold at once: serving, or making the repacked copy at the first start."""
    return max(peak.needed, peak.first_load)


def fit(shape: ModelShape, options: EngineOptions, memory_bytes: int) -> Budgets:
    """Budgets for ``shape`` within ``memory_bytes``: set ones kept, unset ones sized.

    Raises ``MemoryFitError`` naming the setting to change when the set ones cannot
    fit, or when the model does not fit at ``MIN_CONTEXT`` whatever the settings.
    """
    chosen = options.model_fields_set
    mapped = weights_on_disk(options)

    def need(budgets: Budgets) -> PeakEstimate:
        return estimate(shape, budgets, weights_mapped=mapped)

    def budgets(ctx: int, mb: int, rows: int) -> Budgets:
        return Budgets(
            context_tokens=ctx,
            max_batch=batch,
            prefix_cache_mb=mb,
            prefill_chunk_tokens=rows,
            prepacked_on_disk=options.prepacked_on_disk and mapped,
        )

    batch = options.max_batch
    chunk = options.prefill_chunk_tokens
    model_ctx = shape.context_length
    context = min(options.context_tokens, model_ctx) if options.context_tokens else None
    prefix_mb = options.prefix_cache_mb if "prefix_cache_mb" in chosen else None

    smallest = budgets(min(MIN_CONTEXT, model_ctx), 0, min(chunk, CHUNK_CHOICES[-1]))
    peak = need(smallest)
    if peak.needed <= memory_bytes < peak.first_load and "prepacked_on_disk" not in chosen:
        # Making the copy does not fit where serving does: repack in memory at every load instead.
        mapped = False
        peak = need(smallest)
    if peak.needed <= memory_bytes < peak.first_load:
        raise MemoryFitError(
            f"engine.prepacked_on_disk: making the repacked copy of the weights at the first start needs "
            f"~{peak.first_load / _MiB:.0f} MiB and the box has {memory_bytes / _MiB:.0f} MiB for it: "
            "set [engine] prepacked_on_disk = false"
        )
    if peak.needed > memory_bytes:
        raise MemoryFitError(
            f"model.path: the model needs {peak.describe()} at a {smallest.context_tokens}-token context "
            f"and the box has {memory_bytes / _MiB:.0f} MiB for it: serve a smaller model (or int4), "
            "or free memory"
        )
    # The prefill chunk: the configured one, or the largest that leaves the context its room.
    chunks = (
        [chunk] if "prefill_chunk_tokens" in chosen else [c for c in CHUNK_CHOICES if c <= chunk] or [chunk]
    )
    for rows in chunks:
        floor = budgets(context or min(MIN_CONTEXT, model_ctx), prefix_mb or 0, rows)
        if peak_need(need(floor)) <= memory_bytes:
            break
    else:
        floor = budgets(context or min(MIN_CONTEXT, model_ctx), prefix_mb or 0, chunks[-1])
        peak = need(floor)
        setting = _culprit(options, context, prefix_mb)
        raise MemoryFitError(
            f"engine.{setting}: with it the model needs {peak.describe()} and the box has "
            f"{memory_bytes / _MiB:.0f} MiB for it: lower [engine] {setting}"
        )
    rows = floor.prefill_chunk_tokens
    # From the shortest context (a chunk of ``rows`` fills it whole), each token more costs its KV
    # and a column of every chunk row's attention scores.
    base = min(MIN_CONTEXT, model_ctx)
    fixed = need(budgets(base, prefix_mb or 0, rows))
    per_context_token = shape.kv_bytes_per_token * batch + max(2, rows) * shape.attention_heads * 4
    if context is None:  # the longest context that fits, leaving a quarter of the rest to the prefix cache
        spare = max(0, memory_bytes - fixed.needed)
        share = spare if prefix_mb is not None else spare * 3 // 4
        context = min(model_ctx, base + share // max(1, per_context_token))
        if context < model_ctx:
            context = max(base, context // CONTEXT_STEP * CONTEXT_STEP)
    if prefix_mb is None:  # one context's worth of prompt prefixes (at least the usual 256 MiB) if it fits
        left = memory_bytes - need(budgets(context, 0, rows)).needed
        wanted = max(DEFAULT_PREFIX_CACHE_MB * _MiB, shape.kv_bytes_per_token * context)
        prefix_mb = max(0, min(left, wanted) // _MiB)
    return budgets(context, prefix_mb, rows)


def sized_options(
    shape: ModelShape, options: EngineOptions, memory_bytes: int
) -> tuple[EngineOptions, PeakEstimate]:
    """``options`` with the unset budgets sized for a model of ``shape`` in ``memory_bytes``, and the peak.

    Raises ``MemoryFitError`` (naming the setting) when it cannot fit.
    """
    chosen = fit(shape, options, memory_bytes)
    sized = options.model_copy(
        update={
            "context_tokens": chosen.context_tokens,
            "prefix_cache_mb": chosen.prefix_cache_mb,
            "prefill_chunk_tokens": chosen.prefill_chunk_tokens,
            "prepacked_on_disk": chosen.prepacked_on_disk,
        }
    )
    return sized, estimate(shape, chosen, weights_mapped=weights_on_disk(sized))


def shortened_context(shape: ModelShape, configured: EngineOptions, sized_context: int) -> str | None:
    """How to get back the context the box's sizing cut (its KV cache and the int8 copy), or None.

    Only when ``configured`` left the context unset, the box sized it below the model's own,
    and the KV cache is wider than int8 (an int8 cache holds four times float32's context).
    """
    if "context_tokens" in configured.model_fields_set or sized_context >= shape.context_length:
        return None
    if shape.kv_element_bytes <= 1:
        return None
    return (
        f"its KV cache takes {shape.kv_bytes_per_token >> 10} KiB per token ({shape.kv_element_bytes:g} bytes "
        "per value): re-exported with `python -m models.convert`, the folder offers an int8 cache beside it "
        f"(docs/memory.md), which holds about {min(shape.context_length, int(sized_context * shape.kv_element_bytes))} "
        "tokens in the same memory"
    )


def release_need(memory_bytes: int, kv_bytes_per_token: int | None, options: EngineOptions) -> int:
    """The least a release needs on a box with ``options``: its measured memory, the runtime and a minimal context.

    ``memory_bytes`` is what loading it and running its smoke test took at release;
    the context is the configured one, or ``MIN_CONTEXT`` when the box sizes it.
    """
    context = options.context_tokens or MIN_CONTEXT
    prefix = options.prefix_cache_mb * _MiB if "prefix_cache_mb" in options.model_fields_set else 0
    kv = (kv_bytes_per_token or 0) * context * options.max_batch
    return memory_bytes + RUNTIME_BYTES + kv + prefix


def _culprit(options: EngineOptions, context: int | None, prefix_mb: int | None) -> str:
    """The set option that weighs most: the one to lower."""
    if prefix_mb:
        return "prefix_cache_mb"
    if options.max_batch > 1:
        return "max_batch"
    if context is not None:
        return "context_tokens"
    return "prefill_chunk_tokens"


def model_shape(path: str | Path, graph_path: Path | None = None) -> ModelShape:
    """The shape of the model folder at ``path`` (genai_config.json, the graph's KV type, file sizes).

    ``graph_path``: one of the folder's graphs (``agent.engine.kv_variants``), else genai_config.json's.
    """
    from agent.engine.model_folder import ModelFolder
    from agent.engine.onnx_graph import read_graph

    folder = ModelFolder(path)
    decoder = folder.config.model.decoder
    onnx_path = graph_path or folder.onnx_path
    graph = read_graph(onnx_path)
    past = decoder.inputs.past_key_names % 0
    element = graph.input_element_bytes(past) or 4.0
    files = [onnx_path, *sorted(folder.path.glob("*.data"))]
    kv = 2 * decoder.num_hidden_layers * decoder.num_key_value_heads * decoder.head_size * element
    logits = graph.output_dims.get(decoder.outputs.logits, ())
    vocab, hidden = folder.config.model.vocab_size, decoder.hidden_size
    # The token-embedding table: vocab rows read by a Gather (float) or a GatherBlockQuantized (with
    # its scales: models.embedding), never repacked.
    read_by_rows = {
        name
        for node in graph.nodes
        if node.op_type in ("Gather", "GatherBlockQuantized")
        for name in (node.inputs[:1] if node.op_type == "Gather" else node.inputs[:1] + node.inputs[2:4])
    }
    # A table tied to the lm_head (the same tensor read by a MatMulNBits too) is repacked: not counted.
    read_by_rows -= {
        name
        for node in graph.nodes
        if node.op_type not in ("Gather", "GatherBlockQuantized")
        for name in node.inputs
    }
    tables = [sum(i.nbytes for i in graph.initializers if i.name in read_by_rows and i.dims[:1] == (vocab,))]
    by_name = {i.name: i for i in graph.initializers}
    quantized = repacked = 0
    for node in graph.nodes:
        packed = (
            by_name.get(node.inputs[1]) if node.op_type == "MatMulNBits" and len(node.inputs) > 1 else None
        )
        if packed is None or len(packed.dims) != 3:
            continue
        quantized += sum(by_name[n].nbytes for n in node.inputs[1:4] if n in by_name)
        repacked += repacked_matrix_bytes(*packed.dims)
    return ModelShape(
        file_bytes=sum(p.stat().st_size for p in files if p.is_file()),
        embedding_bytes=max(tables, default=0),
        kv_bytes_per_token=int(kv),
        quantized_bytes=quantized,
        repacked_bytes=repacked,
        kv_element_bytes=float(element),
        hidden_size=hidden,
        attention_heads=decoder.num_attention_heads,
        vocab_size=vocab,
        context_length=folder.context_length,
        # A pruned lm_head (the prompt pass returns the last position only) declares 1 row; a
        # row-keeping one (``models.logits_rows``) returns the rows a chunk asks for: one or two.
        full_logits=(len(logits) < 2 or logits[1] != 1) and "num_logits_to_keep" not in graph.input_types,
        kv_calibration=graph.metadata.get(KV_CALIBRATION_KEY, ""),
    )
