"""The prefix cache: keys and values of prompt prefixes, kept across requests.

A prompt is cut into blocks of ``block_tokens`` token ids.  Block ``i`` is named
by a hash chained over the root (the model's identity) and every token up to
the block's end, so two prompts share a block exactly when they share every
token before its end — a token-exact prefix match, found by walking the new
prompt's blocks until one is missing (the hashed blocks of vLLM, flattened: a
dict instead of a radix tree, which for prompts of a few thousand tokens is
both simpler and as fast).  A shared instruction is stored once however many
inputs follow it.

Eviction is least-recently-used within a byte budget.  Whenever a chain of
blocks is used, it is touched from its deepest block to its root, so a block is
always more recent than its descendants and eviction takes leaves first: the
cache never holds a block it cannot reach.

Only keys and values computed by the prefill (chunks of two or more rows) are
stored, never those of decoded tokens: onnxruntime's single-row kernels round
differently, and a hit must give the very bits a cold prefill would.  A hit is
copied into the request's cache block (the block is bound once to the graph's
past and present, so it cannot alias blocks scattered in memory); copying
1,000 tokens of a 4-layer model takes milliseconds.

Reuse is token-exact: after the last whole block that matches, the walk looks
at the blocks stored under that one (in memory and on disk) and reuses the
first positions of the one that shares the most leading tokens with the prompt
(keys and values of position ``i`` depend on tokens ``0..i`` only).  So a
prompt's last, partial block is stored too (``insert(..., tail=True)``): the
next prompt with the same instruction and another input reuses the instruction
to its last token, as llama.cpp's prompt cache does, not to a block boundary.

Blocks can also live on disk (``prefix_store``): written behind the jobs by a
thread of their own (``prefix_writes``), read back into memory at start
(``preload``, on a thread the engine starts), and a block missing in memory is
looked up there lazily, during the walk.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from agent.engine.prefix_writes import WriteBehind

#: Bytes of a block key (BLAKE2b digest): collisions are out of reach at 128 bits.
KEY_BYTES = 16


def chain_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a block holding ``tokens`` whose prefix has key ``parent``."""
    data = np.asarray(tokens, dtype="<i4").tobytes()
    return hashlib.blake2b(parent + data, digest_size=KEY_BYTES).digest()


def root_key(identity: str) -> bytes:
    """The key every chain starts from: the model's identity, so no two models share a block."""
    return hashlib.blake2b(identity.encode(), digest_size=KEY_BYTES).digest()


@dataclass(frozen=True)
class Block:
    """Keys and values of ``len(tokens)`` positions, laid out ``[layers, 2, kv_heads, tokens, head_size]``."""

    key: bytes
    parent: bytes
    tokens: tuple[int, ...]
    kv: npt.NDArray[np.generic]

    @property
    def nbytes(self) -> int:
        """Size of the keys and values."""
        return int(self.kv.nbytes)


class BlockStore(Protocol):
    """Where blocks go when memory is not enough (the disk), consulted lazily."""

    def load(self, key: bytes, parent: bytes, tokens: Sequence[int]) -> Block | None:
        """The block with ``key`` if it is stored and sound, else None."""

    def save(self, blocks: Sequence[Block], chain: Sequence[bytes]) -> None:
        """Store the new ``blocks`` of ``chain`` (keys, root first); best effort."""

    def touch(self, chain: Sequence[bytes]) -> None:
        """Mark ``chain`` (keys, root first) as just used."""

    def children(self, parent: bytes) -> list[tuple[bytes, tuple[int, ...]]]:
        """(key, tokens) of the stored blocks whose parent is ``parent``."""

    def recent(self) -> list[bytes]:
        """Keys of the stored blocks, most recently used first."""

    def read_back(self, key: bytes) -> Block | None:
        """The block stored under ``key`` (one of ``recent``) if it is sound, else None."""


@dataclass(frozen=True)
class Match:
    """What a lookup found: whole ``blocks``, then the first ``tail_tokens`` positions of ``tail``."""

    blocks: list[Block]
    tail: Block | None = None
    tail_tokens: int = 0

    def tokens(self, block_tokens: int) -> int:
        """Prompt positions the match covers."""
        return len(self.blocks) * block_tokens + self.tail_tokens


class PrefixCacheStats(BaseModel):
    """What the cache holds and how often it helped (telemetry reports it)."""

    model_config = ConfigDict(extra="forbid")

    bytes: int = Field(description="Keys and values held in memory.")
    budget_bytes: int
    entries: int = Field(description="Blocks held in memory.")
    block_tokens: int
    lookups: int = Field(description="Prompts looked up since the engine started.")
    hits: int = Field(description="Lookups that reused at least one block.")
    hit_rate: float | None = Field(description="hits / lookups; null before the first lookup.")
    cached_tokens: int = Field(description="Prompt tokens served from the cache since the engine started.")
    disk_loads: int = Field(description="Blocks read back from disk (at start and by lookups).")


class PrefixCache:
    """Blocks of prompt keys and values under an LRU byte budget.

    Thread-safe (a lock per call): the engine's thread uses it, the read-back at
    start (``preload``) fills it, telemetry reads its statistics.
    """

    def __init__(
        self,
        *,
        identity: str,
        block_tokens: int,
        budget_bytes: int,
        store: BlockStore | None = None,
        write_behind: bool = False,
    ) -> None:
        if block_tokens < 2:
            raise ValueError("block_tokens must be at least 2")
        self.identity = identity
        self.block_tokens = block_tokens
        self.budget_bytes = budget_bytes
        self.root = root_key(identity)
        self._store = store
        # Where saves and use marks go: the store itself, or (``write_behind``, the engine's) a
        # writer thread in front of it that no job waits for (``prefix_writes``).
        self._write_behind = WriteBehind(store, self._cached) if write_behind and store is not None else None
        self._writes: BlockStore | WriteBehind | None = self._write_behind or store
        self._blocks: OrderedDict[bytes, Block] = OrderedDict()  # least recent first
        self._children: dict[bytes, set[bytes]] = {}  # parent key -> keys held in memory
        self._bytes = 0
        self._lock = threading.Lock()
        # Lookups and inserts in progress: the read-back at start gives way to them (a lock is not
        # fair, and a read-back that took it back block after block kept a first job out of it).
        self._engine_calls = 0
        self._gate = threading.Condition()
        self._lookups = self._hits = self._cached_tokens = self._disk_loads = 0

    def keys(self, ids: Sequence[int], blocks: int) -> list[tuple[bytes, bytes, tuple[int, ...]]]:
        """(key, parent, tokens) of the first ``blocks`` whole blocks of ``ids``."""
        out: list[tuple[bytes, bytes, tuple[int, ...]]] = []
        parent, size = self.root, self.block_tokens
        for i in range(blocks):
            tokens = tuple(ids[i * size : (i + 1) * size])
            key = chain_key(parent, tokens)
            out.append((key, parent, tokens))
            parent = key
        return out

    def lookup(self, ids: Sequence[int], *, max_tokens: int) -> list[Block]:
        """The longest chain of cached whole blocks that starts ``ids`` and covers at most ``max_tokens``."""
        return self.match(ids, max_tokens=max_tokens, partial=False).blocks

    def match(self, ids: Sequence[int], *, max_tokens: int, partial: bool = True) -> Match:
        """The longest cached prefix of ``ids`` of at most ``max_tokens``: whole blocks, then (``partial``) a tail."""
        with self._engine_call():
            return self._match(ids, max_tokens, partial)

    @contextlib.contextmanager
    def _engine_call(self) -> Iterator[None]:
        """A lookup or insert: the read-back waits until none is in progress."""
        with self._gate:
            self._engine_calls += 1
        try:
            yield
        finally:
            with self._gate:
                self._engine_calls -= 1
                self._gate.notify_all()

    def _match(self, ids: Sequence[int], max_tokens: int, partial: bool) -> Match:
        with self._lock:
            self._lookups += 1
            found: list[Block] = []
            for key, parent, tokens in self.keys(ids, max_tokens // self.block_tokens):
                block = self._blocks.get(key)
                if block is None and self._store is not None:
                    block = self._store.load(key, parent, tokens)
                    if block is not None:
                        self._disk_loads += 1
                        self._add(block)
                if block is None or block.tokens != tokens:
                    break
                found.append(block)
            tail, tail_tokens = None, 0
            if partial:
                start = len(found) * self.block_tokens
                want = tuple(ids[start : min(start + self.block_tokens, max_tokens)])
                tail, tail_tokens = self._best_child(found[-1].key if found else self.root, want)
            chain = found + ([tail] if tail is not None else [])
            self._touch(chain)
            if chain and self._writes is not None:
                self._writes.touch([b.key for b in chain])
            covered = len(found) * self.block_tokens + tail_tokens
            if covered:
                self._hits += 1
                self._cached_tokens += covered
            self._evict()
            # A block evicted just now (the budget shrank below one chain) is still valid to use.
            return Match(found, tail, tail_tokens)

    def preload(self) -> int:
        """Read back the most recently used stored blocks that fit the memory budget; returns how many.

        Run at start beside serving (``Engine`` starts it on a thread), so the first job after a
        restart finds its prefix in memory. One block at a time under the cache's lock, giving way
        to any lookup or insert in progress: a job that comes first loads what it needs itself
        (reading a file twice at once only made both slower) and the read-back skips what is
        here. Blocks go in as the least recently used, so the running jobs' blocks stay ahead of
        them. A root is used after its descendants, so roots come back first and a budget that
        runs out leaves whole prefixes, never orphans.
        """
        if self._store is None or self.budget_bytes <= 0:
            return 0
        loaded = 0
        for key in self._store.recent():
            with self._gate:
                self._gate.wait_for(lambda: self._engine_calls == 0)
            with self._lock:
                if self._bytes >= self.budget_bytes:
                    break
                if key in self._blocks:
                    continue
                block = self._store.read_back(key)
                if block is None:
                    continue
                if self._bytes + block.nbytes > self.budget_bytes:
                    break
                self._add(block)
                self._blocks.move_to_end(key, last=False)
                self._disk_loads += 1
                loaded += 1
        return loaded

    def _best_child(self, parent: bytes, want: tuple[int, ...]) -> tuple[Block | None, int]:
        """The block under ``parent`` sharing the most leading tokens with ``want``, and how many."""
        candidates = {key: self._blocks[key].tokens for key in self._children.get(parent, ())}
        if self._store is not None and want:
            for key, tokens in self._store.children(parent):
                candidates.setdefault(key, tokens)
        best, best_n = None, 0
        for key, tokens in candidates.items():
            n = 0
            for a, b in zip(tokens, want, strict=False):
                if a != b:
                    break
                n += 1
            if n > best_n:
                best, best_n = key, n
        if best is None:
            return None, 0
        block = self._blocks.get(best)
        if block is None and self._store is not None:
            block = self._store.load(best, parent, candidates[best])
            if block is not None:
                self._disk_loads += 1
                self._add(block)
        return (block, best_n) if block is not None else (None, 0)

    def insert(
        self, ids: Sequence[int], kv: npt.NDArray[np.generic], rows: int, *, tail: bool = False
    ) -> int:
        """Store the whole blocks of ``ids[:rows]`` not cached yet; returns how many were new.

        ``kv`` is the request's cache, ``[layers, 2, 1, kv_heads, capacity, head_size]``;
        blocks are copied out of it, as many as fit in the budget (the first ones first).
        ``tail``: the positions after the last whole block go in too, as a shorter block.
        """
        if self.budget_bytes <= 0:
            return 0
        with self._engine_call():
            return self._insert(ids, kv, rows, tail)

    def _insert(self, ids: Sequence[int], kv: npt.NDArray[np.generic], rows: int, tail: bool) -> int:
        new: list[Block] = []
        chain: list[Block] = []
        with self._lock:
            spans = self.keys(ids, rows // self.block_tokens)
            whole = len(spans) * self.block_tokens
            if tail and whole < rows:
                last = spans[-1][0] if spans else self.root
                spans.append((chain_key(last, ids[whole:rows]), last, tuple(ids[whole:rows])))
            for i, (key, parent, tokens) in enumerate(spans):
                block = self._blocks.get(key)
                if block is None:
                    start = i * self.block_tokens
                    data = np.ascontiguousarray(kv[:, :, 0, :, start : start + len(tokens), :])
                    if self._bytes + data.nbytes > self.budget_bytes and not self._can_free(
                        data.nbytes, chain
                    ):
                        break
                    block = Block(key=key, parent=parent, tokens=tokens, kv=data)
                    self._add(block)
                    new.append(block)
                chain.append(block)
            self._touch(chain)
            self._evict()
        if self._writes is not None and chain:
            self._writes.save(new, [b.key for b in chain])
        return len(new)

    def _cached(self, key: bytes) -> Block | None:
        with self._lock:
            return self._blocks.get(key)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the blocks queued for the disk are written; False if ``timeout`` ran out first."""
        return True if self._write_behind is None else self._write_behind.flush(timeout)

    def stats(self) -> PrefixCacheStats:
        """A snapshot of the cache's size and use."""
        with self._lock:
            return PrefixCacheStats(
                bytes=self._bytes,
                budget_bytes=self.budget_bytes,
                entries=len(self._blocks),
                block_tokens=self.block_tokens,
                lookups=self._lookups,
                hits=self._hits,
                hit_rate=self._hits / self._lookups if self._lookups else None,
                cached_tokens=self._cached_tokens,
                disk_loads=self._disk_loads,
            )

    def clear(self) -> None:
        """Forget every block held in memory (the disk copy stays)."""
        with self._lock:
            self._blocks.clear()
            self._children.clear()
            self._bytes = 0

    # -- under the lock ----------------------------------------------------------------

    def _add(self, block: Block) -> None:
        if block.key not in self._blocks:
            self._blocks[block.key] = block
            self._children.setdefault(block.parent, set()).add(block.key)
            self._bytes += block.nbytes

    def _touch(self, chain: list[Block]) -> None:
        for block in reversed(chain):  # deepest first: the root ends up the most recent
            if block.key in self._blocks:
                self._blocks.move_to_end(block.key)

    def _can_free(self, nbytes: int, protected: list[Block]) -> bool:
        """Whether evicting blocks outside ``protected`` could make room for ``nbytes`` more."""
        keep = {b.key for b in protected}
        freeable = sum(b.nbytes for k, b in self._blocks.items() if k not in keep)
        return self._bytes - freeable + nbytes <= self.budget_bytes

    def _evict(self) -> None:
        while self._bytes > self.budget_bytes and self._blocks:
            _, block = self._blocks.popitem(last=False)
            self._children.get(block.parent, set()).discard(block.key)
            self._bytes -= block.nbytes
