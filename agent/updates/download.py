"""Resumable, bounded, verified HTTP(S) downloads of release files (``urllib``, no extra dependency).

``fetch`` downloads one ``FileEntry`` to ``dest`` through ``dest.part``:

* what a dropped connection or a restart left in the part file is kept, and
  the rest is asked for with ``Range`` (a server that ignores it sends the
  whole file again, and the part file starts over);
* never more than the signed ``size`` is read; a server that offers more, or
  less, is refused (code ``size_mismatch``);
* the SHA-256 is computed while streaming (the kept part is re-hashed once on
  resume) and checked before the file takes its final name;
* an optional cap on bytes per second.

A broken connection raises ``DownloadError`` (retry later: it resumes);
anything that retrying cannot fix raises ``UpdateError`` with a precise code.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from edge_contract import __version__
from edge_contract.errors import DownloadError, UpdateError
from edge_contract.manifest import FileEntry

_CHUNK = 64 * 1024
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class RateLimit:
    """Sleeps just enough to keep the average at ``bytes_per_s``."""

    def __init__(self, bytes_per_s: int) -> None:
        self.bytes_per_s = bytes_per_s
        self._start = time.monotonic()
        self._sent = 0

    def take(self, count: int) -> None:
        """Account for ``count`` bytes, sleeping if they came too fast."""
        self._sent += count
        ahead = self._sent / self.bytes_per_s - (time.monotonic() - self._start)
        if ahead > 0:
            time.sleep(ahead)


def sha256_file(path: Path, *, limit: int | None = None) -> tuple[str, int]:
    """Hex SHA-256 and size of ``path`` (or of its first ``limit`` bytes)."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while limit is None or size < limit:
            block = f.read(_CHUNK if limit is None else min(_CHUNK, limit - size))
            if not block:
                break
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def fetch(
    entry: FileEntry,
    dest: Path,
    *,
    on_bytes: Callable[[int], None] = lambda _n: None,
    rate: RateLimit | None = None,
    timeout_s: float = 30.0,
    context: ssl.SSLContext | None = None,
) -> None:
    """Make ``dest`` hold exactly the file ``entry`` describes, downloading what is missing.

    ``on_bytes`` is told of every byte that counts towards the file, including
    those a resumed download already had.  ``context`` verifies HTTPS servers
    (default: the system's CAs).
    """
    part = dest.with_name(dest.name + ".part")
    if part.is_symlink() or dest.is_symlink():
        raise UpdateError(f"{entry.path}: a symlink stands where the download goes", code="unsafe_path")
    digest = hashlib.sha256()
    have = 0
    if part.exists():
        have = part.stat().st_size
        if have > entry.size:
            part.unlink()
            have = 0
        else:
            with part.open("rb") as f:
                while block := f.read(_CHUNK):
                    digest.update(block)
    on_bytes(have)
    if have < entry.size:
        have, digest = _download_rest(entry, part, have, digest, on_bytes, rate, timeout_s, context)
    if digest.hexdigest() != entry.sha256:
        part.unlink()
        raise UpdateError(
            f"{entry.path}: SHA-256 is {digest.hexdigest()}, the manifest signs {entry.sha256}",
            code="sha256_mismatch",
        )
    os.replace(part, dest)


def _download_rest(
    entry: FileEntry,
    part: Path,
    have: int,
    digest: hashlib._Hash,
    on_bytes: Callable[[int], None],
    rate: RateLimit | None,
    timeout_s: float,
    context: ssl.SSLContext | None,
) -> tuple[int, hashlib._Hash]:
    headers = {"User-Agent": f"edge-agent/{__version__}", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(entry.url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s, context=context)
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the connection's socket
        if exc.code == 416 and have:
            part.unlink()
            raise UpdateError(
                f"{entry.path}: the server has fewer bytes than the {entry.size} the manifest signs",
                code="size_mismatch",
            ) from exc
        # 5xx and 404 alike may be a server still being filled: retried later.
        raise DownloadError(f"{entry.path}: HTTP {exc.code} {exc.reason} from {entry.url}") from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise DownloadError(f"{entry.path}: cannot reach {entry.url}: {exc}") from exc
    with response:
        start = have
        if have and response.status == 206:
            found = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if found is None or int(found[1]) != have:
                raise DownloadError(f"{entry.path}: the server answered a resume with the wrong range")
        else:  # 200: the server ignored the range (or none was asked) and sends everything
            on_bytes(-have)
            start, have, digest = 0, 0, hashlib.sha256()
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and start + int(length) != entry.size:
            part.unlink(missing_ok=True)
            raise UpdateError(
                f"{entry.path}: the server offers {start + int(length)} bytes, the manifest signs {entry.size}",
                code="size_mismatch",
            )
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if start else os.O_TRUNC)
        with os.fdopen(os.open(part, flags, 0o644), "wb") as out:
            try:
                while have < entry.size:
                    block = response.read(min(_CHUNK, entry.size - have))
                    if not block:
                        break
                    out.write(block)
                    digest.update(block)
                    have += len(block)
                    on_bytes(len(block))
                    if rate is not None:
                        rate.take(len(block))
                extra = response.read(1) if have == entry.size and length is None else b""
            except (OSError, http.client.HTTPException) as exc:
                raise DownloadError(
                    f"{entry.path}: connection lost after {have} of {entry.size} bytes: {exc}"
                ) from exc
            finally:
                out.flush()
                os.fsync(out.fileno())
    if extra:
        part.unlink()
        raise UpdateError(
            f"{entry.path}: the server sends more than the {entry.size} bytes the manifest signs",
            code="size_mismatch",
        )
    if have < entry.size:
        raise DownloadError(f"{entry.path}: connection closed after {have} of {entry.size} bytes")
    return have, digest
