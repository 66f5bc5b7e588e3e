"""The prefix cache's disk writes, made on a thread of their own so that no job waits for the disk.

A prompt's blocks were written (and authenticated) inline after its prefill: ~0.3 s for 1,000
tokens of a 4-layer Phi-3-mini-shaped model here, ~750 MB at Phi-3-mini's full size, which an
SD card writes in tens of seconds, while every job of the batch waited for its next token.
Writes and use marks go through one queue in order; what waits is bounded (``max_pending_bytes``:
past it, new blocks stay in memory only, with one warning), and ``flush`` lets a clean stop
finish them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Sequence

from agent.engine.prefix_cache import Block, BlockStore

log = logging.getLogger(__name__)
IDLE_EXIT_S = 30.0  # an idle writer ends (an engine replaced by a model update leaves no thread behind)


class WriteBehind:
    """``save`` and ``touch`` of a :class:`BlockStore`, carried out later on one thread, in order."""

    def __init__(self, store: BlockStore, *, max_pending_bytes: int) -> None:
        self._store = store
        self._max_pending_bytes = max_pending_bytes
        self._queue: queue.SimpleQueue[tuple[list[Block], list[bytes]]] = queue.SimpleQueue()
        self._state = threading.Condition()
        self._pending = 0  # queued items not yet carried out
        self._pending_bytes = 0
        self._thread: threading.Thread | None = None
        self._warned = False

    def save(self, blocks: Sequence[Block], chain: Sequence[bytes]) -> None:
        """Queue the new ``blocks`` of ``chain`` (keys, root first) for the disk."""
        kept = list(blocks)
        nbytes = sum(b.nbytes for b in kept)
        with self._state:
            if kept and self._pending_bytes + nbytes > self._max_pending_bytes:
                if not self._warned:
                    log.warning(
                        "prefix cache: the disk falls behind (%d MiB waiting to be written); new prefixes "
                        "are kept in memory only until it catches up",
                        self._pending_bytes >> 20,
                    )
                    self._warned = True
                kept, nbytes = [], 0
            self._pending += 1
            self._pending_bytes += nbytes
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="prefix-cache-writer", daemon=True)
                self._thread.start()
        self._queue.put((kept, list(chain)))

    def touch(self, chain: Sequence[bytes]) -> None:
        """Queue a use mark of ``chain`` (keys, root first), after the writes queued before it."""
        self.save([], chain)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued is on disk; False if ``timeout`` ran out first."""
        with self._state:
            return self._state.wait_for(lambda: self._pending == 0, timeout)

    def _run(self) -> None:
        # The lowest CPU priority (Linux: per thread): on a box whose cores all decode, the writes
        # (authenticating and writing hundreds of MiB) take what the jobs leave.
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while True:
            try:
                blocks, chain = self._queue.get(timeout=IDLE_EXIT_S)
            except queue.Empty:
                with self._state:
                    if self._pending == 0:  # idle: end; the next save starts another thread
                        self._thread = None
                        return
                continue
            try:
                if blocks:
                    self._store.save(blocks, chain)
                else:
                    self._store.touch(chain)
            except Exception:  # the disk copy is an optimisation: the thread goes on
                log.warning("prefix cache: writing to disk failed", exc_info=True)
            finally:
                with self._state:
                    self._pending -= 1
                    self._pending_bytes -= sum(b.nbytes for b in blocks)
                    if self._pending_bytes <= self._max_pending_bytes // 2:
                        self._warned = False
                    self._state.notify_all()
