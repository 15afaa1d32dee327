#!/usr/bin/env bash
# All tests on a fresh Debian 12 machine: install what is missing, build, then
#   1. compile every C++ library, mapld and the C++ tests with clang 14's thread-safety analysis
#      and ThreadSanitizer (build-tsan/, the CMake preset "tsan"): a lock annotation the code
#      breaks fails the build; then run the C++ tests under TSan, with Abseil built with TSan
#      (deploy/tsan-abseil.sh) first on the library path and the library-only suppressions of
#      tests/tsan_suppressions.txt,
#   2. run the C++ kernel and server tests under AddressSanitizer + UndefinedBehaviorSanitizer
#      (build-asan/, the CMake preset "asan": clang 14), with a short run of each libFuzzer target
#      of tests/fuzz from its seed corpus (ctest label fuzz, MAPL_FUZZ_SMOKE_SECONDS each), and
#   3. run the whole suite (C++ and Python) in the normal build, whose ctest summary line
#      ("N% tests passed, ...") is the last line of the output.
# GPU tests carry the ctest label "gpu" and skip where there is no device; each ctest run lists the
# tests that did not run (skipped) just above its summary line.
# CI=true in the environment (.ci/run sets it) reaches every test unchanged: the Python tests then
# fail instead of skipping on a missing dependency. Without it, the tests skip as on a laptop.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
bash deploy/install-deps.sh || exit 1
jobs=$(nproc)
if [ "${CI:-}" = true ]; then
  echo "CI=true: a test whose dependency is missing fails instead of skipping"
fi

# run_ctest DIR [NOTE]: runs ctest in DIR and returns its exit status. ctest prints its summary
# line first and then the label times, the tests that did not run and the failed ones; this holds
# everything from the summary line on and prints it with the summary line last (NOTE, if given,
# just before it), so that the verdict is what a reader, or CI, sees at the end.
run_ctest() {
  local dir=$1 note=${2:-}
  ctest --test-dir "$dir" -j "$jobs" --output-on-failure 2>&1 | awk -v note="$note" '
    /^The following tests did not run:/ { skipped = 1 }
    !held && /^[0-9]+% tests passed, / { held = 1; summary = $0; next }
    held && n == 0 && $0 == "" { next }
    held { tail[n++] = $0; next }
    { print; fflush() }
    END {
      for (i = 0; i < n; i++) print tail[i]
      if (held && !skipped) print "\nskipped tests: none"
      if (note != "") print "\n" note
      if (held) print "\n" summary
    }'
  return "${PIPESTATUS[0]}"
}

echo "== threads: build-tsan (clang 14: -Werror=thread-safety for Abseil's lock annotations, and ThreadSanitizer) =="
start=$SECONDS
absl_tsan=$(bash deploy/tsan-abseil.sh) || exit 1
# -k 0: one run lists every file that breaks an annotation, not just the first.
if ! { cmake --preset tsan >/dev/null && ninja -C build-tsan -j "$jobs" -k 0; }; then
  echo "thread-safety build failed: a [-Wthread-safety-*] error above is code that touches a"
  echo "ABSL_GUARDED_BY member or calls an ABSL_EXCLUSIVE_LOCKS_REQUIRED function without the"
  echo "mutex it names (or an annotation that is wrong): take the lock or correct the annotation"
  exit 1
fi
echo "build-tsan: no thread-safety warnings ($((SECONDS - start)) s)"
# A test fails on its first report; second_deadlock_stack shows both stacks of a lock inversion.
LD_LIBRARY_PATH="$absl_tsan${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$PWD/tests/tsan_suppressions.txt" \
  OPENBLAS_NUM_THREADS=1 run_ctest build-tsan
tsan_rc=$?

echo "== sanitizers: build-asan (address, undefined; and the fuzz targets' smoke runs) =="
cmake --preset asan >/dev/null && ninja -C build-asan -j "$jobs" || exit 1
# Abort on the first report; OpenBLAS's threads are not ours to leak-check.
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  LSAN_OPTIONS=suppressions=$PWD/tests/lsan_suppressions.txt \
  OPENBLAS_NUM_THREADS=1 run_ctest build-asan
asan_rc=$?

echo "== build/ (RelWithDebInfo): all tests =="
bash deploy/build.sh || exit 1
# In CI the CUDA backend must be compiled wherever nvcc is: otherwise a broken .cu file, or a
# build that silently dropped the backend, would pass unnoticed.
nvcc_path=$(command -v nvcc || { [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda/bin/nvcc; })
if [ "${CI:-}" = true ] && [ -n "$nvcc_path" ] && ! grep -qx 'MAPL_WITH_CUDA:BOOL=ON' build/CMakeCache.txt; then
  echo "CI=true: nvcc is installed ($nvcc_path) but build/ has MAPL_WITH_CUDA OFF, so the CUDA"
  echo "backend was not compiled; configure build/ with -DMAPL_WITH_CUDA=ON (or remove a stale build/)"
  exit 1
fi
note=""
if [ "$tsan_rc" -ne 0 ]; then
  note="ThreadSanitizer run failed (exit $tsan_rc): see its failures above, under '== threads'"
fi
if [ "$asan_rc" -ne 0 ]; then
  note="${note:+$note; }sanitizer run failed (exit $asan_rc): see its failures above, under '== sanitizers'"
fi
OPENBLAS_NUM_THREADS=1 run_ctest build "$note"
main_rc=$?
if [ "$tsan_rc" -ne 0 ]; then exit "$tsan_rc"; fi
if [ "$asan_rc" -ne 0 ]; then exit "$asan_rc"; fi
exit "$main_rc"
