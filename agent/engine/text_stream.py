"""Streaming text out of token ids: whole characters only, and stop strings held back.

``IncrementalDecoder`` turns ids into text deltas without ever emitting half of
a multi-byte character: it decodes a small window of recent ids (so tokenizers
that strip a leading space at the start of a decode stay consistent) and holds
text back while it ends in U+FFFD, i.e. while a character is still incomplete.

``StopFilter`` sits behind it and never releases text that could turn out to
be the start of a stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_INCOMPLETE = "\ufffd"


class IncrementalDecoder:
    """Feeds on token ids one at a time and returns the text each one completes."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # ids before this index have been emitted as text

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text (possibly empty)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) > len(prefix_text) and not text.endswith(_INCOMPLETE):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Return whatever is still held back (an unfinished character shows as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(prefix_text) :]


class StopFilter:
    """Releases text as it streams, cutting it at the first stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self.text = ""  # everything received so far (until a stop is found)
        self._released = 0
        self.stopped = False

    @property
    def released_text(self) -> str:
        """The text released so far; after a stop, the final text."""
        return self.text[: self._released]

    def push(self, delta: str) -> str:
        """Take new text; return what is now safe to release.

        After a stop string has been found, ``stopped`` is set and nothing more is
        released; the stop string itself is never part of the output.
        """
        if self.stopped or not delta:
            return ""
        self.text += delta
        if not self._stops:
            return self._release(len(self.text))
        cut = self._first_stop()
        pending = len(self.text) - self._held_back()
        # A complete stop wins only if no longer stop that starts earlier may still complete
        # (stops "y" and "bya" on "by": wait for the next character).
        if cut >= 0 and cut <= pending:
            return self._stop_at(cut)
        return self._release(pending if cut < 0 else min(cut, pending))

    def flush(self) -> str:
        """At the end of generation: release what was held back for a possible stop."""
        if self.stopped:
            return ""
        cut = self._first_stop()
        return self._stop_at(cut) if cut >= 0 else self._release(len(self.text))

    def _first_stop(self) -> int:
        """Where the earliest complete stop string starts in the unreleased text, or -1.

        Released text never begins a stop: a tail that could is held back until it cannot.
        """
        found = (self.text.find(s, self._released) for s in self._stops)
        return min((i for i in found if i >= 0), default=-1)

    def _stop_at(self, cut: int) -> str:
        self.stopped = True
        self.text = self.text[:cut]
        return self._release(cut)

    def _held_back(self) -> int:
        """Length of the longest unreleased tail that is a proper beginning of some stop string."""
        for n in range(min(self._longest - 1, len(self.text) - self._released), 0, -1):
            tail = self.text[-n:]
            if any(len(s) > n and s.startswith(tail) for s in self._stops):
                return n
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self._released)
        out = self.text[self._released : upto]
        self._released = upto
        return out
