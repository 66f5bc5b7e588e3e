"""Make a model's lm_head compute logits for the last ``num_logits_to_keep`` rows of a pass only.

    python -m models.logits_rows MODEL_DIR

onnxruntime-genai's builder exports either every row's logits (a prefill chunk
of 512 tokens pays the lm_head 512 times: ~18 % of a cold prefill at
Phi-3-mini's shape) or, with ``prune_lm_head``, the last row's only (a
``Gather`` of row -1 before the lm_head), which cannot verify speculative
drafts.  This rewrite puts ``Slice(hidden, starts=-N, ends=MAX, axes=[1])``
before the lm_head ``MatMul``/``MatMulNBits``, N a new int64 graph input
``num_logits_to_keep`` of shape ``[1]`` (Hugging Face's name for the same
thing; llama.cpp marks rows in its ``llama_batch``): a prefill chunk asks for
one or two rows, a verify pass for the rows it checks, a decode pass for its
one.  N = 0 keeps every row (as ``x[:, -0:]`` does in transformers), and so
does an N larger than the pass.  A pruned export's ``Gather`` is removed.

The input is also an initializer holding ``[0]`` (an ONNX graph input with a
default: onnxruntime's "overridable initializer"), so a runtime that does not
know it (onnxruntime-genai, an older engine) gets every row, as from the
full-logits export.  Only ``model.onnx`` is rewritten (written beside, then
renamed); the weights file is not touched.  ``models.convert`` applies it by
default; the engine finds the input and feeds it (``agent.engine.engine``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT = "num_logits_to_keep"
ROWS_DIM = "logits_rows"
_MATMULS = ("MatMul", "MatMulNBits")
_PREFIX = "/lm_head/keep"


def lm_head(model: onnx.ModelProto, logits: str) -> onnx.NodeProto:
    """The ``MatMul``/``MatMulNBits`` the ``logits`` output comes from (through a bias ``Add`` or a ``Cast``)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    name = logits
    for _ in range(4):
        node = producers.get(name)
        if node is None:
            break
        if node.op_type in _MATMULS:
            return node
        name = node.input[0]
    raise SystemExit(
        f"error: no MatMul/MatMulNBits computes {logits!r}: not a decoder graph this rewrite knows"
    )


def _unpruned(model: onnx.ModelProto, head: onnx.NodeProto) -> str:
    """The hidden state ``head`` reads, before a ``prune_lm_head`` Gather/Unsqueeze (removed if found)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    unsqueeze = producers.get(head.input[0])
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
        return head.input[0]
    gather = producers.get(unsqueeze.input[0])
    if gather is None or gather.op_type != "Gather":
        return head.input[0]
    readers = [n for n in model.graph.node if set(n.input) & {*unsqueeze.output, *gather.output}]
    if readers != [head, unsqueeze] and readers != [unsqueeze, head]:
        return head.input[0]  # another node reads the last row: leave the chain be
    model.graph.node.remove(unsqueeze)
    model.graph.node.remove(gather)
    return gather.input[0]


def keep_rows(model_dir: Path) -> bool:
    """Rewrite ``model_dir``'s graph so its lm_head takes the last ``num_logits_to_keep`` rows; False: done already."""
    config = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
    decoder = config["model"]["decoder"]
    graph_file = model_dir / decoder["filename"]
    logits = decoder["outputs"].get("logits", "logits")
    model = onnx.load(str(graph_file), load_external_data=False)
    graph = model.graph
    if any(i.name == INPUT for i in graph.input):
        return False
    head = lm_head(model, logits)
    hidden = _unpruned(model, head)
    sliced = f"{_PREFIX}/Slice/output_0"
    nodes = [
        helper.make_node("Neg", [INPUT], [f"{_PREFIX}/Neg/output_0"], name=f"{_PREFIX}/Neg"),
        helper.make_node(
            "Slice",
            [hidden, f"{_PREFIX}/Neg/output_0", f"{_PREFIX}/ends", f"{_PREFIX}/axes"],
            [sliced],
            name=f"{_PREFIX}/Slice",
        ),
    ]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], dtype=np.int64), INPUT),  # the default: every row
            numpy_helper.from_array(np.array([np.iinfo(np.int64).max], dtype=np.int64), f"{_PREFIX}/ends"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), f"{_PREFIX}/axes"),
        ]
    )
    graph.input.append(helper.make_tensor_value_info(INPUT, TensorProto.INT64, [1]))
    index = list(graph.node).index(head)
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    head.input[0] = sliced
    for output in graph.output:
        if output.name == logits and len(output.type.tensor_type.shape.dim) == 3:
            dim = output.type.tensor_type.shape.dim[1]
            dim.Clear()
            dim.dim_param = ROWS_DIM
    _save(model, graph_file)
    return True


def _save(model: onnx.ModelProto, graph_file: Path) -> None:
    """Write the graph (its weights stay where they are) beside ``graph_file`` and rename it over."""
    with tempfile.NamedTemporaryFile(dir=graph_file.parent, prefix=".logits-rows-", delete=False) as tmp:
        tmp.write(model.SerializeToString())
    os.chmod(tmp.name, graph_file.stat().st_mode & 0o777)
    os.replace(tmp.name, graph_file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir", type=Path)
    args = parser.parse_args(argv)
    if keep_rows(args.model_dir):
        print(f"{args.model_dir}: the lm_head now computes the last {INPUT} rows (default: every row)")
    else:
        print(f"{args.model_dir}: already takes {INPUT}; nothing to do")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
