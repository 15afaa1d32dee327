#!/usr/bin/env bash
# Builds the Debian package of mapl (CPack; the contents are in deploy/package/CMakeLists.txt)
# into build/package/ and prints its path. Install it with: sudo apt install ./build/package/mapl_*.deb
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh >&2
bash deploy/build.sh >&2
BUILD_DIR=${MAPL_BUILD_DIR:-build}
cpack --config "$BUILD_DIR/CPackConfig.cmake" -B "$BUILD_DIR/package" >&2
ls "$PWD/$BUILD_DIR"/package/mapl_*.deb
