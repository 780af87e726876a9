#!/usr/bin/env bash
# The whole test suite: install, build (Release), run every test with ctest, then build
# the unit tests with AddressSanitizer + UndefinedBehaviorSanitizer and run them too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
JOBS=${JOBS:-$(nproc)}
export CCACHE_DIR=${CCACHE_DIR:-$HOME/.ccache}
# Paths under the checkout are hashed relative to it, so another clone hits the cache.
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$PWD}

echo "=== build (Release) ==="
bash scripts/build.sh
echo "=== tests (Release) ==="
(cd build && ctest --output-on-failure -j "$JOBS" --timeout 900)

echo "=== build (ASan + UBSan) ==="
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DQSHARD_SANITIZE=ON \
  -DQSHARD_CUDA=OFF -DQSHARD_BUILD_SERVICE=OFF -DQSHARD_BUILD_BENCH=OFF >/dev/null
cmake --build build-asan -j "$JOBS"
echo "=== tests (ASan + UBSan) ==="
# Slow end-to-end checks (full perplexity runs) are covered by the Release run above.
(cd build-asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --output-on-failure -j "$JOBS" --timeout 900 -LE slow)
echo "=== all tests passed ==="
