"""Exact speculative decoding by prompt lookup: draft from n-grams, verify in one pass.

Decode reads every weight once per pass whether the pass carries one token or
a few, so on a memory-bound box a pass over ``k + 1`` tokens costs little more
than a pass over one.  When the text being written copies a span of the prompt
(extraction, reformatting, quoting), the tokens that followed the last few
tokens the last time they occurred are a good guess for what comes next.

* :class:`NgramDrafter` proposes up to ``k`` tokens: the continuation of the
  most recent earlier occurrence of the longest suffix (``max_ngram`` down to
  ``min_ngram`` tokens) of the prompt plus the text so far.
* :class:`Speculator` feeds the last chosen token and the draft in one forward
  pass (the KV cache takes ``k + 1`` positions; GroupQueryAttention places
  them after the ``past`` from the attention mask's length, rotary positions
  included) and then runs the request's own :class:`Sampler` over the returned
  rows in order, keeping drafts while they equal what it picks.  The sampler
  is called exactly as plain decoding would call it -- once per emitted token,
  in order -- so greedy output is plain greedy output, and seeded sampling
  draws the same random numbers and gives the same tokens as without
  speculation.  Rejected positions need no rewind beyond the cache length:
  the next pass writes over them.
* :class:`DraftPolicy` picks ``k`` from the measured acceptance rate and the
  measured cost of a ``k + 1``-token pass against a one-token pass, and stops
  drafting (with a doubling back-off between probes) when speculation does not
  pay, so a job with nothing to copy runs at plain speed.

Every pass has at least two rows, and an even number of them where the model's
kernels compute rows in pairs (``Engine.even_rows``: an odd pass feeds one more
earlier token again).  onnxruntime's attention takes a matrix-vector
path for a one-row pass whose float sums are ordered differently from the
multi-row path, while rows of passes of two or more rows come out bit-identical
whatever the pass boundaries (:mod:`agent.engine.prefill`).  So a step with
nothing to draft feeds the previous token again beside the new one (its cache
entry is rewritten with the same bits), and the output of a speculating engine
is a function of the prompt and the sampler alone, never of what was drafted,
accepted or timed.  When nothing could be drafted for a while (no two-token
suffix of the text has occurred before, ``Speculator.REST_AFTER`` steps in a
row) the speculator rests: ``step`` returns no tokens and the caller takes plain
one-token steps until a suffix matches again; the first pass after a rest feeds
the previous token again whatever it drafts, so its cache entry (written by a
one-row pass) is rewritten alike in every drafting mode.  Resting depends on the
tokens alone, never on timing, so the output is still a function of the prompt
and the sampler; it spares text with nothing to copy the two-row passes, which
cost ~1.1x a one-row pass where decode is compute-bound.  Against an engine that does not speculate (one-row steps)
it can differ only where two logits tie to about 1e-6, as it can across
instruction sets.  The pass-boundary rule is onnxruntime's x86-64 kernels'
(measured); on aarch64 some passes round differently by size, so there a draft
may still tip such a near-tie.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.engine.sampling import Sampler

# forward(ids [1, n], past, logits [1, n, vocab]) runs one pass over ``n`` new tokens.
Forward = Callable[[npt.NDArray[np.int64], int, npt.NDArray[Any]], None]


class NgramDrafter:
    """Prompt-lookup drafting over a growing token history."""

    def __init__(self, tokens: Sequence[int], *, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.tokens: list[int] = []
        # n -> n-gram -> end index of its latest occurrence that has a successor.
        self._index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_ngram, max_ngram + 1)}
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append ``tokens`` to the history."""
        for token in tokens:
            end = len(self.tokens) - 1  # the token before this one now has a successor
            self.tokens.append(int(token))
            if end < 0:
                continue
            for n, index in self._index.items():
                if end + 1 >= n:
                    index[tuple(self.tokens[end + 1 - n : end + 1])] = end

    def matches(self, n: int) -> bool:
        """Whether the last ``n`` tokens occurred earlier with a successor (a draft of ``n``-gram context exists)."""
        index = self._index.get(n)
        return index is not None and len(self.tokens) >= n and tuple(self.tokens[-n:]) in index

    def draft(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the longest matching suffix ([] if none matches)."""
        if k <= 0:
            return []
        history = self.tokens
        for n in range(min(self.max_ngram, len(history)), self.min_ngram - 1, -1):
            end = self._index[n].get(tuple(history[-n:]))
            if end is not None:
                return history[end + 1 : end + 1 + k]
        return []


class DraftPolicy:
    """How many tokens to draft, from acceptance so far and what passes cost.

    The expected number of tokens a pass yields with ``k`` drafts accepted
    independently with probability ``a`` each is ``1 + a + ... + a^k``; it is
    worth a pass costing ``c(k)`` one-token passes when that ratio beats 1.
    ``c`` is measured (an average per pass size, extrapolated linearly for
    sizes not tried yet) so the same policy drafts long on a memory-bound box,
    where a pass over 9 tokens costs about what one does, and short or not at
    all on a compute-bound one.
    """

    _DECAY = 0.8  # recent passes dominate: acceptance changes as the text enters and leaves a copied span
    _MAX_COOLDOWN = 128  # plain passes between probes at most: bounds the cost of a probe to <1 %
    _PROBE_K = 2
    _REMEASURE = 32

    def __init__(self, max_k: int) -> None:
        self.max_k = max_k
        self._accepted = 1.0  # prior: one accepted draft in two
        self._rejected = 1.0
        self._cost: dict[int, float] = {}  # tokens per pass -> average seconds
        self._cooldown = 0
        self._backoff = 4
        self._passes = 0

    @property
    def acceptance(self) -> float:
        """Estimated chance that a draft token is accepted after the previous one was."""
        return self._accepted / (self._accepted + self._rejected)

    def cost_ratio(self, k: int) -> float:
        """Estimated cost of a pass over ``k + 1`` tokens in one-token passes."""
        one = self._cost.get(1)
        if k == 0 or one is None:
            return 1.0
        if k + 1 in self._cost:
            return self._cost[k + 1] / one
        slopes = [(cost / one - 1.0) / (n - 1) for n, cost in self._cost.items() if n > 1]
        slope = max(0.0, sum(slopes) / len(slopes)) if slopes else 0.02
        return 1.0 + slope * k

    def choose(self, limit: int) -> int:
        """Drafts to ask for now (0: a plain step), at most ``limit``."""
        self._passes += 1
        if limit <= 0 or 1 not in self._cost or self._passes % self._REMEASURE == 0:
            return 0  # a plain pass now and then keeps the one-token cost measured
        if self._cooldown > 0:
            self._cooldown -= 1
            return min(self._PROBE_K, self.max_k, limit) if self._cooldown == 0 else 0
        a = min(self.acceptance, 0.999)
        best_k, best_gain = 0, 1.0
        for k in range(1, min(self.max_k, limit) + 1):
            gain = (1.0 - a ** (k + 1)) / (1.0 - a) / self.cost_ratio(k)
            if gain > best_gain * 1.02:  # a marginal gain does not pay for the noise in the estimates
                best_k, best_gain = k, gain
        if best_k == 0:
            # Not worth it now: plain steps for a while, then one small probe.
            self._cooldown = self._backoff
            self._backoff = min(self._MAX_COOLDOWN, self._backoff * 2)
        return best_k

    def record(self, tokens: int, seconds: float, drafted: int, accepted: int) -> None:
        """Account one pass over ``tokens`` tokens that verified ``drafted`` drafts."""
        previous = self._cost.get(tokens)
        self._cost[tokens] = seconds if previous is None else 0.7 * previous + 0.3 * seconds
        if drafted:
            self._accepted = self._DECAY * self._accepted + accepted
            self._rejected = self._DECAY * self._rejected + (1 if accepted < drafted else 0)
            if accepted:
                self._backoff = 4


class Speculator:
    """Draft-and-verify decoding for one request; replaces the one-token step (except while it rests)."""

    REST_AFTER = 8  # steps in a row with no matching two-token suffix: rest (plain steps) until one matches

    def __init__(
        self,
        forward: Forward,
        sampler: Sampler,
        prompt_ids: Sequence[int],
        *,
        vocab: int,
        logits_dtype: npt.DTypeLike,
        max_k: int,
        even: bool = False,
        keep_rows: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._forward = forward
        self._clock = clock
        self._sampler = sampler
        self.drafter = NgramDrafter(prompt_ids)
        self.policy = DraftPolicy(max_k)
        self._even = even  # every pass an even number of rows (``Engine.even_rows``)
        self._keep_rows = keep_rows  # the export computes logits for the rows asked for only
        self._ids = np.zeros((1, max_k + 3), dtype=np.int64)  # drafts, the token, up to two before
        self._logits = np.empty((1, max_k + 3, vocab), dtype=logits_dtype)
        if max_k < 1:
            raise ValueError("max_k must be at least 1: a step feeds two rows")
        self.passes = 0
        self.drafted = 0
        self.accepted = 0
        self.rests = 0  # steps left to plain decoding
        self._dry = 0
        self._rested = False

    def step(self, token: int, past: int, limit: int) -> list[int]:
        """Feed ``token`` at position ``past`` (and a draft after it); return the tokens chosen next.

        At most ``limit`` drafts are verified (room left in the cache and in
        ``max_tokens``).  The list holds the accepted drafts and then the token
        the sampler chose where the first draft was refused (or after the last
        one): all of them final.  An empty list means "resting": nothing
        could be drafted for a while, the caller feeds ``token`` in a plain
        one-token step and calls again with the next one.
        """
        self.drafter.extend((token,))
        pair = min(2, self.drafter.max_ngram)
        self._dry = 0 if self.drafter.matches(pair) else self._dry + 1
        if self._dry >= self.REST_AFTER:
            self._rested = True
            self.rests += 1
            return []
        k = self.policy.choose(limit)
        draft = self.drafter.draft(k)
        n = len(draft) + 1
        # Nothing to verify: feed the previous token again so that the pass still has two rows; after a
        # rest, always (see the module docstring).
        again = 1 if (not draft or self._rested) and past >= 1 else 0
        if self._even and (n + again) % 2 == 1:
            # An odd pass feeds one more earlier token. There is one: ``past`` >= 1, and ``again`` is 1
            # only without drafts (then the pass is even already) or after a rest (8+ steps in).
            again += 1
        self._rested = False
        ids = self._ids[:, : n + again]
        ids[0, again:] = [token, *draft]
        if again:
            ids[0, :again] = self.drafter.tokens[-1 - again : -1]
        # The rows verified are the last ``n``; a row-keeping export computes just those (an even
        # count of them where rows pair: the pass is even, so they pair as in a full-logits pass).
        rows = n + again
        if self._keep_rows:
            rows = min(n + n % 2 if self._even else n, n + again)
        logits = self._logits[:, :rows]
        started = self._clock()
        self._forward(ids, past - again, logits)
        seconds = self._clock() - started
        chosen: list[int] = []
        for j in range(n):
            pick = self._sampler(logits[0, rows - n + j])
            chosen.append(pick)
            if j == len(draft) or pick != draft[j]:
                break
        accepted = len(chosen) - 1
        self.drafter.extend(chosen[:-1])  # the last one is fed (and recorded) next step
        self.passes += 1
        self.drafted += len(draft)
        self.accepted += accepted
        self.policy.record(n, seconds, len(draft), accepted)
        return chosen
