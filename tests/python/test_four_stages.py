"""Four stages from a pipeline description: the example trains through three boundaries (4 mapld,
4 stage processes) as deploy/pipelines/four-stage-two-sites.toml describes them (dense bf16
inside each site, MAPL + RVQ across, mutual TLS with identities on every link), on loopback.

TLS stays on: mapl.launch.start_pipeline makes a throwaway CA and one certificate per stage with
the openssl command (as tests/server/transport/peer_tls_test.cc does), each naming 127.0.0.1 and
the stage's SPIFFE id, so the description runs unchanged, identity checks included.

A small shape: d = 256 (the description's), 4 layers (one a stage), 32-byte sequences, 8 a step
in 4 microbatches, 50 steps, once with GPipe and once with 1F1B (the stages' step code is the
same step scope either way; only the order of forwards and backwards differs).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from conftest import REPO, mapld_binary, missing, need_module

need_module("torch")
need_module("mapl.sidecar")
sys.path.insert(0, str(REPO / "examples"))

import llama_pipeline.run as run_mod  # noqa: E402
from llama_pipeline.run import RunConfig, run  # noqa: E402
from test_llama_pipeline import corpus_file  # noqa: E402

DESCRIPTION = REPO / "deploy" / "pipelines" / "four-stage-two-sites.toml"
STEPS, MICROBATCHES, EVAL_BATCHES = 50, 4, 2


def _processes_mentioning(text: str) -> List[int]:
    """Pids of live processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_four_stages_from_the_description(short_tmp: Path, monkeypatch: Any,
                                          schedule: str) -> None:
    mapld_binary()  # skips (fails under CI=true) while the daemon is not built
    if not shutil.which("openssl"):
        missing("the openssl command makes the test certificates: install Debian's openssl "
                "(bash deploy/install-deps.sh)")

    # Every process the run starts, with how it ended, recorded after the launcher's close().
    ended: Dict[str, Any] = {}
    close = run_mod.Pipeline.close

    def recording_close(self: Any, graceful: bool = True) -> None:
        ended["configs"] = sorted(p.name for p in Path(self.tmp).glob("*.textproto"))
        close(self, graceful)
        ended["tmp"] = str(self.tmp)
        ended["daemons"] = {s: (d.proc.pid, d.proc.returncode) for s, d in self.daemons.items()}
        ended["stages"] = {st.index: (st.proc.pid, st.proc.returncode) for st in self.stages}

    monkeypatch.setattr(run_mod.Pipeline, "close", recording_close)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")

    cfg = RunConfig(d_model=256, layers=4, heads=4, seq_len=32, batch=8,
                    microbatches=MICROBATCHES, schedule=schedule, lr=3e-3, warmup_steps=5,
                    stages=4,
                    eval_batches=EVAL_BATCHES, corpus=corpus_file(short_tmp),
                    timeout_s=60.0, pipeline=str(DESCRIPTION))
    started = time.monotonic()
    summary = run(cfg, out_dir=short_tmp / "out", max_steps=STEPS, plot=False)
    print(f"4 stages, {schedule}, {STEPS} steps: {time.monotonic() - started:.1f} s; loss "
          f"{summary['first_loss']:.3f} -> {summary['final_loss_mean10']:.3f}, val "
          f"{summary['val_loss']}")

    assert summary["steps"] == STEPS
    # The loss fell, well below a uniform guess over bytes (ln 256 = 5.55).
    assert summary["first_loss"] > 5.0
    assert summary["final_loss_mean10"] < summary["first_loss_mean5"] - 1.0
    val = summary["val_loss"]
    assert len(val) >= 2 and val[-1] < val[0]

    # Every boundary carried every microbatch both ways.
    forward = STEPS * MICROBATCHES + summary["evaluations"] * EVAL_BATCHES
    backward = STEPS * MICROBATCHES
    assert sorted(summary["boundaries"]) == ["0", "1", "2"]
    for b, record in summary["boundaries"].items():
        up, down = record["upstream"], record["downstream"]
        assert up["frames_sent"] == down["frames_received"] == forward, b
        assert down["frames_sent"] == up["frames_received"] == backward, b
        assert up["payload_bytes_sent"] > 0 and down["payload_bytes_sent"] > 0, b
    # Across the sites MAPL learned a dictionary; inside them dense bf16 has none.
    cross = summary["boundaries"]["1"]
    assert cross["upstream"]["dictionary_version"] == cross["downstream"]["dictionary_version"] > 0

    # Every process exited 0 and none is left.
    assert ended["configs"] == [f"stage{s}.textproto" for s in range(4)]
    assert {s: code for s, (_, code) in ended["daemons"].items()} == {s: 0 for s in range(4)}
    assert {s: code for s, (_, code) in ended["stages"].items()} == {s: 0 for s in range(4)}
    assert _processes_mentioning(ended["tmp"]) == []
    for pid, _ in list(ended["daemons"].values()) + list(ended["stages"].values()):
        assert not os.path.exists(f"/proc/{pid}"), f"process {pid} is still there"
