#!/usr/bin/env bash
# Configures and builds mapl into build/ (or $MAPL_BUILD_DIR). Extra arguments go to cmake.
# MAPL_BUILD_TARGETS (space-separated ninja targets) builds only those; default: everything.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${MAPL_BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DMAPL_BUILD_TESTS=ON -DMAPL_BUILD_PYTHON=ON -DMAPL_BUILD_BENCH=ON "$@" >/dev/null
# shellcheck disable=SC2086  # the targets are meant to split into words
ninja -C "$BUILD_DIR" ${MAPL_BUILD_TARGETS:-}
