"""Store a model's KV cache in float16: the graph's past/present tensors change type, nothing else.

    python -m models.kv_dtype MODEL_DIR [--dtype float16|float32]

onnxruntime's CPU ``GroupQueryAttention`` (1.32) takes a cache type
``T_CACHE`` apart from its float32 activations ``T``: with float16 past and
present tensors the kernel rounds the new keys and values into the cache and
reads them back widened, so a float32 graph gets a half-size cache by changing
the declared type of its ``past_key_values.*`` inputs and ``present.*`` outputs
(no node is added; the weights file is not touched).  The engine takes the
cache type from the graph, so a rewritten folder needs no setting.  Only
``model.onnx`` is rewritten, in place; its external data stays where it is.

What it costs (measured, docs/memory.md): keys and values are rounded to float16,
tokens then depend on the prefill chunk size and a prefix-cache hit can change them
(the kernel reads some rows rounded and others not), the prefill peak is higher
than with float32 (the kernel widens the cache into float32 scratch) and decode is
slower.  A tool for measurements, not a recommended export.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnx

DTYPES = {"float16": onnx.TensorProto.FLOAT16, "float32": onnx.TensorProto.FLOAT}


def kv_names(model_dir: Path) -> tuple[Path, set[str]]:
    """The graph file and the names of its past and present key/value tensors (from genai_config.json)."""
    config = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
    decoder = config["model"]["decoder"]
    layers = int(decoder["num_hidden_layers"])
    names = {
        pattern % i
        for i in range(layers)
        for pattern in (
            decoder["inputs"]["past_key_names"],
            decoder["inputs"]["past_value_names"],
            decoder["outputs"]["present_key_names"],
            decoder["outputs"]["present_value_names"],
        )
    }
    return model_dir / decoder["filename"], names


def set_kv_dtype(model_dir: Path, dtype: str) -> int:
    """Declare every past/present tensor of ``model_dir``'s graph as ``dtype``; returns how many changed."""
    if dtype not in DTYPES:
        raise SystemExit(f"error: --dtype must be one of {', '.join(DTYPES)}")
    graph_file, names = kv_names(model_dir)
    model = onnx.load(str(graph_file), load_external_data=False)
    changed = 0
    seen = set()
    for value in [*model.graph.input, *model.graph.output]:
        if value.name in names:
            seen.add(value.name)
            if value.type.tensor_type.elem_type != DTYPES[dtype]:
                value.type.tensor_type.elem_type = DTYPES[dtype]
                changed += 1
    missing = names - seen
    if missing:
        raise SystemExit(f"error: {graph_file} lacks {len(missing)} KV tensors named in genai_config.json")
    if changed:
        onnx.save(model, str(graph_file))
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    args = parser.parse_args(argv)
    changed = set_kv_dtype(args.model_dir, args.dtype)
    print(f"{args.model_dir}: {changed} KV tensors now {args.dtype}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
