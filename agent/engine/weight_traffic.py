"""Bytes of weights read per generated token, and the decode speed a memory bandwidth allows at most.

Decoding one token runs every layer once on one position, so each weight
matrix is streamed from memory once per token; on a Raspberry-Pi-class box
that memory traffic, not arithmetic, bounds decode speed.  Counted from the
ONNX graph (``onnx_graph``):

* every initializer in full — MatMulNBits packed weights, their scales and zero
  points, the lm_head (which scores the whole vocabulary every token), norms;
* except tensors read one row per token: the token-embedding table of a
  Gather / GatherBlockQuantized (with its scales and zero points) and the
  rotary cos/sin caches of GroupQueryAttention, of which one row is counted.
  A tensor that any other node also reads (tied embeddings: the same table as
  lm_head) counts in full.

The KV cache and activations are not counted, so the bound is optimistic:
``max_decode_tokens_per_s = bandwidth / weight_bytes_per_token`` is the most a
box with that bandwidth can reach, never a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.engine.onnx_graph import Graph, read_graph

# (op_type, input index) pairs whose tensor is read one row per token.
_ROW_READS = {
    ("Gather", 0),
    ("GatherBlockQuantized", 0),
    ("GatherBlockQuantized", 2),
    ("GatherBlockQuantized", 3),
    ("GroupQueryAttention", 7),  # cos_cache
    ("GroupQueryAttention", 8),  # sin_cache
}


@dataclass(frozen=True)
class WeightTraffic:
    """How many bytes of weights the model holds, and how many one decode step reads."""

    total_bytes: int
    bytes_per_token: int
    row_read_tensors: tuple[str, ...]

    def max_tokens_per_s(self, bandwidth_gbs: float) -> float:
        """The decode speed ``bandwidth_gbs`` (10^9 bytes/s) allows at most: a bound, not a measurement."""
        return bandwidth_gbs * 1e9 / self.bytes_per_token if self.bytes_per_token else 0.0

    def read_gbs(self, tokens_per_s: float) -> float:
        """The weight bandwidth (10^9 bytes/s) a measured decode speed amounts to."""
        return tokens_per_s * self.bytes_per_token / 1e9


def weight_traffic(graph: Graph) -> WeightTraffic:
    """Count the bytes of ``graph``'s initializers that a decode step reads."""
    uses: dict[str, set[tuple[str, int]]] = {}
    for node in graph.nodes:
        for index, name in enumerate(node.inputs):
            if name:
                uses.setdefault(name, set()).add((node.op_type, index))
    total = per_token = 0
    row_read: list[str] = []
    for init in graph.initializers:
        total += init.nbytes
        used_by = uses.get(init.name, set())
        if used_by and used_by <= _ROW_READS and init.dims and init.dims[0] > 0:
            row_read.append(init.name)
            per_token += -(-init.nbytes // init.dims[0])  # one row, rounded up
        else:
            per_token += init.nbytes
    return WeightTraffic(total_bytes=total, bytes_per_token=per_token, row_read_tensors=tuple(row_read))


def model_weight_traffic(onnx_path: str | Path) -> WeightTraffic:
    """``weight_traffic`` of the ONNX model file at ``onnx_path``."""
    return weight_traffic(read_graph(onnx_path))
