"""The main job in small: the two-stage LLaMA-style example (examples/llama_pipeline) trains
through two real mapld daemons, and every microbatch crosses the boundary exactly once.

A tiny model (d = 64, 2 layers, 64-byte sequences, 8 sequences a step in 4 microbatches) on the
KJV Bible (or a generated text where bible-kjv is missing) for 40 GPipe steps with MAPL (k = 8,
RVQ forward, int8 backward), the launcher's own processes and lock-step driver included.
"""

from __future__ import annotations

import importlib.util
import math
import random
import shutil
import sys
from pathlib import Path

from conftest import REPO, mapld_binary, need_module

need_module("torch")
need_module("mapl.sidecar")
sys.path.insert(0, str(REPO / "examples"))

from llama_pipeline.run import RunConfig, run  # noqa: E402

STEPS, MICROBATCHES, EVAL_BATCHES = 40, 4, 2


def corpus_file(directory: Path) -> str:
    """"" (the Bible) when bible-kjv is installed, else a generated text with structure."""
    if shutil.which("bible"):
        return ""
    rng = random.Random(0)
    words = ["the", "and", "of", "lord", "unto", "said", "his", "that", "he", "shall", "in"]
    text = " ".join(rng.choice(words) for _ in range(200_000)) + "\n"
    path = directory / "corpus.txt"
    path.write_text(text)
    return str(path)


def test_two_stage_pipeline_learns_and_every_microbatch_arrives(short_tmp: Path) -> None:
    mapld_binary()  # skips (fails under CI=true) while the daemon is not built
    cfg = RunConfig(d_model=64, layers=2, heads=4, seq_len=64, batch=8,
                    microbatches=MICROBATCHES, lr=3e-3, warmup_steps=5,
                    eval_batches=EVAL_BATCHES, corpus=corpus_file(short_tmp), method="MAPL",
                    k=8, send_rate_mbit=20.0, timeout_s=30.0)
    plot = importlib.util.find_spec("matplotlib") is not None
    summary = run(cfg, out_dir=short_tmp / "out", max_steps=STEPS, plot=plot)

    assert summary["steps"] == STEPS
    # The loss falls well below a uniform guess over bytes (ln 256 = 5.55), on the training
    # batches and on held-out text evaluated through the sidecars.
    assert summary["first_loss"] > 5.0
    assert summary["final_loss_mean10"] < summary["first_loss_mean5"] - 1.0
    val = summary["val_loss"]
    assert len(val) == summary["evaluations"] >= 2
    assert val[-1] < val[0] and val[-1] < math.log(256) - 1.0

    # Every microbatch crossed: M forward and M backward frames a step, plus the validation
    # microbatches (forward only) of each evaluation; both daemons count the same.
    b = summary["boundaries"]["0"]
    up, down = b["upstream"], b["downstream"]
    forward = STEPS * MICROBATCHES + summary["evaluations"] * EVAL_BATCHES
    backward = STEPS * MICROBATCHES
    assert up["frames_sent"] == down["frames_received"] == forward
    assert down["frames_sent"] == up["frames_received"] == backward
    assert up["dictionary_version"] == down["dictionary_version"] > 0
    assert up["dictionary_checksum"] == down["dictionary_checksum"]
    # A floor on the compression from the codecs and the dictionary budget, not read off a run.
    # Raw is d = 64 as bf16, 128 bytes a token each way. A forward frame carries at most 17 bytes
    # a token (bf16 z of k = 8 plus 1-byte token ids of the 256 byte values, before the RVQ
    # codebooks are fitted; 4 + 1 after), a backward one 10 (int8 codes and a bf16 scale). The
    # dictionary sends at most 25 % of the step's forward payload or one row (8 floats and its
    # index), plus the first fitted codebooks whole (4 levels x 256 rows) once.
    tokens = cfg.batch // MICROBATCHES * cfg.seq_len
    payload = 17 * forward * tokens + 10 * backward * tokens
    row = 8 * 4 + 4
    dictionary = 0.25 * 17 * forward * tokens + STEPS * row + 4 * 256 * row
    raw = 128 * (forward + backward) * tokens
    assert summary["raw_bytes"] == raw
    assert summary["compression"] >= raw / (payload + dictionary)
    if plot:
        assert Path(summary["plot"]).stat().st_size > 0
