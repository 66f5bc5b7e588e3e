"""The prefix cache's disk writes, made on a thread of their own so that no job waits for the disk.

A prompt's blocks were written (and authenticated) inline after its prefill: ~0.3 s for 1,000
tokens of a 4-layer Phi-3-mini-shaped model here, ~750 MB at Phi-3-mini's full size, which an
SD card writes in tens of seconds, while every job of the batch waited for its next token.
Writes and use marks go through one queue in order.  The queue holds keys, not keys and values:
the writer takes each block from the memory cache when its turn comes, so a block evicted
meanwhile is simply not written and no queued write keeps memory past the cache's budget.  At
most ``MAX_PENDING`` writes wait (past it, new prefixes stay in memory only, with one warning);
``flush`` lets a clean stop finish them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.engine.prefix_cache import Block, BlockStore

log = logging.getLogger(__name__)
IDLE_EXIT_S = 30.0  # an idle writer ends (an engine replaced by a model update leaves no thread behind)
MAX_PENDING = 1024  # queued writes (a prompt's new blocks each); a disk this far behind is told about


class WriteBehind:
    """``save`` and ``touch`` of a :class:`BlockStore`, carried out later on one thread, in order.

    ``cached(key)``: the block still held in memory under ``key``, or None once evicted.
    """

    def __init__(self, store: BlockStore, cached: Callable[[bytes], Block | None]) -> None:
        self._store = store
        self._cached = cached
        self._queue: queue.SimpleQueue[tuple[list[bytes], list[bytes]]] = queue.SimpleQueue()
        self._state = threading.Condition()
        self._pending = 0  # queued items not yet carried out
        self._thread: threading.Thread | None = None
        self._warned = False

    def save(self, blocks: Sequence[Block], chain: Sequence[bytes]) -> None:
        """Queue the new ``blocks`` of ``chain`` (keys, root first) for the disk."""
        self._put([b.key for b in blocks], chain)

    def touch(self, chain: Sequence[bytes]) -> None:
        """Queue a use mark of ``chain`` (keys, root first), after the writes queued before it."""
        self._put([], chain)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued is on disk; False if ``timeout`` ran out first."""
        with self._state:
            return self._state.wait_for(lambda: self._pending == 0, timeout)

    def _put(self, keys: list[bytes], chain: Sequence[bytes]) -> None:
        with self._state:
            if self._pending >= MAX_PENDING:
                if not self._warned:
                    log.warning(
                        "prefix cache: the disk falls behind (%d writes waiting); new prefixes are kept "
                        "in memory only until it catches up",
                        self._pending,
                    )
                    self._warned = True
                return
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="prefix-cache-writer", daemon=True)
                self._thread.start()
        self._queue.put((keys, list(chain)))

    def _run(self) -> None:
        # The lowest CPU priority (Linux: per thread): on a box whose cores all decode, the writes
        # (authenticating and writing hundreds of MiB) take what the jobs leave.
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while True:
            try:
                keys, chain = self._queue.get(timeout=IDLE_EXIT_S)
            except queue.Empty:
                with self._state:
                    if self._pending == 0:  # idle: end; the next write starts another thread
                        self._thread = None
                        return
                continue
            try:
                self._carry_out(keys, chain)
            except Exception:  # the disk copy is an optimisation: the thread goes on
                log.warning("prefix cache: writing to disk failed", exc_info=True)
            finally:
                with self._state:
                    self._pending -= 1
                    if self._pending <= MAX_PENDING // 2:
                        self._warned = False
                    self._state.notify_all()

    def _carry_out(self, keys: list[bytes], chain: list[bytes]) -> None:
        if not keys:
            self._store.touch(chain)
            return
        blocks = [b for b in map(self._cached, keys) if b is not None]  # evicted meanwhile: not written
        if blocks:
            self._store.save(blocks, chain)
