#!/usr/bin/env bash
# Prove the agent on 64-bit Arm: tests run by an aarch64 CPython 3.11 under
# qemu-user emulation of the Raspberry Pi 5's CPU (Cortex-A76).
#
#   .ci/arm64_emulated.sh               build the environment (cached), then run the tests below
#   .ci/arm64_emulated.sh --build-only  only build it, and print the command that runs its python
#   .ci/arm64_emulated.sh PYTEST_ARGS…  run these tests emulated instead of the default subset
#
# The environment, under .cache/arm64/KEY/ (git-ignored; KEY hashes how it is
# built, deploy/check_wheels.py and the dependency lists of pyproject.toml):
#   sysroot/  Debian 12's arm64 python3.11 and the libraries it needs, downloaded
#             with a private apt state (the host's apt sources, architecture arm64;
#             the host's dpkg never learns of arm64) and unpacked with dpkg -x,
#             plus a proc/cpuinfo describing a Cortex-A76: qemu opens files under
#             its -L prefix first, and onnxruntime's CPU detection crashes without
#             an Arm cpuinfo; with one that lists asimddp its int8 dot-product
#             kernels run.
#   site/     the runtime dependencies, installed by `pip install --target` from
#             manylinux aarch64 wheels alone (deploy/check_wheels.py --target),
#             plus pytest, onnxruntime-genai (the parity reference) and onnx (the
#             int8 KV cache's calibration rewrites the graph) from the test extra.
#
# The default tests: every runtime dependency is installed and every agent module
# imports; the engine's parity tests against onnxruntime-genai (both aarch64) on
# every fixture family and precision; the int8 KV cache's accuracy bound and
# exactness; `edge-agent generate --json` and `edge-agent bench --json`; and a
# daemon smoke test: `edge-agent run`,
# emulated, answering jobs through a mosquitto on the host.  No binfmt_misc is
# needed: the CLI and daemon tests run on the host's pytest and start the
# emulated programs with EDGE_AGENT_TEST_PYTHON (the emulator command).
# Anything missing fails the run; nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

die() {
  echo "arm64_emulated: $*" >&2
  exit 1
}

HOST_PYTHON=${HOST_PYTHON:-.venv/bin/python}
# What Debian's arm64 python3.11 needs besides its own dependencies: libstdc++ for
# the C++ extension modules (onnxruntime, onnxruntime-genai, tokenizers).
APT_PACKAGES=(python3.11 libstdc++6)
TEST_EXTRAS=(pytest hypothesis onnxruntime-genai onnx)
# Run by the emulated interpreter itself: everything in one process, no subprocess.
EMULATED_TESTS=(
  tests/unit/test_dependencies.py
  tests/integration/test_parity.py
  # Batched and speculative output rest on how the kernels round (rows computed alone;
  # multi-row passes bit-identical whatever their boundaries): check that on Arm's kernels too.
  tests/integration/test_batch_parity.py
  tests/integration/test_speculative_parity.py
  # Whether a one-row pass rounds like a row of a batch (the engine's two_row_decode) as measured here.
  tests/integration/test_kernel_rows.py
  # The prefix cache rests on the same rounding rule: a hit must give the cold run's tokens.
  tests/integration/test_prefix_cache.py::test_a_hit_gives_the_cold_runs_tokens
  tests/integration/test_prefix_cache.py::test_chunk_size_does_not_change_tokens
  # The weights repacked for Arm's kernels, saved and mapped, give the in-memory session's tokens.
  tests/integration/test_prepacked.py::test_the_mapped_copy_gives_the_same_tokens
  # The int8 KV cache: its accuracy bound, and its tokens independent of chunks and prefix hits.
  tests/integration/test_kv_quant.py
  # The row-keeping lm_head gives the full export's logits for the rows a pass asks for.
  tests/integration/test_logits_rows.py
)
# Run by the host's pytest, starting the emulated CLI and daemon through
# EDGE_AGENT_TEST_PYTHON: qemu-user can deadlock when an emulated process with
# several threads forks (seen here: a test hung with its forked child stuck
# before exec), so no test forks inside the emulator.
DRIVEN_TESTS=(
  tests/integration/test_cli.py::test_generate_json_contract
  tests/integration/test_cli.py::test_bench_json
  tests/daemon/test_jobs.py::test_mosquitto_pub_v5_job_answers_on_response_topic_with_correlation
  tests/daemon/test_jobs.py::test_streamed_chunks_arrive_in_order_before_the_result
  tests/daemon/test_jobs.py::test_sigterm_exits_cleanly_and_announces_offline_with_its_group
)
export QEMU_CPU=cortex-a76

QEMU=$(command -v qemu-aarch64-static) || die "qemu-aarch64-static is missing: apt-get install qemu-user-static"
command -v apt-get >/dev/null || die "apt-get is missing (this script needs Debian's apt)"
command -v dpkg >/dev/null || die "dpkg is missing"
[ -x "$HOST_PYTHON" ] || die "$HOST_PYTHON is missing: run make setup first"

# What the environment is built from: the build functions (not the tests chosen), the
# packages, deploy/check_wheels.py and pyproject's dependency lists.
cache_key() {
  {
    declare -f build build_sysroot write_cpuinfo
    echo "${APT_PACKAGES[*]} ${TEST_EXTRAS[*]}"
    cat deploy/check_wheels.py
    "$HOST_PYTHON" -c 'import json, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print(json.dumps([p["dependencies"], p["optional-dependencies"]["test"]]))'
  } | sha256sum | cut -c1-16
}

# One "processor" block per host CPU, each a Cortex-A76 (Arm implementer 0x41,
# part 0xd0b) with the features of a Raspberry Pi 5 (asimddp: the int8 dot product).
write_cpuinfo() {
  local out=$1 cpu
  mkdir -p "$(dirname "$out")"
  : >"$out"
  for ((cpu = 0; cpu < $(nproc); cpu++)); do
    printf '%s\n' \
      "processor	: $cpu" \
      "BogoMIPS	: 108.00" \
      "Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" \
      "CPU implementer	: 0x41" \
      "CPU architecture: 8" \
      "CPU variant	: 0x4" \
      "CPU part	: 0xd0b" \
      "CPU revision	: 1" \
      "" >>"$out"
  done
}

build_sysroot() {
  local root=$1 apt_dir=$2 deb
  mkdir -p "$apt_dir/state/lists/partial" "$apt_dir/cache/archives/partial" "$root"
  : >"$apt_dir/status"
  local apt=(
    apt-get -q -o APT::Architecture=arm64 -o APT::Architectures::=arm64
    -o "Dir::State=$apt_dir/state" -o "Dir::State::status=$apt_dir/status"
    -o "Dir::Cache=$apt_dir/cache" -o APT::Sandbox::User=root
  )
  "${apt[@]}" update >/dev/null
  "${apt[@]}" install --yes --download-only --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null
  for deb in "$apt_dir"/cache/archives/*.deb; do
    dpkg -x "$deb" "$root"
  done
  [ -x "$root/usr/bin/python3.11" ] || die "the sysroot has no usr/bin/python3.11"
  write_cpuinfo "$root/proc/cpuinfo"
}

build() {
  local dest=$1 tmp="$1.tmp"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  echo "arm64_emulated: building $dest"
  build_sysroot "$tmp/sysroot" "$tmp/apt"
  rm -rf "$tmp/apt"
  local also=() name
  for name in "${TEST_EXTRAS[@]}"; do also+=(--with "$name"); done
  "$HOST_PYTHON" deploy/check_wheels.py --target "$tmp/site" "${also[@]}"
  rm -rf "$dest"
  mv "$tmp" "$dest"
}

key=$(cache_key)
env_dir="$PWD/.cache/arm64/$key"
if [ -d "$env_dir/sysroot" ] && [ -d "$env_dir/site" ]; then
  echo "arm64_emulated: cached environment $env_dir"
else
  # Only the current environment is kept.
  for old in .cache/arm64/*; do
    [ -e "$old" ] && [ "$old" != ".cache/arm64/$key" ] && rm -rf "$old"
  done
  build "$env_dir"
fi

sysroot="$env_dir/sysroot"
site_path="$env_dir/site:$PWD:$PWD/deploy"
python=(env "QEMU_CPU=$QEMU_CPU" "PYTHONPATH=$site_path" "$QEMU" -L "$sysroot" "$sysroot/usr/bin/python3.11")
# The tests start the daemon and the CLI with this command (tests/support/agent.py); it carries
# its own PYTHONPATH, so the host's pytest (whose PYTHONPATH must not point at aarch64
# modules) can use it too.
EDGE_AGENT_TEST_PYTHON=$(printf '%q ' "${python[@]}")
export EDGE_AGENT_TEST_PYTHON

machine=$("${python[@]}" -c 'import platform; print(platform.machine())')
[ "$machine" = aarch64 ] || die "the emulated python reports machine $machine, not aarch64"
echo "arm64_emulated: $machine CPython $("${python[@]}" -c 'import platform; print(platform.python_version())'), QEMU_CPU=$QEMU_CPU"

if [ "${1:-}" = --build-only ]; then
  echo "$EDGE_AGENT_TEST_PYTHON"
  exit 0
fi
if [ $# -gt 0 ]; then
  exec "${python[@]}" -m pytest -q -p no:cacheprovider "$@"
fi
"${python[@]}" -m pytest -q -p no:cacheprovider "${EMULATED_TESTS[@]}"
"$HOST_PYTHON" -m pytest -q -p no:cacheprovider "${DRIVEN_TESTS[@]}"
