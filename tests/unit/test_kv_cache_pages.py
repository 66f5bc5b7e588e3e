"""The key/value block commits memory as positions are written, page by page.

What a user relies on: a request's cache costs the positions it wrote, and a
filler slot (``agent.engine.rows``: one position per head) costs next to nothing.
With ``numpy.empty`` the block was advised for transparent huge pages, and one
written position per head committed every slot in full (docs/memory.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.engine.kv_cache import KVCache

_MiB = 1 << 20


def _anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_one_position_per_head_commits_pages_not_the_slot() -> None:
    # 2 layers x (key, value) x 2 slots x 8 heads x 4,096 positions x 64 x 4 B = 64 MiB in all,
    # each head's rows of a slot 1 MiB: what a huge page would commit at the first write.
    cache = KVCache(layers=2, kv_heads=8, head_size=64, capacity=4096, dtype=np.float32, slots=2)
    block = cache.block
    assert block.nbytes == 64 * _MiB and not block.any()  # zeroed, and reading commits nothing
    before = _anon()
    block[:, :, 1, :, 0, :] = 1.0  # a filler slot: position 0 of every head
    sparse = _anon() - before
    block[:, :, 0] = 2.0  # positive control: a slot written in full commits its 32 MiB
    full = _anon() - before - sparse
    assert sparse < 2 * _MiB, sparse
    assert full >= 30 * _MiB, full
    assert float(block[1, 1, 1, 7, 0, 63]) == 1.0 and float(block[1, 1, 0, 7, 4095, 63]) == 2.0


def test_the_block_is_released_with_its_last_view() -> None:
    cache = KVCache(layers=1, kv_heads=8, head_size=64, capacity=8192, dtype=np.float32, slots=2)
    cache.block[...] = 1.0  # 32 MiB committed
    before = _anon()
    del cache
    assert before - _anon() >= 30 * _MiB
