"""Issue 24: ``config check`` run as the service's user names the right fix for a file it cannot read
(its group and mode) and for a state_dir it cannot create (never "chown /var/lib")."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import check_files, load_config
from tests.unit.test_config import _present, _write

NOBODY, NOGROUP = 65534, 65534


@contextlib.contextmanager
def _as_nobody() -> Iterator[None]:
    """This process's effective user and group switched to nobody (as the service's user would be)."""
    os.setegid(NOGROUP)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture()
def shared() -> Iterator[Path]:
    """A folder nobody may enter (pytest's tmp_path is root's alone)."""
    if os.geteuid() != 0:
        pytest.fail("this test switches to the user nobody: run the tests as root, as CI does")
    folder = Path(tempfile.mkdtemp(prefix="edge-config-perms-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.e2e  # the printed fix runs as commands, as an operator types them
def test_an_unreadable_key_gets_its_group_and_mode_as_the_fix(shared: Path) -> None:
    config = load_config(_write(shared, _present(shared)))
    for path in [
        shared / "model",
        shared / "model" / "genai_config.json",
        shared / "ca.crt",
        shared / "box.crt",
    ]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    key = shared / "box.key"
    key.chmod(0o600)  # root's alone, as `provision` writes it
    (shared / "state").mkdir(mode=0o777)
    (shared / "state").chmod(0o777)
    with _as_nobody():
        problems = check_files(config)
    [line] = [p for p in problems if p.startswith("mqtt.tls.key")]
    assert "root:root mode 0600" in line and "runs as nobody" in line, line
    assert f"chgrp nogroup {key} && chmod 0640 {key}" in line and "copy it there" not in line
    assert not [p for p in problems if not p.startswith("mqtt.tls.key")], problems  # the rest is readable
    # The fix, applied as written, is the positive control.
    fix = line.split("(", 1)[1].split(")", 1)[0]
    for command in fix.split(" && "):
        subprocess.run(shlex.split(command), check=True)
    with _as_nobody():
        assert check_files(config) == []


def test_a_state_dir_it_cannot_create_is_created_for_it_not_chowned_above(shared: Path) -> None:
    var_lib = shared / "var-lib"
    var_lib.mkdir(mode=0o755)
    text = _present(shared).replace(str(shared / "state"), str(var_lib / "edge-agent"))
    config = load_config(_write(shared, text))
    with _as_nobody():
        problems = [p for p in check_files(config) if p.startswith("state_dir")]
    [line] = problems
    assert f"install -d -o nobody -m 0750 {var_lib / 'edge-agent'}" in line, line
    assert f"chown nobody {var_lib}" not in line and "chown" not in line
