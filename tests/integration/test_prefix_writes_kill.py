"""kill -9 while the prefix cache's writer thread writes: the next start finds only sound blocks.

A real process writes many large blocks behind its "jobs" and is killed with SIGKILL once the
first file is on disk, so the kill lands mid-write most of the time; whatever it hit, the next
store removes the half-written temporary file and every block file left reads back whole.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from agent.engine.prefix_store import DiskBlockStore

pytestmark = pytest.mark.e2e  # a real process, killed

LAYERS, KV_HEADS, BLOCK, HEAD = 4, 8, 16, 64  # 256 KiB of keys and values per block


def _store(root: Path) -> DiskBlockStore:
    return DiskBlockStore(
        root,
        "model-a",
        block_shape=(LAYERS, 2, KV_HEADS, BLOCK, HEAD),
        dtype=np.dtype(np.float32),
        budget_bytes=1 << 30,
    )


WRITER = textwrap.dedent(
    f"""
    import sys, time
    import numpy as np
    from pathlib import Path
    from agent.engine.prefix_cache import PrefixCache
    from agent.engine.prefix_store import DiskBlockStore
    store = DiskBlockStore(Path(sys.argv[1]), "model-a", block_shape=({LAYERS}, 2, {KV_HEADS}, {BLOCK}, {HEAD}),
                           dtype=np.dtype(np.float32), budget_bytes=1 << 30)
    cache = PrefixCache(identity="m", block_tokens={BLOCK}, budget_bytes=1 << 30, store=store, write_behind=True)
    rng = np.random.default_rng(0)
    for prompt in range(40):  # 40 prompts of 8 blocks: 80 MiB queued for the disk at once
        ids = [prompt * 1000 + i for i in range(8 * {BLOCK})]
        kv = rng.standard_normal(({LAYERS}, 2, 1, {KV_HEADS}, len(ids), {HEAD})).astype(np.float32)
        cache.insert(ids, kv, len(ids))
    print("queued", flush=True)
    time.sleep(60)
    """
)


def test_a_kill_during_the_writes_leaves_only_sound_blocks(tmp_path: Path) -> None:
    root = tmp_path / "pc"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root)],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(root.glob("model-a/*.kv")) and time.monotonic() < deadline:
            assert proc.poll() is None, "the writer process ended early"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10)
    files = sorted(root.glob("model-a/*.kv"))
    assert files, "nothing was written before the kill"  # positive control: the writer was writing
    store = _store(root)
    keys = store.recent()
    assert not [
        p for p in (root / "model-a").iterdir() if p.suffix != ".kv"
    ]  # the torn temporary file is gone
    assert len(keys) == len(files)
    assert all(store.read_back(key) is not None for key in keys)  # every block left reads back whole
