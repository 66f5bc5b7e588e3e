"""A real HTTP file server for the update tests: byte ranges, and faults on demand.

``http.server`` serves files but ignores ``Range``; this handler honours
``Range: bytes=N-`` (206 with ``Content-Range``, or 416 past the end) and can be
told to drop the connection after a number of bytes, once per file, the way a
flaky mobile link does.
"""

from __future__ import annotations

import http.server
import re
import ssl
import threading
from pathlib import Path

_RANGE = re.compile(r"^bytes=(\d+)-$")


class FileServer:
    """Serves ``root`` on a free loopback port until ``stop``."""

    def __init__(self, root: Path, *, tls: tuple[Path, Path] | None = None) -> None:
        """``tls``: serve HTTPS with this (certificate, key)."""
        self.root = root
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.drop_after: dict[str, int] = {}  # path -> bytes to send before dropping, once
        self.honour_ranges = True  # False: behave like a server that always sends the whole file
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.lstrip("/")
                with server._lock:
                    server.requests.append((path, self.headers.get("Range")))
                    drop = server.drop_after.pop(path, None)
                file = server.root / path
                if not file.is_file():
                    self.send_error(404)
                    return
                size = file.stat().st_size
                start = 0
                found = _RANGE.match(self.headers.get("Range") or "") if server.honour_ranges else None
                if found:
                    start = int(found[1])
                    if start >= size:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(size - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                left = size - start if drop is None else min(drop, size - start)
                with file.open("rb") as f:
                    f.seek(start)
                    while left > 0 and (block := f.read(min(left, 1 << 20))):
                        self.wfile.write(block)
                        left -= len(block)
                if drop is not None:
                    self.wfile.flush()
                    self.close_connection = True  # mid-body: the client sees a short read

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.base_url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        # A short poll: shutdown() waits up to one poll interval (the default 0.5 s, per test).
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def ranges_asked(self, path: str) -> list[str | None]:
        """The Range headers of every request for ``path``."""
        with self._lock:
            return [r for p, r in self.requests if p == path]

    def stop(self) -> None:
        """Stop serving."""
        self.httpd.shutdown()
        self.httpd.server_close()
