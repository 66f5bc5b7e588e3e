"""Real storage faults for tests (they run as root): a small tmpfs that fills up, a read-only bind mount,
and the ways an SD card damages a database file (``DAMAGES``)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

# mount(2) and umount2(2) straight from libc: the tests stay in-process (no mount/umount/dd commands).
_LIBC = ctypes.CDLL(None, use_errno=True)
_MS_RDONLY, _MS_REMOUNT, _MS_BIND = 1, 32, 4096
_MNT_DETACH = 2


def _mount(source: str, target: Path, fstype: str | None, flags: int, data: str | None = None) -> None:
    done = _LIBC.mount(
        source.encode(),
        str(target).encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    if done != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount {source} on {target} ({fstype or 'bind'}): {os.strerror(code)}")


def _unmount_lazily(target: Path) -> None:
    """Detach ``target`` (a process under test may still hold files there); nothing mounted is no error."""
    _LIBC.umount2(str(target).encode(), _MNT_DETACH)


class SmallDisk:
    """A tmpfs of ``size`` mounted at ``path``: ``fill`` it up, ``free`` it again."""

    def __init__(self, path: Path, size: str = "4m") -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        _mount("tmpfs", path, "tmpfs", 0, f"size={size}")
        self._filler = path / ".filler"

    def fill(self) -> None:
        """Write zeros until the file system is full (the write that fails says 'No space left on device')."""
        block = bytes(4096)
        with open(self._filler, "wb", buffering=0) as filler:
            try:
                while True:
                    filler.write(block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc

    def free(self) -> None:
        """Delete what ``fill`` wrote."""
        self._filler.unlink(missing_ok=True)

    def close(self) -> None:
        """Unmount (lazily: a process under test may still hold files there)."""
        _unmount_lazily(self.path)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """Bind-mount ``path`` read-only onto itself for the duration."""
    _mount(str(path), path, None, _MS_BIND)
    try:
        _mount(str(path), path, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY)
        yield path
    finally:
        _unmount_lazily(path)


def garbage(p: Path) -> None:
    """The file overwritten with random bytes."""
    p.write_bytes(os.urandom(max(8192, p.stat().st_size)))


def truncated(p: Path) -> None:
    """The second half of the file lost."""
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def flipped_pages(p: Path) -> None:
    """Every bit of the second and third 4 KiB pages inverted (the header page left intact)."""
    data = bytearray(p.read_bytes())
    data[4096:12288] = bytes(b ^ 0xFF for b in data[4096:12288])
    p.write_bytes(bytes(data))


def missing_column(p: Path) -> None:
    """A valid database whose ``jobs`` table lacks a column the agent needs."""
    db = sqlite3.connect(p)
    db.execute("ALTER TABLE jobs DROP COLUMN finished_at")
    db.commit()
    db.close()


DAMAGES: list[Callable[[Path], None]] = [garbage, truncated, flipped_pages, missing_column]
