"""A small LLaMA-style decoder trained across pipeline stages whose only link is mapl.

- ``model``: the decoder (RMSNorm, rotary embeddings, SwiGLU, causal attention) and its split into
  stages by layer ranges;
- ``data``: a byte-level corpus with a held-out split and deterministic batches;
- ``config``: the run's settings, shared by the launcher and the stage processes;
- ``stage``: one stage's trainer process (GPipe schedule, AdamW), attached to its own mapld;
- ``run``: the launcher (the main job): daemons, stage processes, progress, summary, loss plot.

    PYTHONPATH=build/python OPENBLAS_NUM_THREADS=1 /usr/bin/python3 examples/llama_pipeline/run.py
"""
