"""Release manifests: versions, canonical form, signatures, and every refusal ``check`` makes."""

from __future__ import annotations

import time

import pytest

from edge_contract import signing
from edge_contract.errors import SignatureError, UpdateError
from edge_contract.manifest import MAX_MANIFEST_BYTES, FileEntry, Manifest, SemVer, SmokeTest

KEY = signing.generate()
TRUSTED = [signing.PublicKey(KEY.public_key(), signing.key_id(KEY.public_key()))]


def _manifest(**changes: object) -> Manifest:
    now = int(time.time())
    base = Manifest(
        name="phi3",
        version="1.2.0",
        files=[
            FileEntry(path="genai_config.json", size=10, sha256="a" * 64, url="http://h/genai_config.json"),
            FileEntry(path="model.onnx", size=20, sha256="b" * 64, url="https://h/model.onnx"),
        ],
        memory_bytes=1 << 20,
        smoke_test=SmokeTest(prompt="hi", prompt_ids=[1, 2], token_ids=[3, 4]),
        created_at=now,
        expires_at=now + 3600,
        key_id="0" * 16,
    )
    return base.model_copy(update=changes).signed(KEY)


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        ("1.0.0", "1.0.1"),
        ("1.9.0", "1.10.0"),
        ("1.0.0-rc.1", "1.0.0"),
        ("1.0.0-alpha", "1.0.0-alpha.1"),
        ("1.0.0-alpha.beta", "1.0.0-beta"),
        ("1.0.0-beta.2", "1.0.0-beta.11"),
        ("1.0.0-rc.1", "1.0.0-rc.a"),
        ("0.9.9", "1.0.0-alpha"),
    ],
)
def test_semantic_versions_order_by_precedence(lower: str, higher: str) -> None:
    assert SemVer(lower) < SemVer(higher)
    assert not SemVer(higher) <= SemVer(lower)


def test_build_metadata_does_not_order() -> None:
    assert SemVer("1.0.0+a") == SemVer("1.0.0+b")


@pytest.mark.parametrize("text", ["1.0", "01.0.0", "1.0.0-", "v1.0.0", "1.0.0-01", ""])
def test_invalid_versions_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="not a semantic version"):
        SemVer(text)


def test_canonical_form_excludes_the_signature_and_is_stable() -> None:
    m = _manifest()
    assert b'"signature"' not in m.canonical()
    assert m.canonical() == Manifest.parse(m.model_dump_json(indent=2).encode()).canonical()
    assert m.canonical().startswith(b'{"created_at":')


def test_a_good_manifest_passes() -> None:
    _manifest().check(TRUSTED, active="1.1.9")
    _manifest().check(TRUSTED, active=None)


def test_any_change_after_signing_breaks_the_signature() -> None:
    m = _manifest()
    forged = m.model_copy(update={"memory_bytes": 1})
    with pytest.raises(SignatureError) as err:
        forged.check(TRUSTED, active=None)
    assert err.value.code == "bad_signature"


def test_an_unknown_key_is_untrusted() -> None:
    m = _manifest().signed(signing.generate())
    with pytest.raises(SignatureError) as err:
        m.check(TRUSTED, active=None)
    assert err.value.code == "untrusted_key"


def test_garbage_signature_is_bad_not_a_crash() -> None:
    m = _manifest().model_copy(update={"signature": "!!!not base64"})
    with pytest.raises(SignatureError) as err:
        m.check(TRUSTED, active=None)
    assert err.value.code == "bad_signature"


@pytest.mark.parametrize(
    ("changes", "active", "code"),
    [
        ({"signature": ""}, None, "bad_signature"),
        ({"expires_at": 1}, None, "expired"),
        ({}, "1.2.0", "downgrade"),
        ({}, "1.3.0", "downgrade"),
        ({"version": "1.2.0-rc.1"}, "1.2.0", "downgrade"),
    ],
)
def test_refusals_carry_precise_codes(changes: dict[str, object], active: str | None, code: str) -> None:
    m = _manifest()
    if changes.keys() == {"signature"}:
        m = m.model_copy(update=changes)
    elif changes:
        m = _manifest(**changes)
    with pytest.raises(UpdateError) as err:
        m.check(TRUSTED, active=active)
    assert err.value.code == code


def test_a_signed_rollback_release_may_go_back() -> None:
    _manifest(rollback=True).check(TRUSTED, active="2.0.0")


@pytest.mark.parametrize(
    "path",
    ["../x", "a/../../x", "/etc/passwd", "a\\..\\x", "./x", ".hidden", "a//b", "a/", "", "genai_config.json"],
)
def test_paths_that_escape_or_repeat_are_refused(path: str) -> None:
    m = _manifest()
    files = [*m.files, FileEntry(path=path or "x", size=1, sha256="c" * 64, url="http://h/x")]
    if not path:
        files[-1] = files[-1].model_copy(update={"path": ""})
    with pytest.raises(UpdateError) as err:
        m.model_copy(update={"files": files}).check_paths()
    assert err.value.code == "unsafe_path"


def test_a_file_and_a_folder_of_the_same_name_are_refused() -> None:
    m = _manifest()
    for order in (["sub", "sub/x"], ["sub/x", "sub"]):
        extra = [FileEntry(path=p, size=1, sha256="c" * 64, url="http://h/x") for p in order]
        with pytest.raises(UpdateError, match="both as a file and a folder"):
            m.model_copy(update={"files": [*m.files, *extra]}).check_paths()


def test_a_release_without_its_config_is_invalid() -> None:
    m = _manifest()
    with pytest.raises(UpdateError) as err:
        m.model_copy(update={"files": m.files[1:]}).check_paths()
    assert err.value.code == "invalid_manifest"


@pytest.mark.parametrize(
    ("payload", "where"),
    [
        (b"not json", "manifest"),
        (b'{"name": "x"}', "version"),
        (b"x" * (MAX_MANIFEST_BYTES + 1), "limit"),
    ],
)
def test_unparsable_manifests_name_the_problem(payload: bytes, where: str) -> None:
    with pytest.raises(UpdateError) as err:
        Manifest.parse(payload)
    assert err.value.code == "invalid_manifest"
    assert where in err.value.message


def test_unknown_fields_and_non_http_urls_are_invalid() -> None:
    import json

    data = json.loads(_manifest().model_dump_json())
    data["surprise"] = 1
    with pytest.raises(UpdateError, match="surprise"):
        Manifest.parse(json.dumps(data).encode())
    m = _manifest()
    text = m.model_dump_json().replace("http://h/genai_config.json", "file:///etc/passwd")
    with pytest.raises(UpdateError, match="url"):
        Manifest.parse(text.encode())


def test_public_keys_round_trip_as_one_openssh_line() -> None:
    line = TRUSTED[0].to_line()
    assert line.startswith("ssh-ed25519 ") and "\n" not in line
    assert signing.PublicKey.from_line(line).key_id == TRUSTED[0].key_id
    with pytest.raises(SignatureError, match="OpenSSH"):
        signing.PublicKey.from_line("ssh-ed25519 AAAAnotakey")
