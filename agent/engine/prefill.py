"""How a prompt is prefilled: which positions come from the cache and how the rest is chunked.

Pure decisions, no onnxruntime: the engine runs the plan.

onnxruntime's GroupQueryAttention takes a chunk of any length after a non-empty
past in the same shared past/present buffer (``seqlens_k`` and
``total_sequence_length`` come from the attention mask, rotary positions from the
past length), and every row of a chunk of two or more rows comes out bit-identical
whatever the chunk boundaries.  Single-row passes take other kernels (matrix-vector
paths) and round differently, so the plan never makes a one-row chunk out of a
longer prompt, and the engine leaves at least two positions to compute after a
cache hit: the cold run and a run that resumes after a cached prefix then compute
the same bits, and a hit never changes a token.
"""

from __future__ import annotations

import itertools


def plan_chunks(start: int, end: int, chunk: int) -> list[tuple[int, int]]:
    """``[start, end)`` as consecutive ``(begin, stop)`` chunks of at most ``chunk`` positions.

    No chunk has a single row unless the whole range is one position: a one-row
    tail borrows a row from the chunk before it (so with ``chunk == 2`` the last
    chunk may have three rows).
    """
    if chunk < 2:
        raise ValueError("the prefill chunk must be at least 2 tokens")
    chunks = list(itertools.pairwise([*range(start, end, chunk), end]))
    if len(chunks) > 1 and chunks[-1][1] - chunks[-1][0] == 1:
        (a, b), (_, d) = chunks[-2], chunks[-1]
        # Borrow a row from the chunk before; with 2-row chunks, merge into a 3-row one instead.
        chunks[-2:] = [(a, b - 1), (b - 1, d)] if b - a > 2 else [(a, d)]
    return chunks
