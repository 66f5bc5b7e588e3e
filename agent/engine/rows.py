"""Decode passes over the slots of a key/value block, and whether a row's bits depend on its pass's row count.

A decode pass feeds one token per slot: slot ``b``'s row of the attention mask
has ones for its own positions (GroupQueryAttention takes each row's past
length from it), so sequences of different lengths share a pass.  The pass is
bound once per row count and reused; between passes only the token ids, the
mask and the position ids change.

Which kernels compute a row depends on the CPU and the export.  onnxruntime's
int4 ``MatMulNBits`` with int8 activations (``accuracy_level`` 4) on AVX2-only
x86 takes a matrix-vector kernel when the pass has one row (MLAS's ``M1``
kernel) and a matrix-matrix kernel from two rows up; they order their float
sums differently (about 1e-6 in a logit).  On AVX-512 VNNI, from block 64 up,
int4 and int8 compute rows in pairs and round an unpaired row (the only row of
a one-row pass, the last of an odd pass) otherwise.  In both cases every row
of a pass with an even number of rows gets the same bits whatever the row count
and its place in the pass (measured).  :func:`rows_depend_on_parity` measures
this on the model itself when an engine opens; where a row's bits depend on it
the engine gives every pass an even number of rows (``Engine.even_rows``):
decode passes a filler slot, prefill chunks and verify passes a recomputed
position, so a sequence's bits are the same alone or beside others, cold or
after a cache hit, whatever the chunk size or the drafts.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from agent.engine.kv_cache import KVCache


class Graph(Protocol):
    """The names, shapes and types of a decoder graph's inputs and outputs (``engine.Engine.graph``)."""

    layers: int
    kv_heads: int
    head_size: int
    vocab: int
    input_ids: str
    attention_mask: str
    position_ids: str | None
    logits: str
    logits_to_keep: str | None
    past_names: list[tuple[str, str]]
    present_names: list[tuple[str, str]]
    kv_dtype: npt.DTypeLike
    logits_dtype: npt.DTypeLike


class DecodeRows:
    """One-token passes over the first ``rows`` slots of ``cache``; fill ``ids`` and ``mask``, then run."""

    def __init__(self, session: ort.InferenceSession, graph: Graph, cache: KVCache) -> None:
        self._session = session
        self._graph = graph
        self._cache = cache
        slots = cache.slots
        self.ids = np.zeros((slots, 1), dtype=np.int64)
        self.mask = np.zeros((slots, cache.capacity), dtype=np.int64)
        self.positions = np.zeros((slots, 1), dtype=np.int64)
        self.logits = np.empty((slots, 1, graph.vocab), dtype=graph.logits_dtype)
        self._one = np.ones(1, dtype=np.int64)  # ``num_logits_to_keep``: each slot's one row
        self._bindings: dict[int, ort.IOBinding] = {}

    def set_row(self, slot: int, token: int, length: int) -> None:
        """Slot ``slot`` feeds ``token`` as its position ``length - 1`` (its mask: ``length`` ones)."""
        self.ids[slot, 0] = token
        row = self.mask[slot]
        if length >= 2 and row[length - 2] == 1 and row[length - 1] == 0:
            row[length - 1] = 1  # the common step: one more position than last time
        else:
            row[:length] = 1
            row[length:] = 0
        self.positions[slot, 0] = length - 1

    def set_filler(self, slot: int, position: int) -> None:
        """Slot ``slot`` feeds a filler token that writes its ``position`` only (free, or rewritten later)."""
        self.set_row(slot, 0, position + 1)

    def run(self, rows: int) -> npt.NDArray[Any]:
        """Run one pass over slots ``0 .. rows``; returns their logits, ``[rows, vocab]``."""
        binding = self._bindings.get(rows)
        if binding is None:
            binding = self._bindings[rows] = self._bind(rows)
        self._session.run_with_iobinding(binding)
        return self.logits[:rows, 0]

    def _bind(self, rows: int) -> ort.IOBinding:
        graph, cache = self._graph, self._cache
        binding = self._session.io_binding()
        cache.bind(binding, graph.past_names, graph.present_names, rows=rows)
        binding.bind_input(graph.input_ids, "cpu", 0, np.int64, (rows, 1), self.ids.ctypes.data)
        binding.bind_input(
            graph.attention_mask, "cpu", 0, np.int64, (rows, cache.capacity), self.mask.ctypes.data
        )
        if graph.position_ids is not None:
            binding.bind_input(graph.position_ids, "cpu", 0, np.int64, (rows, 1), self.positions.ctypes.data)
        if graph.logits_to_keep is not None:
            binding.bind_input(graph.logits_to_keep, "cpu", 0, np.int64, (1,), self._one.ctypes.data)
        logits = self.logits
        binding.bind_output(graph.logits, "cpu", 0, logits.dtype, (rows, 1, graph.vocab), logits.ctypes.data)
        return binding


def rows_depend_on_parity(session: ort.InferenceSession, graph: Graph) -> bool:
    """Whether a row of a pass with an odd number of rows can round otherwise than in an even pass.

    One token in every slot from an empty cache, in passes of 1, 2, 3 and 4 rows: true unless
    every row of every pass has the same bits.
    """
    cache = KVCache(
        layers=graph.layers,
        kv_heads=graph.kv_heads,
        head_size=graph.head_size,
        capacity=1,
        dtype=graph.kv_dtype,
        slots=4,
    )
    rows = DecodeRows(session, graph, cache)
    token = min(1, graph.vocab - 1)
    for slot in range(4):
        rows.set_row(slot, token, 1)
    first = rows.run(1)[0].copy()
    return not all(np.array_equal(first, row) for n in (2, 3, 4) for row in rows.run(n))
