"""Which desired releases a box takes (``agent.updates.policy``) and what it remembers (``record``).

Pure decisions, in milliseconds; the same sequences run against real agents in
``tests/daemon/test_updates.py``.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from agent.updates.policy import Converged, Decision, Install, Refuse, RefusedBefore, Running, decide
from agent.updates.record import MAX_REFUSED, REMEMBERED, UPDATE_CODES, Probation, UpdateRecord
from edge_contract import signing
from edge_contract.manifest import FileEntry, Manifest, SmokeTest

KEY = signing.generate()
OTHER_KEY = signing.generate()


def _public(key: object) -> signing.PublicKey:
    public = key.public_key()  # type: ignore[attr-defined]
    return signing.PublicKey(public, signing.key_id(public))


TRUSTED = [_public(KEY)]
ROOT = Path(__file__).resolve().parents[2]


def _release(
    name: str = "demo", version: str = "1.5.0", *, content: str = "a", **changes: object
) -> Manifest:
    now = int(time.time())
    files = [
        FileEntry(path="genai_config.json", size=10, sha256=content * 64, url="http://h/genai_config.json"),
        FileEntry(path="model.onnx", size=20, sha256="b" * 64, url="http://h/model.onnx"),
    ]
    fields: dict[str, object] = {
        "name": name,
        "version": version,
        "files": files,
        "memory_bytes": 1,
        "smoke_test": SmokeTest(prompt="p", prompt_ids=[1], token_ids=[2]),
        "created_at": now,
        "expires_at": now + 3600,
        "key_id": "0" * 16,
    }
    return Manifest.model_validate({**fields, **changes}).signed(KEY)


def _tampered(manifest: Manifest, **changes: object) -> Manifest:
    """Edited after signing: the signature no longer matches."""
    return Manifest.model_validate({**json.loads(manifest.model_dump_json()), **changes})


RUNNING = Running(name="demo", version="1.4.0")


def _decide(
    manifest: Manifest,
    running: Running = RUNNING,
    *,
    installed: Manifest | None = None,
    trusted: list[signing.PublicKey] = TRUSTED,
    refused: tuple[str, ...] = (),
) -> Decision:
    return decide(
        manifest, running=running, installed=installed, trusted=trusted, refused=refused, now=time.time()
    )


def _code(decision: Decision) -> str:
    assert isinstance(decision, Refuse), decision
    return decision.code


# -- versions per model --------------------------------------------------------------------------


def test_a_higher_version_of_the_running_model_installs_a_lower_or_equal_one_is_a_downgrade() -> None:
    assert _decide(_release(version="1.5.0")) == Install()
    assert _code(_decide(_release(version="1.3.9"))) == "downgrade"
    assert _code(_decide(_release(version="1.4.0-rc.1"))) == "downgrade"
    assert _decide(_release(version="1.3.9", rollback=True)) == Install()


def test_another_model_is_refused_whatever_its_version_unless_it_replaces_the_running_one() -> None:
    # The case: llama-long@1.0.0 over demo@1.4.0 is no downgrade, but needs an explicit switch.
    assert _code(_decide(_release("llama-long", "1.0.0"))) == "other_model"
    assert _code(_decide(_release("llama-long", "9.0.0"))) == "other_model"
    assert _code(_decide(_release("llama-long", "9.0.0", replaces=("phi3",)))) == "other_model"
    assert _decide(_release("llama-long", "1.0.0", replaces=("demo",))) == Install()
    assert _decide(_release("llama-long", "1.0.0", replaces=("phi3", "demo"))) == Install()
    message = _decide(_release("llama-long", "1.0.0"))
    assert isinstance(message, Refuse) and "--replace-model demo" in message.message


def test_the_configured_model_of_unknown_version_takes_any_version_of_its_name_only() -> None:
    unversioned = Running(name="demo", version=None)
    assert _decide(_release(version="0.0.1"), unversioned) == Install()
    assert _code(_decide(_release("other", "5.0.0"), unversioned)) == "other_model"


def test_the_same_name_and_version_is_converged_only_with_the_same_files() -> None:
    same = _release(version="1.4.0")
    running = Running(name="demo", version="1.4.0", files=same.file_keys)
    assert _decide(same, running) == Converged()
    other_files = _release(version="1.4.0", content="c")
    decision = _decide(other_files, running)
    assert _code(decision) == "version_conflict"
    assert isinstance(decision, Refuse) and "new version" in decision.message
    # Another server for the same files is the same release.
    rehosted = _release(
        version="1.4.0", files=[f.model_copy(update={"url": "https://cdn/x"}) for f in same.files]
    )
    assert _decide(rehosted, running) == Converged()


def test_a_forged_conflict_is_a_bad_signature_not_a_version_conflict() -> None:
    same = _release(version="1.4.0")
    running = Running(name="demo", version="1.4.0", files=same.file_keys)
    forged = _tampered(same, memory_bytes=2, files=[f.model_dump() for f in _release(content="c").files])
    assert _code(_decide(forged, running)) == "bad_signature"


def test_an_installed_copy_with_other_files_is_a_version_conflict_the_same_files_are_reused() -> None:
    kept = _release(version="1.3.0")
    assert _decide(_release(version="1.3.0", rollback=True), installed=kept) == Install()
    assert _code(_decide(_release(version="1.3.0", rollback=True, content="c"), installed=kept)) == (
        "version_conflict"
    )
    assert _code(_decide(_release(version="1.6.0", content="c"), installed=_release(version="1.6.0"))) == (
        "version_conflict"
    )


def test_replaces_is_signed_and_left_out_when_empty() -> None:
    plain = _release()
    assert b"replaces" not in plain.canonical() and "replaces" not in plain.model_dump_json()
    switching = _release("llama-long", "1.0.0", replaces=("demo",))
    assert b'"replaces":["demo"]' in switching.canonical()
    # Adding the switch after signing breaks the signature: only the key holder may switch models.
    assert _code(_decide(_tampered(_release("llama-long", "1.0.0"), replaces=["demo"]))) == "bad_signature"
    # A manifest signed before the field existed (no "replaces" in its bytes) still verifies.
    assert _decide(Manifest.parse(plain.model_dump_json(indent=2).encode())) == Install()


# -- refusals remembered by the whole manifest, and only those the manifest earns ------------------


def test_the_digest_covers_every_field_and_ignores_formatting() -> None:
    genuine = _release()
    assert Manifest.parse(genuine.model_dump_json(indent=2).encode()).digest == genuine.digest
    assert _tampered(genuine, memory_bytes=2).digest != genuine.digest
    # Another first character, never the same one (a fixed "x" matched 1 signature in 64).
    other = "B" if genuine.signature[0] == "A" else "A"
    assert _tampered(genuine, signature=other + genuine.signature[1:]).digest != genuine.digest
    assert re.fullmatch(r"[0-9a-f]{64}", genuine.digest)


def test_a_remembered_refusal_is_skipped_quietly_and_only_for_that_manifest() -> None:
    genuine = _release()
    assert _decide(genuine, refused=(genuine.digest,)) == RefusedBefore()
    # An edit of any field (the signature string kept) is another manifest.
    edited = _tampered(genuine, memory_bytes=2)
    assert _code(_decide(edited, refused=(genuine.digest,))) == "bad_signature"


class _Box:
    """The updater's memory loop around ``decide``: refusals remembered as the updater does."""

    def __init__(self, trusted: list[signing.PublicKey]) -> None:
        self.trusted = trusted
        self.record = UpdateRecord()

    def offer(self, manifest: Manifest) -> Decision:
        decision = _decide(manifest, trusted=self.trusted, refused=tuple(self.record.refused))
        if isinstance(decision, Refuse) and decision.remembered:
            self.record.remember_refused(manifest.digest)
        return decision


def test_a_tampered_release_first_does_not_shadow_the_genuine_one() -> None:
    box = _Box(TRUSTED)
    genuine = _release("demo", "2.0.0")
    assert _code(box.offer(_tampered(genuine, memory_bytes=genuine.memory_bytes + 1))) == "bad_signature"
    assert _code(box.offer(_tampered(genuine, signature=""))) == "bad_signature"
    assert box.record.refused == []
    assert box.offer(genuine) == Install()


def test_an_untrusted_release_installs_once_its_key_is_trusted() -> None:
    by_other = _release("demo", "2.0.0").signed(OTHER_KEY)
    box = _Box(TRUSTED)
    assert _code(box.offer(by_other)) == "untrusted_key"
    assert _code(box.offer(by_other)) == "untrusted_key"  # checked again, not skipped
    box.trusted = [*TRUSTED, _public(OTHER_KEY)]  # the key added, the agent restarted
    assert box.offer(by_other) == Install()


@pytest.mark.parametrize(
    ("build", "code"),
    [
        (lambda: _tampered(_release(), version="1.6.0"), "bad_signature"),
        (lambda: _release().signed(OTHER_KEY), "untrusted_key"),
        (lambda: _release(expires_at=int(time.time()) - 1), "expired"),
        (lambda: _release(version="1.0.0"), "downgrade"),
        (lambda: _release("other", "3.0.0"), "other_model"),
    ],
)
def test_refusals_that_depend_on_the_box_are_not_remembered(build, code: str) -> None:  # type: ignore[no-untyped-def]
    decision = _decide(build())
    assert _code(decision) == code
    assert isinstance(decision, Refuse) and not decision.remembered


def test_refusals_the_manifest_earns_are_remembered() -> None:
    assert {
        "sha256_mismatch",
        "size_mismatch",
        "smoke_test_failed",
        "model_load",
        "probation_failed",
    } <= REMEMBERED
    assert not {
        "bad_signature",
        "untrusted_key",
        "expired",
        "downgrade",
        "other_model",
        "version_conflict",
    } & (REMEMBERED)
    assert _code(
        _decide(_release(files=[*_release().files, _release().files[0].model_copy(update={"path": "../x"})]))
    ) == ("unsafe_path")


# -- the record -------------------------------------------------------------------------------------


def test_the_record_keeps_the_newest_refusals() -> None:
    record = UpdateRecord()
    for i in range(MAX_REFUSED + 5):
        record.remember_refused(f"{i:064x}")
    record.remember_refused(f"{7:064x}")
    assert len(record.refused) == MAX_REFUSED and record.refused[-1] == f"{7:064x}"
    assert record.refused.count(f"{7:064x}") == 1


def test_an_old_record_loses_its_signature_refusals_and_keeps_the_rest() -> None:
    old = {
        "refused": ["bm90IGEgZGlnZXN0", "a" * 64],
        "probation": {"release": "demo@2.0.0", "until": 5.0, "jobs": 1, "failures": 0},
        "update": {"name": "demo", "version": "2.0.0", "phase": "active", "at": 1.0},
    }
    record = UpdateRecord.load(json.dumps(old).encode())
    assert record.refused == ["a" * 64]
    assert record.probation == Probation(release="demo@2.0.0", until=5.0, jobs=1)
    assert record.update is not None and record.update.phase == "active"
    for garbage in (b"", b"[1]", b"{not json", b'{"update": {"phase": "exploded"}}', b'{"refused": 5}'):
        assert UpdateRecord.load(garbage).refused == []


def test_the_record_refuses_unknown_fields_when_written() -> None:
    with pytest.raises(ValueError, match="extra"):
        UpdateRecord.model_validate({"refusd": []})


def test_the_documented_remembered_refusals_are_the_remembered_ones() -> None:
    # (docs/protocol.md's table of update codes is checked against UpdateErrorCode in test_protocol.py.)
    text = (ROOT / "docs" / "protocol.md").read_text()
    start = text.index("A refusal the manifest itself earns (")
    listed = text[start : text.index(")", start)]
    assert set(re.findall(r"`([a-z_0-9]+)`", listed)) == REMEMBERED
    assert REMEMBERED <= UPDATE_CODES
