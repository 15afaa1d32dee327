#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: install what is missing, build, then train a small
# LLaMA-style model across two pipeline stages whose only link is a pair of mapld sidecars
# (examples/llama_pipeline/run.py): progress, summary, validation loss and a loss-curve PNG.
# Arguments go to the launcher (--help lists them); the whole command stays within 5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash deploy/install-deps.sh
# Only what the demo runs: the daemon and the Python package (the tests build the rest).
MAPL_BUILD_TARGETS="mapld mapl_python mapl_python_client" bash deploy/build.sh
# Train for what is left of 5 minutes after setup (at most 3.5, at least 1), keeping about 40 s
# for starting the processes, the final evaluation and the shutdown. A --minutes given here wins.
minutes=$(awk -v spent=$(( $(date +%s) - start )) \
  'BEGIN { m = (260 - spent) / 60; if (m > 3.5) m = 3.5; if (m < 1) m = 1; printf "%.2f", m }')
# Debian's PyTorch does its maths in OpenBLAS: one BLAS thread, or the cores are oversubscribed.
export OPENBLAS_NUM_THREADS=1
PYTHONPATH="$PWD/build/python" exec /usr/bin/python3 examples/llama_pipeline/run.py \
  --minutes "$minutes" "$@"
