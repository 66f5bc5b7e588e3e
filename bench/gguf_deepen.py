"""A full-depth GGUF from a few-layer one, the llama.cpp side of ``memory_deepen``.

``memory_deepen`` grows the engine's 4-layer export to 32 layers (layers 0 and 1
kept, layer 2 repeated as layers 2 .. L-2, layer 3 as L-1); this does the same to
the GGUF file that llama.cpp's converter and quantizer made from the same
4-layer checkpoint, so both runtimes load a full-size model of the same shapes
and kinds of weights (``memory_bench --gguf-file``).  The quantized blocks are
copied as they are (llama.cpp does not share identical tensors, so they need no
rotation); the tokens are not a real model's and no one reads them.  Never in CI.

    python bench/gguf_deepen.py bench/models/phi3-mini-shape-4l-q4_0.gguf 32 \
        /work/cache/phi3-mini-shape-32l-q4_0.gguf --llama-src DIR

``--llama-src``: llama.cpp's source (the llama-cpp-python sdist's ``vendor/llama.cpp``), for
its ``gguf-py`` package.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

_BLOCK = re.compile(r"^blk\.(\d+)\.(.*)$")


def source_layer(layer: int, layers: int) -> int:
    """Which layer of the 4-layer source a layer of the ``layers``-deep copy repeats."""
    if layer < 2:
        return layer
    return 3 if layer == layers - 1 else 2


def deepen(source: Path, layers: int, out: Path) -> Path:
    """Write ``source`` (a 4-layer GGUF) deepened to ``layers`` layers into ``out``."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = str(reader.fields["general.architecture"].contents())
    depth_key = f"{arch}.block_count"
    if int(reader.fields[depth_key].contents()) != 4:
        raise SystemExit(f"{source} is not a 4-layer model ({depth_key} is not 4)")
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # the writer writes these itself
        kind = field.types[0]
        value: Any = layers if field.name == depth_key else field.contents()
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, kind, sub_type=sub)

    plan: list[tuple[str, Any]] = []
    emitted = False
    for tensor in reader.tensors:
        match = _BLOCK.match(tensor.name)
        if match is None:
            plan.append((tensor.name, tensor))
        elif not emitted:  # every layer, in order, where the source's first layer tensor stood
            emitted = True
            for layer in range(layers):
                for other in reader.tensors:
                    m = _BLOCK.match(other.name)
                    if m and int(m.group(1)) == source_layer(layer, layers):
                        plan.append((f"blk.{layer}.{m.group(2)}", other))
    for name, tensor in plan:
        writer.add_tensor_info(
            name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, tensor in plan:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
    partial.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path)
    parser.add_argument("layers", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument("--llama-src", type=Path, required=True)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.llama_src / "gguf-py"))
    print(deepen(args.source, args.layers, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
