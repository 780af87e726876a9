#!/usr/bin/env bash
# Builds the CUDA backend's tests and benchmark on a machine with a GPU, runs the tests
# (GPU ops against the CPU, then the shared fixtures end to end on the GPU), then the
# benchmark (Llama-3.1-8B shapes, random weights), and prints a short table last: the
# tests' results and the benchmark's table, with the device. Needs only a C++ compiler, CMake, nvcc and
# the engine core's libraries (abseil, GoogleTest, nlohmann-json, SentencePiece, and a
# pkg-config). A machine without those (the device machine has no package manager and no
# network) uses the tree that scripts/prepare-device-deps.sh writes into .device-deps/,
# carried along with the working tree.
#
#   scripts/device-check.sh [LOG_DIR]     # LOG_DIR: $OUT if set, else ./device-logs
#
# Environment:
#   QSHARD_CUDA_ARCHS       CMAKE_CUDA_ARCHITECTURES (default 90a: H100/H200 only, which
#                           keeps the build short)
#   QSHARD_DEVICE_TESTS     test targets to build and run (default qshard_backend_cuda_tests
#                           qshard_model_cuda_tests)
#   QSHARD_DEVICE_BENCH     arguments for qshard_cuda_bench ("off" skips it; default: the
#                           issue's set, Llama-3.1-8B, bf16 fp8 gptq-4bit awq-4bit)
#   QSHARD_DEVICE_BENCH_TIMEOUT  seconds the benchmark may take (default 240)
#   QSHARD_DEVICE_PROFILE   formats whose layer-0 decoder linears ncu profiles at M=1 and
#                           16 after the benchmark ("off" skips it; default fp8,gptq-4bit;
#                           needs ncu; 60 s per format at most; never fails the run)
#   QSHARD_DEVICE_STEP_PROFILE  formats whose whole batch-1 decode step ncu times kernel
#                           by kernel, summed per kernel name (scripts/ncu-step-summary.py;
#                           "off" skips it; default bf16,fp8,gptq-4bit; needs ncu and
#                           python3; 90 s per format at most; never fails the run)
#   QSHARD_DEVICE_BUILD_DIR build folder (default build-device)
#   QSHARD_DEVICE_ALLOW_SKIP=1  do not fail when tests skip (a dry run without a GPU)
#   QSHARD_DEVICE_FALLBACK  "off" skips the second run of the model tests with the default
#                           fast paths off (QSHARD_CUDA_GRAPHS / _SAMPLING / _TC_ATTENTION /
#                           _PDL=0), which is what a user who turns them off runs
#   QSHARD_DEVICE_OPTIN     "off" skips the third run of the model tests with every opt-in
#                           kernel on (OPTIN_ENV below, plus cuBLASLt autotuning): the
#                           fixtures end to end through what may become the defaults
#
# The fixture test needs the shared models: scripts/prepare-device-fixtures.sh copies the
# ones a run needs into .device-fixtures/ (carry it too); without it those tests skip.
#
# Writes to LOG_DIR (flat, and at most 8 files, so everything comes back from the device
# tool): build.log (nvidia-smi's report first), <target>.log (4: the two test binaries and
# the model tests' fallback and opt-in runs), bench.log, ncu.log, summary.txt (the
# gtest XML reports and the per-kernel profile table go to the build folder). Exit status: 0 only when everything built, every test passed and none
# skipped.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
LOG_DIR="${1:-${OUT:-$ROOT/device-logs}}"
mkdir -p "$LOG_DIR"
LOG_DIR="$(cd "$LOG_DIR" && pwd)"
BUILD_DIR="${QSHARD_DEVICE_BUILD_DIR:-build-device}"
ARCHS="${QSHARD_CUDA_ARCHS:-90a}"
read -r -a TESTS <<<"${QSHARD_DEVICE_TESTS:-qshard_backend_cuda_tests qshard_model_cuda_tests}"
BENCH_ARGS="${QSHARD_DEVICE_BENCH:-}"
BENCH_TIMEOUT="${QSHARD_DEVICE_BENCH_TIMEOUT:-240}"
PROFILE_FORMATS="${QSHARD_DEVICE_PROFILE:-fp8,gptq-4bit}"
STEP_FORMATS="${QSHARD_DEVICE_STEP_PROFILE:-bf16,fp8,gptq-4bit}"
JOBS="$(nproc 2>/dev/null || echo 4)"
BUILD_LOG="$LOG_DIR/build.log"
SUMMARY="$LOG_DIR/summary.txt"
: >"$BUILD_LOG"
# The opt-in kernels (off by default until a GPU run has verified and measured them).
OPTIN_ENV=(QSHARD_CUDA_FUSED_ROPE_KV=1 QSHARD_CUDA_FUSED_COMBINE=1 QSHARD_CUDA_FUSED_ACT_QUANT=1
  QSHARD_CUDA_INT_FACTORED=1 QSHARD_CUDA_INT_GEMV=1 QSHARD_CUDA_FP8_BLAS_SCALED=1
  QSHARD_CUDA_GEMV8_RING=1)

section() { printf '\n==== %s ====\n' "$*"; }
# An executable on PATH (command -v alone also reports a non-executable match).
have() {
  local p
  p="$(command -v "$1" 2>/dev/null)" && [[ -x "$p" ]]
}
now() { date +%s; }

# ---------------------------------------------------------------------------
section "machine"
echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "host:    $(uname -srm), $JOBS cores"
if command -v git >/dev/null && git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
  echo "commit:  $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')" \
    "($(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l) changed paths)"
fi
DEVICE_NAME="(no nvidia-smi)"
if have nvidia-smi; then
  # Read-only queries: never change clocks, power, compute mode or MIG here.
  nvidia-smi >>"$BUILD_LOG" 2>&1 || true
  GPU_CSV="$(nvidia-smi --query-gpu=index,name,compute_cap,memory.total,driver_version \
    --format=csv,noheader 2>/dev/null || true)"
  echo "gpus:    ${GPU_CSV:-none reported}" | sed '2,$s/^/         /'
  DEVICE_NAME="$(printf '%s\n' "$GPU_CSV" | head -1 | cut -d, -f2- | sed 's/^ *//')"
  [[ -n "$DEVICE_NAME" ]] || DEVICE_NAME="(nvidia-smi lists no GPU)"
else
  echo "gpus:    nvidia-smi not found" | tee -a "$BUILD_LOG"
fi

# ---------------------------------------------------------------------------
section "toolchain"
if ! have nvcc && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
have cmake || { echo "device-check: cmake not found" >&2; exit 1; }
echo "cmake:   $(cmake --version | head -1)"
echo "nvcc:    $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo 'not found')"
echo "c++:     $( (${CXX:-c++} --version 2>/dev/null || echo 'not found') | head -1)"
CUDA_LIBS="$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")")"
CUBLASLT="$(find "$CUDA_LIBS/lib64/" "$CUDA_LIBS/targets/" -name 'libcublasLt.so*' \
  2>/dev/null | head -1 || true)"
echo "cublasLt: ${CUBLASLT:-not found under $CUDA_LIBS (so CUDA::cublasLt will not be found)}"
if have ninja; then
  GENERATOR="Ninja"
else
  GENERATOR="Unix Makefiles"
fi
echo "gen:     $GENERATOR, CUDA archs $ARCHS"

CMAKE_ARGS=(
  -S "$ROOT" -B "$BUILD_DIR" -G "$GENERATOR"
  -DCMAKE_BUILD_TYPE=Release
  -DQSHARD_CUDA=ON
  -DQSHARD_BUILD_SERVICE=OFF
  -DQSHARD_BUILD_BENCH=OFF
  -DQSHARD_BUILD_TESTS=ON
  # Another compiler than CI's may warn where CI's does not; that must not cost the run.
  -DQSHARD_WERROR=OFF
  "-DCMAKE_CUDA_ARCHITECTURES=$ARCHS"
)
if [[ -d "$ROOT/.device-fixtures/models" ]]; then
  CMAKE_ARGS+=("-DQSHARD_SHARED_DIR=$ROOT/.device-fixtures")
  echo "fixtures: $ROOT/.device-fixtures ($(ls "$ROOT/.device-fixtures/models" | tr '\n' ' '))"
else
  echo "fixtures: none carried (.device-fixtures); the fixture tests will fail to find models"
fi

# Carried dependencies: preferred over anything the system has, so the device builds
# against the same versions as CI.
DEPS="$ROOT/.device-deps/usr"
if [[ -d "$DEPS" ]]; then
  LIBDIR="$DEPS/lib/x86_64-linux-gnu"
  npkgs="$(grep -c '^Package:' "$ROOT/.device-deps/MANIFEST" 2>/dev/null || echo '?')"
  echo "deps:    $ROOT/.device-deps ($npkgs packages)"
  CMAKE_ARGS+=("-DCMAKE_PREFIX_PATH=$DEPS")
  PKG_CONFIG_PATH="$LIBDIR/pkgconfig:$DEPS/share/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
  export PKG_CONFIG_PATH
  # abseil is shared libraries: the test binaries (and gtest's test discovery, which runs
  # them at build time) must find them, including the ones they only need indirectly.
  export LD_LIBRARY_PATH="$LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  if ! have pkg-config && [[ -x "$DEPS/bin/pkgconf" ]]; then
    CMAKE_ARGS+=("-DPKG_CONFIG_EXECUTABLE=$DEPS/bin/pkgconf")
    echo "pkgconf: carried ($DEPS/bin/pkgconf)"
  fi
else
  echo "deps:    system (no .device-deps; if configure fails, run scripts/prepare-device-deps.sh"
  echo "         on the dev machine and carry .device-deps)"
fi

# ---------------------------------------------------------------------------
# Summary table, also written to summary.txt. Called on every exit path.
declare -A BINARY_RC=()
RUNS=("${TESTS[@]}")  # log names of the test runs, for the summary
BUILD_RESULT="not run"
write_summary() {
  {
    section "device-check summary"
    echo "device: $DEVICE_NAME"
    echo "build:  $BUILD_RESULT"
    if [[ "$BUILD_RESULT" == FAILED* ]]; then
      grep -m 5 -E 'error|Error' "$BUILD_LOG" | cut -c1-240 || true
    fi
    local passed=0 failed=0 skipped=0 t
    printf '%-62s | %s\n' "test" "result"
    printf '%-62s-+-%s\n' "$(printf '%.0s-' {1..62})" "----------------"
    for t in "${RUNS[@]}"; do
      local log="$LOG_DIR/$t.log"
      [[ -f "$log" ]] || continue
      # gtest's per-test end lines: "[       OK ] Suite.Name (12 ms)" (the closing lists
      # repeat names without the time, so requiring "(N ms)" counts each test once).
      while read -r result name ms; do
        # Only what needs attention goes to the table (every test is in <target>.log).
        [[ "$result" == OK ]] || printf '%-62s | %s (%s ms)\n' "$name" "$result" "$ms"
        case "$result" in
          OK) passed=$((passed + 1)) ;;
          FAILED) failed=$((failed + 1)) ;;
          SKIPPED) skipped=$((skipped + 1)) ;;
        esac
      done < <(sed -nE 's/^\[ +(OK|FAILED|SKIPPED) +\] ([^ ]+) \(([0-9]+) ms\).*/\1 \2 \3/p' "$log")
      if [[ -n "${BINARY_RC[$t]:-}" && "${BINARY_RC[$t]}" != 0 ]]; then
        printf '%-62s | exit status %s\n' "$t (binary)" "${BINARY_RC[$t]}"
      fi
    done
    echo "$passed passed, $failed failed, $skipped skipped"
  } | tee "$SUMMARY"
}

fail_build() {
  BUILD_RESULT="FAILED at $1 (last lines of build.log above; first errors below)"
  echo "---- tail of $BUILD_LOG ----"
  tail -n 60 "$BUILD_LOG"
  write_summary
  exit 1
}

# ---------------------------------------------------------------------------
section "configure + build (${TESTS[*]})"
t0=$(now)
if ! cmake "${CMAKE_ARGS[@]}" >>"$BUILD_LOG" 2>&1; then
  fail_build "configure"
fi
grep -E '^-- (qshard|Found)' "$BUILD_LOG" || true
BUILD_TARGETS=("${TESTS[@]}")
[[ "$BENCH_ARGS" == off ]] || BUILD_TARGETS+=(qshard_cuda_bench)
if ! cmake --build "$BUILD_DIR" -j "$JOBS" --target "${BUILD_TARGETS[@]}" >>"$BUILD_LOG" 2>&1; then
  fail_build "build"
fi
t1=$(now)
BUILD_RESULT="ok in $((t1 - t0)) s"
echo "build:   $BUILD_RESULT"

# ---------------------------------------------------------------------------
status=0
# run_tests NAME BINARY [ENV=VALUE...]: one test binary, its log as NAME.log.
run_tests() {
  local name="$1" bin="$2"
  shift 2
  section "run $name${*:+ ($*)}"
  if [[ ! -x "$bin" ]]; then
    echo "device-check: $bin was not built (no test sources?)" | tee "$LOG_DIR/$name.log"
    BINARY_RC[$name]="missing"
    status=1
    return
  fi
  local rc=0
  env "$@" "$bin" --gtest_color=no "--gtest_output=xml:$BUILD_DIR/device-xml/$name.xml" 2>&1 |
    tee "$LOG_DIR/$name.log" || rc=$?
  BINARY_RC[$name]=$rc
  [[ $rc -eq 0 ]] || status=1
  if grep -qE '^\[ +SKIPPED +\] [^ ]+ \(' "$LOG_DIR/$name.log" &&
    [[ "${QSHARD_DEVICE_ALLOW_SKIP:-0}" != 1 ]]; then
    echo "device-check: tests were skipped (is the GPU visible?); counting that as a failure"
    status=1
  fi
}
for t in "${TESTS[@]}"; do
  run_tests "$t" "$BUILD_DIR/bin/$t"
done
# The model tests again with the default fast paths off (CUDA graphs, GPU sampling in the
# engine, tensor-core prefill attention, programmatic dependent launch): the shared
# fixtures end to end through the fallbacks too.
if [[ "${QSHARD_DEVICE_FALLBACK:-on}" != off && " ${TESTS[*]} " == *" qshard_model_cuda_tests "* ]]; then
  RUNS+=(qshard_model_cuda_tests-fallback)
  run_tests qshard_model_cuda_tests-fallback "$BUILD_DIR/bin/qshard_model_cuda_tests" \
    QSHARD_CUDA_GRAPHS=0 QSHARD_CUDA_SAMPLING=0 QSHARD_CUDA_TC_ATTENTION=0 QSHARD_CUDA_PDL=0
fi
if [[ "${QSHARD_DEVICE_OPTIN:-on}" != off && " ${TESTS[*]} " == *" qshard_model_cuda_tests "* ]]; then
  RUNS+=(qshard_model_cuda_tests-optin)
  run_tests qshard_model_cuda_tests-optin "$BUILD_DIR/bin/qshard_model_cuda_tests" \
    "${OPTIN_ENV[@]}" QSHARD_CUDA_BLAS_AUTOTUNE=1
fi

# ---------------------------------------------------------------------------
BENCH_RESULT="skipped (QSHARD_DEVICE_BENCH=off)"
if [[ "$BENCH_ARGS" != off ]]; then
  section "benchmark"
  read -r -a bench_argv <<<"$BENCH_ARGS"
  rc=0
  timeout "$BENCH_TIMEOUT" "$BUILD_DIR/bin/qshard_cuda_bench" "${bench_argv[@]}" \
    >"$LOG_DIR/bench.log" 2>&1 || rc=$?
  cat "$LOG_DIR/bench.log"
  if [[ $rc -eq 0 ]]; then
    BENCH_RESULT="ok"
  else
    # (A plain `$([[ ... ]] && echo)` would fail the assignment, and set -e the script.)
    timed_out=""
    [[ $rc -ne 124 ]] || timed_out=", timed out after ${BENCH_TIMEOUT} s"
    BENCH_RESULT="FAILED (exit status $rc$timed_out)"
    status=1
  fi
fi

# ---------------------------------------------------------------------------
# Kernel profile: what each linear kernel achieves (DRAM throughput, occupancy, registers,
# where warps stall), to direct kernel work. Informational: it never fails the run.
PROFILE_RESULT="skipped"
PROFILE_TABLE="$BUILD_DIR/profile.txt"
rm -f "$PROFILE_TABLE"
NCU="$(command -v ncu 2>/dev/null || true)"
for c in /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu; do
  [[ -n "$NCU" || ! -x "$c" ]] || NCU="$c"
done
if [[ "$BENCH_ARGS" != off && "$PROFILE_FORMATS" != off && -n "$NCU" ]]; then
  section "kernel profile (ncu, layer 0 linears, M=1 and 16)"
  PROFILE_RESULT="ok"
  for f in ${PROFILE_FORMATS//,/ }; do
    rc=0
    timeout 60 "$NCU" --clock-control none --print-kernel-base function \
      --nvtx --nvtx-include "linears/" \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      "$BUILD_DIR/bin/qshard_cuda_bench" --formats "$f" --layers 1 --profile 1,16 \
      >"$BUILD_DIR/ncu-$f.log" 2>&1 || rc=$?
    cat "$BUILD_DIR/ncu-$f.log" >>"$LOG_DIR/ncu.log"
    [[ $rc -eq 0 ]] || PROFILE_RESULT="some profiles failed (see ncu.log)"
    # One line per kernel: name (shortened), grid, duration, DRAM %, occupancy, registers,
    # and the start of ncu's note on the main stall reason.
    awk -v fmt="$f" '
      function flush() {
        if (name != "") printf "%-9s %-30.30s %-18s %10s %6s%% dram %6s%% occ %4s regs  %s\n",
                                fmt, name, grid, dur, dram, occ, regs, substr(stall, 1, 90)
        name = ""; dur = dram = occ = regs = "?"; stall = ""
      }
      /^  [^ ].*\([0-9]+, [0-9]+, [0-9]+\)x\([0-9]+, [0-9]+, [0-9]+\)/ {
        flush(); match($0, /\([0-9]+, [0-9]+, [0-9]+\)x\([0-9]+, [0-9]+, [0-9]+\)/)
        name = substr($0, 3, RSTART - 4); grid = substr($0, RSTART, RLENGTH); gsub(/ /, "", grid)
        next }
      /^    Duration / { dur = $NF " " $(NF-1) }
      /^    DRAM Throughput / { dram = $NF }
      /^    Achieved Occupancy / { occ = $NF }
      /^    Registers Per Thread / { regs = $NF }
      stall == "" && match($0, /spends [0-9.,]+ cycles being stalled [^.]*/) { stall = substr($0, RSTART + 7, RLENGTH - 7) }
      END { flush() }' "$BUILD_DIR/ncu-$f.log" | tee -a "$PROFILE_TABLE" || true
  done
elif [[ -z "$NCU" ]]; then
  PROFILE_RESULT="skipped (no ncu)"
fi

# Where a whole decode step's time goes: one eager batch-1 step (context 256) per format,
# every kernel profiled on its own (durations without launch overlap), summed by kernel.
# 4 of the 32 layers (every layer runs the same kernels; the per-launch column is what
# carries over, while the lm_head's share is 8x too large), to keep the run short. The
# opt-in fused kernels are on here (they are what the next kernel work builds on).
STEP_RESULT="skipped"
STEP_TABLE="$BUILD_DIR/step-profile.txt"
rm -f "$STEP_TABLE"
if [[ "$BENCH_ARGS" != off && "$STEP_FORMATS" != off && -n "$NCU" ]] && have python3; then
  section "decode step profile (ncu, batch 1, context 256, 4 layers, fused kernels on)"
  STEP_RESULT="ok"
  for f in ${STEP_FORMATS//,/ }; do
    rc=0
    env "${OPTIN_ENV[@]}" timeout 90 "$NCU" \
      --clock-control none --cache-control none --nvtx --nvtx-include "step/" \
      --metrics gpu__time_duration.sum --csv --page raw \
      "$BUILD_DIR/bin/qshard_cuda_bench" --formats "$f" --layers 4 --profile-step 1 --context 256 \
      >"$BUILD_DIR/ncu-step-$f.csv" 2>"$BUILD_DIR/ncu-step-$f.err" || rc=$?
    { echo "== step profile $f (exit $rc)"; tail -n 5 "$BUILD_DIR/ncu-step-$f.err"; } \
      >>"$LOG_DIR/ncu.log"
    [[ $rc -eq 0 ]] || STEP_RESULT="some step profiles failed (see ncu.log)"
    python3 "$ROOT/scripts/ncu-step-summary.py" "$f" <"$BUILD_DIR/ncu-step-$f.csv" \
      | tee -a "$STEP_TABLE" || true
    echo | tee -a "$STEP_TABLE"
  done
elif [[ -z "$NCU" ]]; then
  STEP_RESULT="skipped (no ncu)"
elif ! have python3; then
  STEP_RESULT="skipped (no python3)"
fi

write_summary
{
  echo "bench:  $BENCH_RESULT"
  if [[ -f "$LOG_DIR/bench.log" ]]; then
    sed -n '/^## qshard_cuda_bench/,$p' "$LOG_DIR/bench.log"
  fi
  echo "kernel profile: $PROFILE_RESULT"
  [[ -f "$PROFILE_TABLE" ]] && cat "$PROFILE_TABLE"
  echo "decode step profile: $STEP_RESULT"
  [[ -f "$STEP_TABLE" ]] && cat "$STEP_TABLE"
} | tee -a "$SUMMARY"
if [[ $status -eq 0 ]]; then
  echo "RESULT: PASS"
else
  echo "RESULT: FAIL"
fi
exit "$status"
