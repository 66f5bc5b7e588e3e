"""llama.cpp's parallel decoding, driven as its server drives it, for ``batch_bench``.

What ``llama-server --parallel c`` does with ``c`` requests that arrive together:
one context with ``n_seq_max = c`` and a KV cache split into ``c`` sequences
(``kv_unified`` off, the server's default when ``--parallel`` is given), every
prompt's tokens in one ``llama_decode`` (each sequence's last position asks for
logits), then one ``llama_decode`` per step over a ``llama_batch`` holding one
token per sequence with distinct ``seq_id``s.  Greedy (argmax over the logits),
eos ignored.  Everything else is llama.cpp's context default (flash attention
``auto``, ``n_ubatch`` 512), with the thread counts of our engine.

The low-level API of llama-cpp-python is used: its ``Llama`` class keeps one
sequence per context.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path
from typing import Any

import numpy as np


def unavailable() -> str | None:
    """Why llama.cpp cannot run here (None when ``llama_cpp`` imports)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:  # an ImportError, or an OSError from a library built for another CPU
        return f"llama_cpp is not importable ({type(exc).__name__}: {exc})"
    return None


def version() -> str | None:
    """llama-cpp-python's version, None when absent."""
    try:
        import llama_cpp
    except Exception:
        return None
    return str(llama_cpp.__version__)


class LlamaParallel:
    """One GGUF model; one context per concurrency, made on first use (a server started with ``--parallel c``)."""

    def __init__(self, gguf: Path, threads: int, slot_tokens: int, max_batch_tokens: int) -> None:
        import llama_cpp as lc

        self._lc = lc
        # Keep the callback referenced: llama.cpp calls it for every log line.
        self._quiet = lc.llama_log_callback(lambda level, text, data: None)
        lc.llama_log_set(self._quiet, ctypes.c_void_p(0))
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(str(gguf).encode(), lc.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.threads, self.slot_tokens = threads, slot_tokens
        self._contexts: dict[int, Any] = {}
        self._batch = lc.llama_batch_init(max_batch_tokens, 0, 1)
        self._capacity = max_batch_tokens

    def _context(self, seqs: int, prompt_tokens: int) -> Any:
        lc = self._lc
        if seqs not in self._contexts:
            params = lc.llama_context_default_params()
            params.n_seq_max = seqs
            params.n_ctx = seqs * (-(-self.slot_tokens // 256) * 256)  # llama.cpp pads to 256 anyway
            params.n_batch = max(params.n_batch, prompt_tokens)
            params.kv_unified = False
            params.n_threads = params.n_threads_batch = self.threads
            ctx = lc.llama_init_from_model(self.model, params)
            if not ctx:
                raise RuntimeError(f"llama.cpp could not make a context for {seqs} sequences")
            self._contexts[seqs] = ctx
        return self._contexts[seqs]

    def _put(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b = self._batch
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, int(logits)
        b.seq_id[i][0] = seq

    def _decode(self, ctx: Any, n_tokens: int) -> None:
        self._batch.n_tokens = n_tokens
        status = self._lc.llama_decode(ctx, self._batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        self._lc.llama_synchronize(ctx)

    def _argmax(self, ctx: Any, i: int) -> int:
        logits = np.ctypeslib.as_array(self._lc.llama_get_logits_ith(ctx, i), shape=(self.vocab,))
        return int(np.argmax(logits))

    def run(self, prompts: list[list[int]], new: int) -> dict[str, Any]:
        """Decode ``new`` tokens for every prompt together; the timings, as ``batch_bench`` reports ours."""
        lc, seqs = self._lc, len(prompts)
        total = sum(len(p) for p in prompts)
        if total > self._capacity or seqs > self._capacity:
            raise ValueError(f"{total} prompt tokens exceed the batch of {self._capacity}")
        ctx = self._context(seqs, total)
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        n, last = 0, []
        for seq, ids in enumerate(prompts):
            for pos, token in enumerate(ids):
                self._put(n, token, pos, seq, pos == len(ids) - 1)
                n += 1
            last.append(n - 1)
        started = time.perf_counter()
        self._decode(ctx, n)
        tokens = [self._argmax(ctx, i) for i in last]
        prefilled = time.perf_counter()
        decode_s = 0.0
        for step in range(1, new):
            for seq, ids in enumerate(prompts):
                self._put(seq, tokens[seq], len(ids) + step - 1, seq, True)
            t0 = time.perf_counter()
            self._decode(ctx, seqs)
            decode_s += time.perf_counter() - t0
            tokens = [self._argmax(ctx, seq) for seq in range(seqs)]
        finished = time.perf_counter()
        return {
            # as Batcher.rows / Batcher.decode_seconds: tokens of one-token passes / time in those passes
            "aggregate_decode_tok_s": seqs * (new - 1) / decode_s,
            # as a job's Timings: (new - 1) / (last token - first token); every job sees the same window
            "per_job_decode_tok_s": (new - 1) / (finished - prefilled),
            "prefill_tok_s": total / (prefilled - started),
        }

    def close(self) -> None:
        """Free the contexts, the batch and the model."""
        lc = self._lc
        for ctx in self._contexts.values():
            lc.llama_free(ctx)
        self._contexts.clear()
        lc.llama_batch_free(self._batch)
        lc.llama_model_free(self.model)
