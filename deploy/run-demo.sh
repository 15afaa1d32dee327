#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: install what is missing, build, run the demo.
# Today the demo is the codec on real activations (examples/codec_demo.py); the two-sidecar
# training run replaces it when the daemon lands.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
bash deploy/build.sh
# Debian's PyTorch does its maths in OpenBLAS: one BLAS thread, or the cores are oversubscribed.
export OPENBLAS_NUM_THREADS=1
PYTHONPATH="$PWD/build/python" exec /usr/bin/python3 examples/codec_demo.py "$@"
