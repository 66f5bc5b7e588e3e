"""The prefix cache's name for a model: changed weights never keep it, and naming them never reads them.

Hashing the weights at every start took as long as opening the session and read the whole file
from an SD card at each boot; they are named by inode, size and times instead.  Bytes read are
counted by the kernel (``/proc/self/io``, ``rchar``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from agent.engine.model_identity import HASHED_BYTES, files_fingerprint, model_identity

BIG = HASHED_BYTES + (4 << 20)


def _read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def _folder(tmp_path: Path) -> tuple[Path, Path]:
    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"graph" * 1000)
    weights = tmp_path / "model.onnx.data"
    weights.write_bytes(os.urandom(1 << 20) * (BIG >> 20))
    return graph, weights


def test_naming_a_model_reads_its_small_files_and_never_its_weights(tmp_path: Path) -> None:
    graph, weights = _folder(tmp_path)
    before = _read_bytes()
    model_identity([graph, weights], threads=2)
    read = _read_bytes() - before
    # The graph is read (positive control: the counter sees this process's reads) ...
    assert read >= graph.stat().st_size
    # ... the weights are not: far less than one megabyte of the 20 MiB file.
    assert read < (1 << 20)


def test_weights_rewritten_in_place_with_size_and_times_kept_get_another_name(tmp_path: Path) -> None:
    graph, weights = _folder(tmp_path)
    first = files_fingerprint([graph, weights])
    assert files_fingerprint([graph, weights]) == first  # unchanged files keep their name
    kept = weights.stat()
    # The kernel stamps change times from a coarse clock (a tick of a few ms): let one pass, as any
    # real rewrite of gigabytes would, so the change time can move at all.
    time.sleep(0.05)
    with weights.open("r+b") as f:  # one byte changed, in place: same inode, same size
        f.seek(12345)
        byte = f.read(1)
        f.seek(12345)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(weights, ns=(kept.st_atime_ns, kept.st_mtime_ns))  # the modification time put back
    changed = weights.stat()
    assert (changed.st_ino, changed.st_size, changed.st_mtime_ns) == (
        kept.st_ino,
        kept.st_size,
        kept.st_mtime_ns,
    )
    assert files_fingerprint([graph, weights]) != first


def test_replaced_weights_and_a_changed_graph_get_another_name(tmp_path: Path) -> None:
    graph, weights = _folder(tmp_path)
    first = files_fingerprint([graph, weights])
    kept = weights.stat()
    other = tmp_path / "new.data"
    other.write_bytes(weights.read_bytes())  # the same bytes under a new inode, then renamed over
    os.utime(other, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    other.replace(weights)
    second = files_fingerprint([graph, weights])
    assert second != first
    graph.write_bytes(b"graph" * 999 + b"GRAPH")  # a small file counts by its bytes
    assert files_fingerprint([graph, weights]) != second
