"""The prefix cache's rules without a model: chunk plans, block chains, LRU, the disk store."""

from __future__ import annotations

import itertools
import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.engine.prefill import plan_chunks
from agent.engine.prefix_cache import Block, PrefixCache, chain_key, root_key
from agent.engine.prefix_store import DiskBlockStore

LAYERS, KV_HEADS, HEAD = 2, 2, 4
BLOCK = 4


def kv_for(ids: list[int], capacity: int | None = None) -> np.ndarray:
    """A fake request cache whose position ``p`` holds the value ``ids[p]`` everywhere."""
    capacity = capacity or len(ids)
    kv = np.zeros((LAYERS, 2, 1, KV_HEADS, capacity, HEAD), dtype=np.float32)
    kv[:, :, 0, :, : len(ids), :] = np.asarray(ids, dtype=np.float32)[None, None, None, :, None]
    return kv


def cache(budget_blocks: int = 100, store: DiskBlockStore | None = None) -> PrefixCache:
    per_block = LAYERS * 2 * KV_HEADS * BLOCK * HEAD * 4
    return PrefixCache(identity="m", block_tokens=BLOCK, budget_bytes=budget_blocks * per_block, store=store)


def positions(blocks: list[Block]) -> list[int]:
    """The token values a chain of blocks holds, read back from their keys and values."""
    return [int(v) for b in blocks for v in b.kv[0, 0, 0, :, 0]]


# -- chunk plans ------------------------------------------------------------------------------


@given(st.integers(0, 300), st.integers(1, 300), st.integers(2, 64))
def test_plan_covers_the_range_with_no_single_row_chunk(start: int, length: int, chunk: int) -> None:
    end = start + length
    plan = plan_chunks(start, end, chunk)
    assert plan[0][0] == start and plan[-1][1] == end
    assert all(a[1] == b[0] for a, b in itertools.pairwise(plan))
    assert all(0 < stop - begin <= max(chunk, 3) for begin, stop in plan)
    if length > 1:
        assert all(stop - begin >= 2 for begin, stop in plan)


@given(st.integers(0, 300), st.integers(1, 300), st.integers(2, 64))
def test_an_even_plan_computes_every_position_in_passes_of_even_rows(
    start: int, length: int, chunk: int
) -> None:
    # Where the kernels pair rows (Engine.even_rows): every pass even, a recomputed position before
    # it at most (its key/value rewritten alike), never a position past the end or a later one skipped.
    end = start + length
    plan = plan_chunks(start, end, chunk, even=True)
    if end == 1:
        assert plan == [(0, 1)]  # a one-token prompt has no other pass
        return
    assert all((stop - begin) % 2 == 0 and 0 < stop - begin <= max(chunk, 3) + 1 for begin, stop in plan)
    assert plan[0][0] in (start, start - 1) and plan[-1][1] == end
    assert all(b[0] in (a[1], a[1] - 1) for a, b in itertools.pairwise(plan))


def test_plan_rejects_one_token_chunks() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        plan_chunks(0, 10, 1)


# -- the in-memory cache ---------------------------------------------------------------------


def test_longest_shared_prefix_is_found_token_exact() -> None:
    c = cache()
    first = list(range(10, 30))  # 5 blocks
    assert c.insert(first, kv_for(first), len(first)) == 5
    other = [*first[:9], 999, *first[10:]]  # differs inside block 2
    hit = c.lookup(other, max_tokens=len(other))
    assert positions(hit) == first[:8]
    assert positions(c.lookup(first, max_tokens=len(first))) == first
    assert c.lookup([1, 2, 3, 4, 5], max_tokens=5) == []  # positive control above, miss here
    stats = c.stats()
    assert (stats.lookups, stats.hits, stats.cached_tokens) == (3, 2, 28)


def test_lookup_respects_max_tokens() -> None:
    c = cache()
    ids = list(range(16))
    c.insert(ids, kv_for(ids), 16)
    assert len(c.lookup(ids, max_tokens=14)) == 3
    assert len(c.lookup(ids, max_tokens=16)) == 4


def test_only_rows_given_are_stored_and_partial_blocks_are_not() -> None:
    c = cache()
    ids = list(range(100, 111))
    assert c.insert(ids, kv_for(ids, capacity=20), 10) == 2  # 10 rows: 2 whole blocks
    assert positions(c.lookup(ids, max_tokens=11)) == ids[:8]


def test_shared_prefix_is_stored_once() -> None:
    c = cache()
    instruction = list(range(50, 66))  # 4 blocks
    for tail in range(5):
        prompt = [*instruction, *range(200 + 10 * tail, 204 + 10 * tail)]
        c.insert(prompt, kv_for(prompt), len(prompt))
    assert c.stats().entries == 4 + 5


def test_lru_evicts_leaves_of_the_oldest_chain_first() -> None:
    c = cache(budget_blocks=6)
    a = list(range(0, 16))  # 4 blocks
    b = list(range(100, 108))  # 2 blocks
    c.insert(a, kv_for(a), 16)
    c.insert(b, kv_for(b), 8)
    assert c.stats().entries == 6
    d = list(range(200, 208))  # 2 more: two of a's blocks must go, its deepest ones
    c.insert(d, kv_for(d), 8)
    assert c.stats().entries == 6
    assert positions(c.lookup(a, max_tokens=16)) == a[:8]  # a's root survives
    assert len(c.lookup(b, max_tokens=8)) == 2 and len(c.lookup(d, max_tokens=8)) == 2
    assert c.stats().bytes <= c.budget_bytes


def test_a_prefix_longer_than_the_budget_keeps_its_start() -> None:
    c = cache(budget_blocks=3)
    ids = list(range(40))  # 10 blocks
    assert c.insert(ids, kv_for(ids), 40) == 3
    assert positions(c.lookup(ids, max_tokens=40)) == ids[:12]


def test_zero_budget_stores_nothing() -> None:
    c = PrefixCache(identity="m", block_tokens=BLOCK, budget_bytes=0)
    ids = list(range(8))
    assert c.insert(ids, kv_for(ids), 8) == 0
    assert c.lookup(ids, max_tokens=8) == []


def test_keys_depend_on_the_whole_prefix_and_the_model() -> None:
    assert chain_key(root_key("m"), [1, 2]) != chain_key(root_key("n"), [1, 2])
    k1 = chain_key(chain_key(root_key("m"), [1, 2]), [3, 4])
    k2 = chain_key(chain_key(root_key("m"), [9, 2]), [3, 4])
    assert k1 != k2


# -- the disk store -------------------------------------------------------------------------


def disk(root: Path, identity: str = "model-a", budget_blocks: int = 100) -> DiskBlockStore:
    per_file = 760  # about one block file: 256 bytes of keys and values, a ~450-byte header, the digest
    return DiskBlockStore(
        root,
        identity,
        block_shape=(LAYERS, 2, KV_HEADS, BLOCK, HEAD),
        dtype=np.dtype(np.float32),
        budget_bytes=budget_blocks * per_file,
    )


def test_blocks_survive_a_new_process(tmp_path: Path) -> None:
    ids = list(range(300, 316))
    c1 = cache(store=disk(tmp_path))
    c1.insert(ids, kv_for(ids), 16)
    c2 = PrefixCache(identity="m", block_tokens=BLOCK, budget_bytes=1 << 20, store=disk(tmp_path))
    hit = c2.lookup(ids, max_tokens=16)
    assert positions(hit) == ids
    assert c2.stats().disk_loads == 4


def test_a_restart_reads_back_the_most_recent_prefixes_that_fit_roots_first(tmp_path: Path) -> None:
    older, newer = list(range(200, 216)), list(range(300, 316))  # 4 blocks each
    c1 = cache(store=disk(tmp_path))
    c1.insert(older, kv_for(older), 16)
    c1.insert(newer, kv_for(newer), 16)
    # A budget of 6 blocks: the newer chain whole, the older one's first 2 blocks (roots come first).
    restarted = cache(budget_blocks=6, store=disk(tmp_path))
    assert restarted.preload() == 6
    assert restarted.stats().disk_loads == 6 and restarted.stats().entries == 6
    assert positions(restarted.lookup(newer, max_tokens=16)) == newer
    assert restarted.stats().disk_loads == 6  # served from memory: nothing more was read
    assert positions(restarted.lookup(older, max_tokens=16)) == older  # the rest still comes from disk
    assert restarted.stats().disk_loads == 8
    # A damaged file is left out (and removed) at start, with the others read back.
    victim = _files(tmp_path)[0]
    data = victim.read_bytes()
    victim.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    again = cache(store=disk(tmp_path))
    assert again.preload() == 7 and not victim.exists()
    # Without a disk store, or with no memory budget, nothing is read.
    assert cache().preload() == 0 and cache(budget_blocks=0, store=disk(tmp_path)).preload() == 0


def test_the_read_back_skips_what_a_first_job_already_read(tmp_path: Path) -> None:
    older, newer = list(range(200, 216)), list(range(300, 316))
    c1 = cache(store=disk(tmp_path))
    c1.insert(older, kv_for(older), 16)
    c1.insert(newer, kv_for(newer), 16)
    restarted = cache(store=disk(tmp_path))
    assert positions(restarted.lookup(newer, max_tokens=16)) == newer  # a job came before the read-back
    assert restarted.stats().disk_loads == 4
    assert restarted.preload() == 4  # only the other prefix's blocks: none of the job's read again
    assert restarted.stats().disk_loads == 8 and restarted.stats().entries == 8


def test_lookups_beside_a_running_read_back_are_served_whole_and_nothing_is_held_twice(
    tmp_path: Path,
) -> None:
    prompts = [list(range(100 * i, 100 * i + 16)) for i in range(1, 7)]  # 6 prefixes of 4 blocks
    first = cache(store=disk(tmp_path))
    for ids in prompts:
        first.insert(ids, kv_for(ids), 16)
    for _ in range(5):  # real threads, whatever order they take
        restarted = cache(store=disk(tmp_path))
        thread = threading.Thread(target=restarted.preload)
        thread.start()
        for ids in reversed(prompts):
            assert positions(restarted.lookup(ids, max_tokens=16)) == ids
        thread.join(10)
        assert not thread.is_alive()
        assert restarted.stats().entries == 24 and restarted.stats().bytes == first.stats().bytes
        assert restarted.stats().disk_loads == 24  # each block read once, by the job or by the read-back


def test_another_model_identity_drops_the_directory(tmp_path: Path) -> None:
    ids = list(range(8))
    cache(store=disk(tmp_path, "model-a")).insert(ids, kv_for(ids), 8)
    assert (tmp_path / "model-a").is_dir()
    other = cache(store=disk(tmp_path, "model-b"))
    assert other.lookup(ids, max_tokens=8) == []
    assert not (tmp_path / "model-a").exists()
    # Control: the same identity again would have found it.
    cache(store=disk(tmp_path, "model-b")).insert(ids, kv_for(ids), 8)
    assert len(cache(store=disk(tmp_path, "model-b")).lookup(ids, max_tokens=8)) == 2


def _files(root: Path, identity: str = "model-a") -> list[Path]:
    return sorted((root / identity).glob("*.kv"))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda data: data[: len(data) // 2], "checksum"),
        (lambda data: data[:100] + bytes([data[100] ^ 1]) + data[101:], "checksum"),
        (lambda data: b"garbage" * 10, "not a prefix-cache file"),
        (lambda data: b"", "not a prefix-cache file"),
    ],
)
def test_corrupt_file_is_ignored_with_a_warning_and_removed(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage,
    reason,  # type: ignore[no-untyped-def]
) -> None:
    ids = list(range(20, 28))
    cache(store=disk(tmp_path)).insert(ids, kv_for(ids), 8)
    root_file = tmp_path / "model-a" / f"{chain_key(root_key('m'), ids[:4]).hex()}.kv"
    root_file.write_bytes(damage(root_file.read_bytes()))
    with caplog.at_level(logging.WARNING):
        hit = cache(store=disk(tmp_path)).lookup(ids, max_tokens=8)
    assert hit == []
    assert reason in caplog.text and str(root_file) in caplog.text
    assert not root_file.exists()


def test_an_oversized_file_is_not_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ids = list(range(20, 24))
    cache(store=disk(tmp_path)).insert(ids, kv_for(ids), 4)
    (path,) = _files(tmp_path)
    with path.open("ab") as f:
        f.truncate(1 << 20)  # sparse: a megabyte a 4-token block can never need
    with caplog.at_level(logging.WARNING):
        assert cache(store=disk(tmp_path)).lookup(ids, max_tokens=4) == []
    assert "larger than a block can be" in caplog.text and not path.exists()


def test_foreign_file_under_a_valid_name_is_not_loaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ids = list(range(60, 64))
    other_ids = list(range(70, 74))
    cache(store=disk(tmp_path)).insert(other_ids, kv_for(other_ids), 4)
    (src,) = _files(tmp_path)
    target = tmp_path / "model-a" / f"{chain_key(root_key('m'), ids).hex()}.kv"
    src.rename(target)  # a sound file, but for other tokens
    with caplog.at_level(logging.WARNING):
        assert cache(store=disk(tmp_path)).lookup(ids, max_tokens=4) == []
    assert "do not match" in caplog.text


def test_file_for_another_identity_is_not_loaded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ids = list(range(60, 64))
    cache(store=disk(tmp_path / "x", "model-z")).insert(ids, kv_for(ids), 4)
    (src,) = _files(tmp_path / "x", "model-z")
    # The same box (same key): only the identity in the header tells the file apart.
    shutil.copy(tmp_path / "x.key", tmp_path.with_name(tmp_path.name + ".key"))
    (tmp_path / "model-a").mkdir()
    src.rename(tmp_path / "model-a" / src.name)
    with caplog.at_level(logging.WARNING):
        assert cache(store=disk(tmp_path)).lookup(ids, max_tokens=4) == []
    assert "another model" in caplog.text


def test_disk_budget_removes_leaves_before_roots(tmp_path: Path) -> None:
    store = disk(tmp_path, budget_blocks=5)
    c = cache(store=store)
    a = list(range(0, 16))  # 4 blocks
    c.insert(a, kv_for(a), 16)
    b = list(range(100, 108))  # 2 blocks: one of a's must go
    c.insert(b, kv_for(b), 8)
    assert len(_files(tmp_path)) <= 5 and store.used_bytes <= store.budget_bytes
    fresh = cache(store=disk(tmp_path, budget_blocks=5))
    assert positions(fresh.lookup(a, max_tokens=16)) == a[:12]  # the leaf went, the root stayed
    assert len(fresh.lookup(b, max_tokens=8)) == 2


def test_a_full_disk_loses_the_copy_not_the_request(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ro = tmp_path / "ro"
    ro.write_text("a file where the directory should be")
    ids = list(range(8))
    c = cache(store=disk(ro / "inner"))
    with caplog.at_level(logging.WARNING):
        assert c.insert(ids, kv_for(ids), 8) == 2
    assert len(c.lookup(ids, max_tokens=8)) == 2  # memory still serves it
    assert "prefix cache" in caplog.text


# -- token-exact reuse -------------------------------------------------------------------------


def matched(c: PrefixCache, ids: list[int], max_tokens: int) -> list[int]:
    """The token values a match covers, read back from the keys and values it would copy."""
    found = c.match(ids, max_tokens=max_tokens)
    tail = [] if found.tail is None else [int(v) for v in found.tail.kv[0, 0, 0, : found.tail_tokens, 0]]
    assert found.tokens(BLOCK) == len(positions(found.blocks)) + len(tail)
    return positions(found.blocks) + tail


def test_reuse_goes_to_the_last_matching_token_not_a_block_boundary() -> None:
    c = cache()
    instruction = list(range(100, 110))  # 2 whole blocks of 4 and 2 tokens
    first = [*instruction, 7, 8, 9]  # blocks: 100-103, 104-107, 108 109 7 8, tail 9
    c.insert(first, kv_for(first), len(first), tail=True)
    second = [*instruction, 5, 6, 4, 3]
    assert matched(c, second, len(second) - 2) == instruction  # into the third block, to its 2nd token
    assert matched(c, first, len(first)) == first  # the tail block too
    assert matched(c, first, len(first) - 2) == first[:-2]  # max_tokens cuts inside a block
    assert matched(c, [1, 2, 3], 3) == []  # positive control: a miss
    assert (
        c.lookup(second, max_tokens=len(second)) == c.match(second, max_tokens=9).blocks
    )  # whole blocks only


def test_the_best_of_several_stored_continuations_is_reused() -> None:
    c = cache()
    base = list(range(20, 24))
    for tail in ([1, 2, 3, 4], [1, 2, 9, 9], [5, 5]):
        ids = base + tail
        c.insert(ids, kv_for(ids), len(ids), tail=True)
    assert matched(c, [*base, 1, 2, 9, 7, 0], 9) == [*base, 1, 2, 9]
    assert matched(c, [*base, 5, 6, 0], 7) == [*base, 5]


def test_tails_are_found_on_disk_after_a_restart(tmp_path: Path) -> None:
    first = list(range(40, 51))  # 2 whole blocks and a 3-token tail
    cache(store=disk(tmp_path)).insert(first, kv_for(first), len(first), tail=True)
    restarted = cache(store=disk(tmp_path))
    second = [*first[:10], 0, 0]
    assert matched(restarted, second, len(second) - 2) == first[:10]
    assert restarted.stats().disk_loads == 3
