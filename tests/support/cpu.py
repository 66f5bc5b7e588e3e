"""Which CPU family the tests run on, as the kernels see it, and the exactness guarantees per family.

The family is read from what the process may execute (CPUID on x86-64, through
numpy's run-time dispatch table), not from ``/proc/cpuinfo``: under
``qemu-x86_64 -cpu Haswell`` (``.ci/x86_avx2_emulated.sh``) and on some VMs
``/proc/cpuinfo`` lists the host's AVX-512 flags while the process cannot run
them, and onnxruntime's MLAS dispatches on CPUID as numpy does.

The guarantees (``docs/engine.md`` says why each holds):

* ``BATCH_EXACT`` -- a sequence's tokens are the same alone and in a batch, bit for bit;
* ``PREFIX_EXACT`` -- a prefix-cache hit gives the cold run's tokens, bit for bit;
* ``DRAFT_EXACT`` -- a speculating engine's tokens do not depend on what it drafted, bit for
  bit; where it does not hold (aarch64) the near-tie bound is what is checked;
* ``BATCH_DRAFT_EXACT`` -- a speculating sequence's tokens are the same alone and in a batch of
  speculating sequences (verify passes of its own, resting rows batched), bit for bit;
* ``KV_INT8_EXACT`` -- with an int8 KV cache (``models.kv_quant``) a sequence's tokens do not
  depend on the prefill chunk size or on a prefix-cache hit, bit for bit (x86-64: AVX-512 VNNI,
  and AVX2 emulated; aarch64 emulated, Cortex-A76);
* ``KEPT_ROWS_EXACT`` -- the row-keeping export (``models.logits_rows``) gives the engine the
  full-logits export's logits for the rows it asks for, bit for bit (so every guarantee above
  carries over to it);
* ``NEAR_TIE`` -- a speculating engine's token is plain decoding's arg-max or within
  ``NEAR_TIE`` logits of it (every family).
"""

from __future__ import annotations

import platform

X86_AVX512 = "x86-64 AVX-512 VNNI"
X86_AVX2 = "x86-64 AVX2-only"
AARCH64 = "aarch64"
OTHER = "other"


def _x86_features() -> dict[str, bool]:
    try:
        from numpy._core._multiarray_umath import __cpu_features__  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__
    return dict(__cpu_features__)


def family() -> str:
    """The CPU family the kernels run on: ``X86_AVX512``, ``X86_AVX2``, ``AARCH64`` or ``OTHER``."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return AARCH64
    if machine in ("x86_64", "amd64"):
        features = _x86_features()
        if features.get("AVX512F"):
            # MLAS has separate AVX-512 core and AVX-512 VNNI kernels: only VNNI was measured.
            return X86_AVX512 if features.get("AVX512BW") and features.get("AVX512VNNI") else OTHER
        if features.get("AVX2") and features.get("FMA3"):
            return X86_AVX2
    return OTHER


BATCH_EXACT = frozenset({X86_AVX512, X86_AVX2, AARCH64})
PREFIX_EXACT = frozenset({X86_AVX512, X86_AVX2, AARCH64})
DRAFT_EXACT = frozenset({X86_AVX512, X86_AVX2})
# The lm_head of the rows kept is the full export's where a pass asks for an even count of rows
# wherever rows pair (Engine.even_rows): AVX-512 VNNI natively, AVX2 and aarch64 under emulation.
KEPT_ROWS_EXACT = frozenset({X86_AVX512, X86_AVX2, AARCH64})
# A verify pass is the one run alone; resting rows are batched one-token rows (BATCH_EXACT).
BATCH_DRAFT_EXACT = frozenset({X86_AVX512, X86_AVX2, AARCH64})
# onnxruntime's CPU GroupQueryAttention reads every cache row through the int8 scales, the
# current chunk's too, and stores the same int8 bytes on x86-64 and aarch64
# (bench/gqa_int8_arm_repro.py). Checked on AVX-512 VNNI, emulated AVX2 and emulated aarch64
# (make test-arm64, onnxruntime 1.32). The accuracy bound (KV_INT8_GAP in
# tests/integration/test_kv_quant.py) is checked on every family.
KV_INT8_EXACT = frozenset({X86_AVX512, X86_AVX2, AARCH64})
# Where every row of a pass rounds alike whatever the pass's row count (one row, an odd count), per
# export of the fixtures (int4/int8 MatMulNBits in blocks of 32, int8 activations; int4-b128: blocks
# of 128): the engine measures it when it opens (Engine.even_rows is its negation); this is what was
# measured, so a new onnxruntime that changes it fails tests/integration/test_kernel_rows.py and the
# docs get updated.
ONE_ROW_MATCHES = {
    (X86_AVX512, "int4"): True,
    (X86_AVX512, "int8"): True,
    (X86_AVX2, "int4"): False,
    (X86_AVX2, "int8"): True,
    (AARCH64, "int4"): True,  # emulated Cortex-A76 (NEON dot product), onnxruntime 1.32
    (AARCH64, "int8"): True,
    (X86_AVX512, "int4-b128"): False,  # rows computed in pairs: an odd pass's last row rounds otherwise
    (X86_AVX2, "int4-b128"): False,  # emulated Haswell: one row differs, as at block 32
    (AARCH64, "int4-b128"): True,  # emulated Cortex-A76: every row agrees, as at block 32
}
