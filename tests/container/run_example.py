"""The two-stage example (examples/llama_pipeline) with a tiny model for a few steps; checks that
every microbatch crossed boundary 0 and prints one summary line. test_image.sh runs it

- on the host, its daemons each in a container of the image: WRAPPER CONTAINER0 CONTAINER1 make
  each daemon's command line `WRAPPER --user 0:0 -v /tmp:/tmp CONTAINERi -- /usr/bin/mapld ...`
  ($MAPLD=/usr/bin/mapld, the image's path; /tmp, where the launcher keeps the daemons'
  configs, sockets and ready files, bind-mounted at the same path; uid 0, the trainers' uid);
- inside the trainer image, daemons and trainers side by side as the image's user.

    run_example.py EXAMPLES_DIR WORK_DIR [WRAPPER CONTAINER0 CONTAINER1]
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

examples, work = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(examples))
import mapl  # noqa: E402
from llama_pipeline.run import RunConfig, StagePlacement, run  # noqa: E402

placement = None
if len(sys.argv) > 3:
    wrapper, containers = sys.argv[3], sys.argv[4:]
    placement = [StagePlacement(daemon_wrap=[wrapper, "--user", "0:0", "-v", "/tmp:/tmp", c, "--"])
                 for c in containers]
print(f"mapl from {mapl.__file__}")

STEPS, MICROBATCHES, EVAL_BATCHES = 8, 4, 2
work.mkdir(parents=True, exist_ok=True)
rng = random.Random(0)
words = ["the", "and", "of", "lord", "unto", "said", "his", "that", "he", "shall", "in"]
corpus = work / "corpus.txt"
corpus.write_text(" ".join(rng.choice(words) for _ in range(50_000)) + "\n")
cfg = RunConfig(d_model=64, layers=2, heads=4, seq_len=64, batch=8, microbatches=MICROBATCHES,
                lr=3e-3, warmup_steps=2, eval_batches=EVAL_BATCHES, corpus=str(corpus),
                method="MAPL", k=8, send_rate_mbit=20.0, timeout_s=60.0)
summary = run(cfg, out_dir=work / "out", max_steps=STEPS, plot=False, placement=placement)

b = summary["boundaries"]["0"]
up, down = b["upstream"], b["downstream"]
forward = STEPS * MICROBATCHES + summary["evaluations"] * EVAL_BATCHES
assert summary["steps"] == STEPS, summary["steps"]
assert up["frames_sent"] == down["frames_received"] == forward, (up, down)
assert down["frames_sent"] == up["frames_received"] == STEPS * MICROBATCHES, (up, down)
print(f"steps {summary['steps']}, loss {summary['first_loss']:.2f} -> "
      f"{summary['final_loss_mean10']:.2f}, forward frames {forward} and backward "
      f"{STEPS * MICROBATCHES} each way as counted, compression {summary['compression']:.1f}x")
