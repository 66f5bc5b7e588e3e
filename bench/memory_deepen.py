"""A full-depth model from a few-layer builder export, with bounded memory (for ``memory_bench``).

The builder's 32-layer Phi-3-mini export peaks at ~22 GB of RAM.  This makes the
same graph at any depth from the 4-layer export instead: layers 0 and 1 are
kept, layer 2's nodes are repeated as layers 2 .. L-2 (layer 3's as L-1, the
final norm as L), and each new layer's initializers are copies of the template
layer's bytes written one at a time into a new external data file.  The result
has every per-layer page the real model has (weights, KV, repacked copies), so
its memory and speed are a full-size model's; its values are the template's
(each copy of a 4-bit matrix rotated by a few bytes, so that no two layers are
identical: onnxruntime shares one repacked copy of identical weights), so its
tokens are not a real model's (no one reads them).  Copies to
``/work/cache`` by default, never built in CI.

    python bench/memory_deepen.py bench/models/phi3-mini-shape-4l-int4 32 /work/cache/phi3-mini-shape-32l-int4
"""

from __future__ import annotations

import copy
import json
import mmap
import re
import shutil
import sys
from pathlib import Path

_INDEX = re.compile(r"(layers\.|past_key_values\.|present\.)(\d+)")
_ALIGN = 4096


def renumber(text: str, mapping: dict[int, int]) -> str:
    """``text`` with each layer index in ``mapping`` replaced (``layers.2`` -> ``layers.7``)."""
    return _INDEX.sub(lambda m: m.group(1) + str(mapping.get(int(m.group(2)), int(m.group(2)))), text)


def deepen(source: Path, layers: int, out: Path) -> Path:
    """Write ``source`` (a 4-layer builder export) deepened to ``layers`` layers into ``out``."""
    import onnx

    model = onnx.load(str(source / "model.onnx"), load_external_data=False)
    graph = model.graph
    have = sum(1 for i in graph.input if i.name.startswith("past_key_values.") and i.name.endswith(".key"))
    if have != 4 or layers < 4:
        raise SystemExit(f"{source}: want a 4-layer export and at least 4 layers (it has {have})")

    def index_of(name: str) -> int | None:
        found = re.search(r"layers\.(\d+)[/.]", name)
        return int(found.group(1)) if found else None

    # Which source layer each new layer repeats, and the renumbering that makes it.
    plans: list[tuple[int, dict[int, int]]] = [(0, {}), (1, {})]
    plans += [(2, {2: j, 1: j - 1}) for j in range(2, layers - 1)]
    plans += [(3, {3: layers - 1, 2: layers - 2}), (4, {4: layers, 3: layers - 1})]
    by_layer: dict[int, list[onnx.NodeProto]] = {}
    head: list[onnx.NodeProto] = []
    tail: list[onnx.NodeProto] = []
    for node in graph.node:
        idx = index_of(node.name)
        if idx is None:
            (tail if by_layer else head).append(node)
        else:
            by_layer.setdefault(idx, []).append(node)
    inits = {i.name: i for i in graph.initializer}
    new_nodes: list[onnx.NodeProto] = list(head)
    new_inits: list[onnx.TensorProto] = [i for i in graph.initializer if index_of(i.name) is None]
    added: set[str] = set()
    copy_no: dict[str, int] = {}
    for template, mapping in plans:
        for node in by_layer[template]:
            clone = copy.deepcopy(node)
            clone.name = renumber(node.name, mapping)
            clone.input[:] = [renumber(n, mapping) for n in node.input]
            clone.output[:] = [renumber(n, mapping) for n in node.output]
            new_nodes.append(clone)
            for name in node.input:
                if name in inits and index_of(name) is not None and renumber(name, mapping) not in added:
                    added.add(renumber(name, mapping))
                    copy_no[renumber(name, mapping)] = len(added)
                    tensor = copy.deepcopy(inits[name])
                    tensor.name = renumber(name, mapping)
                    new_inits.append(tensor)
    for node in tail:  # the lm_head reads the final norm's output, renumbered
        node.input[:] = [renumber(n, {4: layers}) for n in node.input]
        new_nodes.append(node)

    def io(values: list[onnx.ValueInfoProto], prefix: str) -> list[onnx.ValueInfoProto]:
        plain = [v for v in values if not v.name.startswith(prefix)]
        out_values = []
        for kind in ("key", "value"):
            template = next(v for v in values if v.name == f"{prefix}0.{kind}")
            for j in range(layers):
                clone = copy.deepcopy(template)
                clone.name = f"{prefix}{j}.{kind}"
                out_values.append(clone)
        return plain + out_values

    inputs, outputs = io(list(graph.input), "past_key_values."), io(list(graph.output), "present.")
    del graph.node[:], graph.initializer[:], graph.input[:], graph.output[:], graph.value_info[:]
    graph.node.extend(new_nodes)
    graph.input.extend(inputs)
    graph.output.extend(outputs)

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    data_name = "model.onnx.data"
    with (source / data_name).open("rb") as src_file, (partial / data_name).open("wb") as dst:
        src = mmap.mmap(src_file.fileno(), 0, access=mmap.ACCESS_READ)
        for tensor in new_inits:
            fields = {e.key: e.value for e in tensor.external_data}
            if "location" in fields:
                start, length = int(fields["offset"]), int(fields["length"])
                pad = -dst.tell() % _ALIGN
                dst.write(b"\0" * pad)
                offset = dst.tell()
                # A copy of a template layer's matrix is rotated by a few bytes per layer: onnxruntime
                # shares the repacked copy of identical weights, which a real model does not have.
                shift = (copy_no.get(tensor.name, 0) * 4099) % length if tensor.name.endswith("_Q4") else 0
                for lo, hi in ((start + shift, start + length), (start, start + shift)):
                    for at in range(lo, hi, 1 << 24):
                        dst.write(src[at : min(hi, at + (1 << 24))])
                del tensor.external_data[:]
                for key, value in (("location", data_name), ("offset", offset), ("length", length)):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, str(value)
            graph.initializer.append(tensor)
        src.close()
    onnx.save(model, str(partial / "model.onnx"))
    for item in source.iterdir():
        if item.name not in ("model.onnx", data_name, "genai_config.json"):
            shutil.copy(item, partial / item.name)
    config = json.loads((source / "genai_config.json").read_text())
    config["model"]["decoder"]["num_hidden_layers"] = layers
    (partial / "genai_config.json").write_text(json.dumps(config, indent=4))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


if __name__ == "__main__":
    print(deepen(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])))
