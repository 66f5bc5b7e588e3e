"""Continuous batching: several sequences decode together, one pass over the weights per step.

Decode is memory-bound: a pass reads every weight once whether it carries one
sequence's next token or eight.  :class:`Batcher` keeps up to ``max_batch``
sequences in one key/value block ``[layers, 2, max_batch, kv_heads, slot_tokens,
head_size]``; each sequence owns one *slot* (a row of that block) and its own
length, sampler, detokenizer and stop strings.

How the exported graph makes this work (checked on every fixture family):

* GroupQueryAttention takes each row's past length from the attention mask
  (``seqlens_k`` = ones in the row - 1) and places rotary positions from it, so
  rows of different lengths share a pass: row ``b``'s mask has ones for its
  own positions, zeros after.  A row attends to its own slot only.
* A sequence is prefilled straight into its slot (the slot's rows bound as a
  batch-1 cache): joining copies nothing.  Long prompts are prefilled in chunks
  of ``prefill_chunk`` tokens, one chunk between decode steps, so running
  sequences stall for one chunk at most.  Chunks are never a single token:
  multi-token passes give bit-identical rows whatever their length, a
  one-token pass does not (attention takes another kernel path).
* Each row of a batched one-token pass is computed exactly as a solo decode
  step (the matrix kernels work row by row; attention per row), so batched
  output is solo output bit for bit -- the parity tests check this.
* A slot that is free or still prefilling gets a filler row, which writes
  one position its own next pass overwrites (or position 0 of a free slot):
  a sequence leaves without moving anyone's cache.

Memory: the block is ``max_batch * slot_tokens`` positions; a budget caps
``max_batch`` at construction (and says so), and a request that needs more
positions than a slot holds runs alone once the batch has drained.
Speculative decoding is not combined with batching (a batch row feeds one token).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.engine.engine import Completion, Engine, FinishReason, Timings
from agent.engine.sampling import Sampler, SamplingParams
from agent.engine.text_stream import IncrementalDecoder, StopFilter
from edge_contract.errors import AgentError, ContextOverflowError, InvalidRequestError

log = logging.getLogger(__name__)

_QUEUED, _PREFILL, _DECODE, _DONE = "queued", "prefill", "decode", "done"


class BatchJob:
    """One sequence's request and state; ``completion`` is set when it is done."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        on_text: Callable[[str], None] | None,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.state = _QUEUED
        self.completion: Completion | None = None
        self.error: AgentError | None = None
        self._on_text = on_text
        self._should_stop = should_stop
        self.slot = -1
        self.prefilled = 0  # prompt positions in the cache
        self.token = 0  # chosen, not yet fed
        self.generated: list[int] = []
        self.finish: FinishReason = "length"
        self.max_new = 0
        self.sampler: Sampler | None = None
        self.decoder: IncrementalDecoder | None = None
        self.stops = StopFilter(params.stop)
        self.started = self.first_token_at = 0.0

    @property
    def done(self) -> bool:
        """True once the job has its completion (or its error)."""
        return self.state == _DONE

    @property
    def length(self) -> int:
        """Positions of this sequence in its slot after the token in hand is fed."""
        return len(self.prompt_ids) + len(self.generated)

    def emit(self, text: str) -> None:
        if text and self._on_text is not None:
            self._on_text(text)

    def canceled(self) -> bool:
        return self._should_stop is not None and self._should_stop()


class Batcher:
    """Decodes up to ``max_batch`` sequences together on one :class:`Engine`. One thread drives it."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int | None = None,
        slot_tokens: int | None = None,
        budget_bytes: int | None = None,
        prefill_chunk: int = 256,
    ) -> None:
        io = engine._io
        self.engine = engine
        self.slot_tokens = min(slot_tokens or engine.context_length, engine.context_length)
        self.position_bytes = io.layers * 2 * io.kv_heads * io.head_size * np.dtype(io.kv_dtype).itemsize
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
        self.prefill_chunk = max(2, prefill_chunk)
        # Pages are committed as positions are written (numpy.empty maps lazily).
        self._block = np.empty(
            (io.layers, 2, self.max_batch, io.kv_heads, self.slot_tokens, io.head_size), dtype=io.kv_dtype
        )
        self._mask = np.zeros((self.max_batch, self.slot_tokens), dtype=np.int64)
        self._ids = np.zeros((self.max_batch, 1), dtype=np.int64)
        self._logits = np.empty((self.max_batch, 1, io.vocab), dtype=io.logits_dtype)
        self._ones = np.ones((1, self.slot_tokens), dtype=np.int64)
        self._slots: list[BatchJob | None] = [None] * self.max_batch
        self._queue: deque[BatchJob] = deque()
        self.passes = 0  # batched decode passes
        self.rows = 0  # sequences decoded over all passes (occupancy = rows / passes / max_batch)
        self.decode_seconds = 0.0  # time in batched decode passes

    # -- public surface --------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Size of the key/value block at most (committed as it fills)."""
        return int(self._block.nbytes)

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
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        *,
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> BatchJob:
        """Queue a sequence; it joins the batch at a later :meth:`step`. Bad prompts raise here."""
        engine = self.engine
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise InvalidRequestError("the prompt is empty (no tokens)")
        if any(i < 0 or i >= engine._io.vocab for i in ids):
            raise InvalidRequestError(f"prompt token ids must lie in [0, {engine._io.vocab})")
        if len(ids) >= engine.context_length:
            raise ContextOverflowError(len(ids), engine.context_length)
        job = BatchJob(ids, params or SamplingParams(), on_text, should_stop)
        self._queue.append(job)
        return job

    def step(self) -> list[BatchJob]:
        """Admit, prefill one chunk, decode one token for every running sequence; return who finished."""
        finished: list[BatchJob] = []
        self._admit(finished)
        prefilling = [job for job in self._slots if job is not None and job.state == _PREFILL]
        decoding = any(job is not None and job.state == _DECODE for job in self._slots)
        for job in prefilling:
            # With nobody decoding, nobody waits: prefill whole prompts back to back.
            while job.state == _PREFILL:
                self._prefill_chunk(job, finished)
                if decoding:
                    break
            if decoding:
                break
        if any(job is not None and job.state == _DECODE for job in self._slots):
            self._decode(finished)
        return finished

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
            if job.canceled():
                self._queue.popleft()
                job.started = job.first_token_at = time.perf_counter()
                job.finish = "canceled"
                self._finish(job, finished)
                continue
            room = self.engine.context_length - len(job.prompt_ids)
            need = len(job.prompt_ids) + min(job.params.max_tokens, room) - 1
            if need > self.slot_tokens:
                if self.active:
                    return  # runs alone once the batch has drained
                self._queue.popleft()
                self._run_alone(job, finished)
                continue
            free = next((i for i, s in enumerate(self._slots) if s is None), None)
            if free is None:
                return
            self._queue.popleft()
            self._slots[free] = job
            job.slot, job.state, job.started = free, _PREFILL, time.perf_counter()
            job.max_new = min(job.params.max_tokens, room)
            job.sampler = Sampler(job.params, self.engine._io.vocab, job.prompt_ids)
            job.decoder = IncrementalDecoder(self.engine.tokenizer.decode)

    def _run_alone(self, job: BatchJob, finished: list[BatchJob]) -> None:
        try:
            job.completion = self.engine.generate(
                job.prompt_ids, job.params, on_text=job._on_text, should_stop=job._should_stop
            )
        except AgentError as exc:
            job.error = exc
        job.state = _DONE
        finished.append(job)

    def _prefill_chunk(self, job: BatchJob, finished: list[BatchJob]) -> None:
        engine, io = self.engine, self.engine._io
        ids = job.prompt_ids
        start = job.prefilled
        end = min(len(ids), start + self.prefill_chunk)
        if len(ids) - end == 1:
            end += 1  # never leave a one-token chunk (see the module docstring)
        chunk = np.asarray([ids[start:end]], dtype=np.int64)
        rows = io.prefill_logits_rows(end - start)
        logits = np.empty((1, rows, io.vocab), dtype=io.logits_dtype)
        binding = engine.session.io_binding()
        self._bind_cache(binding, job.slot, 1)
        binding.bind_input(io.input_ids, "cpu", 0, np.int64, chunk.shape, chunk.ctypes.data)
        binding.bind_input(io.attention_mask, "cpu", 0, np.int64, (1, end), self._ones.ctypes.data)
        binding.bind_output(io.logits, "cpu", 0, logits.dtype, logits.shape, logits.ctypes.data)
        engine.session.run_with_iobinding(binding)
        job.prefilled = end
        if end < len(ids):
            return
        assert job.sampler is not None
        job.first_token_at = time.perf_counter()
        job.state = _DECODE
        self._mask[job.slot] = 0
        self._mask[job.slot, : len(ids)] = 1
        self._take(job, job.sampler(logits[0, -1]), finished)

    def _decode(self, finished: list[BatchJob]) -> None:
        engine, io = self.engine, self.engine._io
        rows = 1 + max(i for i, job in enumerate(self._slots) if job is not None and job.state == _DECODE)
        running: list[BatchJob] = []
        for slot in range(rows):
            job = self._slots[slot]
            if job is not None and job.state == _DECODE:
                self._ids[slot, 0] = job.token
                self._mask[slot, job.length - 1] = 1
                running.append(job)
            else:
                # Filler: writes one position that is free or about to be overwritten by a chunk.
                self._ids[slot, 0] = 0
                self._mask[slot] = 0
                self._mask[slot, : (job.prefilled if job is not None else 0) + 1] = 1
        binding = engine.session.io_binding()
        self._bind_cache(binding, 0, rows)
        binding.bind_input(io.input_ids, "cpu", 0, np.int64, (rows, 1), self._ids.ctypes.data)
        binding.bind_input(
            io.attention_mask, "cpu", 0, np.int64, (rows, self.slot_tokens), self._mask.ctypes.data
        )
        binding.bind_output(
            io.logits, "cpu", 0, self._logits.dtype, (rows, 1, io.vocab), self._logits.ctypes.data
        )
        started = time.perf_counter()
        engine.session.run_with_iobinding(binding)
        self.decode_seconds += time.perf_counter() - started
        self.passes += 1
        self.rows += len(running)
        for job in running:
            assert job.sampler is not None
            self._take(job, job.sampler(self._logits[job.slot, 0]), finished)

    def _take(self, job: BatchJob, token: int, finished: list[BatchJob]) -> None:
        """The per-token rules of ``Engine.generate``: eos, stop strings, max_tokens, cancel."""
        assert job.decoder is not None
        eos = () if job.params.ignore_eos else self.engine.eos_ids
        if token in eos:
            job.finish = "stop"
            return self._finish(job, finished)
        job.generated.append(token)
        job.emit(job.stops.push(job.decoder.push(token)))
        if job.stops.stopped:
            job.finish = "stop"
            return self._finish(job, finished)
        if len(job.generated) >= job.max_new:
            return self._finish(job, finished)
        if job.canceled():
            job.finish = "canceled"
            return self._finish(job, finished)
        job.token = token
        return None

    def _finish(self, job: BatchJob, finished: list[BatchJob]) -> None:
        if job.decoder is not None and not job.stops.stopped:
            tail = job.stops.push(job.decoder.flush())
            job.emit(tail + job.stops.flush())
        if 0 <= job.slot < self.max_batch and self._slots[job.slot] is job:
            self._slots[job.slot] = None
        done = time.perf_counter()
        prefill_s = job.first_token_at - job.started
        decode_s = done - job.first_token_at
        n = len(job.generated)
        job.completion = Completion(
            token_ids=job.generated,
            text=job.stops.released_text,
            finish_reason=job.finish,
            prompt_tokens=len(job.prompt_ids),
            completion_tokens=n,
            timings=Timings(
                prefill_ms=prefill_s * 1e3,
                decode_ms=decode_s * 1e3,
                total_ms=(done - job.started) * 1e3,
                prefill_tokens_per_s=len(job.prompt_ids) / prefill_s if prefill_s > 0 else 0.0,
                decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            ),
        )
        job.state = _DONE
        finished.append(job)

    def _bind_cache(self, binding: Any, first_slot: int, rows: int) -> None:
        io = self.engine._io
        shape = (rows, io.kv_heads, self.slot_tokens, io.head_size)
        for layer, ((past_k, past_v), (present_k, present_v)) in enumerate(
            zip(io.past_names, io.present_names, strict=True)
        ):
            for kind, past, present in ((0, past_k, present_k), (1, past_v, present_v)):
                view: npt.NDArray[Any] = self._block[layer, kind, first_slot : first_slot + rows]
                ptr = view.ctypes.data
                binding.bind_input(past, "cpu", 0, io.kv_dtype, shape, ptr)
                binding.bind_output(present, "cpu", 0, io.kv_dtype, shape, ptr)
