"""Signed releases of the committed fixtures, served by a real HTTP server, for the update tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_contract import signing
from edge_contract.manifest import Manifest
from edge_fleet.releases import build_release
from tests.support.http import FileServer
from tests.support.models import fixture_path

#: The model the ``agents`` fixture runs unless told otherwise (its folder's name).
CONFIGURED_MODEL = "phi3-int4"


class Releases:
    """Builds releases under the server's root: ``<name>-<version>/…`` and its manifest."""

    def __init__(self, server: FileServer, key: Ed25519PrivateKey) -> None:
        self.server = server
        self.key = key
        self.public_line = signing.PublicKey(key.public_key(), signing.key_id(key.public_key())).to_line()

    def make(
        self,
        version: str,
        *,
        fixture: str = "llama-int4",
        name: str = "assistant",
        source: Path | None = None,
        replaces: tuple[str, ...] = (CONFIGURED_MODEL,),
    ) -> Manifest:
        """A signed release of ``fixture`` (or the folder ``source``), served at once.

        By default it may replace the model the test agents are configured with (a release of
        another name is refused as ``other_model`` unless it says so): pass ``replaces=()`` for
        a release that does not.
        """
        folder = f"{name}-{version}"
        return build_release(
            source or fixture_path(fixture),
            self.server.root / folder,
            name=name,
            version=version,
            base_url=f"{self.server.base_url}/{folder}",
            key=self.key,
            precision="int4",
            smoke_tokens=8,
            replaces=[r for r in replaces if r != name],
        )

    def resign(self, manifest: Manifest, key: Ed25519PrivateKey | None = None, **changes: Any) -> Manifest:
        """``manifest`` with ``changes``, signed again (by ``key``, default the fleet key)."""
        return manifest.model_copy(update=changes).signed(key or self.key)

    def copy_fixture(self, fixture: str, dest: Path) -> Path:
        """A writable copy of a fixture folder, to break on purpose."""
        shutil.copytree(fixture_path(fixture), dest)
        return dest


def payload(manifest: Manifest) -> bytes:
    """The retained desired-state message for ``manifest``."""
    return manifest.model_dump_json().encode()


def tampered(manifest: Manifest, **changes: Any) -> bytes:
    """``manifest`` changed after signing (the signature no longer matches)."""
    data = json.loads(manifest.model_dump_json())
    data.update(changes)
    return json.dumps(data).encode()


def replace_file(releases: Releases, manifest: Manifest, path: str, data: bytes) -> Manifest:
    """Serve ``data`` as ``path`` of ``manifest`` and sign the manifest again to match it."""
    import hashlib

    folder = releases.server.root / f"{manifest.name}-{manifest.version}"
    (folder / path).write_bytes(data)
    files = [
        f.model_copy(update={"size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        if f.path == path
        else f
        for f in manifest.files
    ]
    return releases.resign(manifest, files=files)


def placeholder_release(key: Ed25519PrivateKey, version: str, folder: Path) -> Path:
    """A signed manifest with no real files, for simulated devices (which download nothing);
    written to ``folder/manifest-VERSION.json``, whose path is returned."""
    import time

    from edge_contract.manifest import FileEntry, SmokeTest

    now = int(time.time())
    manifest = Manifest(
        name="assistant",
        version=version,
        files=[FileEntry(path="genai_config.json", size=2, sha256="0" * 64, url="http://127.0.0.1:9/g")],
        memory_bytes=1,
        smoke_test=SmokeTest(prompt="p", prompt_ids=[1], token_ids=[2]),
        created_at=now,
        expires_at=now + 3600,
        key_id="0" * 16,
    ).signed(key)
    path = folder / f"manifest-{version}.json"
    path.write_text(manifest.model_dump_json())
    return path
