"""Which KV cache the daemon serves a model with, and the budgets that go with it: a pure decision.

A folder ``models.convert`` wrote offers a float32 and an int8 cache (``agent.engine.kv_variants``);
``[engine] kv_cache`` picks one, or ``auto`` (the default) lets the box choose:

* **float32** when the model's context (or the operator's ``context_tokens``) fits the box's
  memory with it (``memory_plan.sized_options``): the exact cache, when memory allows;
* else **int8** when the folder offers it and its accuracy bound holds (``int8_kv_trusted``: scales
  calibrated with the vocabulary sweep, on every CPU family; scales from text alone, on x86-64
  only): a quarter of the bytes per token, a longer context in the same memory;
* else float32 with the context the box can hold (the sizing cuts it; the reason says why not int8).

An explicit cache the folder lacks is refused naming the fix; an explicit ``int8`` where its
bound is not trusted is served with a warning.  No I/O here: the caller reads the shapes
(``kv_variants.variant_shapes``), the box's memory and its machine.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from agent.engine.kv_variants import KvCache, missing_cache
from agent.engine.memory_plan import ModelShape, PeakEstimate, shortened_context, sized_options
from agent.engine.options import EngineOptions
from edge_contract.errors import MemoryFitError, ModelConfigError

#: CPU families (``platform.machine()``) where an int8 KV cache whose scales were calibrated on
#: text alone met its accuracy bound (``KV_INT8_GAP`` logits of the float32 cache's arg-max,
#: tests/integration/test_kv_quant.py): x86-64. On emulated aarch64 such scales failed it (one
#: token 3.2 logits off: keys of tokens the text lacked were clamped, docs/memory.md); scales
#: calibrated with the vocabulary sweep meet it on x86-64 and emulated aarch64 alike.
INT8_KV_TRUSTED = frozenset({"x86_64", "amd64"})
#: What marks sweep-calibrated scales in the graph's calibration metadata (``models.kv_quant``).
SWEPT = "vocabulary sweep in sequences of"
#: Named by the warning where the scales are not trusted.
INT8_KV_ISSUE = (
    "its scales were calibrated on text alone, which failed the accuracy bound on aarch64 (issue 23, "
    "docs/memory.md): convert the model again with `python -m models.convert`"
)


def int8_kv_trusted(machine: str, calibration: str = "") -> bool:
    """Whether an int8 KV cache calibrated as ``calibration`` says meets its accuracy bound on ``machine``."""
    return SWEPT in calibration or machine.lower() in INT8_KV_TRUSTED


class KvChoice(BaseModel):
    """The cache chosen, why, and the options and peak that go with it."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    cache: KvCache = Field(description="The KV cache's element type served.")
    reason: str = Field(description="Why, in a few words (logged at start, telemetry, doctor).")
    warning: str | None = Field(None, description="Served against advice (int8 where it is not trusted).")
    options: EngineOptions = Field(description="The engine options: budgets sized, kv_cache resolved.")
    peak: PeakEstimate
    shape: ModelShape = Field(description="The model's shape with this cache.")

    def describe(self) -> str:
        """``int8 KV cache (why)``."""
        return f"{self.cache} KV cache ({self.reason})"


def choose(
    shapes: Mapping[KvCache, ModelShape],
    options: EngineOptions,
    memory_bytes: int,
    *,
    machine: str,
    name: str = "the model",
) -> KvChoice:
    """The cache among ``shapes`` (the folder's, its default first) for ``options`` in ``memory_bytes``.

    Raises ``ModelConfigError`` for an explicit cache the folder lacks and ``MemoryFitError``
    (naming the setting) when nothing fits.
    """
    caches = list(shapes)
    setting = options.kv_cache
    int8_shape = shapes.get("int8")
    trusted = int8_kv_trusted(machine, int8_shape.kv_calibration if int8_shape is not None else "")
    untrusted = None if trusted else f"int8 KV on {machine}: {INT8_KV_ISSUE}"
    if setting != "auto":
        if setting not in shapes:
            raise ModelConfigError(missing_cache(name, setting, [str(c) for c in caches]))
        return _sized(shapes, setting, options, memory_bytes, "set in [engine] kv_cache", untrusted)
    if len(caches) == 1:
        only = caches[0]
        warning = untrusted if only == "int8" else None
        alone = _sized(shapes, only, options, memory_bytes, "the only cache the model folder has", warning)
        hint = shortened_context(alone.shape, options, alone.options.context_tokens or 0)
        if hint is None:
            return alone
        cut = f"; the context is cut to {alone.options.context_tokens} of {alone.shape.context_length} tokens"
        return alone.model_copy(update={"reason": f"{alone.reason}{cut}: {hint}"})
    # float32 first, whichever graph genai_config.json names (``models.convert --int8-kv``: the int8 one).
    default: KvCache = "float32" if "float32" in shapes else caches[0]
    wanted = min(options.context_tokens or shapes[default].context_length, shapes[default].context_length)
    try:
        first = _sized(shapes, default, options, memory_bytes, "", None)
    except MemoryFitError as exc:
        first, failure = None, exc
    if first is not None and (first.options.context_tokens or 0) >= wanted:
        why = f"its {wanted}-token context fits with it"
        return first.model_copy(update={"reason": why})
    short = (
        f"{default} would cut the context to {first.options.context_tokens} of {wanted} tokens"
        if first is not None
        else f"{default} does not fit ({failure.message.split(':', 1)[0]})"
    )
    if "int8" not in shapes or default == "int8" or not trusted:
        why = (
            "the folder has no int8-KV graph: re-export it with `python -m models.convert`"
            if "int8" not in shapes
            else f"int8 KV is not trusted on {machine} ({INT8_KV_ISSUE})"
        )
        if first is None:
            raise failure
        return first.model_copy(update={"reason": f"{short}; {why}"})
    try:
        int8 = _sized(shapes, "int8", options, memory_bytes, "", None)
    except MemoryFitError:
        if first is None:
            raise
        return first.model_copy(update={"reason": f"{short}; int8 does not fit either"})
    held = int8.options.context_tokens
    return int8.model_copy(update={"reason": f"{short}; int8 holds {held}"})


def _sized(
    shapes: Mapping[KvCache, ModelShape],
    cache: KvCache,
    options: EngineOptions,
    memory_bytes: int,
    reason: str,
    warning: str | None,
) -> KvChoice:
    shape = shapes[cache]
    # The engine opens the graph named by kv_cache; float16 (an older export's only graph) is its default.
    resolved = options.model_copy(update={"kv_cache": cache if cache != "float16" else "auto"})
    sized, peak = sized_options(shape, resolved, memory_bytes)
    return KvChoice(
        cache=cache,
        reason=reason,
        warning=warning if cache == "int8" else None,
        options=sized,
        peak=peak,
        shape=shape,
    )


def release_kv_options(
    kv_bytes_per_token: int | None,
    kv_int8_bytes_per_token: int | None,
    options: EngineOptions,
) -> dict[str, int | None]:
    """The KV bytes per token a release may be served with on this box, by cache (a manifest's figures).

    The default graph's always (``kv_bytes_per_token``), but for an explicit ``int8`` on a release
    that offers it; its int8 cache's too when it offers one and ``auto`` may choose it. A manifest
    names an int8 figure only for a graph calibrated with the vocabulary sweep (``edge-fleet
    release``), which every CPU family trusts (``int8_kv_trusted``).
    """
    if kv_int8_bytes_per_token is not None and options.kv_cache == "int8":
        return {"int8": kv_int8_bytes_per_token}
    caches: dict[str, int | None] = {"default": kv_bytes_per_token}
    if kv_int8_bytes_per_token is not None and options.kv_cache == "auto":
        caches["int8"] = kv_int8_bytes_per_token
    return caches
