#!/usr/bin/env bash
# Builds Abseil's libraries with ThreadSanitizer, from the Debian source of the very version
# installed (same patches, same inline namespace and sonames), into build-tsan-abseil/, and prints
# the one directory that holds them. All of them: each inlines Abseil's call_once and spinlocks,
# whose synchronization TSan must see wherever it happens. A ThreadSanitizer
# binary run with that directory first on LD_LIBRARY_PATH then has an absl::Mutex whose locking
# TSan sees; gRPC's own locks are absl::Mutex too. Debian's libraries are not instrumented, so
# without this TSan takes every access guarded by an absl::Mutex for a race.
# Enables Debian's source archive (deb-src) for this, in a file of its own, once. Idempotent: an
# existing build of the installed version is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD/build-tsan-abseil
pkg=$(dpkg-query -W -f='${binary:Package}\n' 'libabsl2*' | head -1)
version=$(dpkg-query -W -f='${Version}' "$pkg")
lib=$root/lib
if [ -f "$lib/.version" ] && [ "$(cat "$lib/.version")" = "$version" ]; then
  echo "$lib"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
src_list=/etc/apt/sources.list.d/mapl-deb-src.sources
if ! grep -rqs '^Types:.*deb-src\|^deb-src ' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "tsan-abseil: enabling Debian's source archive in $src_list" >&2
  $SUDO tee "$src_list" >/dev/null <<'SOURCES'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  $SUDO apt-get update -qq >&2
fi
rm -rf "$root"
mkdir -p "$root" "$lib"
(cd "$root" && apt-get source -qq "abseil=$version" >&2)
src=$(find "$root" -maxdepth 1 -type d -name 'abseil-*' | head -1)
# The libraries only (no tests), with the options of Debian's shared build.
CC=clang-14 CXX=clang++-14 cmake -S "$src" -B "$root/build" -G Ninja \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_STANDARD=17 -DBUILD_SHARED_LIBS=ON \
  -DCMAKE_C_FLAGS=-fsanitize=thread -DCMAKE_CXX_FLAGS=-fsanitize=thread \
  -DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=thread >&2
ninja -C "$root/build" -j "$(nproc)" >&2
find "$root/build" -name 'libabsl_*.so.*' -exec cp -P {} "$lib/" \;
echo "$version" > "$lib/.version"
echo "tsan-abseil: $(find "$lib" -name 'libabsl_*.so.*.*' | wc -l) libraries of Abseil $version in $lib" >&2
echo "$lib"
