#!/usr/bin/env bash
# The Debian package, used from outside the source tree: builds it with CPack from BUILD_DIR,
# checks its control fields and layout, unpacks it into a scratch root, builds a C++ program
# against the unpacked CMake package (find_package(mapl)), and has the unpacked Python package
# start two unpacked daemons that carry a boundary while that program reads one daemon's stats.
# Usage: test_package.sh BUILD_DIR
set -euo pipefail
build=$(cd "$1" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d /tmp/mapl-package-XXXXXX)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

cpack --config "$build/CPackConfig.cmake" -B "$work/deb" >"$work/cpack.log" 2>&1 ||
  { cat "$work/cpack.log"; fail "cpack could not build the package"; }
deb=$(ls "$work"/deb/mapl_*.deb)
echo "package: $(basename "$deb"), $(stat -c %s "$deb") bytes"
depends=$(dpkg-deb -f "$deb" Depends)
echo "Depends: $depends"
for lib in libgrpc++ libprotobuf libopenblas python3-numpy; do
  [[ "$depends" == *"$lib"* ]] || fail "Depends lacks $lib"
done
contents=$(dpkg-deb -c "$deb" | awk '{print $6}')
for path in ./usr/bin/mapld ./usr/bin/mapl-health ./usr/lib/systemd/system/mapld@.service ./usr/lib/sysusers.d/mapl.conf \
            ./usr/include/mapl/client/mapl_client.h ./usr/include/mapl/proto/mapl/v1/local.pb.h \
            ./usr/lib/python3/dist-packages/mapl/__init__.py \
            ./usr/lib/python3/dist-packages/mapl/pipeline.py \
            ./usr/lib/python3/dist-packages/mapl/config.proto \
            ./usr/lib/cmake/mapl/maplConfig.cmake; do
  grep -qx "$path" <<<"$contents" || fail "the package lacks $path"
done
grep -q "_client.cpython" <<<"$contents" || fail "the package lacks the Python client module"
# Debian's python3 imports from /usr/lib/python3/dist-packages with no PYTHONPATH.
/usr/bin/python3 -c 'import sys; assert "/usr/lib/python3/dist-packages" in sys.path'

root=$work/root
dpkg-deb -x "$deb" "$root"
cmake -S "$here/consumer" -B "$work/consumer" -G Ninja -DCMAKE_PREFIX_PATH="$root/usr" \
  >"$work/consumer.log" 2>&1 || { cat "$work/consumer.log"; fail "find_package(mapl) failed"; }
ninja -C "$work/consumer" >>"$work/consumer.log" 2>&1 ||
  { cat "$work/consumer.log"; fail "the consumer did not build against the package"; }

# The unpacked Python package and daemons (PATH finds the unpacked mapld; nothing of the build).
mkdir -p "$work/run"
coproc DRIVE { cd /tmp && env -u MAPLD PATH="$root/usr/bin:$PATH" OPENBLAS_NUM_THREADS=1 \
  PYTHONPATH="$root/usr/lib/python3/dist-packages" /usr/bin/python3 -u \
  "$here/drive_installed.py" "$root" "$work/run" 2>&1; }
socket=""
while IFS= read -r -u "${DRIVE[0]}" line; do
  echo "  $line"
  if [[ "$line" == socket\ * ]]; then socket=${line#socket }; break; fi
done
[ -n "$socket" ] || fail "the installed Python package did not carry the boundary"
stats=$("$work/consumer/mapl_consumer" "$socket") || fail "the consumer could not read stats"
echo "$stats" | sed 's/^/  consumer: /'
# The installed probe: readiness follows the link, which the health loop samples every 200 ms
# (and which a loaded machine can take a moment to show), so it is asked until it says SERVING.
for _ in $(seq 100); do
  health=$("$root/usr/bin/mapl-health" --socket "$socket") && break
  sleep 0.2
done
[[ "$health" == "readiness: SERVING" ]] || fail "mapl-health: $health"
echo "  mapl-health: $health"
grep -q "boundary 0 frames_sent 4 frames_received 4" <<<"$stats" ||
  fail "the consumer read unexpected stats"
echo >&"${DRIVE[1]}"
wait "$DRIVE_PID" || fail "the driver failed"
echo "1 passed, 0 failed"
