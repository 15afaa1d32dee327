"""One pipeline stage's trainer process: its layers, AdamW, and its own mapld as the only link
to the neighbouring stages.

    python3 -m llama_pipeline.stage --config run.json --stage 1 --socket /tmp/x/s1.sock

The launcher (``run.py``) drives it in lock step over stdin and stdout, one JSON object a line.
In: ``{"cmd": "step", "step": s, "lr": lr, "eval": bool}``, ``{"cmd": "stats"}``,
``{"cmd": "save", "dir": path}`` (the stage's weights to path/stage<i>.pt),
``{"cmd": "generate", "index": i, "context": [bytes], "temperature": t}`` (one byte of text
through the pipeline) or ``{"cmd": "stop"}``. Out: ``{"event": "ready", ...}`` once attached,
``{"event": "step", ...}`` after each step (loss on the last stage, the sidecar's stats),
``{"event": "stats", ...}``, ``{"event": "saved", "path": ...}``, ``{"event": "generated",
"byte": b}`` (None but on the last stage), and ``{"event": "error", "message": ...}`` before
exiting with 1. Anything else the process prints goes to stderr (the stage's log).

The stage talks to its sidecar only through step scopes (mapl.torch_pipeline): a training step
is ``with sc.step()``, whose activations cross with ``st.recv()`` / ``st.send()`` and whose
gradients cross inside ``backward()``; evaluation and generation are ``with
sc.step(evaluation=True)``, which trains no compressor. A middle stage needs no data: the token
ids come with the activations and go on with them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, TextIO, Tuple

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import mapl  # noqa: E402

from .config import RunConfig  # noqa: E402
from .data import Corpus, load_text  # noqa: E402
from .model import build_stage  # noqa: E402

VOCAB = 256


def checkpoint_path(directory: str, index: int) -> Path:
    """Where stage ``index`` keeps its weights in a checkpoint directory."""
    return Path(directory) / f"stage{index}.pt"


def schedule(name: str, microbatches: int, stages: int, index: int,
             lead: int = 0) -> List[Tuple[str, int]]:
    """The order of stage ``index``'s forward ("F", mb) and backward ("B", mb) passes in one
    step. GPipe: every forward, then every backward (the last stage runs each backward right
    after its forward: nothing downstream waits, and its activations go at once). 1F1B: as many
    forwards as stages below this one (plus ``lead``), then one forward and one backward in
    turn, then the remaining backwards; at most (stages - index + lead) microbatches are in
    flight on a stage. ``lead`` lets a stage run further ahead where a round trip over the link
    takes longer than a microbatch's compute (each backward would wait for it otherwise)."""
    m = microbatches
    if name == "gpipe":
        if index == stages - 1:
            return [op for i in range(m) for op in (("F", i), ("B", i))]
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    warmup = min(stages - index - 1 + (lead if index < stages - 1 else 0), m)
    order = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        order += [("F", warmup + i), ("B", i)]
    return order + [("B", i) for i in range(m - warmup, m)]


class StageTrainer:
    """Stage ``index`` of the run: receives activations from the stage before it (unless it is
    the first), sends them to the stage after it (unless it is the last)."""

    def __init__(self, cfg: RunConfig, index: int, sidecar: mapl.Sidecar) -> None:
        self.cfg, self.index, self.sc = cfg, index, sidecar
        self.first, self.last = index == 0, index == cfg.stages - 1
        self.model = build_stage(cfg.model(), cfg.stages, index, cfg.seed)
        if cfg.init_checkpoint:
            self.model.load_state_dict(torch.load(checkpoint_path(cfg.init_checkpoint, index),
                                                  map_location="cpu"))
        self.params = sum(p.numel() for p in self.model.parameters())
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=cfg.lr, betas=(0.9, 0.95))
        # Only the first stage (inputs) and the last (targets) read the data.
        self.corpus = Corpus(load_text(cfg.corpus)) if self.first or self.last else None
        if self.corpus is not None:
            self.corpus.check(cfg.seq_len)

    def train_step(self, step: int, lr: float) -> Tuple[Optional[float], Any]:
        """One step of the configured schedule and AdamW. Returns (the mean training loss on
        the last stage, else None; the sidecar's stats after the step closed)."""
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        self.model.train()
        losses: List[float] = []
        outputs: Dict[int, torch.Tensor] = {}  # what each microbatch's backward starts from
        with self.sc.step(timeout=cfg.timeout_s) as st:
            # Every receive of the step posted at once: each arrives while the stage computes.
            inputs = [] if self.first else [st.irecv() for _ in range(cfg.microbatches)]
            for op, mb in schedule(cfg.schedule, cfg.microbatches, cfg.stages, self.index,
                                   cfg.schedule_lead):
                if op == "B":
                    outputs.pop(mb).backward()
                    continue
                x = y = None
                if self.corpus is not None:
                    x, y = self.corpus.train_batch(cfg.seed, step + cfg.data_step_offset, mb,
                                                   cfg.microbatch_size, cfg.seq_len)
                out = self.model(x if self.first else inputs[mb].wait())
                if self.last:
                    loss = F.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1))
                    losses.append(float(loss))
                    outputs[mb] = loss / cfg.microbatches
                else:
                    outputs[mb] = st.send(out, token_ids=x)
            self.opt.step()
        return (sum(losses) / len(losses) if losses else None), st.stats

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Forward passes over the fixed validation set through the sidecars, as evaluation
        traffic; returns the mean validation loss (nats a byte) on the last stage."""
        cfg = self.cfg
        self.model.eval()
        total, count = 0.0, 0
        with self.sc.step(evaluation=True, timeout=cfg.timeout_s) as st:
            for j in range(cfg.eval_batches):
                x = y = None
                if self.corpus is not None:
                    x, y = self.corpus.val_batch(j, cfg.microbatch_size, cfg.seq_len)
                out = self.model(x if self.first else st.recv())
                if self.last:
                    total += float(F.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1),
                                                   reduction="sum"))
                    count += y.numel()
                else:
                    st.send(out, token_ids=x)
        return total / count if self.last else None

    @torch.no_grad()
    def generate_byte(self, index: int, context: list, temperature: float,
                      seed: int) -> Optional[int]:
        """One byte of text generation through the sidecars: the context (the last seq_len
        bytes) goes in as one sequence; the last stage samples the next byte from the logits of
        the last position (temperature, then the top 40) and returns it, the others None."""
        self.model.eval()
        with self.sc.step(evaluation=True, timeout=self.cfg.timeout_s) as st:
            if self.first:
                ids = torch.tensor(context[-self.cfg.seq_len:], dtype=torch.long).unsqueeze(0)
                out = self.model(ids)
            else:
                out = self.model(st.recv())
            if not self.last:
                st.send(out, token_ids=ids if self.first else None)
                return None
        logits = out[0, -1].double() / max(temperature, 1e-6)
        top = torch.topk(logits, 40)
        probs = torch.softmax(top.values, dim=0)
        g = torch.Generator().manual_seed(seed * 1_000_003 + index)
        return int(top.indices[torch.multinomial(probs, 1, generator=g)])

    def save(self, directory: str) -> str:
        path = checkpoint_path(directory, self.index)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), path)
        return str(path)

    def run_step(self, step: int, lr: float, do_eval: bool) -> Dict[str, Any]:
        start = time.perf_counter()
        loss, stats = self.train_step(step, lr)
        evaluating = time.perf_counter()
        val = self.evaluate() if do_eval else None
        eval_s = time.perf_counter() - evaluating
        return {"event": "step", "stage": self.index, "step": step, "loss": loss,
                "val_loss": val, "seconds": time.perf_counter() - start, "eval_seconds": eval_s,
                "boundaries": [asdict(b) for b in stats.boundaries]}


def serve(cfg: RunConfig, index: int, socket_path: str, commands: TextIO, out: TextIO) -> None:
    def emit(message: Dict[str, Any]) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    torch.set_num_threads(1)
    with mapl.Sidecar.connect(stage=index, socket_path=socket_path, timeout=60.0) as sc:
        trainer = StageTrainer(cfg, index, sc)
        emit({"event": "ready", "stage": index, "params": trainer.params,
              "layers": [trainer.model.first, trainer.model.last]})
        for line in commands:  # EOF: the launcher is gone
            cmd = json.loads(line)
            if cmd["cmd"] == "stop":
                break
            if cmd["cmd"] == "save":
                emit({"event": "saved", "stage": index, "path": trainer.save(cmd["dir"])})
            elif cmd["cmd"] == "generate":
                byte = trainer.generate_byte(int(cmd["index"]), cmd["context"],
                                             float(cmd["temperature"]), trainer.cfg.seed)
                emit({"event": "generated", "stage": index, "byte": byte})
            elif cmd["cmd"] == "stats":
                emit({"event": "stats", "stage": index,
                      "boundaries": [asdict(b) for b in sc.stats().boundaries]})
            else:
                emit(trainer.run_step(int(cmd["step"]), float(cmd["lr"]), bool(cmd["eval"])))


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description="one stage of the mapl LLaMA pipeline")
    ap.add_argument("--config", required=True, help="the run's RunConfig as JSON")
    ap.add_argument("--stage", type=int, required=True)
    ap.add_argument("--socket", required=True, help="this stage's mapld local socket")
    args = ap.parse_args(argv)
    # The protocol owns the real stdout; stray prints (warnings, libraries) go to the log.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        serve(RunConfig.load(Path(args.config)), args.stage, args.socket, sys.stdin, out)
    except Exception as e:  # reported to the launcher, which says which stage failed and why
        traceback.print_exc()
        out.write(json.dumps({"event": "error", "stage": args.stage,
                              "message": f"{type(e).__name__}: {e}"}) + "\n")
        out.flush()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
