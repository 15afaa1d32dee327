#!/usr/bin/env bash
# The CUDA backend's checks on a device machine, in two halves:
#
#   bench/gpu_check.sh --pack        here (the build machine): builds the GPU tests and the
#                                    benchmarks in build/, and packs the stripped binaries with
#                                    their shared libraries (minus glibc, libcuda and cuBLAS) into
#                                    .gpucheck/bundle.tar.xz (git-ignored; under 40 MB).
#   bench/gpu_check.sh OUT_DIR       on the device machine, from the repository root with
#                                    .gpucheck/ beside it: unpacks the bundle, finds cuBLAS 13,
#                                    prints nvidia-smi, runs every GPU test (ctest label gpu: the
#                                    */cuda* instances of the kernel tests, cuda_backend_test and
#                                    cuda_ipc_test) and the benchmarks gpu_codec_bench and
#                                    cuda_ipc_bench, each under a timeout, and writes each
#                                    log and summary.txt into OUT_DIR.
#
# The device machine has the NVIDIA driver, a CUDA 13 toolkit and Python, but not the libraries
# mapl builds against (gRPC, Abseil, OpenBLAS): hence binaries carried, not built there. The run
# fails if any step fails, times out, runs no test, or skips a test: a GPU test that skips (no
# device, no cuBLAS) proves nothing. It takes about 3-5 minutes, within an 8-minute budget.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

# The GPU tests: binary and gtest filter. Keep in step with tests/kernels/CMakeLists.txt and
# tests/server/CMakeLists.txt (the gpu label); --pack checks that the two agree.
GPU_TESTS=(
  "cuda_backend_test:*"
  "projection_test:*/cuda*"
  "rvq_test:*/cuda*"
  "scalar_codec_test:*/cuda*"
  "spel_test:*/cuda*"
  "anchors_test:*/cuda*"
  "signals_test:*/cuda*"
  "registry_test:*/cuda*"
  "cuda_ipc_test:*"
)
BENCHES=(gpu_codec_bench cuda_ipc_bench)
# Binaries the tests and benchmarks run as processes of their own (the GPU trainer of the CUDA
# IPC test and benchmark, found next to them).
HELPERS=(cuda_ipc_trainer)

# The built binary of a GPU test or benchmark, in build/.
bin_path() {
  local d
  for d in tests/kernels tests/server bench; do
    if [ -x "build/$d/$1" ]; then echo "build/$d/$1"; return 0; fi
  done
  echo "gpu_check --pack: $1 was not built (looked in build/tests/kernels, build/tests/server" \
       "and build/bench)" >&2
  return 1
}

pack() {
  local build=build stage=build/gpucheck-stage
  if [ ! -f "$build/CMakeCache.txt" ]; then cmake --preset default >/dev/null || return 1; fi
  if ! grep -qx 'MAPL_WITH_CUDA:BOOL=ON' "$build/CMakeCache.txt"; then
    echo "gpu_check --pack: build/ has MAPL_WITH_CUDA OFF; configure it with nvcc available" >&2
    return 1
  fi
  local targets=() t
  for t in "${GPU_TESTS[@]}"; do targets+=("${t%%:*}"); done
  targets+=("${BENCHES[@]}" "${HELPERS[@]}")
  nice -n 5 ninja -C "$build" -j "${MAPL_PACK_JOBS:-2}" mapl_cuda || return 1
  nice -n 5 ninja -C "$build" -j "${MAPL_PACK_JOBS:-2}" "${targets[@]}" || return 1

  # The gpu label as ctest knows it must be exactly what GPU_TESTS runs (names compared).
  local want got
  want=$(ctest --test-dir "$build" -N -L gpu | sed -n 's/^ *Test *#[0-9]*: //p' | sed 's/  #.*//' | sort)
  got=$(for t in "${GPU_TESTS[@]}"; do
          local bin=${t%%:*} filter=${t#*:}
          "$(bin_path "$bin")" \
            --gtest_list_tests --gtest_filter="$filter" | awk '
              /^[^ ]/ { suite = $1; next } { print suite $1 }'
        done | sort)
  echo "gpu_check --pack: ctest -L gpu lists $(echo "$want" | grep -c .) tests;" \
       "GPU_TESTS runs $(echo "$got" | grep -c .)"
  if [ -z "$want" ] || [ "$want" != "$got" ]; then
    echo "gpu_check --pack: the tests of ctest -L gpu and of GPU_TESTS differ; update GPU_TESTS" \
         "in $0:" >&2
    diff <(echo "$want") <(echo "$got") >&2
    return 1
  fi

  rm -rf "$stage" && mkdir -p "$stage/bin" "$stage/lib/compat" || return 1
  local bins=() path
  for t in "${targets[@]}"; do
    path=$(bin_path "$t") || return 1
    strip --strip-unneeded -o "$stage/bin/$t" "$path" || return 1
    bins+=("$path")
  done
  # The CUDA backend's module, next to the binaries, where its loader looks first.
  strip --strip-unneeded -o "$stage/bin/libmapl_cuda.so" "$build/kernels/libmapl_cuda.so" ||
    return 1
  bins+=("$build/kernels/libmapl_cuda.so")
  # The shared-library closure, without glibc (the device image has its own, 2.36 or later
  # needed), libcuda (the driver's) and cuBLAS (found there at run time). libstdc++ and libgcc_s
  # go to lib/compat, used only when the image's are older than these.
  local lib name
  for lib in $(ldd "${bins[@]}" | awk '/=> \// { print $3 }' | sort -u); do
    name=$(basename "$lib")
    case "$name" in
      libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|ld-linux*|libresolv.so.*) continue ;;
      libcuda.so.*|libcublas*) continue ;;
      libstdc++.so.*|libgcc_s.so.*) strip --strip-unneeded -o "$stage/lib/compat/$name" "$lib" ;;
      *) strip --strip-unneeded -o "$stage/lib/$name" "$lib" ;;
    esac || return 1
  done
  mkdir -p .gpucheck && rm -f .gpucheck/bundle.tar.xz
  tar -C "$stage" -cJf .gpucheck/bundle.tar.xz . || return 1
  local bytes
  bytes=$(stat -c %s .gpucheck/bundle.tar.xz)
  echo "gpu_check --pack: .gpucheck/bundle.tar.xz, $((bytes / 1024 / 1024)) MiB" \
       "($(ls "$stage/bin" | wc -l) binaries, $(find "$stage/lib" -type f | wc -l) libraries)"
  if [ "$bytes" -ge $((40 * 1024 * 1024)) ]; then
    echo "gpu_check --pack: the bundle is over 40 MB; it must fit the device run's 64 MiB carry" >&2
    return 1
  fi
}

# The directory holding libcublas.so.13 on this machine: the loader's cache, the toolkit, or
# pip's nvidia packages (torch's CUDA wheels bring them).
find_cublas() {
  local p
  p=$(ldconfig -p 2>/dev/null | awk '/libcublas\.so\.13 / { print $NF; exit }')
  if [ -n "$p" ]; then dirname "$p"; return 0; fi
  for p in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib; do
    if [ -e "$p/libcublas.so.13" ]; then echo "$p"; return 0; fi
  done
  local roots
  roots=$(python3 -c 'import nvidia, sys; print("\n".join(nvidia.__path__))' 2>/dev/null)
  for p in $roots; do
    p=$(find "$p" -name 'libcublas.so.13' 2>/dev/null | head -1)
    if [ -n "$p" ]; then dirname "$p"; return 0; fi
  done
  return 1
}

run() {
  local out=$1
  mkdir -p "$out" || return 1
  out=$(cd "$out" && pwd)
  local summary=$out/summary.txt failed=0
  : >"$summary"
  note() { echo "$*" | tee -a "$summary"; }
  [ -f .gpucheck/bundle.tar.xz ] || { note "FAIL: no .gpucheck/bundle.tar.xz (run --pack first)"; return 1; }
  local work
  work=$(mktemp -d) || return 1
  # tar -J needs the xz program, which a bare image may lack; Python's tarfile reads xz itself.
  if ! tar -C "$work" -xJf .gpucheck/bundle.tar.xz 2>"$out/unpack.log" &&
     ! python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
       .gpucheck/bundle.tar.xz "$work" 2>>"$out/unpack.log"; then
    note "FAIL: cannot unpack the bundle (log: unpack.log)"
    return 1
  fi

  nvidia-smi >"$out/nvidia-smi.txt" 2>&1
  cat "$out/nvidia-smi.txt"
  local cublas
  if ! cublas=$(find_cublas); then
    note "FAIL: libcublas.so.13 not found (ldconfig, /usr/local/cuda, pip nvidia packages)"
    return 1
  fi
  note "cuBLAS: $cublas/libcublas.so.13"
  export LD_LIBRARY_PATH="$work/lib:$cublas${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  # The image's libstdc++ first; the carried one only if a binary needs a newer GLIBCXX.
  if "$work/bin/registry_test" --gtest_list_tests 2>&1 | grep -q 'GLIBCXX\|CXXABI'; then
    export LD_LIBRARY_PATH="$work/lib/compat:$LD_LIBRARY_PATH"
    note "using the carried libstdc++ (the image's is older)"
  fi
  export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-8}
  export MAPL_CUDA_MODULE="$work/bin/libmapl_cuda.so"

  # One budget for the whole run (8 minutes on the device machine, less the unpacking and
  # nvidia-smi): each step gets its own limit, or what is left of the budget if that is less.
  local deadline=$((SECONDS + ${MAPL_GPU_CHECK_BUDGET:-450}))
  limit() {
    local left=$((deadline - SECONDS))
    [ "$left" -gt 5 ] || { echo 0; return; }
    echo $(($1 < left ? $1 : left))
  }
  local t bin filter rc start secs ran skipped lim
  for t in "${GPU_TESTS[@]}"; do
    bin=${t%%:*}
    filter=${t#*:}
    start=$SECONDS
    lim=$(limit "$([ "$bin" = cuda_backend_test ] && echo 240 || echo 60)")
    if [ "$lim" -eq 0 ]; then
      failed=1
      note "FAIL  $bin: not run, the time budget is spent"
      continue
    fi
    timeout "$lim" "$work/bin/$bin" --gtest_filter="$filter" >"$out/$bin.log" 2>&1
    rc=$?
    secs=$((SECONDS - start))
    ran=$(sed -n 's/^\[==========\] \([0-9]*\) tests\{0,1\} from .* ran\..*/\1/p' "$out/$bin.log" | tail -1)
    skipped=$(grep -cE '^\[  SKIPPED \] .* \([0-9]+ ms\)$' "$out/$bin.log")
    if [ "$rc" -ne 0 ] || [ -z "$ran" ] || [ "$ran" -eq 0 ] || [ "$skipped" -ne 0 ]; then
      failed=1
      note "FAIL  $bin: exit $rc, ${ran:-0} tests, $skipped skipped, ${secs}s (log: $bin.log)"
      grep -E '^\[  (FAILED|SKIPPED) \]|Skipped|Failure' "$out/$bin.log" | head -20 | tee -a "$summary"
    else
      note "ok    $bin: ${ran} tests, ${secs}s"
    fi
  done
  for bin in "${BENCHES[@]}"; do
    start=$SECONDS
    lim=$(limit 150)
    if [ "$lim" -eq 0 ]; then
      failed=1
      note "FAIL  $bin: not run, the time budget is spent"
      continue
    fi
    timeout "$lim" "$work/bin/$bin" >"$out/$bin.txt" 2>&1
    rc=$?
    if [ "$rc" -ne 0 ]; then
      failed=1
      note "FAIL  $bin: exit $rc, $((SECONDS - start))s (log: $bin.txt)"
      tail -5 "$out/$bin.txt" | tee -a "$summary"
    else
      note "ok    $bin: $((SECONDS - start))s"
      tee -a "$summary" <"$out/$bin.txt"
    fi
  done
  rm -rf "$work"
  if [ "$failed" -ne 0 ]; then
    note "gpu_check: FAILED"
    return 1
  fi
  note "gpu_check: all GPU tests passed, none skipped"
}

case "${1:-}" in
  --pack) pack ;;
  ""|-h|--help)
    echo "usage: $0 --pack | $0 OUT_DIR" >&2
    exit 2
    ;;
  *) run "$1" ;;
esac
