"""Getting a release onto the box: download, verify and install it; its smoke test; files on disk.

The updater (``updater``) runs these on its own thread; they report progress
through callbacks and raise ``UpdateError`` with a precise code.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from agent import failpoints
from agent.engine.engine import Engine
from agent.link.tls import client_context
from agent.updates.download import RateLimit, fetch, sha256_file
from agent.updates.options import UpdateConfig
from agent.updates.store import ModelStore
from edge_contract.errors import DownloadError, LinkError, UpdateError
from edge_contract.manifest import FileKey, Manifest
from edge_contract.protocol import UpdatePhase

# Progress is reported at most this often (a retained message per update).
_PROGRESS_EVERY_S = 1.0


def smoke_test(engine: Engine, manifest: Manifest) -> None:
    """Check the recorded tokens rank within ``top_k`` at every step (teacher-forced)."""
    test = manifest.smoke_test
    ids = engine.prompt_ids(test.prompt)
    if ids != test.prompt_ids:
        raise UpdateError(
            "smoke test: the tokenizer splits the prompt differently than at release",
            code="smoke_test_failed",
        )
    ranks = engine.token_ranks(ids, test.token_ids)
    bad = [(step, rank) for step, rank in enumerate(ranks) if rank >= test.top_k]
    if bad:
        step, rank = bad[0]
        raise UpdateError(
            f"smoke test: {len(bad)} of {len(ranks)} recorded tokens fall outside the top {test.top_k} "
            f"(first at step {step}, rank {rank})",
            code="smoke_test_failed",
        )


def download_and_install(
    store: ModelStore,
    manifest: Manifest,
    settings: UpdateConfig,
    *,
    min_free_bytes: int,
    report: Callable[[UpdatePhase, float | None], None],
    cancelled: Callable[[], bool],
) -> None:
    """Download ``manifest``'s files into the store's staging folder (resuming what is there),
    verify them again and install the version (updater thread).

    ``report`` gets each phase and its progress (at most every second); a download stops with
    ``DownloadError`` as soon as ``cancelled`` says so (shutdown, or a new desired release).
    """
    release = manifest.release_id
    staging = store.staging(manifest)
    store.discard_staging(keep=release)
    _download(store, manifest, staging, settings, min_free_bytes, report, cancelled)
    report("verifying", 0.0)
    for entry in manifest.files:
        digest, size = sha256_file(staging / entry.path)
        if (digest, size) != (entry.sha256, entry.size):
            (staging / entry.path).unlink()
            raise UpdateError(f"{entry.path}: changed on disk after download", code="sha256_mismatch")
    failpoints.hit("verifying")
    store.install(manifest)


def _download(
    store: ModelStore,
    manifest: Manifest,
    staging: Path,
    settings: UpdateConfig,
    min_free_bytes: int,
    report: Callable[[UpdatePhase, float | None], None],
    cancelled: Callable[[], bool],
) -> None:
    needed = sum(f.size - _have(staging / f.path) for f in manifest.files if not (staging / f.path).exists())
    free = store.free_bytes()
    if needed + min_free_bytes > free:
        raise UpdateError(
            f"needs {needed >> 20} MiB plus {min_free_bytes >> 20} MiB to spare; {free >> 20} MiB are free",
            code="disk_full",
        )
    total = max(1, manifest.total_bytes)
    done = 0
    last = 0.0
    crash_at = total // 2
    rate = RateLimit(settings.bandwidth_kbps * 1000) if settings.bandwidth_kbps else None
    try:
        context = client_context(settings.ca)  # TLS 1.2+, verified: as for the broker
    except LinkError as exc:
        raise UpdateError(f"[update] ca: {exc.message}", code="download_interrupted") from exc
    report("downloading", 0.0)

    def on_bytes(count: int) -> None:
        nonlocal done, last
        done += count
        if done >= crash_at:
            failpoints.hit("downloading")
        now = time.monotonic()
        if now - last >= _PROGRESS_EVERY_S:
            last = now
            report("downloading", min(1.0, done / total))
        if cancelled():
            raise DownloadError("the download was stopped (shutdown, or a new desired release)")

    for entry in manifest.files:
        dest = store.target(staging, entry.path)
        if dest.exists():
            on_bytes(entry.size)  # finished in an earlier run; verified below
            continue
        fetch(entry, dest, on_bytes=on_bytes, rate=rate, context=context)


def files_on_disk(folder: Path, manifest: Manifest) -> frozenset[FileKey]:
    """The files of ``folder`` that ``manifest`` names, as (path, size, sha256) of what is on disk.

    A file whose size differs is not hashed, a missing one not listed; nothing outside
    ``folder`` is read (``UpdateError`` ``unsafe_path`` first).
    """
    manifest.check_paths()
    found: set[FileKey] = set()
    for entry in manifest.files:
        path = folder / entry.path
        if path.is_file() and path.stat().st_size == entry.size:
            digest, size = sha256_file(path)
            found.add((entry.path, size, digest))
    return frozenset(found)


def _have(path: Path) -> int:
    part = path.with_name(path.name + ".part")
    return part.stat().st_size if part.exists() else 0
