"""Real storage faults for tests (they run as root): a small tmpfs that fills up, a read-only bind mount."""

from __future__ import annotations

import contextlib
import subprocess
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
