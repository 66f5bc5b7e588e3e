"""The inference engine: a model folder, one onnxruntime session, and how requests run on it.

One request runs at a time (an edge box has a handful of cores and one model's
worth of memory).  ``generate`` is a one-slot run of the scheduler
(``agent.engine.batch``), the same loop the daemon runs with ``max_batch`` > 1:
tokenize; copy the longest cached prefix of the prompt into the slot
(``prefix_cache``) and prefill the rest in chunks (``prefill``), checking
``should_stop`` between chunks; then decode one token per pass, every buffer
bound once through IOBinding (``rows``), or draft and verify (``speculate``).
The per-token rules and the completion are ``sequence``'s.  The prompt's blocks
go into the prefix cache (and its directory, when the engine has one) once it
is prefilled.  ``token_ranks`` is a forced sequence through the same loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from agent.engine.graph_io import LOGITS_TO_KEEP as LOGITS_TO_KEEP
from agent.engine.graph_io import GraphIO
from agent.engine.kv_cache import KVCache
from agent.engine.kv_variants import graph_for, served_files
from agent.engine.model_folder import ModelFolder
from agent.engine.options import EngineOptions as EngineOptions
from agent.engine.prefill import open_prefix_cache
from agent.engine.prefix_cache import PrefixCache, PrefixCacheStats
from agent.engine.prepacked import prepacked_model
from agent.engine.rows import rows_depend_on_parity
from agent.engine.sampling import SamplingParams
from agent.engine.sequence import Completion as Completion
from agent.engine.sequence import ForcedSampler
from agent.engine.sequence import Sequence as GenSequence
from agent.engine.tokenizer import Tokenizer
from edge_contract.errors import ContextOverflowError, InvalidRequestError, ModelFileError
from edge_contract.protocol import FinishReason as FinishReason
from edge_contract.protocol import Timings as Timings

log = logging.getLogger(__name__)


def _default_threads() -> int:
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except ImportError:  # pragma: no cover - psutil is a runtime dependency
        cores = None
    return max(1, cores or os.cpu_count() or 1)


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
        prepacked_dir: str | Path | None = None,
    ) -> None:
        self.options = options or EngineOptions()
        self.folder = ModelFolder(path)
        # The graph of the KV cache asked for (agent.engine.kv_variants; the daemon resolves "auto").
        self.graph_file = graph_for(self.folder, self.options.kv_cache)
        #: Why this KV cache, when the daemon chose it (agent.engine.kv_choice); None otherwise.
        self.kv_reason: str | None = None
        self.tokenizer = Tokenizer(self.folder)
        self.threads = self.options.threads or _default_threads()
        self.prepacked_dir = Path(prepacked_dir) if prepacked_dir is not None else None
        self.session = self._open_session()
        self._io = GraphIO(self.folder, self.session)
        self.eos_ids = frozenset(self.folder.eos_token_ids)
        limit = self.options.context_tokens
        self.context_length = min(limit, self.folder.context_length) if limit else self.folder.context_length
        # A row of ones long enough for any request; each step binds a prefix of it.
        self._mask = np.ones(self.context_length, dtype=np.int64)
        self._positions = np.arange(self.context_length, dtype=np.int64)
        # ``num_logits_to_keep`` values (``models.logits_rows``): a pass binds ``[n]`` from here.
        self._counts = np.arange(self.context_length + 1, dtype=np.int64)
        opts, io = self.options, self._io
        self.prefix_cache = open_prefix_cache(
            self.folder.path,
            files=served_files(self.folder, self.graph_file),
            directory=None if prefix_cache_dir is None else Path(prefix_cache_dir),
            memory_mb=opts.prefix_cache_mb,
            disk_mb=opts.prefix_cache_disk_mb,
            block_tokens=opts.prefix_block_tokens,
            block_shape=(io.layers, 2, io.kv_heads, opts.prefix_block_tokens, io.head_size),
            dtype=np.dtype(io.kv_dtype),
            threads=self.threads,
        )
        #: Reads the prefix cache's files back into memory at start (None without a disk copy).
        self.prefix_read_back: threading.Thread | None = None
        if self.prefix_cache is not None and prefix_cache_dir is not None:
            self.prefix_read_back = threading.Thread(
                target=_read_back, args=(self.prefix_cache,), name="prefix-cache-read-back", daemon=True
            )
            self.prefix_read_back.start()
        # Where a row's bits depend on its pass's row count (int4 on AVX2-only x86: one row; block 64
        # and up on AVX-512 VNNI: any odd count; see agent.engine.rows), every pass gets an even number
        # of rows: a sequence's bits are then the same alone or batched, cold or after a cache hit.
        self.even_rows = rows_depend_on_parity(self.session, self._io)
        if self.options.speculate and not self._io.verifies:
            log.warning(
                "%s computes the last position's logits only (a pruned lm_head): speculative decoding is "
                "off; re-export it with `python -m models.convert` (its default lm_head computes the rows "
                "a pass asks for) to speculate",
                self.folder.name,
            )
        # The last one-slot run's key/value buffer and the prompt tokens whose positions it holds
        # (``keep_slot``): the next run reuses them in place when its prompt starts the same way.
        self._kept: tuple[KVCache, list[int]] | None = None

    @property
    def graph(self) -> GraphIO:
        """Names, shapes and types of the graph's inputs and outputs."""
        return self._io

    @property
    def kv_cache(self) -> str:
        """The KV cache's element type: float32, float16 or int8 (the graph's)."""
        return np.dtype(self._io.kv_dtype).name

    @property
    def name(self) -> str:
        """The model's name (its folder's)."""
        return self.folder.name

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """Bytes, blocks and hit rate of the prefix cache; None when it is off."""
        return self.prefix_cache.stats() if self.prefix_cache is not None else None

    def _session_options(self) -> ort.SessionOptions:
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
        return so

    def _graph_path(self) -> Path:
        """The graph to open: the model's, or its repacked copy for this CPU (``agent.engine.prepacked``)."""
        source = self.graph_file
        if self.prepacked_dir is None or not (
            self.options.prepack_weights and self.options.prepacked_on_disk
        ):
            return source
        try:
            return prepacked_model(self.prepacked_dir, self.folder.path, source, self._session_options)
        except Exception as exc:  # OSError (disk full, read-only) or onnxruntime's untyped errors
            log.warning(
                "serving %s with its weights repacked in memory: the repacked copy in %s could not be "
                "made (%s); free disk space there or set [engine] prepacked_on_disk = false",
                self.folder.name,
                self.prepacked_dir,
                exc,
            )
            return source

    def _open_session(self) -> ort.InferenceSession:
        graph = self._graph_path()
        if graph != self.graph_file:
            try:
                return self._session(graph, optimized=True)
            except ModelFileError as exc:
                log.warning("%s; removing that copy and serving the model's own graph", exc.message)
                shutil.rmtree(graph.parent, ignore_errors=True)
        return self._session(self.graph_file)

    def _session(self, graph: Path, *, optimized: bool = False) -> ort.InferenceSession:
        so = self._session_options()
        if optimized:  # the repacked copy was saved optimized (with these options): not again
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(str(graph), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises untyped errors for bad files
            raise ModelFileError(graph, f"onnxruntime cannot load it: {exc}") from exc

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
        """Generate after ``prompt_ids``: a one-slot run of the scheduler (``agent.engine.batch``).

        ``on_text`` receives each piece of text as soon as it is final (whole
        characters, never part of a stop string).  ``should_stop`` is polled
        between prefill chunks and between tokens; when it returns true
        generation ends as ``canceled``.  ``on_prefill(done, total)`` reports the
        prompt positions ready after the cache lookup and after each chunk.
        """
        seq = self.sequence(prompt_ids, params, on_text=on_text, should_stop=should_stop)
        return self._run_alone(seq, speculate=self.options.speculate, on_prefill=on_prefill)

    def sequence(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        *,
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> GenSequence:
        """A new sequence for this model (the prompt checked: raises on a bad one)."""
        return GenSequence(
            self.check_prompt(prompt_ids),
            params or SamplingParams(),
            vocab=self._io.vocab,
            context_length=self.context_length,
            eos_ids=self.eos_ids,
            decode=self.tokenizer.decode,
            on_text=on_text,
            should_stop=should_stop,
        )

    def token_ranks(self, prompt_ids: Sequence[int], expected: Sequence[int]) -> list[int]:
        """Feed ``expected`` after ``prompt_ids`` (teacher-forced) and return each token's rank.

        Rank 0 means the model's own greedy choice at that step; rank 3 means
        three tokens scored higher.  This checks a model against tokens
        recorded elsewhere without demanding bit-identical arithmetic.
        """
        forced = [int(i) for i in expected]
        rows = self.teacher_forced_logits(prompt_ids, forced)
        return [int(np.count_nonzero(row > row[token])) for row, token in zip(rows, forced, strict=True)]

    def teacher_forced_logits(
        self, prompt_ids: Sequence[int], tokens: Sequence[int]
    ) -> list[npt.NDArray[Any]]:
        """The logits plain decoding computes before each of ``tokens``, fed whatever the model prefers.

        A sequence whose sampler picks ``tokens`` in turn, run as ``generate`` runs
        one (without speculation): the prompt prefilled, then one decode step per token.
        """
        forced = [int(i) for i in tokens]
        if not forced:
            raise InvalidRequestError("need at least one prompt token and one expected token")
        ids = self.check_prompt(prompt_ids, limit=self.context_length + 1 - len(forced))
        if any(i < 0 or i >= self._io.vocab for i in forced):
            raise InvalidRequestError(f"token ids must lie in [0, {self._io.vocab})")
        seq = self.sequence(ids, SamplingParams(max_tokens=len(forced), ignore_eos=True))
        sampler = seq.sampler = ForcedSampler(forced, self._io.vocab)
        self._run_alone(seq, speculate=False)
        return sampler.rows

    def check_prompt(self, prompt_ids: Sequence[int], *, limit: int | None = None) -> list[int]:
        """``prompt_ids`` as a list of ints; raises when it is empty, has unknown ids or leaves no room.

        ``limit``: the prompt must be shorter than this (default: the context length).
        """
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise InvalidRequestError("the prompt is empty (no tokens)")
        if any(i < 0 or i >= self._io.vocab for i in ids):
            raise InvalidRequestError(f"prompt token ids must lie in [0, {self._io.vocab})")
        limit = self.context_length if limit is None else limit
        if len(ids) >= limit:
            raise ContextOverflowError(len(ids) + self.context_length - limit, self.context_length)
        return ids

    def _run_alone(
        self, seq: GenSequence, *, speculate: bool, on_prefill: Callable[[int, int], None] | None = None
    ) -> Completion:
        """Run ``seq`` alone: a scheduler of one slot sized to what the sequence can use."""
        from agent.engine.batch import Batcher

        batcher = Batcher(self, max_batch=1, slot_tokens=seq.capacity, speculate=speculate)
        job = batcher.submit_sequence(seq, on_text=None, should_stop=seq.canceled, on_prefill=on_prefill)
        batcher.run()
        batcher.close()
        if job.error is not None:
            raise job.error
        assert job.completion is not None  # a slot sized to the sequence never sends it elsewhere
        return job.completion

    def restore_prefix(self, ids: list[int], cache: KVCache, slot: int = 0, *, in_place: int = 0) -> int:
        """Copy the longest usable cached prefix of ``ids`` into ``cache``'s ``slot``; returns its length.

        ``in_place``: positions the slot already holds for ``ids`` (a kept run's); nothing is copied
        unless the prefix cache has a longer prefix, and blocks within those positions never are.
        """
        if self.prefix_cache is None:
            return in_place
        size = self.prefix_cache.block_tokens
        # At least two positions are left to compute: the last one's logits pick the first token,
        # and a one-row pass would take kernels that round differently (see ``prefill``; an odd
        # rest is prefilled from the position before it where ``even_rows``).
        found = self.prefix_cache.match(ids, max_tokens=len(ids) - 2)
        if found.tokens(size) <= in_place:
            return in_place
        for i, block in enumerate(found.blocks):
            if (i + 1) * size > in_place:
                cache.block[:, :, slot, :, i * size : (i + 1) * size, :] = block.kv
        if found.tail is not None:
            start, n = len(found.blocks) * size, found.tail_tokens
            cache.block[:, :, slot, :, start : start + n, :] = found.tail.kv[:, :, :, :n, :]
        return found.tokens(size)

    # -- the kept slot (llama.cpp's server keeps a slot's ``cache_tokens`` alike) -----------------

    def keep_slot(self, cache: KVCache, tokens: list[int]) -> None:
        """Hold ``cache`` (a one-slot run's, done) whose slot 0 holds the positions of ``tokens``.

        A buffer held between runs is within the memory a running one takes (``memory_plan``
        budgets a full context per slot); ``release_kept`` frees it. With the prefix cache off
        (``prefix_cache_mb = 0``) nothing is reused, in place or not: every run is cold.
        """
        self._kept = (cache, tokens) if tokens and self.prefix_cache is not None else None

    def take_kept(self, slots: int, capacity: int) -> tuple[KVCache, list[int]] | None:
        """The kept buffer, if it has ``slots`` slots of ``capacity`` positions at least; it is the caller's now.

        Either way the engine lets go of it (an unfit one is freed before the caller allocates).
        """
        kept, self._kept = self._kept, None
        if kept is None or kept[0].slots != slots or kept[0].capacity < capacity:
            return None
        return kept

    def release_kept(self) -> int:
        """Free the kept buffer (a model swap, memory pressure); returns the bytes it could hold."""
        kept, self._kept = self._kept, None
        return kept[0].nbytes if kept is not None else 0

    def bind_chunk(
        self, binding: ort.IOBinding, ids: npt.NDArray[np.int64], *, past: int, logits: npt.NDArray[Any]
    ) -> None:
        """Bind the new tokens ``ids`` ``[1, n]`` after ``past`` positions of a one-slot cache, and ``logits``.

        ``logits`` ``[1, rows, vocab]``: the last ``rows`` positions' where the export keeps rows
        (``GraphIO.keeps_rows``), else as many rows as the export returns (``prefill_logits_rows``).
        """
        io = self._io
        binding.bind_input(io.input_ids, "cpu", 0, np.int64, ids.shape, ids.ctypes.data)
        binding.bind_output(io.logits, "cpu", 0, logits.dtype, logits.shape, logits.ctypes.data)
        if io.logits_to_keep is not None:
            count = self._counts[logits.shape[1] :]
            binding.bind_input(io.logits_to_keep, "cpu", 0, np.int64, (1,), count.ctypes.data)
        self._bind_mask(binding, past + ids.shape[1], positions_from=past)

    def _bind_mask(self, binding: ort.IOBinding, total: int, *, positions_from: int) -> None:
        io = self._io
        binding.bind_input(io.attention_mask, "cpu", 0, np.int64, (1, total), self._mask.ctypes.data)
        if io.position_ids is not None:
            count = total - positions_from
            ptr = self._positions.ctypes.data + positions_from * self._positions.itemsize
            binding.bind_input(io.position_ids, "cpu", 0, np.int64, (1, count), ptr)


def _read_back(cache: PrefixCache) -> None:
    """``cache.preload()`` on its own thread: logged, and never fatal (the disk copy is an optimisation)."""
    with contextlib.suppress(OSError, AttributeError):  # the lowest CPU priority: jobs come first
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    started = time.monotonic()
    try:
        blocks = cache.preload()
    except Exception:  # the thread ends either way; serving goes on without the read-back
        log.warning(
            "prefix cache: reading the disk copy back failed; it is read as jobs need it", exc_info=True
        )
        return
    if blocks:
        log.info(
            "prefix cache: %d blocks (%d MiB) read back from disk in %.2f s",
            blocks,
            cache.stats().bytes >> 20,
            time.monotonic() - started,
        )
