"""One sequence's place in a :class:`~agent.engine.batch.Batcher`: its state, slot and callbacks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent.engine.sequence import Completion
from agent.engine.sequence import Sequence as GenSequence
from agent.engine.speculate import Speculator

_QUEUED, _PREFILL, _DECODE, _DONE = "queued", "prefill", "decode", "done"


class BatchJob:
    """One sequence's place in the batch; ``completion`` (or ``error``) is set when it is done."""

    def __init__(
        self,
        seq: GenSequence,
        on_text: Callable[[str], None] | None,
        should_stop: Callable[[], bool] | None,
        on_prefill: Callable[[int, int], None] | None = None,
    ) -> None:
        self.seq = seq
        self.state = _QUEUED
        self.completion: Completion | None = None
        self.error: Exception | None = None  # a fault of this sequence alone (its sampler)
        self.on_text = on_text
        self.should_stop = should_stop
        self.on_prefill = on_prefill
        self.slot = -1
        self.prefilled = 0  # prompt positions in the cache
        self.token = 0  # chosen, not yet fed
        self.spec: Speculator | None = None
        self.forward: Callable[[Any, int, Any], None] | None = None  # its verify passes (speculating)

    def prefill_progress(self) -> None:
        """Report the prompt positions ready (``on_prefill``)."""
        if self.on_prefill is not None:
            self.on_prefill(self.prefilled, len(self.seq.prompt_ids))

    @property
    def prompt_ids(self) -> list[int]:
        """The prompt's token ids."""
        return self.seq.prompt_ids

    @property
    def done(self) -> bool:
        """True once the job has its completion (or its error)."""
        return self.state == _DONE
