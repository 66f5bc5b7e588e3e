"""Decode passes over the slots of a key/value block, and whether one-row passes round like the rest.

A decode pass feeds one token per slot: slot ``b``'s row of the attention mask
has ones for its own positions (GroupQueryAttention takes each row's past
length from it), so sequences of different lengths share a pass.  The pass is
bound once per row count and reused; between passes only the token ids, the
mask and the position ids change.

Which kernels compute a row depends on the CPU.  onnxruntime's int4
``MatMulNBits`` with int8 activations (``accuracy_level`` 4) on AVX2-only x86
takes a matrix-vector kernel when the pass has one row (MLAS's ``M1`` kernel,
``sqnbitgemm_m1_sym_kernel_avx2_int8_*``) and a matrix-matrix kernel from two
rows up; the two order their float sums differently (about 1e-6 in a logit,
measured), while every row of a pass of two or more rows gets the same bits
whatever the row count and its place in the pass.  On AVX-512 VNNI (and at
int8 on AVX2) one row and many agree.  :func:`one_row_matches_many` measures
this on the model itself when an engine opens; where they disagree the engine
gives every decode pass a second row (``filler``), so a sequence's tokens are
the same whether it decodes alone or beside others.
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
        logits = self.logits
        binding.bind_output(graph.logits, "cpu", 0, logits.dtype, (rows, 1, graph.vocab), logits.ctypes.data)
        return binding


def one_row_matches_many(session: ort.InferenceSession, graph: Graph) -> bool:
    """Whether a one-row pass computes the bits a row of a two-row pass does, on this CPU and model.

    Two passes from an empty cache: one token alone, then the same token in two slots.
    """
    cache = KVCache(
        layers=graph.layers,
        kv_heads=graph.kv_heads,
        head_size=graph.head_size,
        capacity=1,
        dtype=graph.kv_dtype,
        slots=2,
    )
    rows = DecodeRows(session, graph, cache)
    token = min(1, graph.vocab - 1)
    rows.set_row(0, token, 1)
    rows.set_row(1, token, 1)
    alone = rows.run(1)[0].copy()
    pair = rows.run(2)
    return bool(np.array_equal(alone, pair[0]) and np.array_equal(pair[0], pair[1]))
