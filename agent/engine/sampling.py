"""Choosing the next token from logits: greedy, or seeded sampling.

The order follows Hugging Face's logits processors so that a seed gives the
kind of output people expect: repetition penalty, then temperature, top-k,
top-p, then a draw from the remaining distribution.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field


class SamplingParams(BaseModel):
    """How to pick tokens and when to stop. The one source of truth for these knobs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(256, ge=1, le=131072, description="Most new tokens to generate.")
    temperature: float = Field(
        0.0, ge=0.0, le=5.0, description="0 means greedy; higher flattens the distribution."
    )
    top_k: int = Field(0, ge=0, le=100000, description="Keep the k likeliest tokens (0: all).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Keep the smallest set with this much mass.")
    repetition_penalty: float = Field(
        1.0, gt=0.0, le=10.0, description="Divide (or multiply, when negative) logits of seen tokens."
    )
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="Seed for reproducible sampling; random if unset."
    )
    stop: tuple[str, ...] = Field(
        (), max_length=16, description="Strings that end generation; they are not part of the text."
    )

    ignore_eos: bool = Field(False, description="Keep generating past the eos ids (benchmarks use this).")

    @property
    def greedy(self) -> bool:
        """True when the choice is the arg-max whatever the seed."""
        return self.temperature == 0.0 or self.top_k == 1


class Sampler:
    """Picks tokens for one request; holds its random generator and the ids seen so far."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: list[int]) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)
        self._penalize = params.repetition_penalty != 1.0
        self._seen = np.zeros(vocab_size, dtype=bool)
        if self._penalize:
            self._seen[[i for i in prompt_ids if 0 <= i < vocab_size]] = True

    def __call__(self, logits: npt.NDArray[np.float32]) -> int:
        """The next token for the last position's ``logits`` (shape ``[vocab]``)."""
        params = self.params
        if self._penalize:
            logits = self._apply_repetition_penalty(logits)
        token = int(np.argmax(logits)) if params.greedy else self._sample(logits)
        if self._penalize:
            self._seen[token] = True
        return token

    def _apply_repetition_penalty(self, logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        logits = logits.copy()
        seen = logits[self._seen]
        penalty = self.params.repetition_penalty
        logits[self._seen] = np.where(seen > 0, seen / penalty, seen * penalty)
        return logits

    def _sample(self, logits: npt.NDArray[np.float32]) -> int:
        params = self.params
        scaled = logits.astype(np.float64) / params.temperature
        # Tokens more than e^40 less likely than the best cannot be drawn at float64
        # precision; dropping them first keeps the sort below small.
        candidates = np.flatnonzero(scaled > scaled.max() - 40.0)
        if 0 < params.top_k < candidates.shape[0]:
            part = np.argpartition(scaled[candidates], -params.top_k)[-params.top_k :]
            candidates = candidates[part]
        # Sort candidates by descending score; ties broken by id for determinism.
        order = np.lexsort((candidates, -scaled[candidates]))
        candidates = candidates[order]
        probs = np.exp(scaled[candidates] - scaled[candidates[0]])
        probs /= probs.sum()
        if params.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
            candidates, probs = candidates[:keep], probs[:keep] / probs[:keep].sum()
        return int(candidates[self._rng.choice(len(candidates), p=probs)])
