"""Continuous batching: several sequences decode together, one pass over the weights per step.

Decode is memory-bound: a pass reads every weight once whether it carries one
sequence's next token or eight.  :class:`Batcher` keeps up to ``max_batch``
sequences in one :class:`~agent.engine.kv_cache.KVCache` of that many slots;
each sequence (:class:`~agent.engine.sequence.Sequence`) owns one slot.  One
:meth:`Batcher.step` admits waiting sequences (the free slot holding the
longest prefix of the prompt, then the prefix cache), prefills one chunk, and
runs one decode pass for every running sequence; a speculating sequence
verifies in a pass of its own.  ``docs/engine.md`` ("One loop", "What one pass
can hold", "Exactness, per CPU family") says how the exported graph makes rows
of different lengths share a pass, why a chunk or a verify pass cannot share
one with decode rows (onnxruntime's GroupQueryAttention), and why filler rows
keep batched output equal to solo output bit for bit.

Memory: the block is ``max_batch * slot_tokens`` positions; a budget caps
``max_batch`` at construction (and says so), and a request that needs more
positions than a slot holds runs alone once the batch has drained.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt

from agent.engine.batch_job import _DECODE, _DONE, _PREFILL, BatchJob
from agent.engine.kv_cache import KVCache
from agent.engine.prefill import plan_chunks
from agent.engine.rows import DecodeRows
from agent.engine.sampling import SamplingParams
from agent.engine.sequence import Completion
from agent.engine.sequence import Sequence as GenSequence
from agent.engine.speculate import Speculator
from edge_contract.errors import AgentError
from edge_contract.protocol import FinishReason

if TYPE_CHECKING:
    from agent.engine.engine import Engine

log = logging.getLogger(__name__)

_T = TypeVar("_T")
#: A joining prompt's chunk while others decode. Each chunk is a pass the running sequences wait
#: for, so its size is their longest gap between tokens; the joiner pays one decode pass of theirs
#: per extra chunk (~0.1 s for 3 rows on a 2-vCPU AVX-512 box, against seconds per 512-token
#: chunk). Measured there (docs/engine.md, "Capped chunks"): longest gap 9.8 s -> 2.7-3.4 s,
#: the joiner's first token within noise of before.
JOIN_CHUNK_TOKENS = 128
#: A one-slot buffer is allocated in multiples of this many positions (committed only as written),
#: so that it can be kept for a next job a few tokens longer (``Batcher.close``).
_KEPT_ROUNDING = 256


class Batcher:
    """Decodes up to ``max_batch`` sequences together on one :class:`Engine`. One thread drives it."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int | None = None,
        slot_tokens: int | None = None,
        budget_bytes: int | None = None,
        prefill_chunk: int | None = None,
        speculate: bool = False,
    ) -> None:
        """``speculate``: every sequence drafts and verifies (``agent.engine.speculate``); not on a pruned export."""
        graph = engine.graph
        self.engine = engine
        self.slot_tokens = min(slot_tokens or engine.context_length, engine.context_length)
        self.position_bytes = (
            graph.layers * 2 * graph.kv_heads * graph.head_size * np.dtype(graph.kv_dtype).itemsize
        )
        wanted = max_batch or engine.options.max_batch
        fits = wanted if budget_bytes is None else budget_bytes // (self.position_bytes * self.slot_tokens)
        if fits < 1:
            raise AgentError(
                f"the batch memory budget ({budget_bytes} bytes) cannot hold one slot of "
                f"{self.slot_tokens} positions ({self.position_bytes * self.slot_tokens} bytes): "
                "raise the budget or lower the slot size"
            )
        if fits < wanted:
            log.warning("batch capped at %d sequences (of %d asked) by its memory budget", fits, wanted)
        self.max_batch = int(min(wanted, fits))
        self.speculate = speculate and graph.verifies  # last-position logits cannot verify
        self.prefill_chunk = max(2, prefill_chunk or engine.options.prefill_chunk_tokens)
        # Where a row's bits depend on its pass's row-count parity (``Engine.even_rows``), an odd pass
        # gets a filler row: an odd ``max_batch`` needs a slot for it, which only ever has position 0
        # written. Pages are committed as positions are written.
        filler = 1 if engine.even_rows and self.max_batch % 2 == 1 else 0
        # The positions each slot holds for a prompt: ``(tokens, n)``, the KV of ``tokens[:n]``.
        self._held: list[tuple[list[int], int]] = [([], 0)] * self.max_batch
        kept = engine.take_kept(self.max_batch + filler, self.slot_tokens)  # an unfit one is freed here
        if kept is not None:
            self._cache, tokens = kept
            self._held[0] = (tokens, len(tokens))
        else:
            capacity = self.slot_tokens
            if self.max_batch == 1:  # a little room, so that the next run's slightly longer job fits it
                capacity = min(-(-capacity // _KEPT_ROUNDING) * _KEPT_ROUNDING, engine.context_length)
            self._cache = KVCache(
                layers=graph.layers,
                kv_heads=graph.kv_heads,
                head_size=graph.head_size,
                capacity=max(capacity, self.slot_tokens),
                dtype=graph.kv_dtype,
                slots=self.max_batch + filler,
            )
        self._rows = DecodeRows(engine.session, graph, self._cache)
        self._chunk_logits = np.empty((1, 0, graph.vocab), dtype=graph.logits_dtype)
        self._slots: list[BatchJob | None] = [None] * self.max_batch
        self._queue: deque[BatchJob] = deque()
        self.passes = 0  # batched decode passes
        self.rows = 0  # sequences decoded over all passes (occupancy = rows / passes / max_batch)
        self.decoded = 0  # tokens chosen by decode and verify passes
        self.decode_seconds = 0.0  # time in batched decode passes

    # -- public surface --------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Size of the sequences' key/value slots at most (committed as they fill)."""
        return self.max_batch * self.slot_tokens * self.position_bytes

    @property
    def active(self) -> int:
        """Sequences holding a slot (prefilling or decoding)."""
        return sum(job is not None for job in self._slots)

    @property
    def queued(self) -> int:
        """Sequences waiting for a slot."""
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """Nothing running and nothing waiting."""
        return not self._queue and self.active == 0

    @property
    def occupancy(self) -> float:
        """Mean share of ``max_batch`` busy per decode pass so far."""
        return self.rows / (self.passes * self.max_batch) if self.passes else 0.0

    def submit(
        self,
        prompt_ids: Sequence[int] | list[int],
        params: SamplingParams | None = None,
        *,
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> BatchJob:
        """Queue a sequence; it joins the batch at a later :meth:`step`. Bad prompts raise here."""
        seq = self.engine.sequence(prompt_ids, params, on_text=on_text, should_stop=should_stop)
        return self.submit_sequence(seq, on_text=on_text, should_stop=should_stop)

    def submit_sequence(
        self,
        seq: GenSequence,
        *,
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_prefill: Callable[[int, int], None] | None = None,
    ) -> BatchJob:
        """Queue a sequence made by ``Engine.sequence`` (``on_prefill(done, total)``: prompt positions ready)."""
        job = BatchJob(seq, on_text, should_stop, on_prefill)
        self._queue.append(job)
        return job

    def step(self) -> list[BatchJob]:
        """Admit, prefill one chunk, decode one token for every running sequence; return who finished."""
        finished: list[BatchJob] = []
        self._admit(finished)
        prefilling = [job for job in self._slots if job is not None and job.state == _PREFILL]
        decoding = any(job is not None and job.state == _DECODE for job in self._slots)
        # While others decode, a joining prompt's chunk is capped: each chunk is a pass the running
        # sequences wait for (the GQA kernel cannot take it beside their rows). Alone: the configured size.
        chunk = min(self.prefill_chunk, JOIN_CHUNK_TOKENS) if decoding else self.prefill_chunk
        for job in prefilling:
            # With nobody decoding, nobody waits: prefill whole prompts back to back.
            while job.state == _PREFILL:
                self._prefill_chunk(job, finished, chunk)
                if decoding:
                    break
            if decoding:
                break
        if any(job is not None and job.state == _DECODE for job in self._slots):
            self._decode(finished)
        return finished

    def close(self, *, keep: bool = True) -> None:
        """Done with this scheduler: a one-slot one leaves its buffer and prompt positions to the engine.

        The next one-slot run reuses them in place when its prompt starts the same way
        (``Engine.keep_slot``); ``keep=False`` (after a model fault) lets them go.
        """
        if keep and self.max_batch == 1 and self.idle:
            tokens, n = self._held[0]
            self.engine.keep_slot(self._cache, tokens[:n])

    def run(self) -> None:
        """Step until every submitted sequence is done."""
        while not self.idle:
            self.step()

    def generate_all(self, requests: Sequence[tuple[Sequence[int], SamplingParams]]) -> list[Completion]:
        """Submit ``requests`` at once and run them to completion (benchmarks, tests)."""
        jobs = [self.submit(ids, params) for ids, params in requests]
        self.run()
        return [job.completion for job in jobs if job.completion is not None]

    # -- scheduling --------------------------------------------------------------

    def _admit(self, finished: list[BatchJob]) -> None:
        while self._queue:
            job = self._queue[0]
            free, common = self._free_slot(job.prompt_ids)
            alone = job.seq.capacity > self.slot_tokens  # runs alone once the batch has drained
            if free is None or (alone and self.active):
                if job.seq.canceled():  # canceled while it waits (polled only then, as the solo loop does)
                    self._queue.popleft()
                    self._finish(job, finished, "canceled")
                    continue
                return
            if alone:
                self._queue.popleft()
                self._run_alone(job, finished)
                continue
            assert free is not None
            self._queue.popleft()
            self._slots[free] = job
            job.slot, job.state = free, _PREFILL
            job.prefilled = job.seq.cached_tokens = self.engine.restore_prefix(
                job.prompt_ids, self._cache, free, in_place=common
            )
            self._held[free] = (job.prompt_ids, job.prefilled)
            job.prefill_progress()
            if self.speculate:
                job.spec = self._speculator(job)

    def _free_slot(self, ids: list[int]) -> tuple[int | None, int]:
        """The free slot holding the longest prefix of ``ids``, and how many positions of it are usable.

        Usable: the common tokens, leaving two positions to compute (as a prefix cache hit does);
        none with the prefix cache off (every run cold).
        """
        best: tuple[int | None, int] = (None, -1)
        for slot, job in enumerate(self._slots):
            if job is None and self.engine.prefix_cache is None:
                return slot, 0
            if job is None:
                tokens, n = self._held[slot]
                common = 0
                for a, b in zip(tokens[: min(n, len(ids) - 2)], ids, strict=False):
                    if a != b:
                        break
                    common += 1
                if common > best[1]:
                    best = (slot, common)
        return best[0], max(best[1], 0)

    def _run_alone(self, job: BatchJob, finished: list[BatchJob]) -> None:
        try:
            job.completion = self.engine.generate(
                job.prompt_ids, job.seq.params, on_text=job.on_text, should_stop=job.should_stop
            )
        except AgentError as exc:
            job.error = exc
        job.state = _DONE
        finished.append(job)

    def _prefill_chunk(self, job: BatchJob, finished: list[BatchJob], size: int) -> None:
        engine, graph, seq = self.engine, self.engine.graph, job.seq
        ids = job.prompt_ids
        begin, end = plan_chunks(job.prefilled, len(ids), size, even=engine.even_rows)[0]
        if job.prefilled > seq.cached_tokens and seq.canceled():  # between chunks, as the solo loop
            return self._finish(job, finished, "canceled")
        chunk = np.asarray([ids[begin:end]], dtype=np.int64)
        rows = graph.prefill_logits_rows(end - begin, even=engine.even_rows)
        if self._chunk_logits.shape[1] < rows:  # one buffer for every chunk: bounded by the chunk size
            self._chunk_logits = np.empty((1, rows, graph.vocab), dtype=graph.logits_dtype)
        logits = self._chunk_logits[:, :rows]
        binding = engine.session.io_binding()
        self._cache.bind(binding, graph.past_names, graph.present_names, first=job.slot)
        engine.bind_chunk(binding, chunk, past=begin, logits=logits)
        engine.session.run_with_iobinding(binding)
        job.prefilled = end
        if end - begin > 1:  # a one-row chunk (a one-token prompt) rounds otherwise: never reused
            self._held[job.slot] = (ids, end)
        job.prefill_progress()
        if end < len(ids):
            return None
        job.state = _DECODE
        token = self._sample(job, seq.first, logits[0, rows - 1], finished)
        if token is None:
            return None
        if engine.prefix_cache is not None:  # the prompt's positions are final from here on
            kv = self._cache.block[:, :, job.slot : job.slot + 1]
            engine.prefix_cache.insert(ids, kv, len(ids), tail=True)
        return self._take(job, token, finished)

    def _decode(self, finished: list[BatchJob]) -> None:
        """One step for every running sequence: a verify pass of its own for each speculating one,
        then one batched one-token pass for the others (those not speculating, or resting).

        Verify rows cannot share a pass: onnxruntime's GroupQueryAttention takes several new tokens
        per row only in a batch of one ("batch_size must be 1 when sequence_length > 1 and past
        context is given"). Each verify pass is therefore the one the sequence runs alone.
        """
        running = [job for job in self._slots if job is not None and job.state == _DECODE]
        plain: list[BatchJob] = []
        for job in running:
            if job.spec is None or not self._speculate(job, job.spec, finished):
                plain.append(job)
        if plain:
            self._plain(plain, finished)

    def _plain(self, running: list[BatchJob], finished: list[BatchJob]) -> None:
        """One decode pass: one token for every sequence in ``running`` (fillers elsewhere)."""
        rows = 1 + max(job.slot for job in running)
        if rows % 2 == 1 and self.engine.even_rows:
            rows += 1  # never an odd pass where its last row rounds differently (``agent.engine.rows``)
        for slot in range(rows):
            job = self._slots[slot] if slot < self.max_batch else None
            if job is not None and job in running:
                self._rows.set_row(slot, job.token, job.seq.length)
            elif job is not None and job.state == _DECODE:
                # Filler: writes the position its token in hand takes next (a verify pass ran this step).
                self._rows.set_filler(slot, job.seq.length - 1)
            else:
                # Filler: writes one position that is free or about to be overwritten by a chunk
                # (in a free slot, the one after the prompt positions it holds).
                held = self._held[slot][1] if slot < self.max_batch else 0
                self._rows.set_filler(slot, job.prefilled if job is not None else held)
        started = time.perf_counter()
        logits = self._rows.run(rows)
        self.decode_seconds += time.perf_counter() - started
        self.passes += 1
        self.rows += len(running)
        self.decoded += len(running)
        for job in running:
            token = self._sample(job, job.seq.sampler, logits[job.slot], finished)
            if token is not None:
                self._take(job, token, finished)

    def _speculate(self, job: BatchJob, spec: Speculator, finished: list[BatchJob]) -> bool:
        """Draft and verify ``job`` in a pass of its own; False: it rests, decode it plainly."""
        seq = job.seq
        room = min(seq.capacity - seq.length, seq.max_new - len(seq.generated) - 1)
        started = time.perf_counter()
        chosen = self._sample(job, lambda t: spec.step(t, seq.length - 1, room), job.token, finished)
        if chosen == []:
            return False  # resting: nothing to draft for a while
        self.decode_seconds += time.perf_counter() - started
        self.passes += 1
        self.rows += 1
        self.decoded += len(chosen or ())
        for token in chosen or ():  # the accepted drafts, then the token chosen after them
            if seq.take(token):
                self._finish(job, finished)
                break
        else:
            if chosen:
                job.token = chosen[-1]
        return True

    def _speculator(self, job: BatchJob) -> Speculator:
        engine, graph = self.engine, self.engine.graph
        binding = engine.session.io_binding()
        self._cache.bind(binding, graph.past_names, graph.present_names, first=job.slot)

        def forward(new: npt.NDArray[np.int64], past: int, logits: npt.NDArray[Any]) -> None:
            engine.bind_chunk(binding, new, past=past, logits=logits)
            engine.session.run_with_iobinding(binding)

        return Speculator(
            forward,
            job.seq.sampler,
            job.prompt_ids,
            even=engine.even_rows,
            keep_rows=graph.keeps_rows,
            vocab=graph.vocab,
            logits_dtype=graph.logits_dtype,
            max_k=engine.options.speculate_max_k,
        )

    def _sample(
        self, job: BatchJob, sampler: Callable[[Any], _T], logits: Any, finished: list[BatchJob]
    ) -> _T | None:
        """``sampler(logits)``; a fault there (a request's extreme parameters) ends this sequence alone."""
        try:
            return sampler(logits)
        except Exception as exc:
            job.error = exc
            self._finish(job, finished)
            return None

    def _take(self, job: BatchJob, token: int, finished: list[BatchJob]) -> None:
        if job.seq.take(token):
            self._finish(job, finished)
        else:
            job.token = token

    def _finish(self, job: BatchJob, finished: list[BatchJob], finish: FinishReason | None = None) -> None:
        if 0 <= job.slot < self.max_batch and self._slots[job.slot] is job:
            self._slots[job.slot] = None
        if job.spec is not None:
            job.seq.drafted, job.seq.accepted = job.spec.drafted, job.spec.accepted
        if job.error is None:
            job.completion = job.seq.complete(finish)
        job.state = _DONE
        finished.append(job)
