#!/usr/bin/env bash
# The engine's exactness tests on an AVX2-only x86-64 CPU, emulated: the host's own
# venv python run by qemu-user as a Haswell (AVX2, FMA, no AVX-512), so onnxruntime's
# MLAS dispatches to its AVX2 kernels whatever the host has.
#
#   .ci/x86_avx2_emulated.sh               the default tests below (about 2 minutes here)
#   .ci/x86_avx2_emulated.sh PYTEST_ARGS…  these tests instead (docs/engine.md has the full set)
#
# The tests find the CPU family themselves (tests/support/cpu.py reads CPUID through
# numpy, which qemu answers as a Haswell; /proc/cpuinfo would still list the host's
# flags) and check the guarantees claimed for it.  Nothing forks inside the emulator.
# Anything missing fails the run; nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

die() {
  echo "x86_avx2_emulated: $*" >&2
  exit 1
}

HOST_PYTHON=${HOST_PYTHON:-.venv/bin/python}
TESTS=(
  # The engine measures one-row vs two-row rounding as it was measured for AVX2 (int4: differs).
  tests/integration/test_kernel_rows.py
  # Batched output is solo output, bit for bit (the filler row makes it so on AVX2).
  tests/integration/test_batch_parity.py
  # Even-row passes: logits bit for bit across chunk sizes, prefix hits, batching and drafts
  # (llama-int4-b128, and llama-int4 with the even passes forced; about 100 s emulated).
  tests/integration/test_even_rows.py
  # The row-keeping export (models.convert's default) gives the full export's logits, bit for bit,
  # chunked, resumed, batched and speculating (KEPT_ROWS_EXACT; about 60 s emulated).
  tests/integration/test_logits_rows.py
  # A prefix-cache hit gives the cold run's tokens (one int4 fixture: each costs ~25 s emulated).
  "tests/integration/test_prefix_cache.py::test_a_hit_gives_the_cold_runs_tokens[llama-int4]"
  # The same for the last run's buffer reused in place.
  "tests/integration/test_prefix_cache.py::test_the_last_runs_buffer_reused_in_place_gives_the_cold_runs_tokens[llama-int4]"
  # With an int8 KV cache, tokens do not depend on the chunk size or a prefix hit (KV_INT8_EXACT).
  "tests/integration/test_kv_quant.py::test_tokens_do_not_depend_on_the_chunk_size_or_a_prefix_hit"
)
# Haswell without what qemu's TCG cannot emulate (TSX, PCID, x2APIC, TSC deadline, INVPCID:
# none matters to user code), or it warns on every start.
export QEMU_CPU=Haswell-noTSX,-pcid,-x2apic,-tsc-deadline,-invpcid

QEMU=$(command -v qemu-x86_64-static) || die "qemu-x86_64-static is missing: apt-get install qemu-user-static"
[ "$(uname -m)" = x86_64 ] || die "this emulates an x86-64 CPU on an x86-64 host"
[ -x "$HOST_PYTHON" ] || die "$HOST_PYTHON is missing: run make setup first"

family=$("$QEMU" "$HOST_PYTHON" -c "from tests.support import cpu; print(cpu.family())")
[ "$family" = "x86-64 AVX2-only" ] || die "the emulated CPU reads as '$family', not x86-64 AVX2-only"

if [ $# -gt 0 ]; then
  TESTS=("$@")
fi
echo "x86_avx2_emulated: ${TESTS[*]} on an emulated ${QEMU_CPU%%,*} ($family)"
exec "$QEMU" "$HOST_PYTHON" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
