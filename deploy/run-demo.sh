#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: install what is missing, build, then train a small
# LLaMA-style model across two pipeline stages whose only link is a pair of mapld sidecars
# (examples/llama_pipeline/run.py). It ends with one screen: text the trained model writes through
# the sidecars, its validation loss next to a dense run's at the same steps, and the bytes saved;
# the loss curve is a PNG. Arguments go to the launcher (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
# Only what the demo runs: the daemon and the Python package (the tests build the rest).
MAPL_BUILD_TARGETS="mapld mapl_python mapl_python_client" bash deploy/build.sh
# MAPL with 8 RVQ levels (measured at the end: 35x fewer bytes than dense bf16 for +6.0 % in
# validation loss; with 4 levels 42x for +25 %). A fixed training budget, whatever setup took:
# 600 steps (1.2 M tokens), about 4 minutes on two idle cores, the budget of the dense reference
# run the result is compared with (examples/llama_pipeline/dense_reference.json), so that the
# learning-rate schedules agree step by step. A --steps or --minutes given here wins.
# Debian's PyTorch does its maths in OpenBLAS: one BLAS thread, or the cores are oversubscribed.
export OPENBLAS_NUM_THREADS=1
PYTHONPATH="$PWD/build/python" exec /usr/bin/python3 examples/llama_pipeline/run.py \
  --minutes 0 --steps 600 --evals 8 --rvq-levels 8 --sample-bytes 300 "$@"
