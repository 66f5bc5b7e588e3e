"""How a prompt is prefilled: which positions come from the cache and how the rest is chunked.

The chunk plan is a pure decision, no onnxruntime: the engine runs it.

onnxruntime's GroupQueryAttention takes a chunk of any length after a non-empty
past in the same shared past/present buffer (``seqlens_k`` and
``total_sequence_length`` come from the attention mask, rotary positions from the
past length), and every row of a chunk of two or more rows comes out bit-identical
whatever the chunk boundaries.  Single-row passes take other kernels (matrix-vector
paths) and round differently, so the plan never makes a one-row chunk out of a
longer prompt, and the engine leaves at least two positions to compute after a
cache hit: the cold run and a run that resumes after a cached prefix then compute
the same bits, and a hit never changes a token.  Where a row's bits depend on the
parity of its pass's row count (``Engine.even_rows``: blocks of 64 and up on AVX-512
VNNI, int4 on AVX2) every chunk has an even number of rows: an odd chunk after a past recomputes
the position before it (its key/value rewritten with the same bits), a first odd
chunk is split in two even ones that overlap by a position.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from agent.engine.model_identity import model_identity
from agent.engine.prefix_cache import PrefixCache
from agent.engine.prefix_store import DiskBlockStore


def plan_chunks(start: int, end: int, chunk: int, *, even: bool = False) -> list[tuple[int, int]]:
    """``[start, end)`` as consecutive ``(begin, stop)`` chunks of at most ``chunk`` positions.

    No chunk has a single row unless the whole range is one position: a one-row
    tail borrows a row from the chunk before it (so with ``chunk == 2`` the last
    chunk may have three rows).  ``even``: no chunk has an odd number of rows (but a
    one-position prompt's): an odd one starts a position earlier, or at position 0
    becomes ``(0, stop - 1), (stop - 2, stop)``; a chunk may then hold ``chunk + 1`` rows.
    """
    if chunk < 2:
        raise ValueError("the prefill chunk must be at least 2 tokens")
    chunks = list(itertools.pairwise([*range(start, end, chunk), end]))
    if len(chunks) > 1 and chunks[-1][1] - chunks[-1][0] == 1:
        (a, b), (_, d) = chunks[-2], chunks[-1]
        # Borrow a row from the chunk before; with 2-row chunks, merge into a 3-row one instead.
        chunks[-2:] = [(a, b - 1), (b - 1, d)] if b - a > 2 else [(a, d)]
    if not even:
        return chunks
    paired: list[tuple[int, int]] = []
    for a, b in chunks:
        if (b - a) % 2 == 0 or b == 1:
            paired.append((a, b))
        elif a > 0:
            paired.append((a - 1, b))
        else:
            paired += [(0, b - 1), (b - 2, b)]
    return paired


def open_prefix_cache(
    model_dir: Path,
    *,
    files: list[Path] | None = None,
    directory: Path | None,
    memory_mb: int,
    disk_mb: int,
    block_tokens: int,
    block_shape: tuple[int, ...],
    dtype: np.dtype[np.generic],
    threads: int,
) -> PrefixCache | None:
    """The engine's prefix cache (None when ``memory_mb`` is 0), on disk too when ``directory`` is given.

    On disk, blocks are keyed by the model's identity (``model_identity.model_identity`` of
    ``files``: those it serves, not another KV cache's graph; default: the folder's): the small
    files are hashed, the weights named by inode, size and times, never read. Blocks reach the
    disk on a thread of their own (``prefix_writes``): no job waits for the disk.
    """
    if memory_mb <= 0:
        return None
    store = None
    identity = f"memory:{model_dir.resolve()}"
    if directory is not None and disk_mb > 0:
        served = files if files is not None else [p for p in model_dir.iterdir() if p.is_file()]
        identity = model_identity(served, threads)
        store = DiskBlockStore(
            directory, identity, block_shape=block_shape, dtype=dtype, budget_bytes=disk_mb << 20
        )
    return PrefixCache(
        identity=identity,
        block_tokens=block_tokens,
        budget_bytes=memory_mb << 20,
        store=store,
        write_behind=True,
    )
