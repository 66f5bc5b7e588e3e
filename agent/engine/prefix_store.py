"""Prefix-cache blocks on disk, so a restart does not forget a long instruction.

Layout: ``{root}/{identity}/{key}.kv``, one file per block, where ``identity``
names the model (its files, the onnxruntime version and the CPU's features:
keys and values computed by other kernels could change a token) and
``key`` is the block's chained hash.  Opening the store for one identity
removes the directories of every other: a model update drops the old cache.

A file is ``MAGIC``, a 4-byte header length, a JSON header (identity, key,
parent, tokens, dtype, shape), the raw keys and values, and an HMAC-SHA256 of
all that under the box's own key (``STATE_DIR/prefix_cache.key``: 32 random
bytes made at first use, mode 0600).  A checksum anyone can recompute let a
local user who could write the folder change answers (scaled keys, NaN values);
a file written without the key now fails.  A file is loaded only if every check
passes — the keyed digest, the identity, the key recomputed from parent and
tokens, the shape the engine expects, every value finite — otherwise it is
removed with a warning and the request prefills normally.  Without a usable key
file the disk copy is off (with a warning), never unauthenticated.  Files are written to a temporary name and renamed, so a power cut
leaves either the whole file or none (or a torn one, which the digest rejects).

The directory is bounded (``budget_bytes``): writing past it removes the least
recently used files (each use of a chain refreshes its files' modification
times, root newest).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from agent.engine.prefix_cache import Block, chain_key

log = logging.getLogger(__name__)

MAGIC = b"EAKVBLK2"
FORMAT_VERSION = 2  # 2: keyed (HMAC-SHA256); version 1 files are dropped with their folder
_DIGEST = 32
KEY_BYTES = 32
_SUFFIX = ".kv"
_MAX_HEADER = 1 << 16


def box_key(path: Path) -> bytes:
    """The box's key of prefix-cache files at ``path``: made at first use (0600), read afterwards.

    A key of the wrong length is replaced (the files it signed then fail and are removed);
    one readable by others is made 0600 again, with a warning.  ``OSError`` when neither works.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
    if len(data) == KEY_BYTES:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning("prefix cache: %s was mode %04o; made 0600 (it authenticates the cache)", path, mode)
            path.chmod(0o600)
        return data
    if data:
        log.warning("prefix cache: %s is not a %d-byte key; replacing it", path, KEY_BYTES)
    key = secrets.token_bytes(KEY_BYTES)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return key


class DiskBlockStore:
    """Blocks of one model identity under ``root`` (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        identity: str,
        *,
        block_shape: tuple[int, ...],
        dtype: np.dtype[np.generic],
        budget_bytes: int,
    ) -> None:
        self.root = Path(root)
        self.identity = identity
        self.dir = self.root / identity
        self.block_shape = tuple(block_shape)
        self.dtype = np.dtype(dtype)
        self.budget_bytes = budget_bytes
        self.key_file = self.root.with_name(self.root.name + ".key")
        self._key: bytes | None = None
        self._opened = False
        self._used: int = 0
        self._warned_write = False
        # parent key -> {key: tokens} of the files here, read from their headers on first need.
        self._index: dict[bytes, dict[bytes, tuple[int, ...]]] | None = None
        # The engine's thread, the read-back at start and the writer (prefix_writes) share this
        # state (index, bytes used, key); file reads and writes themselves run outside the lock.
        self._lock = threading.RLock()

    # -- lazily, on first use ------------------------------------------------------------

    def _open(self) -> None:
        if self._opened:
            return
        with self._lock:
            if not self._opened:
                try:
                    self._open_locked()
                finally:  # only now: another thread seeing it set must find the key read
                    self._opened = True

    def _open_locked(self) -> None:
        try:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            self._key = box_key(self.key_file)
        except OSError as exc:
            log.warning(
                "prefix cache: cannot read or create its key %s (%s); continuing without the disk copy",
                self.key_file,
                exc,
            )
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            for other in self.root.iterdir():
                if other.name != self.identity:
                    log.info("prefix cache: removing %s (another model or runtime)", other)
                    if other.is_dir() and not other.is_symlink():
                        shutil.rmtree(other, ignore_errors=True)
                    else:
                        other.unlink(missing_ok=True)
            self._used = 0
            for path in self.dir.iterdir():
                if path.suffix != _SUFFIX:  # a temporary file a crash left behind
                    path.unlink(missing_ok=True)
                else:
                    self._used += path.stat().st_size
        except OSError as exc:
            log.warning("prefix cache: cannot use %s (%s); continuing without the disk copy", self.dir, exc)

    def _path(self, key: bytes) -> Path:
        return self.dir / f"{key.hex()}{_SUFFIX}"

    # -- reading ------------------------------------------------------------------------

    def load(self, key: bytes, parent: bytes, tokens: Sequence[int]) -> Block | None:
        """The block stored under ``key``, or None if absent or unsound (then it is removed)."""
        self._open()
        if self._key is None:
            return None
        path = self._path(key)
        # Never read more than a sound file can hold: a block's payload plus a generous header.
        limit = int(np.prod(self.block_shape)) // self.block_shape[3] * len(tokens) * self.dtype.itemsize
        limit += _MAX_HEADER
        try:
            if path.stat().st_size > limit:
                log.warning("prefix cache: ignoring and removing %s: larger than a block can be", path)
                self._remove(path)
                return None
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("prefix cache: cannot read %s (%s); ignoring it", path, exc)
            return None
        problem, block = self._decode(data, key, parent, tuple(tokens))
        if block is None:
            log.warning("prefix cache: ignoring and removing %s: %s", path, problem)
            self._remove(path)
            return None
        return block

    def children(self, parent: bytes) -> list[tuple[bytes, tuple[int, ...]]]:
        """(key, tokens) of the files whose parent is ``parent`` (unchecked: ``load`` checks a file)."""
        with self._lock:
            self._open()
            if self._index is None:
                self._index = {}
                try:
                    paths = [p for p in self.dir.iterdir() if p.suffix == _SUFFIX]
                except OSError:
                    paths = []
                for path in paths:
                    entry = _read_header(path)
                    if entry is not None:
                        self._indexed(*entry)
            return list(self._index.get(parent, {}).items())

    def recent(self) -> list[bytes]:
        """Keys of the blocks here, most recently used first (only the files' times are read)."""
        self._open()
        dated: list[tuple[int, bytes]] = []
        with contextlib.suppress(OSError):
            for path in self.dir.iterdir():
                if path.suffix == _SUFFIX:
                    with contextlib.suppress(OSError, ValueError):  # removed meanwhile; not a key's name
                        dated.append((path.stat().st_mtime_ns, bytes.fromhex(path.stem)))
        dated.sort(key=lambda item: item[0], reverse=True)
        return [key for _, key in dated]

    def read_back(self, key: bytes) -> Block | None:
        """The block stored under ``key`` (one of ``recent``), checked as ``load`` checks it; None if unsound or gone."""
        entry = _read_header(self._path(key))
        if entry is None or entry[0] != key:
            return None
        return self.load(*entry)

    def _indexed(self, key: bytes, parent: bytes, tokens: tuple[int, ...]) -> None:
        if self._index is not None:
            self._index.setdefault(parent, {})[key] = tokens

    def _decode(
        self, data: bytes, key: bytes, parent: bytes, tokens: tuple[int, ...]
    ) -> tuple[str, Block | None]:
        head = len(MAGIC) + 4
        if len(data) < head + _DIGEST or not data.startswith(MAGIC):
            return "not a prefix-cache file", None
        # Views, not copies: a block file is tens of MiB at Phi-3-mini's size and a restart reads
        # hundreds of them; the array below views the bytes read (read-only, never written).
        view = memoryview(data)
        body, digest = view[:-_DIGEST], data[-_DIGEST:]
        if not hmac.compare_digest(self._mac(body), digest):
            return "keyed checksum mismatch (written without this box's key, torn or corrupt)", None
        (size,) = struct.unpack("<I", data[len(MAGIC) : head])
        try:
            header = json.loads(bytes(body[head : head + size]))
        except ValueError:
            return "unreadable header", None
        if not isinstance(header, dict):
            return "unreadable header", None
        if header.get("identity") != self.identity:
            return "written for another model or runtime", None
        if (
            header.get("key") != key.hex()
            or header.get("parent") != parent.hex()
            or header.get("tokens") != list(tokens)
            or chain_key(parent, tokens) != key
        ):
            return "its tokens do not match its name", None
        shape = (*self.block_shape[:3], len(tokens), *self.block_shape[4:])
        if header.get("dtype") != self.dtype.str or header.get("shape") != list(shape):
            return f"shape or dtype {header.get('shape')} {header.get('dtype')} is not the model's", None
        payload = body[head + size :]
        if len(payload) != int(np.prod(shape)) * self.dtype.itemsize:
            return "wrong payload size", None
        kv = np.frombuffer(payload, dtype=self.dtype).reshape(shape)
        if kv.dtype.kind in "fc" and not np.isfinite(kv).all():
            return "non-finite values", None
        return "", Block(key=key, parent=parent, tokens=tokens, kv=kv)

    # -- writing ------------------------------------------------------------------------

    def save(self, blocks: Sequence[Block], chain: Sequence[bytes]) -> None:
        """Write the new ``blocks`` of ``chain`` (its keys, root first), then trim to the budget.

        Failures are logged, never raised: the disk copy is an optimisation.
        """
        if self.budget_bytes <= 0:
            return
        self._open()
        if self._key is None:
            return
        for block in blocks:
            header = json.dumps(
                {
                    "identity": self.identity,
                    "key": block.key.hex(),
                    "parent": block.parent.hex(),
                    "tokens": list(block.tokens),
                    "dtype": self.dtype.str,
                    "shape": list(block.kv.shape),
                }
            ).encode()
            body = MAGIC + struct.pack("<I", len(header)) + header + block.kv.tobytes()
            data = body + self._mac(body)
            if len(data) > self.budget_bytes:
                return
            path = self._path(block.key)
            tmp = path.with_suffix(".tmp")
            try:
                previous = path.stat().st_size if path.exists() else 0
                tmp.write_bytes(data)
                tmp.replace(path)
                with self._lock:
                    self._used += len(data) - previous
                    self._indexed(block.key, block.parent, block.tokens)
            except OSError as exc:
                self._remove(tmp)
                if not self._warned_write:
                    log.warning(
                        "prefix cache: cannot write %s (%s); the copy on disk is incomplete", path, exc
                    )
                    self._warned_write = True
                break
        self.touch(chain)
        self._trim()

    def _mac(self, body: bytes | memoryview) -> bytes:
        assert self._key is not None  # checked by every caller
        return hmac.new(self._key, body, hashlib.sha256).digest()

    def touch(self, keys: Sequence[bytes]) -> None:
        """Mark a chain (root first) as just used; its root becomes the newest file, its leaf the oldest.

        The budget removes the oldest files first, so it takes leaves before their
        ancestors and never leaves a block that no walk can reach.
        """
        if not keys or self.budget_bytes <= 0:
            return
        self._open()
        now = time.time_ns()
        for age, key in enumerate(keys):
            stamp = now - age * 1000
            with contextlib.suppress(OSError):
                os.utime(self._path(key), ns=(stamp, stamp))

    def _trim(self) -> None:
        with self._lock:
            if self._used <= self.budget_bytes:
                return
            try:
                files = sorted(
                    ((p.stat().st_mtime_ns, p) for p in self.dir.iterdir() if p.suffix == _SUFFIX),
                    key=lambda item: item[0],
                )
            except OSError:
                return
            for _, path in files:
                if self._used <= self.budget_bytes:
                    break
                self._remove(path)

    def _remove(self, path: Path) -> None:
        with self._lock:
            try:
                size = path.stat().st_size
                path.unlink()
            except OSError:
                return
            if path.suffix == _SUFFIX:
                self._used -= size
                if self._index is not None:
                    with contextlib.suppress(ValueError):
                        key = bytes.fromhex(path.stem)
                        for children in self._index.values():
                            children.pop(key, None)

    @property
    def used_bytes(self) -> int:
        """Bytes of block files in the directory (as this process has counted them)."""
        with self._lock:
            self._open()
            return self._used


def _read_header(path: Path) -> tuple[bytes, bytes, tuple[int, ...]] | None:
    """(key, parent, tokens) from a block file's header, or None when it has none readable."""
    head = len(MAGIC) + 4
    try:
        with path.open("rb") as f:
            start = f.read(head)
            if len(start) < head or not start.startswith(MAGIC):
                return None
            (size,) = struct.unpack("<I", start[len(MAGIC) :])
            if size > _MAX_HEADER:
                return None
            header = json.loads(f.read(size))
        return bytes.fromhex(header["key"]), bytes.fromhex(header["parent"]), tuple(header["tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
