"""Give a model folder an int8-KV graph beside its float32-KV one, sharing its weights file.

    python -m models.kv_variants MODEL_DIR

``models.convert`` runs it on every export. The scales are calibrated on the folder's
float graph (``models.kv_quant.observe``), then ``models.kv_quant.quantize_kv`` rewrites a
copy of the graph file alone in a scratch folder (it is small: the weights are external
data, referenced by a relative name, and stay where they are), which is moved in as
``INT8_GRAPH``; ``kv_variants.json`` lists both (``agent.engine.kv_variants``), and the
daemon picks one at start (``[engine] kv_cache``, ``agent.engine.kv_choice``).
``default_int8`` makes the int8 graph the one genai_config.json names (what runtimes that
read one graph open: onnxruntime-genai, agents before ``kv_cache``).

Why two graphs rather than scales rewritten into the graph at load: the daemon then
needs neither the ``onnx`` package nor a graph rewrite at every start, the repacked
copy (``agent.engine.prepacked``) is keyed by a file's digest as it is, and an int8-KV
graph costs the disk only its own size (947 KiB at Phi-3-mini's shape, docs/memory.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from agent.engine.kv_variants import VARIANTS_FILE, KvVariant, KvVariants
from agent.engine.model_folder import CONFIG_FILE, ModelFolder
from models import kv_quant

INT8_GRAPH = "model.kv-int8.onnx"


def add_int8_variant(
    model_dir: Path,
    tokens: int = 1024,
    chunk: int = 256,
    margin: float = kv_quant.MARGIN,
    *,
    sweep: int = kv_quant.SWEEP,
    default_int8: bool = False,
) -> Path:
    """Write ``model_dir``'s int8-KV graph and ``kv_variants.json``; returns the int8 graph's path."""
    folder = ModelFolder(model_dir)
    graph = folder.onnx_path
    if graph.name == INT8_GRAPH or (model_dir / VARIANTS_FILE).is_file():
        raise SystemExit(f"error: {model_dir} has KV variants already ({VARIANTS_FILE})")
    scales, how = kv_quant.calibrated_scales(model_dir, tokens, chunk, margin, sweep)
    with tempfile.TemporaryDirectory(dir=model_dir, prefix=".kv-int8-") as scratch:
        work = Path(scratch)
        shutil.copy2(model_dir / CONFIG_FILE, work / CONFIG_FILE)
        shutil.copy2(graph, work / graph.name)
        kv_quant.quantize_kv(work, scales, how)
        os.replace(work / graph.name, model_dir / INT8_GRAPH)
    variants = KvVariants(
        format=1,
        variants={
            "float32": KvVariant(graph=graph.name),
            "int8": KvVariant(
                graph=INT8_GRAPH, calibration_tokens=min(tokens, folder.context_length), margin=margin
            ),
        },
    )
    (model_dir / VARIANTS_FILE).write_text(variants.model_dump_json(indent=1, exclude_none=True) + "\n")
    if default_int8:
        config = json.loads((model_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        config["model"]["decoder"]["filename"] = INT8_GRAPH
        (model_dir / CONFIG_FILE).write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
    return model_dir / INT8_GRAPH


def main(argv: list[str] | None = None) -> int:
    """Add the int8-KV graph to an existing folder (``models.kv_quant``'s defaults for the scales)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    written = add_int8_variant(parser.parse_args(argv).model_dir)
    print(f"wrote {written} (int8 KV cache) and {VARIANTS_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
