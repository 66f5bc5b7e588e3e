"""Issue 24: prefix-cache files are authenticated with the box's own key; a file written without it
(the old attack: values scaled, the checksum recomputed) is ignored with a warning, and non-finite
values never reach the engine."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import stat
import struct
from pathlib import Path

import numpy as np
import pytest

from agent.engine.prefix_store import _DIGEST, KEY_BYTES, MAGIC
from tests.unit.test_prefix_cache import _files, cache, disk, kv_for


def _key_file(root: Path) -> Path:
    return root.with_name(root.name + ".key")


def _rewrite(path: Path, change, sign) -> None:  # type: ignore[no-untyped-def]
    """Parse a block file, ``change`` its values, and append ``sign(body)`` as its digest."""
    data = path.read_bytes()
    body = data[:-_DIGEST]
    head = len(MAGIC) + 4
    (size,) = struct.unpack("<I", body[len(MAGIC) : head])
    header = json.loads(body[head : head + size])
    kv = np.frombuffer(body[head + size :], dtype=np.dtype(header["dtype"])).copy()
    body = body[: head + size] + change(kv).tobytes()
    path.write_bytes(body + sign(body))


def test_the_key_is_made_at_first_use_for_the_owner_alone(tmp_path: Path) -> None:
    ids = list(range(8))
    cache(store=disk(tmp_path)).insert(ids, kv_for(ids), 8)
    key = _key_file(tmp_path)
    assert len(key.read_bytes()) == KEY_BYTES and stat.S_IMODE(key.stat().st_mode) == 0o600
    again = cache(store=disk(tmp_path))
    assert len(again.lookup(ids, max_tokens=8)) == 2, "the control: the box's own files load"
    assert key.read_bytes() == _key_file(tmp_path).read_bytes(), "and the key stays"


@pytest.mark.parametrize(
    "sign",
    [
        lambda body: hashlib.blake2b(body, digest_size=_DIGEST).digest(),  # the old checksum, recomputed
        lambda body: hmac.new(b"\0" * KEY_BYTES, body, hashlib.sha256).digest(),  # a guessed key
    ],
    ids=["unkeyed", "other-key"],
)
def test_a_file_forged_without_the_key_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, sign
) -> None:  # type: ignore[no-untyped-def]
    ids = list(range(40, 44))
    cache(store=disk(tmp_path)).insert(ids, kv_for(ids), 4)
    (path,) = _files(tmp_path)
    _rewrite(path, lambda kv: kv * 1000.0, sign)
    with caplog.at_level(logging.WARNING):
        assert cache(store=disk(tmp_path)).lookup(ids, max_tokens=4) == []
    assert "written without this box's key" in caplog.text and str(path) in caplog.text
    assert not path.exists()


def test_non_finite_values_never_reach_the_engine_even_when_signed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ids = list(range(50, 54))
    cache(store=disk(tmp_path)).insert(ids, kv_for(ids), 4)
    (path,) = _files(tmp_path)
    key = _key_file(tmp_path).read_bytes()

    def nan(kv: np.ndarray) -> np.ndarray:
        kv[3] = np.nan
        return kv

    _rewrite(path, nan, lambda body: hmac.new(key, body, hashlib.sha256).digest())
    with caplog.at_level(logging.WARNING):
        assert cache(store=disk(tmp_path)).lookup(ids, max_tokens=4) == []
    assert "non-finite values" in caplog.text


def test_a_key_readable_by_others_is_closed_and_an_unusable_one_turns_the_disk_copy_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ids = list(range(8))
    cache(store=disk(tmp_path)).insert(ids, kv_for(ids), 8)
    key = _key_file(tmp_path)
    key.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert len(cache(store=disk(tmp_path)).lookup(ids, max_tokens=8)) == 2
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and "made 0600" in caplog.text
    key.unlink()
    key.mkdir()  # cannot be read nor replaced
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        c = cache(store=disk(tmp_path))
        assert c.insert(ids, kv_for(ids), 8) == 2  # memory still serves
    assert "continuing without the disk copy" in caplog.text
