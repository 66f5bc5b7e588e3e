"""Downloads against a real HTTP server: resume, refusal of wrong sizes and hashes, bandwidth cap."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from agent.updates.download import RateLimit, fetch
from edge_contract.errors import DownloadError, UpdateError
from edge_contract.manifest import FileEntry

DATA = os.urandom(300_000)


def _entry(server, name: str = "f.bin", data: bytes = DATA, **changes: object) -> FileEntry:  # type: ignore[no-untyped-def]
    (server.root / name).write_bytes(data)
    entry = FileEntry(
        path=name, size=len(data), sha256=hashlib.sha256(data).hexdigest(), url=f"{server.base_url}/{name}"
    )
    return entry.model_copy(update=changes)


def test_downloads_verify_and_report_every_byte(file_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    seen: list[int] = []
    fetch(_entry(file_server), tmp_path / "f.bin", on_bytes=seen.append)
    assert (tmp_path / "f.bin").read_bytes() == DATA
    assert sum(seen) == len(DATA)
    assert not (tmp_path / "f.bin.part").exists()


def test_a_dropped_connection_keeps_what_arrived_and_resumes_with_range(file_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    entry = _entry(file_server)
    file_server.drop_after["f.bin"] = 100_000
    with pytest.raises(DownloadError, match="100000 of 300000"):
        fetch(entry, tmp_path / "f.bin")
    assert (tmp_path / "f.bin.part").stat().st_size == 100_000
    fetch(entry, tmp_path / "f.bin")
    assert (tmp_path / "f.bin").read_bytes() == DATA
    assert file_server.ranges_asked("f.bin") == [None, "bytes=100000-"]


def test_a_server_ignoring_range_starts_the_file_over(file_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    entry = _entry(file_server)
    file_server.honour_ranges = False
    (tmp_path / "f.bin.part").write_bytes(DATA[:5000])
    seen: list[int] = []
    fetch(entry, tmp_path / "f.bin", on_bytes=seen.append)
    assert (tmp_path / "f.bin").read_bytes() == DATA
    assert sum(seen) == len(DATA)  # progress counted the restart, not the bytes twice
    assert file_server.ranges_asked("f.bin") == ["bytes=5000-"]


def test_corrupt_resumed_bytes_fail_the_hash_and_are_thrown_away(file_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    entry = _entry(file_server)
    (tmp_path / "f.bin.part").write_bytes(DATA[:1000] + b"\0" * 1000)
    with pytest.raises(UpdateError) as err:
        fetch(entry, tmp_path / "f.bin")
    assert err.value.code == "sha256_mismatch"
    assert not (tmp_path / "f.bin.part").exists()
    fetch(entry, tmp_path / "f.bin")
    assert (tmp_path / "f.bin").read_bytes() == DATA


def test_a_file_longer_than_signed_is_refused_unread(file_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    entry = _entry(file_server, size=len(DATA) - 1)
    with pytest.raises(UpdateError) as err:
        fetch(entry, tmp_path / "f.bin")
    assert err.value.code == "size_mismatch"
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()


def test_a_truncated_file_on_the_server_is_refused(file_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    entry = _entry(file_server)
    (file_server.root / "f.bin").write_bytes(DATA[:1000])
    with pytest.raises(UpdateError) as err:
        fetch(entry, tmp_path / "f.bin")
    assert err.value.code == "size_mismatch"
    # Also when the shortfall only shows on resume (416: nothing past what we have).
    (tmp_path / "f.bin.part").write_bytes(DATA[:1000])
    with pytest.raises(UpdateError) as err:
        fetch(entry, tmp_path / "f.bin")
    assert err.value.code == "size_mismatch"
    assert not (tmp_path / "f.bin.part").exists()


def test_wrong_content_is_refused_and_not_kept(file_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    entry = _entry(file_server, sha256="0" * 64)
    with pytest.raises(UpdateError) as err:
        fetch(entry, tmp_path / "f.bin")
    assert err.value.code == "sha256_mismatch"
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()


def test_missing_file_and_dead_server_are_transient(file_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    entry = _entry(file_server)
    with pytest.raises(DownloadError, match="404"):
        fetch(entry.model_copy(update={"url": f"{file_server.base_url}/nope"}), tmp_path / "f.bin")
    with pytest.raises(DownloadError, match="cannot reach"):
        fetch(entry.model_copy(update={"url": "http://127.0.0.1:9/f.bin"}), tmp_path / "f.bin")


def test_a_symlink_where_the_part_goes_is_refused(file_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "f.bin.part").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UpdateError) as err:
        fetch(_entry(file_server), tmp_path / "f.bin")
    assert err.value.code == "unsafe_path"
    assert not (tmp_path / "elsewhere").exists()


def test_the_bandwidth_cap_paces_the_download(file_server, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    slept: list[float] = []
    monkeypatch.setattr("agent.updates.download.time.sleep", slept.append)
    fetch(_entry(file_server), tmp_path / "f.bin", rate=RateLimit(100_000))
    assert (tmp_path / "f.bin").read_bytes() == DATA
    # 300 kB at 100 kB/s: with the clock standing still (sleep is replaced), the limiter's
    # last request is to be 3 s behind the start, less the real time the transfer took.
    assert 2.0 < slept[-1] <= 3.0
    assert slept == sorted(slept)


def test_https_servers_are_verified_against_the_configured_ca(tmp_path: Path) -> None:
    from agent.link.tls import client_context
    from tests.support.http import FileServer
    from tests.support.pki import Fleet

    pki = Fleet(tmp_path / "pki")
    assert pki.broker.cert is not None and pki.broker.key is not None
    root = tmp_path / "www"
    root.mkdir()
    server = FileServer(root, tls=(pki.broker.cert, pki.broker.key))
    try:
        entry = _entry(server)
        assert entry.url.startswith("https://127.0.0.1:")
        with pytest.raises(DownloadError, match="CERTIFICATE_VERIFY_FAILED"):
            fetch(entry, tmp_path / "f.bin")  # the system's CAs do not know the fleet's CA
        fetch(entry, tmp_path / "f.bin", context=client_context(pki.ca))
        assert (tmp_path / "f.bin").read_bytes() == DATA
    finally:
        server.stop()
