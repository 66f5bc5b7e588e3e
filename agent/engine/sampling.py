"""Choosing the next token from logits: greedy, or seeded sampling.

The order follows Hugging Face's logits processors so that a seed gives the
kind of output people expect: repetition penalty, then temperature, top-k,
top-p, then a draw from the remaining distribution.

The sampler cannot fail on any parameters ``SamplingParams`` admits, whatever
the logits (huge, tiny, infinite or NaN): scores are computed in float64 after
subtracting the best one, so no penalty or temperature overflows them, and the
best token always survives every filter.  ``tests/unit/test_sampling.py``
checks this property over the whole admitted range.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from edge_contract.params import SamplingParams

__all__ = ["Sampler", "SamplingParams"]

# Tokens more than e^40 less likely than the best cannot be drawn at float64 precision.
_NEGLIGIBLE = -40.0
# top_p sorts this many of the likeliest candidates first (then 16 times more, as needed).
_FIRST_SORTED = 256


class Sampler:
    """Picks tokens for one request; holds its random generator and the ids seen so far."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: list[int]) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)
        self._penalize = params.repetition_penalty != 1.0
        self._seen = np.zeros(vocab_size, dtype=bool)
        if self._penalize:
            self._seen[[i for i in prompt_ids if 0 <= i < vocab_size]] = True

    def __call__(self, logits: npt.NDArray[np.floating]) -> int:
        """The next token for the last position's ``logits`` (shape ``[vocab]``)."""
        params = self.params
        if params.greedy and not self._penalize:
            token = int(np.argmax(logits))  # the common path: no copy
        else:
            scores = logits.astype(np.float64)  # a copy, wide enough that no scaling overflows
            if self._penalize:
                self._apply_repetition_penalty(scores)
            token = int(np.argmax(scores)) if params.greedy else self._sample(scores)
        if self._penalize:
            self._seen[token] = True
        return token

    def _apply_repetition_penalty(self, scores: npt.NDArray[np.float64]) -> None:
        seen = scores[self._seen]
        penalty = self.params.repetition_penalty
        scores[self._seen] = np.where(seen > 0, seen / penalty, seen * penalty)

    def _sample(self, scores: npt.NDArray[np.float64]) -> int:
        params = self.params
        best = scores.max()
        if np.isnan(best):  # a broken model's NaN logits: never drawn
            scores[np.isnan(scores)] = -np.inf
            best = scores.max()
        if np.isfinite(best):
            # Relative to the best (0 for it, at most 0 for the rest), then scaled: a small
            # temperature sends the others towards -inf, never the best above 0.
            scaled = scores
            scaled -= best
            with np.errstate(over="ignore"):  # only below the admitted temperatures: -inf is right
                scaled /= params.temperature
        else:
            # Some logits are +inf (they alone count), or every one is -inf or NaN (a broken
            # model: all count alike). Either way the ties at the top share the draw.
            scaled = np.where(scores == best, 0.0, -np.inf)
        # Never empty: the best scores 0, and is among the top k.
        if 0 < params.top_k < scaled.shape[0]:
            candidates = np.argpartition(scaled, -params.top_k)[-params.top_k :]
            candidates = np.sort(candidates[scaled[candidates] > _NEGLIGIBLE])
        else:
            candidates = np.flatnonzero(scaled > _NEGLIGIBLE)
        scores = scaled[candidates]
        weights = np.exp(scores)  # the best's is exp(0) = 1, so the sum is at least 1
        if params.top_p < 1.0:
            keep = _nucleus(scores, candidates, weights, params.top_p)
            candidates, weights = candidates[keep], weights[keep]
        # Candidates in id order (or by descending score after top_p): the same seed, the same draw.
        return int(candidates[self._rng.choice(candidates.shape[0], p=weights / weights.sum())])


def _nucleus(
    scores: npt.NDArray[np.float64],
    ids: npt.NDArray[np.intp],
    weights: npt.NDArray[np.float64],
    top_p: float,
) -> npt.NDArray[np.intp]:
    """Positions of the smallest set of likeliest candidates holding ``top_p`` of the mass.

    Ordered by descending score, ties by id.  Only the likeliest few are sorted, more only when
    they hold too little mass: a full sort of a 150k vocabulary costs more than a decode step
    of a small model on a Raspberry Pi.
    """
    total = weights.sum()
    count = scores.shape[0]
    size = min(count, _FIRST_SORTED)
    while True:
        part = np.argpartition(-scores, size - 1)[:size] if size < count else np.arange(count)
        order = part[np.lexsort((ids[part], -scores[part]))]
        mass = np.cumsum(weights[order]) / total
        if size == count or mass[-1] >= top_p:
            keep = min(order.shape[0], int(np.searchsorted(mass, top_p)) + 1)
            return order[:keep]
        size = min(count, size * 16)
