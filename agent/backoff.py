"""When to try again: exponential backoff, the one used for the broker and for storage.

Pure logic (no clock of its own, no I/O).  The link asks for the next delay after
each failed attempt or lost connection and reports when a connection came up; a
connection that drops within ``stable_s`` does not count as recovery — a broker
that accepts TLS and then closes the connection (a revoked identity, a full
broker) would otherwise be retried about once a second, forever.  Storage retries
(``agent.daemon.faults``) use it without jitter and ``reset()`` it after a write
that worked.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays of ``first_s * 2**n``, capped at ``max_s``, each drawn from its upper half at random.

    The jitter spreads a fleet's reconnections after a broker restart; drawing from the upper
    half keeps the growth (a delay is at least half its nominal value).
    """

    first_s: float = 1.0
    max_s: float = 60.0
    #: A connection that stayed up this long resets the backoff: long enough that a broker
    #: dropping the box right after CONNACK (or after its first SUBSCRIBE) does not count as
    #: recovery, short enough that brokers restarted a few times in a row are rejoined quickly.
    stable_s: float = 10.0
    #: Draw each delay from the upper half of its nominal value (spreads a fleet's reconnections);
    #: off, the delays are exactly ``first_s * 2**n``.
    jitter: bool = True
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0
    _up_since: float | None = None

    def next_delay(self) -> float:
        """The wait before the next attempt; each call counts one more failure."""
        nominal = min(self.max_s, self.first_s * 2**self.failures)
        self.failures += 1
        if not self.jitter:
            return float(nominal)
        return float(nominal / 2 + self.rng.uniform(0, nominal / 2))

    def reset(self) -> None:
        """It worked: the next trouble starts with a short delay again."""
        self.failures = 0

    def connected(self, now: float) -> None:
        """A connection came up at ``now`` (monotonic seconds)."""
        self._up_since = now

    def disconnected(self, now: float) -> None:
        """The connection went down at ``now``: reset the backoff only if it had been stable."""
        if self._up_since is not None and now - self._up_since >= self.stable_s:
            self.failures = 0
        self._up_since = None
