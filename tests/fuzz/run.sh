#!/usr/bin/env bash
# Runs every fuzz target for a while from its seed corpus and prints, per target, the
# executions, the coverage (libFuzzer's final "cov:" count of covered edges, and "ft:" features)
# and whether it found anything.
#   tests/fuzz/run.sh [seconds_per_target (default 600)] [build_dir (default build-asan)]
# Builds the targets first (cmake --preset asan when build_dir is build-asan and not configured
# yet). What a run finds is written to build_dir/tests/fuzz/run/<target>/ (crash-*, leak-*,
# oom-*, timeout-*: replay one with `build_dir/tests/fuzz/<target> FILE`); new inputs go to
# build_dir/tests/fuzz/run/<target>/corpus, never into the checked-in corpus. Extra libFuzzer
# flags can be given in FUZZ_FLAGS (e.g. FUZZ_FLAGS=-jobs=2). Exits 1 if any target found
# something.
set -uo pipefail
seconds=${1:-600}
build=${2:-build-asan}
cd "$(dirname "$0")/../.." || exit 1
targets=(frame_fuzzer peer_sequence_fuzzer dictionary_fuzzer config_fuzzer tensor_ref_fuzzer state_fuzzer)
declare -A max_len=([frame_fuzzer]=16384 [peer_sequence_fuzzer]=131072
                    [dictionary_fuzzer]=65536 [config_fuzzer]=4096 [tensor_ref_fuzzer]=1024
                    [state_fuzzer]=262144)

if [ ! -f "$build/build.ninja" ]; then
  if [ "$build" != build-asan ]; then
    echo "run.sh: $build is not a configured build (configure it with -DMAPL_BUILD_FUZZERS=ON)" >&2
    exit 2
  fi
  cmake --preset asan >/dev/null || exit 2
fi
nice -n 10 ninja -C "$build" "${targets[@]}" >/dev/null || {
  echo "run.sh: building the fuzz targets in $build failed (configured with MAPL_BUILD_FUZZERS=ON?)" >&2
  exit 2
}

found_any=0
summary=()
for t in "${targets[@]}"; do
  work="$build/tests/fuzz/run/$t"
  mkdir -p "$work/corpus"
  log="$work/log.txt"
  echo "== $t: ${seconds} s, -max_len=${max_len[$t]} (log: $log)"
  start=$SECONDS
  touch "$work/.start"  # what this run finds is newer (earlier findings stay, unreported)
  # shellcheck disable=SC2086
  OPENBLAS_NUM_THREADS=1 ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1} \
    "$build/tests/fuzz/$t" -max_total_time="$seconds" -max_len="${max_len[$t]}" -timeout=30 \
    -rss_limit_mb=2048 -malloc_limit_mb=512 -print_final_stats=1 -artifact_prefix="$work/" \
    ${FUZZ_FLAGS:-} "$work/corpus" "tests/fuzz/corpus/$t" >"$log" 2>&1
  rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1)
  artifacts=$(find "$work" -maxdepth 1 -newer "$work/.start" -regextype egrep \
              -regex '.*/(crash|leak|oom|timeout|slow-unit)-.*' -printf '%f ')
  if [ "$rc" -ne 0 ] || [ -n "$artifacts" ]; then
    found_any=1
    verdict="FOUND (exit $rc) ${artifacts:-see the log}"
    grep -E '^==[0-9]+==ERROR|^SUMMARY|fuzz oracle failed|MAPL_CHECK|deadly signal' "$log" | head -5
  else
    verdict="nothing found"
  fi
  line=$(printf '%-22s %6s s  execs %-10s (%s/s)  %-18s  %s' "$t" "$((SECONDS - start))" \
         "${execs:-?}" "${rate:-?}" "${cov:-cov: ?}" "$verdict")
  echo "$line"
  summary+=("$line")
done
echo
echo "== summary (${seconds} s a target)"
printf '%s\n' "${summary[@]}"
exit "$found_any"
