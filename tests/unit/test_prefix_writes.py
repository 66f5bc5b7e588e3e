"""The prefix cache's disk writes happen behind the job: in order, bounded, flushed at a clean stop."""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.engine import prefix_writes
from agent.engine.prefix_cache import Block, PrefixCache
from agent.engine.prefix_store import DiskBlockStore
from tests.unit.test_prefix_cache import BLOCK, _files, cache, disk, kv_for, positions


class _Gated(DiskBlockStore):
    """The real store, whose writes wait until the test opens the gate (a slow SD card)."""

    def __init__(self, root: Path) -> None:
        base = disk(root)
        super().__init__(
            base.root,
            base.identity,
            block_shape=base.block_shape,
            dtype=base.dtype,
            budget_bytes=base.budget_bytes,
        )
        self.gate = threading.Event()
        self.fail_next = False

    def save(self, blocks: Sequence[Block], chain: Sequence[bytes]) -> None:
        assert self.gate.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise OSError("the card went away")
        super().save(blocks, chain)


def _behind(store: DiskBlockStore, budget_blocks: int = 100) -> PrefixCache:
    per_block = cache().budget_bytes // 100
    return PrefixCache(
        identity="m",
        block_tokens=BLOCK,
        budget_bytes=budget_blocks * per_block,
        store=store,
        write_behind=True,
    )


def test_an_insert_returns_before_the_disk_and_flush_waits_for_it(tmp_path: Path) -> None:
    store = _Gated(tmp_path)
    c = _behind(store)
    ids = list(range(16))
    assert c.insert(ids, kv_for(ids), 16) == 4  # returned although the disk has not written anything
    assert positions(c.lookup(ids, max_tokens=16)) == ids  # served from memory meanwhile
    assert _files(tmp_path) == [] and not c.flush(0.2)  # nothing on disk yet: flush says so
    store.gate.set()
    assert c.flush(10)
    assert len(_files(tmp_path)) == 4  # positive control: written once the disk moved
    restarted = cache(store=disk(tmp_path))
    assert positions(restarted.lookup(ids, max_tokens=16)) == ids


def test_past_the_bound_new_blocks_stay_in_memory_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prefix_writes, "MAX_PENDING", 1)
    store = _Gated(tmp_path)
    c = _behind(store)
    first, second = list(range(16)), list(range(100, 116))
    c.insert(first, kv_for(first), 16)  # one write waiting: the bound
    with caplog.at_level(logging.WARNING):
        c.insert(second, kv_for(second), 16)
    assert "the disk falls behind" in caplog.text
    assert positions(c.lookup(second, max_tokens=16)) == second  # still served from memory
    store.gate.set()
    assert c.flush(10)
    assert len(_files(tmp_path)) == 4  # the first prompt's blocks only


def test_a_block_evicted_before_its_turn_is_not_written_nor_kept(tmp_path: Path) -> None:
    store = _Gated(tmp_path)
    c = _behind(store, budget_blocks=4)  # room for one prompt
    first, second = list(range(16)), list(range(100, 116))
    c.insert(first, kv_for(first), 16)
    evicted = weakref.ref(c.lookup(first, max_tokens=16)[0].kv)
    c.insert(second, kv_for(second), 16)  # evicts the first prompt's blocks from memory
    assert c.lookup(first, max_tokens=16) == []
    gc.collect()
    assert evicted() is None  # the queued write did not keep its keys and values alive
    store.gate.set()
    assert c.flush(10)
    restarted = cache(store=disk(tmp_path))
    assert positions(restarted.lookup(second, max_tokens=16)) == second  # positive control: written
    assert restarted.lookup(first, max_tokens=16) == []


def test_a_failed_write_is_logged_and_the_writer_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = _Gated(tmp_path)
    store.fail_next = True
    c = _behind(store)
    first, second = list(range(16)), list(range(100, 116))
    with caplog.at_level(logging.WARNING):
        c.insert(first, kv_for(first), 16)
        c.insert(second, kv_for(second), 16)
        store.gate.set()
        assert c.flush(10)
    assert "writing to disk failed" in caplog.text
    restarted = cache(store=disk(tmp_path))
    assert positions(restarted.lookup(second, max_tokens=16)) == second  # the next write went through
    assert restarted.lookup(first, max_tokens=16) == []  # the failed one is simply not there


def test_an_idle_writer_ends_and_a_later_write_starts_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prefix_writes, "IDLE_EXIT_S", 0.5)
    store = _Gated(tmp_path)
    store.gate.set()
    c = _behind(store)
    first, second = list(range(16)), list(range(100, 116))
    before = set(threading.enumerate())  # other tests' writers may still be idling
    c.insert(first, kv_for(first), 16)
    assert c.flush(10)
    writers = [t for t in set(threading.enumerate()) - before if t.name == "prefix-cache-writer"]
    deadline = time.monotonic() + 10
    while any(t.is_alive() for t in writers) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert writers and not any(t.is_alive() for t in writers)  # it was there, and it ended
    c.insert(second, kv_for(second), 16)
    assert c.flush(10)
    assert len(_files(tmp_path)) == 8  # the later blocks were written by a new thread
