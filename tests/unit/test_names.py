"""Names and paths are matched whole: ``re.match(...$)`` takes a trailing newline ("box\\n").

The agent's config has its own cases in ``test_config.py`` and the wire's job ids in ``test_protocol.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_contract.errors import UpdateError
from edge_contract.manifest import FileEntry, Manifest, SemVer
from edge_fleet.cli import main as fleet
from tests.unit.test_manifest import _manifest


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    assert fleet(["ca", "init", "--out", str(tmp_path / "ca")]) == 0
    return tmp_path / "ca"


@pytest.mark.parametrize("text", ["1.0.0\n", "1.0.0-rc.1\n", "1.0.0+b\n", "\n1.0.0"])
def test_a_version_with_a_newline_is_no_semantic_version(text: str) -> None:
    assert SemVer(text.strip()) == SemVer(text.strip()), "positive control"
    with pytest.raises(ValueError, match="not a semantic version"):
        SemVer(text)


def test_a_manifest_version_or_name_with_a_newline_is_invalid() -> None:
    good = _manifest()
    for field, value in (("version", "1.2.0\n"), ("name", "phi3\n")):
        with pytest.raises(UpdateError) as err:
            Manifest.parse(good.model_copy(update={field: value}).model_dump_json().encode())
        assert err.value.code == "invalid_manifest", field
    assert Manifest.parse(good.model_dump_json().encode()) == good, "positive control"


@pytest.mark.parametrize("path", ["x\n", "weights.bin\n", "sub/x\n", "sub\n/x"])
def test_a_file_path_with_a_newline_is_unsafe(path: str) -> None:
    m = _manifest()
    files = [*m.files, FileEntry(path=path, size=1, sha256="c" * 64, url="http://h/x")]
    with pytest.raises(UpdateError) as err:
        m.model_copy(update={"files": files}).check_paths()
    assert err.value.code == "unsafe_path"
    ok = [*m.files, FileEntry(path=path.replace("\n", ""), size=1, sha256="c" * 64, url="http://h/x")]
    m.model_copy(update={"files": ok}).check_paths()  # positive control: the same path without it


@pytest.mark.parametrize(
    "field,value",
    [("size", "10"), ("size", 10.0), ("size", True), ("memory_bytes", "1"), ("created_at", 1.5)],
)
def test_manifest_integers_are_json_integers(field: str, value: object) -> None:
    """The canonical form that is signed has only integers: a string or float is not a size."""
    good = _manifest()
    data = good.model_dump(mode="json")
    if field == "size":
        data["files"][0]["size"] = value
    else:
        data[field] = value
    with pytest.raises(UpdateError) as err:
        Manifest.parse(json.dumps(data).encode())
    assert err.value.code == "invalid_manifest"


@pytest.mark.parametrize("args", [["box\n"], ["box-1", "--group", "g\n"], ["\nbox"]], ids=repr)
def test_provision_refuses_a_name_with_a_newline(ca: Path, tmp_path: Path, args: list[str]) -> None:
    """Before: ``provision 'box\\n'`` wrote an ACL line that stops mosquitto from starting."""
    out = tmp_path / "out"
    assert fleet(["provision", *args, "--ca", str(ca), "--out", str(out)]) == 1
    assert not out.exists() or not any(out.iterdir())
    clean = [a.strip() for a in args]
    assert fleet(["provision", *clean, "--ca", str(ca), "--out", str(tmp_path / "ok")]) == 0, "control"


@pytest.mark.parametrize("field", ["key_id", "sha256"])
def test_pydantic_patterns_end_at_the_end_of_the_text(field: str) -> None:
    """pydantic matches ``pattern`` with Rust's regex, whose ``$`` (unlike Python's) takes no final newline."""
    good = _manifest()
    data = good.model_dump(mode="json")
    target = data["files"][0] if field == "sha256" else data
    target[field] += "\n"
    with pytest.raises(UpdateError) as err:
        Manifest.parse(json.dumps(data).encode())
    assert err.value.code == "invalid_manifest"
    target[field] = target[field].rstrip("\n")
    assert Manifest.parse(json.dumps(data).encode()).key_id == good.key_id, "positive control"
