"""One sequence being generated: its sampler, stop rules, streaming and completion.

The engine's solo loop and the batch scheduler both drive sequences through
:meth:`Sequence.take` (the per-token rules: eos, stop strings, ``max_tokens``,
cancel) and end them with :meth:`Sequence.complete`; only how the logits are
computed differs between them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from collections.abc import Sequence as Seq

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from agent.engine.sampling import Sampler, SamplingParams
from agent.engine.text_stream import IncrementalDecoder, StopFilter
from edge_contract.protocol import FinishReason, Timings


class Completion(BaseModel):
    """The outcome of one generation."""

    model_config = ConfigDict(extra="forbid")

    token_ids: list[int] = Field(description="Generated ids, without the eos id that ended them.")
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = Field(
        0, description="Prompt tokens whose keys and values came from the prefix cache."
    )
    timings: Timings
    drafted_tokens: int = Field(0, description="Draft tokens verified (speculative decoding).")
    accepted_tokens: int = Field(0, description="Draft tokens the model agreed with.")


class Sequence:
    """A prompt, its sampling parameters and what was generated after it so far."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        vocab: int,
        context_length: int,
        eos_ids: Iterable[int],
        decode: Callable[[Seq[int]], str],
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_new = min(params.max_tokens, context_length - len(prompt_ids))
        self.sampler = Sampler(params, vocab, prompt_ids)
        self.eos_ids = frozenset() if params.ignore_eos else frozenset(eos_ids)
        self._decoder = IncrementalDecoder(decode)
        self._stops = StopFilter(params.stop)
        self._on_text = on_text
        self._should_stop = should_stop
        self.generated: list[int] = []
        self.finish: FinishReason = "length"
        self.cached_tokens = 0
        self.drafted = self.accepted = 0
        self.started = time.perf_counter()
        self.first_token_at: float | None = None

    @property
    def capacity(self) -> int:
        """Cache positions the sequence needs: the last token is never fed back."""
        n = len(self.prompt_ids)
        return n + self.max_new - 1 if self.max_new > 1 else n

    @property
    def length(self) -> int:
        """Positions in the cache once the token in hand is fed."""
        return len(self.prompt_ids) + len(self.generated)

    def canceled(self) -> bool:
        """Whether ``should_stop`` says to stop now."""
        return self._should_stop is not None and self._should_stop()

    def first(self, logits: object) -> int:
        """The first token, from the prompt's last logits; the prefill ends here."""
        token = self.sampler(logits)  # type: ignore[arg-type]
        self.first_token_at = time.perf_counter()
        return token

    def take(self, token: int) -> bool:
        """Account the chosen ``token``; True when the sequence is finished (``finish`` says why)."""
        if token in self.eos_ids:
            self.finish = "stop"
            return True
        self.generated.append(token)
        self._emit(self._stops.push(self._decoder.push(token)))
        if self._stops.stopped:
            self.finish = "stop"
            return True
        if len(self.generated) >= self.max_new:
            return True
        if self.canceled():
            self.finish = "canceled"
            return True
        return False

    def complete(self, finish: FinishReason | None = None) -> Completion:
        """Flush the text and return the completion (``finish`` overrides the reason, e.g. a cancel)."""
        if finish is not None:
            self.finish = finish
        if not self._stops.stopped:
            self._emit(self._stops.push(self._decoder.flush()) + self._stops.flush())
        done = time.perf_counter()
        first = self.first_token_at if self.first_token_at is not None else done
        prefill_s, decode_s = first - self.started, done - first
        n = len(self.generated)
        prefilled = len(self.prompt_ids) - self.cached_tokens
        return Completion(
            token_ids=self.generated,
            text=self._stops.released_text,
            finish_reason=self.finish,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=n,
            cached_tokens=self.cached_tokens,
            drafted_tokens=self.drafted,
            accepted_tokens=self.accepted,
            timings=Timings(
                prefill_ms=prefill_s * 1e3,
                decode_ms=decode_s * 1e3,
                total_ms=(done - self.started) * 1e3,
                prefill_tokens_per_s=prefilled / prefill_s
                if prefill_s > 0 and self.first_token_at is not None
                else 0.0,
                decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            ),
        )

    def _emit(self, text: str) -> None:
        if text and self._on_text is not None:
            self._on_text(text)


class ForcedSampler(Sampler):
    """Picks the given tokens in turn and keeps a copy of the logits it was shown (teacher forcing)."""

    def __init__(self, tokens: list[int], vocab_size: int) -> None:
        super().__init__(SamplingParams(), vocab_size, [])
        self._tokens = tokens
        self.rows: list[npt.NDArray[np.floating]] = []

    def __call__(self, logits: npt.NDArray[np.floating]) -> int:
        self.rows.append(np.array(logits, copy=True))
        return self._tokens[len(self.rows) - 1]
