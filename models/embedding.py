"""Store a model's token-embedding table as int8 blocks: the float32 ``Gather`` becomes a ``GatherBlockQuantized``.

    python -m models.embedding MODEL_DIR [--block-size 32]

onnxruntime-genai's builder exports the embedding table in float32 even for an
int4/int8 model (Phi-3-mini: 32064 x 3072 x 4 B = 376 MiB, every byte of it
resident once prompts have touched most rows).  This rewrite quantizes the table
symmetrically per block of ``block_size`` values along the hidden axis (one
float32 scale per block, int8 values stored as uint8 around onnxruntime's default
zero point 128) and reads it with onnxruntime's contrib ``GatherBlockQuantized``
(com.microsoft, ``bits`` 8, ``gather_axis`` 0, ``quantize_axis`` 1), which
dequantizes only the gathered rows: 1 + 4/block bytes per value instead of 4
(0.28x at block 32).  The lm_head is not touched (the builder already quantizes it).

What it changes: each embedding value moves by at most half a step of its block
(max |w| / 254), so the logits change slightly and a greedy token can differ where
the two best candidates are nearly tied (measured on the fixtures:
docs/memory.md).  ``models.convert`` applies it by default (``--float-embedding``
keeps the builder's table).  The graph and its external data file are rewritten
in place (written beside, then renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

BLOCK_SIZES: tuple[int, ...] = (16, 32, 64, 128, 256)
ZERO_POINT = 128  # GatherBlockQuantized's default for uint8 data without zero_points
QMAX = 127


def quantize_rows(table: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per-block quantization of ``table`` (rows x hidden): (uint8 values, float32 scales)."""
    rows, hidden = table.shape
    if hidden % block_size:
        raise ValueError(f"hidden size {hidden} is not a multiple of block size {block_size}")
    blocks = table.astype(np.float32).reshape(rows, hidden // block_size, block_size)
    scales = np.abs(blocks).max(axis=-1) / QMAX
    scales[scales == 0] = 1.0
    values = np.clip(np.rint(blocks / scales[..., None]), -QMAX, QMAX).astype(np.int16) + ZERO_POINT
    return values.astype(np.uint8).reshape(rows, hidden), scales.astype(np.float32)


def dequantize_rows(values: np.ndarray, scales: np.ndarray, block_size: int) -> np.ndarray:
    """What ``GatherBlockQuantized`` returns for every row (float32)."""
    rows, hidden = values.shape
    blocks = (values.astype(np.float32) - ZERO_POINT).reshape(rows, hidden // block_size, block_size)
    return (blocks * scales[..., None]).reshape(rows, hidden)


def _embedding_gather(model: onnx.ModelProto, input_ids: str) -> onnx.NodeProto | None:
    """The float ``Gather`` reading token rows of a table initializer by ``input_ids`` (None if there is none)."""
    names = {init.name for init in model.graph.initializer}
    for node in model.graph.node:
        official = node.op_type == "Gather" and node.domain in ("", "ai.onnx") and len(node.input) == 2
        if official and node.input[1] == input_ids and node.input[0] in names:
            return node
    return None


def quantize_embedding(model_dir: Path, block_size: int = 32) -> int:
    """Rewrite ``model_dir``'s embedding ``Gather`` as an int8 ``GatherBlockQuantized``; bytes saved (0: nothing to do).

    Raises ``SystemExit`` naming the problem when the table is tied to another node
    (it would be read twice, once quantized) or its width does not divide into blocks.
    """
    if block_size not in BLOCK_SIZES:
        raise SystemExit(f"error: --block-size must be one of {BLOCK_SIZES}")
    config = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
    decoder = config["model"]["decoder"]
    graph_file = model_dir / decoder["filename"]
    input_ids = decoder["inputs"].get("input_ids", "input_ids")
    old_data = _external_files(graph_file)
    model = onnx.load(str(graph_file), load_external_data=True)
    gather = _embedding_gather(model, input_ids)
    if gather is None:
        return 0  # already quantized (or the builder's int4 GatherBlockQuantized)
    table_name = gather.input[0]
    readers = [n for n in model.graph.node if table_name in n.input]
    if len(readers) != 1:
        raise SystemExit(f"error: {graph_file}: {table_name} is read by {len(readers)} nodes (tied weights)")
    init = next(i for i in model.graph.initializer if i.name == table_name)
    table = numpy_helper.to_array(init)
    if table.ndim != 2 or table.dtype not in (np.float32, np.float16):
        raise SystemExit(
            f"error: {graph_file}: {table_name} is {table.dtype} {table.shape}, not a float table"
        )
    if table.shape[1] % block_size:
        raise SystemExit(
            f"error: hidden size {table.shape[1]} is not a multiple of --block-size {block_size}"
        )
    values, scales = quantize_rows(table, block_size)
    if table.dtype == np.float16:
        scales = scales.astype(np.float16)  # GatherBlockQuantized's output takes the scales' type
    saved = int(table.nbytes - values.nbytes - scales.nbytes)
    del table
    model.graph.initializer.remove(init)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(values, f"{table_name}_Q8"),
            numpy_helper.from_array(scales, f"{table_name}_scales"),
        ]
    )
    quantized = helper.make_node(
        "GatherBlockQuantized",
        [f"{table_name}_Q8", gather.input[1], f"{table_name}_scales"],
        list(gather.output),
        name=gather.name.rsplit("/", 1)[0] + "/GatherBlockQuantized",
        domain="com.microsoft",
        gather_axis=0,
        quantize_axis=1,
        block_size=block_size,
        bits=8,
    )
    nodes = list(model.graph.node)
    index = nodes.index(gather)
    model.graph.node.remove(gather)
    model.graph.node.insert(index, quantized)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _save(model, graph_file)
    for path in old_data - {graph_file.parent / (graph_file.name + ".data")}:
        path.unlink(missing_ok=True)
    return saved


def _external_files(graph_file: Path) -> set[Path]:
    """The external data files ``graph_file``'s initializers name."""
    model = onnx.load(str(graph_file), load_external_data=False)
    return {
        graph_file.parent / entry.value
        for init in model.graph.initializer
        for entry in init.external_data
        if entry.key == "location"
    }


def _save(model: onnx.ModelProto, graph_file: Path) -> None:
    """Write the graph and its external data beside ``graph_file`` and rename both over the old files."""
    data_name = graph_file.name + ".data"
    with tempfile.TemporaryDirectory(prefix=".embedding-", dir=graph_file.parent) as tmp:
        staged = Path(tmp) / graph_file.name
        onnx.save_model(
            model,
            str(staged),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        mode = graph_file.stat().st_mode & 0o777
        for name in (data_name, graph_file.name):
            os.chmod(Path(tmp) / name, mode)  # the staged files are private (0600) like their folder
        os.replace(Path(tmp) / data_name, graph_file.parent / data_name)
        os.replace(staged, graph_file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--block-size", type=int, choices=BLOCK_SIZES, default=32)
    args = parser.parse_args(argv)
    saved = quantize_embedding(args.model_dir, args.block_size)
    if saved:
        print(
            f"{args.model_dir}: embedding table int8 (block {args.block_size}), {saved / 2**20:.1f} MiB smaller"
        )
    else:
        print(f"{args.model_dir}: no float embedding Gather; nothing to do")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
