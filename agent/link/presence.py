"""Whether an agent runs on this box, and what its broker link looks like — for ``doctor``.

``doctor`` used to log in as the box to test its certificate and subscriptions.
On a devices' listener the client id is the certificate's name, so that login
took the running agent's session and kicked it off the broker.  Now:

* the agent holds an exclusive ``flock`` on ``STATE_DIR/agent.lock`` for its
  whole life (a second agent on the same ``state_dir`` is refused at start);
* it writes ``STATE_DIR/link.json`` (mode 0644: no secret in it) whenever its
  link changes: connected or not, to which broker, which subscriptions the broker
  granted or refused, the last problem;
* ``doctor`` finds the lock held and reports the running agent's link from that
  file instead of logging in.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
import weakref
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_contract.errors import StorageError

LOCK_FILE, LINK_FILE = "agent.lock", "link.json"


class LinkState(BaseModel):
    """What ``link.json`` holds."""

    model_config = ConfigDict(extra="forbid")

    pid: int
    connected: bool = False
    endpoint: str | None = None
    since: float = Field(default_factory=time.time)
    granted: list[str] = Field(default_factory=list)
    refused: dict[str, str] = Field(default_factory=dict)
    problem: str | None = None


class AgentLock:
    """The running agent's hold on its ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock, or raise ``StorageError`` naming the agent that holds it."""
        try:
            handle = self.path.open("a+")
            os.chmod(self.path, 0o644)
        except OSError as exc:
            raise StorageError(
                f"{self.path}: {exc.strerror or exc}: make state_dir writable by the agent's user"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise StorageError(
                f"another edge-agent (pid {holder}) runs with state_dir {self.path.parent}: stop it first "
                "(two agents would share one job queue and one broker identity)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle
        # An agent dropped without serving (tests, a failed start) lets go when it is collected.
        weakref.finalize(self, handle.close)

    def release(self) -> None:
        """Let go (the process exiting does the same)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def running_agent(state_dir: Path) -> int | None:
    """The pid of the agent holding ``state_dir``'s lock (0 if unreadable), or None if none does."""
    path = state_dir / LOCK_FILE
    try:
        handle = path.open()
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = handle.read().strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None


class LinkRecorder:
    """Writes ``link.json`` (atomically) as the link changes."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LINK_FILE
        self.state = LinkState(pid=os.getpid())

    def update(self, **changes: Any) -> None:
        """Change fields and write the file (a write that fails is skipped: it is only a report)."""
        self.state = self.state.model_copy(update=changes)
        with contextlib.suppress(OSError):
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".link-")
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(self.state.model_dump_json())
                os.chmod(tmp, 0o644)
                os.replace(tmp, self.path)
            except OSError:
                os.unlink(tmp)
                raise


def read_link(state_dir: Path) -> LinkState | None:
    """The running agent's last written link state, or None."""
    try:
        return LinkState.model_validate(json.loads((state_dir / LINK_FILE).read_text()))
    except (OSError, ValueError, ValidationError):
        return None
