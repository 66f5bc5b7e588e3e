"""What names a model's prefix cache: its files and the runtime that computes its keys and values.

Keys and values computed by other weights, another onnxruntime, other CPU features or another
thread count could change a token, so a disk cache written under one name is never read under
another (``prefix_store`` drops the other names' folders).  The repacked weights' copy
(``prepacked``) is named with the same pieces.
"""

from __future__ import annotations

import contextlib
import hashlib
import platform
from collections.abc import Iterable
from pathlib import Path

from agent.engine.prefix_store import FORMAT_VERSION

_HASH_CHUNK = 1 << 20
# Files up to this size (graph, tokenizer, configs) are hashed whole; larger ones (the weights,
# gigabytes at Phi-3-mini's size) are named by inode, size and times: hashing them took as long
# as opening the session at every start, and read the whole file from an SD card at each boot.
HASHED_BYTES = 16 << 20


def file_digest(paths: Iterable[Path]) -> str:
    """SHA-256 over the names and contents of ``paths`` (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def runtime_fingerprint(threads: int) -> str:
    """What besides the weights decides the keys' and values' bits: runtime, CPU features, threads."""
    import onnxruntime

    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
    parts = (
        f"v{FORMAT_VERSION}",
        onnxruntime.__version__,
        platform.machine(),
        flags,
        _executable_features(),
        f"threads={threads}",
    )
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _executable_features() -> str:
    """The instruction sets this process may run, from CPUID (numpy's dispatch table).

    ``/proc/cpuinfo`` can list more than a process may run (some VMs, and qemu-user,
    which passes the host's through), and the kernels dispatch on CPUID.
    """
    import importlib

    try:
        umath = importlib.import_module("numpy._core._multiarray_umath")
    except ImportError:  # pragma: no cover - numpy 1.x
        umath = importlib.import_module("numpy.core._multiarray_umath")
    features: dict[str, bool] = umath.__cpu_features__
    return " ".join(sorted(name for name, on in features.items() if on))


def files_fingerprint(paths: Iterable[Path]) -> str:
    """Names the contents of ``paths`` without reading the large ones.

    A file up to ``HASHED_BYTES`` counts by its SHA-256; a larger one by its inode, size,
    modification and change times.  Rewriting a file in place moves its change time (which no
    user can set back without moving the clock), replacing it gives another inode, so changed
    weights never keep a name; copying or restoring an unchanged file gives a new name, which
    costs one cold cache.
    """
    h = hashlib.sha256()
    for path in sorted(paths):
        stat = path.stat()
        h.update(path.name.encode() + b"\0")
        if stat.st_size <= HASHED_BYTES:
            h.update(file_digest([path]).encode())
        else:
            h.update(f"{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}".encode())
    return h.hexdigest()


def model_identity(model_files: Iterable[Path], threads: int) -> str:
    """The name of a model's cache: its files' fingerprint combined with the runtime's."""
    combined = f"{files_fingerprint(model_files)}:{runtime_fingerprint(threads)}"
    return hashlib.sha256(combined.encode()).hexdigest()[:32]
