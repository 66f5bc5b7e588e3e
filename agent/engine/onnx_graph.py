"""A minimal reader of an ONNX file's main graph: its nodes and the sizes of its initializers.

onnxruntime does not expose initializer sizes, and the ``onnx`` package is no
runtime dependency, so this reads the protobuf wire format directly — only the
few fields it needs (ONNX's ``onnx.proto``: ModelProto.graph = 7, metadata_props = 14;
StringStringEntryProto.key = 1, value = 2;
GraphProto.node = 1, initializer = 5, input = 11, output = 12; NodeProto.input = 1, op_type = 4;
TensorProto.dims = 1, data_type = 2, name = 8; ValueInfoProto.name = 1, type = 2;
TypeProto.tensor_type = 1; TypeProto.Tensor.elem_type = 1, shape = 2;
TensorShapeProto.dim = 1; Dimension.dim_value = 1) — and skips every other field
without decoding it.  Tensor bytes are counted from dims and element type, so
weights stored inside the file and in external data files count alike, and the
weights themselves are never read.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path

from edge_contract.errors import ModelFileError

# TensorProto.DataType -> bits per element (STRING, 8, has no fixed size: counted as 0).
_ELEMENT_BITS = {
    1: 32,  # FLOAT
    2: 8,  # UINT8
    3: 8,  # INT8
    4: 16,  # UINT16
    5: 16,  # INT16
    6: 32,  # INT32
    7: 64,  # INT64
    9: 8,  # BOOL
    10: 16,  # FLOAT16
    11: 64,  # DOUBLE
    12: 32,  # UINT32
    13: 64,  # UINT64
    14: 64,  # COMPLEX64
    15: 128,  # COMPLEX128
    16: 16,  # BFLOAT16
    17: 8,  # FLOAT8E4M3FN
    18: 8,  # FLOAT8E4M3FNUZ
    19: 8,  # FLOAT8E5M2
    20: 8,  # FLOAT8E5M2FNUZ
    21: 4,  # UINT4
    22: 4,  # INT4
    23: 4,  # FLOAT4E2M1
}

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


@dataclass(frozen=True)
class Initializer:
    """One weight tensor of the graph: its name, shape and size in bytes."""

    name: str
    dims: tuple[int, ...]
    data_type: int
    nbytes: int


@dataclass(frozen=True)
class Node:
    """One operator of the graph: its type and the names of its inputs ('' for an omitted one)."""

    op_type: str
    inputs: tuple[str, ...]


@dataclass(frozen=True)
class Graph:
    """The main graph's nodes and initializers, in file order, and its inputs' element types."""

    nodes: tuple[Node, ...]
    initializers: tuple[Initializer, ...]
    input_types: dict[str, int] = field(default_factory=dict)
    #: Each output's dims, -1 for a named (dynamic) one.
    output_dims: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: The model's metadata (``metadata_props``: key -> value).
    metadata: dict[str, str] = field(default_factory=dict)

    def input_element_bytes(self, name: str) -> float | None:
        """Bytes per element of the graph input ``name`` (None when it is not a tensor input)."""
        bits = _ELEMENT_BITS.get(self.input_types.get(name, 0))
        return None if not bits else bits / 8


class _Malformed(Exception):
    pass


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Malformed("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> list[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of one message; a length-delimited value is a view."""
    out: list[tuple[int, int, int | memoryview]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: int | memoryview
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise _Malformed("field runs past the end of its message")
            value, pos = buf[pos : pos + size], pos + size
        elif wire == _I64:
            value, pos = 0, pos + 8
        elif wire == _I32:
            value, pos = 0, pos + 4
        else:
            raise _Malformed(f"unsupported wire type {wire}")
        out.append((number, wire, value))
    if pos != len(buf):
        raise _Malformed("fixed-size field runs past the end of its message")
    return out


def _text(value: int | memoryview) -> str:
    if not isinstance(value, memoryview):
        raise _Malformed("expected a string")
    return bytes(value).decode("utf-8")


def _dims(wire: int, value: int | memoryview) -> list[int]:
    if wire == _VARINT and isinstance(value, int):
        return [value]
    if wire == _LEN and isinstance(value, memoryview):  # packed repeated int64
        dims, pos = [], 0
        while pos < len(value):
            dim, pos = _varint(value, pos)
            dims.append(dim)
        return dims
    raise _Malformed("bad dims")


def _tensor(buf: memoryview) -> Initializer:
    dims: list[int] = []
    data_type, name = 0, ""
    for number, wire, value in _fields(buf):
        if number == 1:
            dims += _dims(wire, value)
        elif number == 2 and isinstance(value, int):
            data_type = value
        elif number == 8:
            name = _text(value)
    # STRING tensors have no fixed element size; a language model holds no weights as strings.
    bits = _ELEMENT_BITS.get(data_type, 0)
    count = 1
    for dim in dims:
        count *= dim
    return Initializer(name=name, dims=tuple(dims), data_type=data_type, nbytes=(count * bits + 7) // 8)


def _node(buf: memoryview) -> Node:
    inputs: list[str] = []
    op_type = ""
    for number, _wire, value in _fields(buf):
        if number == 1:
            inputs.append(_text(value))
        elif number == 4:
            op_type = _text(value)
    return Node(op_type=op_type, inputs=tuple(inputs))


def _value_info(buf: memoryview) -> tuple[str, int, tuple[int, ...]]:
    """(name, tensor element type, dims with -1 for a named one) of a ValueInfoProto."""
    name, elem_type, dims = "", 0, []
    for number, wire, value in _fields(buf):
        if number == 1:
            name = _text(value)
        elif number == 2 and wire == _LEN and isinstance(value, memoryview):
            for tensor in _messages(value, 1):  # TypeProto.tensor_type
                for k, _w, item in _fields(tensor):
                    if k == 1 and isinstance(item, int):  # elem_type
                        elem_type = item
                    elif k == 2 and isinstance(item, memoryview):  # shape: TensorShapeProto.dim
                        for dim in _messages(item, 1):
                            sizes = [v for n, _w2, v in _fields(dim) if n == 1 and isinstance(v, int)]
                            dims.append(sizes[0] if sizes else -1)
    return name, elem_type, tuple(dims)


def _messages(buf: memoryview, number: int) -> list[memoryview]:
    """The embedded messages of field ``number``."""
    return [v for n, w, v in _fields(buf) if n == number and w == _LEN and isinstance(v, memoryview)]


def read_graph(path: str | Path) -> Graph:
    """The main graph of the ONNX model at ``path`` (subgraphs of If/Loop nodes are not read)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            # Mapped, not read: a model with its weights inside the file can be gigabytes,
            # of which only the small tensor headers are touched.  The map is unmapped
            # when the last view of it is gone.
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return _parse_model(memoryview(data))
    except (_Malformed, UnicodeDecodeError, ValueError) as exc:
        raise ModelFileError(path, f"not a readable ONNX model: {exc}") from exc
    except OSError as exc:
        raise ModelFileError(path, f"cannot read it: {exc.strerror or exc}") from exc


def _parse_model(view: memoryview) -> Graph:
    graphs = [v for n, w, v in _fields(view) if n == 7 and w == _LEN]
    if len(graphs) != 1 or not isinstance(graphs[0], memoryview):
        raise _Malformed("no graph")
    nodes: list[Node] = []
    initializers: list[Initializer] = []
    input_types: dict[str, int] = {}
    output_dims: dict[str, tuple[int, ...]] = {}
    for number, wire, value in _fields(graphs[0]):
        if wire != _LEN or not isinstance(value, memoryview):
            continue
        if number == 1:
            nodes.append(_node(value))
        elif number == 5:
            initializers.append(_tensor(value))
        elif number == 11:
            name, elem_type, _ = _value_info(value)
            input_types[name] = elem_type
        elif number == 12:
            name, _type, dims = _value_info(value)
            output_dims[name] = dims
    metadata: dict[str, str] = {}
    for entry in _messages(view, 14):
        parts = {n: _text(v) for n, w, v in _fields(entry) if n in (1, 2) and w == _LEN}
        metadata[parts.get(1, "")] = parts.get(2, "")
    return Graph(
        nodes=tuple(nodes),
        initializers=tuple(initializers),
        input_types=input_types,
        output_dims=output_dims,
        metadata=metadata,
    )
