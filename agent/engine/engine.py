"""The inference engine: a model folder, one onnxruntime session, and the generation loop.

One request runs at a time (an edge box has a handful of cores and one model's
worth of memory).  Per request: tokenize; copy the longest cached prefix of the
prompt into the request's KV cache (``prefix_cache``) and prefill the rest in
chunks (``prefill``), checking ``should_stop`` between chunks; then decode one
token per pass with every buffer bound once through IOBinding — the KV cache
(see ``kv_cache``), the token, the attention mask (a view of one preallocated
row of ones) and the logits.  The only work per step besides the forward pass
is choosing the token and detokenizing it.  After the request the prompt's
blocks go into the prefix cache (and its directory, when the engine has one).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field

from agent.config import EngineOptions as EngineOptions
from agent.engine.kv_cache import KVCache
from agent.engine.model_folder import ModelFolder
from agent.engine.prefill import open_prefix_cache, plan_chunks
from agent.engine.prefix_cache import PrefixCacheStats
from agent.engine.sampling import Sampler, SamplingParams
from agent.engine.speculate import Speculator
from agent.engine.text_stream import IncrementalDecoder, StopFilter
from agent.engine.tokenizer import Tokenizer
from agent.errors import ContextOverflowError, InvalidRequestError, ModelConfigError, ModelFileError
from edge_contract.protocol import FinishReason as FinishReason
from edge_contract.protocol import Timings as Timings

_ORT_TYPES: dict[str, npt.DTypeLike] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
}


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


def _default_threads() -> int:
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except ImportError:  # pragma: no cover - psutil is a runtime dependency
        cores = None
    return max(1, cores or os.cpu_count() or 1)


class _PrefillCanceled(Exception):
    """``should_stop`` asked to stop between two prefill chunks."""


class Engine:
    """Runs one model folder. Not thread-safe: one ``generate`` at a time.

    ``prefix_cache_dir`` keeps prompt prefixes across restarts (the daemon passes
    ``state_dir/prefix_cache``); without it the prefix cache lives in memory only.
    """

    def __init__(
        self,
        path: str | Path,
        options: EngineOptions | None = None,
        *,
        prefix_cache_dir: str | Path | None = None,
    ) -> None:
        self.options = options or EngineOptions()
        self.folder = ModelFolder(path)
        self.tokenizer = Tokenizer(self.folder)
        self.threads = self.options.threads or _default_threads()
        self.session = self._open_session()
        self._io = _GraphIO(self.folder, self.session)
        self.eos_ids = frozenset(self.folder.eos_token_ids)
        limit = self.options.context_tokens
        self.context_length = min(limit, self.folder.context_length) if limit else self.folder.context_length
        # A row of ones long enough for any request; each step binds a prefix of it.
        self._mask = np.ones(self.context_length, dtype=np.int64)
        self._positions = np.arange(self.context_length, dtype=np.int64)
        self._token = np.zeros((1, 1), dtype=np.int64)
        self._step_logits = np.empty((1, 1, self._io.vocab), dtype=self._io.logits_dtype)
        opts, io = self.options, self._io
        self.prefix_cache = open_prefix_cache(
            self.folder.path,
            directory=None if prefix_cache_dir is None else Path(prefix_cache_dir),
            memory_mb=opts.prefix_cache_mb,
            disk_mb=opts.prefix_cache_disk_mb,
            block_tokens=opts.prefix_block_tokens,
            block_shape=(io.layers, 2, io.kv_heads, opts.prefix_block_tokens, io.head_size),
            dtype=np.dtype(io.kv_dtype),
            threads=self.threads,
        )
        self._cached_tokens = 0  # of the last prefill

    @property
    def name(self) -> str:
        """The model's name (its folder's)."""
        return self.folder.name

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """Bytes, blocks and hit rate of the prefix cache; None when it is off."""
        return self.prefix_cache.stats() if self.prefix_cache is not None else None

    def _open_session(self) -> ort.InferenceSession:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        spin_us = self.options.spin_us
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_us else "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if spin_us:
            so.add_session_config_entry("session.intra_op.spin_duration_us", str(spin_us))
        # Memory (docs/memory.md): the keys are onnxruntime's session_options_config_keys.h.
        so.enable_cpu_mem_arena = self.options.cpu_arena
        if not self.options.prepack_weights:
            so.add_session_config_entry("session.disable_prepacking", "1")
        try:
            return ort.InferenceSession(
                str(self.folder.onnx_path), sess_options=so, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises untyped errors for bad files
            raise ModelFileError(self.folder.onnx_path, f"onnxruntime cannot load it: {exc}") from exc

    # -- prompts -----------------------------------------------------------------

    def prompt_ids(
        self, prompt: str | None = None, messages: Sequence[dict[str, Any]] | None = None
    ) -> list[int]:
        """Token ids for a plain ``prompt`` or for chat ``messages`` (exactly one of them)."""
        if (prompt is None) == (messages is None):
            raise InvalidRequestError("give exactly one of prompt or messages")
        if messages is not None:
            return self.tokenizer.encode_chat(messages)
        assert prompt is not None
        return self.tokenizer.encode(prompt)

    # -- generation ----------------------------------------------------------------

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        *,
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_prefill: Callable[[int, int], None] | None = None,
    ) -> Completion:
        """Generate after ``prompt_ids``.

        ``on_text`` receives each piece of text as soon as it is final (whole
        characters, never part of a stop string).  ``should_stop`` is polled
        between prefill chunks and between tokens; when it returns true
        generation ends as ``canceled``.  ``on_prefill(done, total)`` reports the
        prompt positions ready after the cache lookup and after each chunk.
        """
        params = params or SamplingParams()
        ids = [int(i) for i in prompt_ids]
        n_prompt = len(ids)
        if n_prompt == 0:
            raise InvalidRequestError("the prompt is empty (no tokens)")
        if any(i < 0 or i >= self._io.vocab for i in ids):
            raise InvalidRequestError(f"prompt token ids must lie in [0, {self._io.vocab})")
        if n_prompt >= self.context_length:
            raise ContextOverflowError(n_prompt, self.context_length)
        max_new = min(params.max_tokens, self.context_length - n_prompt)
        sampler = Sampler(params, self._io.vocab, ids)
        decoder = IncrementalDecoder(self.tokenizer.decode)
        stops = StopFilter(params.stop)
        emit = on_text or (lambda _text: None)
        eos_ids = frozenset() if params.ignore_eos else self.eos_ids

        started = time.perf_counter()
        # The last token is never fed back, so the cache needs one slot less than that.
        capacity = n_prompt + max_new - 1 if max_new > 1 else n_prompt
        try:
            binding, cache, last = self._prefill(
                ids, capacity, should_stop=should_stop, on_prefill=on_prefill
            )
        except _PrefillCanceled:
            return self._canceled_in_prefill(n_prompt, started)
        token = sampler(last)
        prefill_done = time.perf_counter()
        cached_tokens = self._cached_tokens

        spec = self._speculator(ids, binding, sampler)
        ahead: list[int] = []  # tokens a verify pass chose beyond the one in hand
        generated: list[int] = []
        finish: FinishReason = "length"
        while True:
            if token in eos_ids:
                finish = "stop"
                break
            generated.append(token)
            piece = stops.push(decoder.push(token))
            if piece:
                emit(piece)
            if stops.stopped:
                finish = "stop"
                break
            if len(generated) >= max_new:
                break
            if should_stop is not None and should_stop():
                finish = "canceled"
                break
            total = n_prompt + len(generated)
            if ahead:
                token = ahead.pop(0)
                continue
            if spec is not None:
                room = min(capacity - total, max_new - len(generated) - 1)
                token, *ahead = spec.step(token, total - 1, room)
                continue
            # Decode: feed the token just chosen at position n_prompt + len - 1.
            self._token[0, 0] = token
            self._bind_mask(binding, total, positions_from=total - 1)
            self.session.run_with_iobinding(binding)
            token = sampler(self._step_logits[0, -1])

        if not stops.stopped:
            tail = stops.push(decoder.flush())
            tail += stops.flush()
            if tail:
                emit(tail)
        finished = time.perf_counter()
        if self.prefix_cache is not None:  # after the answer: never delays the first token
            self.prefix_cache.insert(ids, cache.block, n_prompt)
        decode_s = finished - prefill_done
        prefill_s = prefill_done - started
        return Completion(
            token_ids=generated,
            text=stops.released_text,
            finish_reason=finish,
            prompt_tokens=n_prompt,
            completion_tokens=len(generated),
            cached_tokens=cached_tokens,
            drafted_tokens=spec.drafted if spec else 0,
            accepted_tokens=spec.accepted if spec else 0,
            timings=Timings(
                prefill_ms=prefill_s * 1e3,
                decode_ms=decode_s * 1e3,
                total_ms=(finished - started) * 1e3,
                prefill_tokens_per_s=(n_prompt - cached_tokens) / prefill_s if prefill_s > 0 else 0.0,
                decode_tokens_per_s=(len(generated) - 1) / decode_s
                if len(generated) > 1 and decode_s > 0
                else 0.0,
            ),
        )

    def _canceled_in_prefill(self, n_prompt: int, started: float) -> Completion:
        elapsed_ms = (time.perf_counter() - started) * 1e3
        return Completion(
            token_ids=[],
            text="",
            finish_reason="canceled",
            prompt_tokens=n_prompt,
            completion_tokens=0,
            cached_tokens=self._cached_tokens,
            timings=Timings(
                prefill_ms=elapsed_ms,
                decode_ms=0.0,
                total_ms=elapsed_ms,
                prefill_tokens_per_s=0.0,
                decode_tokens_per_s=0.0,
            ),
        )

    def _speculator(self, ids: list[int], binding: ort.IOBinding, sampler: Sampler) -> Speculator | None:
        """A draft-and-verify stepper for this request, or None when speculation is off."""
        if not self.options.speculate or self._io.prefill_logits_rows(2) == 1:
            return None  # an export with last-position logits only cannot verify drafts

        def forward(new: npt.NDArray[np.int64], past: int, logits: npt.NDArray[Any]) -> None:
            self._bind_step(binding, new, past=past, logits=logits)
            self.session.run_with_iobinding(binding)

        return Speculator(
            forward,
            sampler,
            ids,
            vocab=self._io.vocab,
            logits_dtype=self._io.logits_dtype,
            max_k=self.options.speculate_max_k,
        )

    def token_ranks(self, prompt_ids: Sequence[int], expected: Sequence[int]) -> list[int]:
        """Feed ``expected`` after ``prompt_ids`` (teacher-forced) and return each token's rank.

        Rank 0 means the model's own greedy choice at that step; rank 3 means
        three tokens scored higher.  This checks a model against tokens
        recorded elsewhere without demanding bit-identical arithmetic.
        """
        ids, forced = [int(i) for i in prompt_ids], [int(i) for i in expected]
        if not ids or not forced:
            raise InvalidRequestError("need at least one prompt token and one expected token")
        if any(i < 0 or i >= self._io.vocab for i in ids + forced):
            raise InvalidRequestError(f"token ids must lie in [0, {self._io.vocab})")
        n_prompt = len(ids)
        if n_prompt + len(forced) > self.context_length:
            raise ContextOverflowError(n_prompt + len(forced) - 1, self.context_length)
        binding, _cache, row = self._prefill(ids, n_prompt + len(forced) - 1)
        ranks: list[int] = []
        for step, token in enumerate(forced):
            ranks.append(int(np.count_nonzero(row > row[token])))
            if step == len(forced) - 1:
                break
            self._token[0, 0] = token
            total = n_prompt + step + 1
            self._bind_mask(binding, total, positions_from=total - 1)
            self.session.run_with_iobinding(binding)
            row = self._step_logits[0, -1]
        return ranks

    def _prefill(
        self,
        ids: list[int],
        capacity: int,
        *,
        should_stop: Callable[[], bool] | None = None,
        on_prefill: Callable[[int, int], None] | None = None,
    ) -> tuple[ort.IOBinding, KVCache, npt.NDArray[Any]]:
        """The prompt into a new cache of ``capacity`` positions: cached blocks copied, the rest in chunks.

        Returns the binding, already set up for the first decode step; the cache,
        which must stay referenced while the binding is used; and the logits of
        the prompt's last position.  Sets ``_cached_tokens``.  Raises
        ``_PrefillCanceled`` when ``should_stop`` says so between chunks.
        """
        io, n = self._io, len(ids)
        cache = KVCache(
            layers=io.layers,
            kv_heads=io.kv_heads,
            head_size=io.head_size,
            capacity=capacity,
            dtype=io.kv_dtype,
        )
        done = done_before = self._cached_tokens = self._restore_prefix(ids, cache)
        if on_prefill is not None:
            on_prefill(done, n)
        binding = self.session.io_binding()
        cache.bind(binding, io.past_names, io.present_names)
        chunks = plan_chunks(done, n, self.options.prefill_chunk_tokens)
        longest = max(stop - begin for begin, stop in chunks)
        # One logits buffer for every chunk, bound at each chunk's length: memory stays bounded by the chunk.
        logits = np.empty((1, io.prefill_logits_rows(longest), io.vocab), io.logits_dtype)
        prompt = np.asarray([ids], dtype=np.int64)
        for begin, stop in chunks:
            if begin > done_before and should_stop is not None and should_stop():  # between chunks
                raise _PrefillCanceled
            rows = io.prefill_logits_rows(stop - begin)
            self._bind_step(binding, prompt[:, begin:stop], past=begin, logits=logits[:, :rows])
            self.session.run_with_iobinding(binding)
            done = stop
            if on_prefill is not None:
                on_prefill(done, n)
        last = logits[0, rows - 1].copy()  # not a view: the chunk-sized logits are freed on return
        self._bind_step(binding, self._token, past=n, logits=self._step_logits)
        return binding, cache, last

    def _restore_prefix(self, ids: list[int], cache: KVCache) -> int:
        """Copy the longest usable cached prefix of ``ids`` into ``cache``; returns its length."""
        if self.prefix_cache is None:
            return 0
        size = self.prefix_cache.block_tokens
        # At least two positions are left to compute: the last one's logits pick the first token,
        # and a one-row pass would take kernels that round differently (see ``prefill``).
        blocks = self.prefix_cache.lookup(ids, max_tokens=len(ids) - 2)
        for i, block in enumerate(blocks):
            cache.block[:, :, 0, :, i * size : (i + 1) * size, :] = block.kv
        return len(blocks) * size

    def _bind_step(
        self, binding: ort.IOBinding, ids: npt.NDArray[np.int64], *, past: int, logits: npt.NDArray[Any]
    ) -> None:
        io = self._io
        binding.bind_input(io.input_ids, "cpu", 0, np.int64, ids.shape, ids.ctypes.data)
        binding.bind_output(io.logits, "cpu", 0, logits.dtype, logits.shape, logits.ctypes.data)
        self._bind_mask(binding, past + ids.shape[1], positions_from=past)

    def _bind_mask(self, binding: ort.IOBinding, total: int, *, positions_from: int) -> None:
        io = self._io
        binding.bind_input(io.attention_mask, "cpu", 0, np.int64, (1, total), self._mask.ctypes.data)
        if io.position_ids is not None:
            count = total - positions_from
            ptr = self._positions.ctypes.data + positions_from * self._positions.itemsize
            binding.bind_input(io.position_ids, "cpu", 0, np.int64, (1, count), ptr)


class _GraphIO:
    """Names, shapes and types of the graph's inputs and outputs, checked against the config."""

    def __init__(self, folder: ModelFolder, session: ort.InferenceSession) -> None:
        decoder = folder.config.model.decoder
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}

        def need(names: dict[str, Any], name: str, kind: str) -> str:
            if name not in names:
                raise ModelConfigError(
                    f"{folder.path}: genai_config.json names {kind} {name!r}, which {folder.onnx_path.name} lacks"
                )
            return name

        self.layers = decoder.num_hidden_layers
        self.kv_heads = decoder.num_key_value_heads
        self.head_size = decoder.head_size
        self.input_ids = need(inputs, decoder.inputs.input_ids, "input")
        self.attention_mask = need(inputs, decoder.inputs.attention_mask, "input")
        self.position_ids = (
            need(inputs, decoder.inputs.position_ids, "input")
            if decoder.inputs.position_ids and decoder.inputs.position_ids in inputs
            else None
        )
        self.logits = need(outputs, decoder.outputs.logits, "output")
        self.past_names = [
            (
                need(inputs, decoder.inputs.past_key_names % i, "input"),
                need(inputs, decoder.inputs.past_value_names % i, "input"),
            )
            for i in range(self.layers)
        ]
        self.present_names = [
            (
                need(outputs, decoder.outputs.present_key_names % i, "output"),
                need(outputs, decoder.outputs.present_value_names % i, "output"),
            )
            for i in range(self.layers)
        ]
        past = inputs[self.past_names[0][0]]
        self.kv_dtype = _dtype(past.type, past.name)
        kv_shape = past.shape
        if isinstance(kv_shape[1], int) and kv_shape[1] != self.kv_heads:
            raise ModelConfigError(
                f"{folder.path}: num_key_value_heads is {self.kv_heads} but {past.name} has {kv_shape[1]} heads"
            )
        if isinstance(kv_shape[3], int) and kv_shape[3] != self.head_size:
            raise ModelConfigError(
                f"{folder.path}: head_size is {self.head_size} but {past.name} has {kv_shape[3]}"
            )
        out = outputs[self.logits]
        self.logits_dtype = _dtype(out.type, out.name)
        vocab = out.shape[-1]
        self.vocab = vocab if isinstance(vocab, int) else folder.config.model.vocab_size
        # Some exports compute logits for the last position only ("pruned" lm_head).
        self._pruned_logits = out.shape[1] == 1

    def prefill_logits_rows(self, prompt_tokens: int) -> int:
        """Rows of logits the prefill pass returns."""
        return 1 if self._pruned_logits else prompt_tokens


def _dtype(ort_type: str, name: str) -> npt.DTypeLike:
    try:
        return _ORT_TYPES[ort_type]
    except KeyError:
        raise ModelConfigError(
            f"{name} has element type {ort_type}, which the engine does not support"
        ) from None
