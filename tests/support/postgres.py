"""A real PostgreSQL 15 for the tests, from Debian's binaries, on a free port in its own folder.

As root (CI), the cluster runs as the user ``postgres`` (initdb refuses root), in a folder
that user owns; a system cluster on 5432 is left alone.  A missing PostgreSQL fails the test
(CI installs it: apt-get install postgresql), it never skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.broker import free_port, open_folder

BIN = Path("/usr/lib/postgresql/15/bin")


def _as_postgres(*command: str) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return list(command)


class Postgres:
    """One cluster; ``dsn(name)`` creates a database and returns its DSN."""

    def __init__(self) -> None:
        if not (BIN / "initdb").exists():
            pytest.fail(
                f"PostgreSQL 15 is not installed ({BIN}/initdb missing; CI: apt-get install postgresql)"
            )
        self.root = open_folder("edge-pg-")
        self.data = self.root / "data"
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self.port = free_port()
        self._run(str(BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            str(BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "pg.log"),
            "-w",
            "-o",
            options,
            "start",
        )
        self._databases = 0

    def _run(self, *command: str) -> None:
        done = subprocess.run(_as_postgres(*command), capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed: {done.stdout}{done.stderr}")

    def dsn(self, name: str | None = None) -> str:
        """A new, empty database's DSN."""
        self._databases += 1
        name = name or f"fleet{self._databases}"
        self._run(str(BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        """Stop the cluster and remove its folder."""
        subprocess.run(_as_postgres(str(BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"),
                       capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)
