"""Which KV caches a model folder offers: its graphs by cache element type (``kv_variants.json``).

``python -m models.convert`` writes, beside the float32-KV graph that ``genai_config.json``
names, an int8-KV graph sharing the same external weights file (``models.kv_variants``:
scales calibrated on the float graph, ``models.kv_quant``), and lists both here:

    {"format": 1, "variants": {"float32": {"graph": "model.onnx"},
                               "int8": {"graph": "model.kv-int8.onnx"}}}

A folder without the file (older exports, the fixtures, onnxruntime-genai's builder
alone) offers one cache: its graph's, named by the graph's past-key element type. The
engine opens the graph of the cache it is told (``[engine] kv_cache``, resolved by the
daemon's sizing: ``agent.engine.kv_choice``); ``auto`` outside the daemon is the
folder's default graph.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.engine.memory_plan import ModelShape, model_shape
from agent.engine.model_folder import ModelFolder
from agent.engine.onnx_graph import read_graph
from edge_contract.errors import ModelConfigError, ModelFileError

log = logging.getLogger(__name__)

VARIANTS_FILE = "kv_variants.json"
FORMAT_VERSION = 1
#: A cache's element type as the graph declares it, by bytes per value.
KvCache = Literal["float32", "float16", "int8"]
_BY_BYTES: dict[float, KvCache] = {4.0: "float32", 2.0: "float16", 1.0: "int8"}


class KvVariant(BaseModel):
    """One graph of the folder and how its cache was made."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    graph: str = Field(description="The graph's file name in the folder (it shares the folder's weights).")
    calibration_tokens: int | None = Field(
        None, ge=1, description="int8: tokens of models.demo_corpus text the scales were calibrated on."
    )
    margin: float | None = Field(None, ge=1.0, description="int8: the calibrated range's margin.")

    @field_validator("graph")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if Path(value).name != value or value in ("", ".", "..") or not value.endswith(".onnx"):
            raise ValueError("must be an .onnx file name inside the model folder")
        return value


class KvVariants(BaseModel):
    """``kv_variants.json``: the folder's graphs by KV cache element type."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    format: Literal[1] = Field(description="This module's FORMAT_VERSION.")
    # The caches [engine] kv_cache can name (a float16 graph is served only as a folder's one graph).
    variants: dict[Literal["float32", "int8"], KvVariant] = Field(min_length=1)


def read_variants(folder: Path) -> KvVariants | None:
    """The folder's ``kv_variants.json``, None when absent; ``ModelConfigError`` when invalid."""
    path = folder / VARIANTS_FILE
    if not path.is_file():
        return None
    try:
        return KvVariants.model_validate_json(path.read_bytes())
    except (OSError, ValidationError) as exc:
        raise ModelConfigError(
            f"{path}: {exc}; re-export the model with `python -m models.convert` or remove the file"
        ) from exc


def graph_cache(graph: Path, folder: ModelFolder) -> KvCache:
    """The element type of ``graph``'s KV cache (its first past-key input)."""
    past = folder.config.model.decoder.inputs.past_key_names % 0
    element = read_graph(graph).input_element_bytes(past) or 4.0
    return _BY_BYTES.get(float(element), "float32")


def offered(folder: ModelFolder) -> dict[KvCache, Path]:
    """The graphs of the caches ``folder`` offers, the default (genai_config.json's) first."""
    listed = read_variants(folder.path)
    if listed is None:
        return {graph_cache(folder.onnx_path, folder): folder.onnx_path}
    graphs: dict[KvCache, Path] = {}
    for cache, variant in listed.variants.items():
        path = folder.path / variant.graph
        if not path.is_file():
            raise ModelFileError(path, f"missing (listed in {VARIANTS_FILE})")
        graphs[cache] = path
    default = [c for c, p in graphs.items() if p.name == folder.onnx_path.name]
    if not default:
        raise ModelConfigError(
            f"{folder.path / VARIANTS_FILE}: does not list {folder.onnx_path.name}, the graph genai_config.json "
            "names; re-export the model with `python -m models.convert`"
        )
    return {default[0]: graphs.pop(default[0]), **graphs}


def graph_for(folder: ModelFolder, setting: str) -> Path:
    """The graph to open for ``[engine] kv_cache`` = ``setting`` (``auto``: the folder's default graph)."""
    if setting == "auto":
        return folder.onnx_path
    graphs = offered(folder)
    for cache, graph in graphs.items():
        if cache == setting:
            return graph
    raise ModelConfigError(missing_cache(folder.name, setting, list(graphs)))


def missing_cache(name: str, setting: str, caches: list[str]) -> str:
    """The one line refusing ``kv_cache = setting`` on a folder offering ``caches``, naming the fix."""
    return (
        f"engine.kv_cache: model {name} has no {setting} KV cache (it has {', '.join(caches)}): re-export it "
        "with `python -m models.convert` (which writes both; `python -m models.kv_variants MODEL_DIR` adds "
        f'the int8 one to a float32 folder), or set [engine] kv_cache = "auto"'
    )


def variant_shapes(path: str | Path) -> dict[KvCache, ModelShape]:
    """The shape of the model at ``path`` with each cache it offers, the default first."""
    folder = ModelFolder(path)
    shapes: dict[KvCache, ModelShape] = {}
    for number, (cache, graph) in enumerate(offered(folder).items()):
        try:
            shapes[cache] = model_shape(path, graph)
        except ModelFileError as exc:
            if number == 0:  # the default graph: the model cannot be served without it
                raise
            # Another cache's graph damaged after install: serve the others, and say how to mend it.
            log.warning(
                "%s; the %s KV cache is not offered: run `python -m models.kv_variants %s` again after "
                "removing %s and %s, or re-export the model",
                exc.message,
                cache,
                folder.path,
                graph.name,
                VARIANTS_FILE,
            )
    for cache, shape in shapes.items():
        if _BY_BYTES.get(shape.kv_element_bytes) != cache:
            raise ModelConfigError(
                f"{folder.path / VARIANTS_FILE}: the graph of its {cache} entry has a "
                f"{_BY_BYTES.get(shape.kv_element_bytes, shape.kv_element_bytes)} KV cache; re-export the model "
                "with `python -m models.convert`"
            )
    return shapes


def served_files(folder: ModelFolder, graph: Path) -> list[Path]:
    """The folder's files the engine reads serving ``graph``: not the other caches' graphs."""
    others = {p.name for p in offered(folder).values()} - {graph.name}
    return [p for p in folder.path.iterdir() if p.is_file() and p.name not in others]
