"""The model store under ``state_dir/models``: installed versions and which one is active.

    models/
      store.json               {"active": "name@version", "previous": …}  (replaced atomically)
      updates.json             the update record: last status, probation, refused releases
      versions/NAME@VERSION/   an installed version: its files and release.json (its manifest)
      staging/NAME@VERSION/    a download in progress (``*.part`` files resume)

A version directory appears only by renaming a complete, fsynced staging
directory, and the active version changes only by replacing ``store.json``
(write, fsync, rename, fsync the directory).  So a power cut at any moment
leaves either the old or the new pointer, and every version directory it can
name is whole.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from agent.updates.record import UpdateRecord
from edge_contract.errors import UpdateError
from edge_contract.manifest import Manifest

RELEASE_FILE = "release.json"


@dataclass(frozen=True)
class Pointer:
    """Which installed versions are active and previous (``name@version`` ids)."""

    active: str | None = None
    previous: str | None = None


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ModelStore:
    """Installed model versions under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.versions = root / "versions"
        self.staging_root = root / "staging"
        for folder in (self.versions, self.staging_root):
            folder.mkdir(parents=True, exist_ok=True)
        self._pointer_file = root / "store.json"
        self.record_file = root / "updates.json"

    # -- which version is active ---------------------------------------------------

    def pointer(self) -> Pointer:
        """The active and previous versions (a pointer to a missing version reads as none)."""
        try:
            data = json.loads(self._pointer_file.read_bytes())
        except FileNotFoundError:
            return Pointer()
        except (OSError, ValueError):
            return Pointer()  # unreadable: serve the configured model rather than nothing
        active, previous = data.get("active"), data.get("previous")
        return Pointer(
            active=active if isinstance(active, str) and self.manifest(active) else None,
            previous=previous if isinstance(previous, str) and self.manifest(previous) else None,
        )

    def set_pointer(self, pointer: Pointer) -> None:
        """Switch atomically."""
        data = {"active": pointer.active, "previous": pointer.previous}
        write_atomically(self._pointer_file, json.dumps(data).encode())

    def path(self, release_id: str) -> Path:
        """Folder of an installed version."""
        return self.versions / release_id

    def manifest(self, release_id: str) -> Manifest | None:
        """The manifest an installed version came with, or ``None`` if it is not installed."""
        try:
            return Manifest.model_validate_json((self.versions / release_id / RELEASE_FILE).read_bytes())
        except (OSError, ValueError):
            return None

    # -- installing ----------------------------------------------------------------------

    def staging(self, manifest: Manifest) -> Path:
        """The folder a release downloads into (created; what it holds already is kept)."""
        folder = self.staging_root / manifest.release_id
        folder.mkdir(exist_ok=True)
        return folder

    def target(self, folder: Path, relative: str) -> Path:
        """Where file ``relative`` goes inside ``folder``: refused if it would land outside it."""
        dest = folder.joinpath(*relative.split("/"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        inside = folder.resolve()
        if not dest.parent.resolve().is_relative_to(inside) or dest.is_symlink():
            raise UpdateError(f"{relative}: would be written outside the version folder", code="unsafe_path")
        return dest

    def install(self, manifest: Manifest) -> Path:
        """Move a complete staging folder into ``versions`` (durably) and return its path."""
        staged = self.staging_root / manifest.release_id
        final = self.versions / manifest.release_id
        if final.exists():  # installed before (a rollback release to a kept version)
            shutil.rmtree(staged, ignore_errors=True)
            return final
        for entry in manifest.files:
            with (staged / entry.path).open("rb") as f:
                os.fsync(f.fileno())
        release = staged / RELEASE_FILE
        with release.open("wb") as f:
            f.write(manifest.model_dump_json().encode())
            f.flush()
            os.fsync(f.fileno())
        for folder in {(staged / e.path).parent for e in manifest.files} | {staged}:
            fsync_dir(folder)
        os.rename(staged, final)
        fsync_dir(self.versions)
        return final

    def discard_staging(self, keep: str | None = None) -> None:
        """Delete downloads in progress, except that of ``keep``."""
        for folder in self.staging_root.iterdir():
            if folder.name != keep:
                shutil.rmtree(folder, ignore_errors=True)

    def remove(self, release_id: str) -> None:
        """Delete an installed version (never the active one)."""
        if release_id == self.pointer().active:
            raise UpdateError(f"{release_id} is active and cannot be removed")
        # Rename first so that a crash mid-delete leaves no half version under its name.
        doomed = self.staging_root / f"{release_id}.deleting"
        shutil.rmtree(doomed, ignore_errors=True)
        os.rename(self.versions / release_id, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def collect_garbage(self, keep: int) -> list[str]:
        """Keep the active, the previous and the newest others up to ``keep`` versions in all."""
        pointer = self.pointer()
        protected = {pointer.active, pointer.previous}
        others = sorted(
            (p for p in self.versions.iterdir() if p.is_dir() and p.name not in protected),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        room = max(0, keep - len(protected - {None}))
        removed = []
        for folder in others[room:]:
            self.remove(folder.name)
            removed.append(folder.name)
        return removed

    # -- the update record ---------------------------------------------------------------------

    def read_record(self) -> UpdateRecord:
        """The update record (empty when there is none; what is unreadable in it is dropped)."""
        try:
            data = self.record_file.read_bytes()
        except OSError:
            return UpdateRecord()
        return UpdateRecord.load(data)

    def write_record(self, record: UpdateRecord) -> None:
        """Replace the update record atomically."""
        write_atomically(self.record_file, record.model_dump_json().encode())

    def free_bytes(self) -> int:
        """Free space on the store's file system."""
        return shutil.disk_usage(self.root).free
