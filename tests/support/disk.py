"""Real storage faults for tests (they run as root): a small tmpfs that fills up, a read-only bind mount,
and the ways an SD card damages a database file (``DAMAGES``)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path


class SmallDisk:
    """A tmpfs of ``size`` mounted at ``path``: ``fill`` it with dd, ``free`` it again."""

    def __init__(self, path: Path, size: str = "4m") -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        self._filler = path / ".filler"

    def fill(self) -> None:
        """Write zeros until the file system is full (dd ends with 'No space left on device')."""
        done = subprocess.run(
            ["dd", "if=/dev/zero", f"of={self._filler}", "bs=4k"], capture_output=True, text=True
        )
        assert "No space left on device" in done.stderr, done.stderr

    def free(self) -> None:
        """Delete what ``fill`` wrote."""
        self._filler.unlink(missing_ok=True)

    def close(self) -> None:
        """Unmount (lazily: a process under test may still hold files there)."""
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@contextlib.contextmanager
def read_only(path: Path):  # type: ignore[no-untyped-def]
    """Bind-mount ``path`` read-only onto itself for the duration."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


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
