"""Storage faults, contained: a shared tally that logs at most once per interval, and a backoff per caller.

A full or stalled SD card makes every SQLite call fail for as long as it lasts;
logging each failure would bury the log (hundreds of lines a second) and
re-trying at once would spin.  Each caller (intake, worker, outbox,
supervisor) keeps a ``Backoff`` and reports to the one ``StorageFaults``, which
logs the first error, then a summary with a count at most every
``LOG_EVERY_S``, and a line when storage works again.  It has no thread of its
own: any thread may report (a lock guards it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from agent.backoff import Backoff
from agent.jobs.store import is_corruption

log = logging.getLogger(__name__)

#: A failing disk is reported at most this often (with the count since the last report).
LOG_EVERY_S = 30.0
# The first retry comes quickly (a blip), then doubling to at most this: slow enough not to
# spin on a dead card, quick enough that service resumes within seconds once space is freed.
_FIRST_S = 0.05
_MAX_S = 2.0


class StorageFaults:
    """How the job store is doing: failing now or not, errors counted, logged sparingly."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, log_every_s: float = LOG_EVERY_S) -> None:
        self._clock = clock
        self._every = log_every_s
        self._lock = threading.Lock()
        self._since: float | None = None  # when the current run of failures began
        self._last_log = -float("inf")
        self._unlogged = 0  # errors not reported in a log line yet
        self._run = 0  # errors in the current run
        self._run_logged = False
        self.total = 0  # every storage error since start (telemetry)
        self.corrupt: str | None = None  # SQLite found the database damaged while running: why

    @property
    def failing(self) -> bool:
        """Whether storage failed since the last successful write."""
        with self._lock:
            return self._since is not None

    def failed(self, what: str, exc: BaseException) -> None:
        """Count one failed storage operation (``what`` the agent was doing)."""
        now = self._clock()
        if self.corrupt is None and is_corruption(exc):
            self.corrupt = f"{what}: {exc}"
            log.critical("JOB DATABASE CORRUPT while %s: %s; the agent restarts to move it aside", what, exc)
        with self._lock:
            self.total += 1
            self._run += 1
            self._unlogged += 1
            if self._since is None:
                self._since = now
            if now - self._last_log < self._every:
                return
            if self._unlogged == 1:
                log.error(
                    "job store error while %s: %s; retrying with backoff (repeats are summed up every %.0f s)",
                    what,
                    exc,
                    self._every,
                )
            else:
                log.error(
                    "job store failing: %d errors in the last %.0f s (last while %s: %s)",
                    self._unlogged,
                    min(now - self._last_log, now - self._since),
                    what,
                    exc,
                )
            self._last_log = now
            self._unlogged = 0
            self._run_logged = True

    def ok(self) -> None:
        """A write succeeded: storage works (logged when a failure had been logged)."""
        if self._since is None:  # the common case, without the lock
            return
        with self._lock:
            if self._since is None:
                return
            if self._run_logged:
                log.warning(
                    "job store works again after %.1f s and %d errors", self._clock() - self._since, self._run
                )
            self._since = None
            self._run = 0
            self._run_logged = False


def storage_backoff(first_s: float = _FIRST_S) -> Backoff:
    """The delays before storage retries: doubling from ``first_s`` to 2 s, no jitter, reset on success."""
    return Backoff(first_s=first_s, max_s=_MAX_S, jitter=False)
