"""onnxruntime's repacked weights kept on disk, so they are memory-mapped at load (docs/memory.md).

onnxruntime repacks every int4/int8 ``MatMulNBits`` matrix into its kernels'
layout when a session is created: 1.24x the file's bytes in anonymous memory,
the largest part of the engine's peak.  With
``session.save_external_prepacked_constant_initializers`` a session writes its
optimized graph with the repacked blobs beside the initializers in its external
data file; a session opened on that copy maps the blobs from the file instead of
repacking (file-backed pages the kernel can reclaim, and a faster load).

The repacked layout depends on the CPU's instruction sets and on the onnxruntime
version, so a copy is made on the box that serves it, never shipped: at the
first start under ``{state_dir}/prepacked/{name}/`` (``model.onnx``,
``model.onnx.data`` and ``prepacked.json``, written to a temporary directory and
renamed).  ``prepacked.json`` names what the copy was made from — the model's
files (graph digest, data files' sizes and modification times), onnxruntime's
version and the CPU's features — and the SHA-256 and size of each file written;
a copy whose source, runtime or CPU changed, or whose files do not match, is made
again.  Opening the store removes the copies of model folders that no longer exist;
a copy is made only when the disk has room for it (``COPY_FACTOR``) and some to spare.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.engine.model_identity import file_digest, runtime_fingerprint

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MANIFEST = "prepacked.json"
#: Initializers smaller than this stay inside the graph file.
_EXTERNAL_MIN_BYTES = 1024
#: A copy's size per byte of the model's files: its initializers and their repacked blobs (2.03 measured
#: on Phi-3-mini-shaped int4), with room to spare.
COPY_FACTOR = 2.3
#: Free space left beside a copy (the job queue and the model store share the disk).
_SPARE_BYTES = 512 << 20


class WrittenFile(BaseModel):
    """One file of a copy: its size and SHA-256."""

    model_config = ConfigDict(extra="forbid", strict=True)

    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class PrepackedManifest(BaseModel):
    """``prepacked.json``: what a copy was made from, and what was written."""

    model_config = ConfigDict(extra="forbid", strict=True)

    format: int = Field(description="This module's FORMAT_VERSION when the copy was made.")
    source: str = Field(description="The model folder the copy was made from.")
    key: str = Field(description="Digest of the source's files, onnxruntime's version and the CPU.")
    onnxruntime: str
    made_at: float = Field(description="Unix time the copy was written.")
    seconds: float = Field(description="How long making it took.")
    files: dict[str, WrittenFile]


def source_key(folder: Path, graph: Path) -> str:
    """What decides a copy's bytes: the graph's digest, the data files' sizes and times, runtime and CPU."""
    parts = [f"v{FORMAT_VERSION}", file_digest([graph]), runtime_fingerprint(0)]
    for path in sorted(folder.glob("*.data")):
        stat = path.stat()
        parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def copy_dir(root: Path, folder: Path) -> Path:
    """Where the copy of model ``folder`` lives under ``root``: its name and a digest of its path."""
    resolved = str(folder.resolve())
    return root / f"{folder.name}-{hashlib.sha256(resolved.encode()).hexdigest()[:12]}"


def read_manifest(directory: Path) -> PrepackedManifest | None:
    """The copy's manifest, or None when absent or unreadable."""
    try:
        return PrepackedManifest.model_validate_json((directory / MANIFEST).read_bytes())
    except (OSError, ValidationError):
        return None


def usable(directory: Path, key: str) -> bool:
    """Whether the copy in ``directory`` was made from ``key`` and its files are the ones written.

    The graph file is hashed again (it is small); the data file's size is checked (hashing
    gigabytes at every start would cost more than the load it saves).
    """
    manifest = read_manifest(directory)
    if manifest is None or manifest.format != FORMAT_VERSION or manifest.key != key:
        return False
    for name, written in manifest.files.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != written.bytes:
            return False
    graph = manifest.files.get(MODEL_FILE)
    return graph is not None and _sha256(directory / MODEL_FILE) == graph.sha256


def prepacked_model(
    root: Path, folder: Path, graph: Path, make_options: Callable[[], ort.SessionOptions]
) -> Path:
    """The graph of ``folder``'s repacked copy under ``root``, made now if missing or stale.

    ``make_options`` gives the serving session's options (the copy is optimized with
    them). Raises ``OSError`` or onnxruntime's errors when the copy cannot be made.
    """
    key = source_key(folder, graph)
    target = copy_dir(root, folder)
    if usable(target, key):
        return target / MODEL_FILE
    root.mkdir(parents=True, exist_ok=True)
    remove_orphans(root)
    check_room(root, folder, target)
    partial = root / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        started = time.perf_counter()
        log.info("repacking %s's weights for this CPU into %s (once)", folder.name, target)
        _write_copy(graph, partial, make_options)
        manifest = PrepackedManifest(
            format=FORMAT_VERSION,
            source=str(folder.resolve()),
            key=key,
            onnxruntime=ort.__version__,
            made_at=time.time(),
            seconds=round(time.perf_counter() - started, 3),
            files={
                name: WrittenFile(bytes=(partial / name).stat().st_size, sha256=_sha256(partial / name))
                for name in (MODEL_FILE, DATA_FILE)
            },
        )
        _write_synced(partial / MANIFEST, manifest.model_dump_json(indent=1).encode())
        old = root / f".{target.name}.old-{os.getpid()}"
        if target.exists():
            target.rename(old)
        partial.rename(target)
        _sync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target / MODEL_FILE


def check_room(root: Path, folder: Path, target: Path) -> None:
    """Raise ``OSError`` when the disk under ``root`` cannot take the copy and leave some room."""
    model_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    old = sum(p.stat().st_size for p in target.iterdir() if p.is_file()) if target.is_dir() else 0
    need = int(model_bytes * COPY_FACTOR) + _SPARE_BYTES
    free = shutil.disk_usage(root).free + old
    if free < need:
        raise OSError(f"{root} has {free >> 20} MiB free and the copy needs ~{need >> 20} MiB")


def remove_orphans(root: Path) -> None:
    """Remove copies whose model folder is gone, and leftovers of interrupted writes."""
    for entry in root.iterdir():
        if entry.name.startswith(".") and (".partial-" in entry.name or ".old-" in entry.name):
            pid = entry.name.rsplit("-", 1)[-1]
            if not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
                shutil.rmtree(entry, ignore_errors=True)
            continue
        manifest = read_manifest(entry) if entry.is_dir() else None
        if entry.is_dir() and (manifest is None or not Path(manifest.source).is_dir()):
            log.info("removing %s: its model folder is gone", entry)
            shutil.rmtree(entry, ignore_errors=True)


def _write_copy(graph: Path, into: Path, make_options: Callable[[], ort.SessionOptions]) -> None:
    """Open ``graph`` once with onnxruntime saving its optimized form and repacked weights into ``into``."""
    so = make_options()
    so.optimized_model_filepath = str(into / MODEL_FILE)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA_FILE)
    so.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", str(_EXTERNAL_MIN_BYTES)
    )
    so.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    session = ort.InferenceSession(str(graph), sess_options=so, providers=["CPUExecutionProvider"])
    del session
    for name in (MODEL_FILE, DATA_FILE):
        if not (into / name).is_file():
            raise OSError(f"onnxruntime wrote no {name} (nothing large enough to keep outside the graph)")
        with (into / name).open("rb+") as f:
            os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
