#!/usr/bin/env bash
# All tests on a fresh Debian 12 machine: install what is missing, build, then run
#   1. the C++ kernel and server tests under AddressSanitizer + UndefinedBehaviorSanitizer
#      (build-asan/, the CMake preset "asan"), and
#   2. the whole suite (C++ and Python) in the normal build, whose ctest summary ends the output.
# GPU tests carry the ctest label "gpu" and skip where there is no device.
set -uo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh || exit 1
jobs=$(nproc)

echo "== sanitizers: build-asan (address, undefined) =="
cmake --preset asan >/dev/null && ninja -C build-asan -j "$jobs" || exit 1
# Abort on the first report; OpenBLAS's threads are not ours to leak-check.
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  OPENBLAS_NUM_THREADS=1 ctest --test-dir build-asan -j "$jobs" --output-on-failure
asan_rc=$?

echo "== build/ (RelWithDebInfo): all tests =="
bash deploy/build.sh || exit 1
OPENBLAS_NUM_THREADS=1 ctest --test-dir build -j "$jobs" --output-on-failure
main_rc=$?
if [ "$asan_rc" -ne 0 ]; then
  echo "sanitizer run failed (exit $asan_rc): see the output above"
  exit "$asan_rc"
fi
exit "$main_rc"
