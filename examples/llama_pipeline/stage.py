"""One pipeline stage's trainer process: its layers, AdamW, and its own mapld as the only link
to the neighbouring stages.

    python3 -m llama_pipeline.stage --config run.json --stage 1 --socket /tmp/x/s1.sock

The launcher (``run.py``) drives it in lock step over stdin and stdout, one JSON object a line.
In: ``{"cmd": "step", "step": s, "lr": lr, "eval": bool}``, ``{"cmd": "stats"}``,
``{"cmd": "save", "dir": path}`` (the stage's weights to path/stage<i>.pt),
``{"cmd": "generate", "step": s, "mb": i, "context": [bytes], "temperature": t}`` (one byte of
text through the pipeline), ``{"cmd": "close", "step": s}`` (Sidecar.step after generating) or
``{"cmd": "stop"}``. Out: ``{"event": "ready", ...}`` once attached, ``{"event": "step", ...}``
after each step (loss on the last stage, the sidecar's stats), ``{"event": "stats", ...}``,
``{"event": "saved", "path": ...}``, ``{"event": "generated", "byte": b}`` (None but on the last
stage), ``{"event": "closed"}``, and ``{"event": "error", "message": ...}`` before exiting
with 1.
Anything else the process prints goes to stderr (the stage's log).

Step numbering. Training step s uses mapl step s; its M microbatches are 0 .. M-1. A step that
also evaluates runs the validation microbatches after the optimizer step, in the same mapl step,
as microbatches M .. M+E-1 (forward only), and only then calls ``Sidecar.step(s)``. Eval thus
goes through the sidecars like training does, the steps the daemons close stay 1, 2, 3, ...,
and no extra daemon step runs: a daemon step without gradients would still move the learned
projection (SPEL follows its momentum) and advance its step-length schedule.
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
from typing import Any, Dict, Optional, TextIO

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import mapl  # noqa: E402
from mapl import torch_pipeline as tp  # noqa: E402

from .config import RunConfig  # noqa: E402
from .data import Corpus, load_text  # noqa: E402
from .model import build_stage  # noqa: E402

VOCAB = 256


def checkpoint_path(directory: str, index: int) -> Path:
    """Where stage ``index`` keeps its weights in a checkpoint directory."""
    return Path(directory) / f"stage{index}.pt"


class StageTrainer:
    """Stage ``index`` of the run: receives from boundary index-1, sends on boundary index."""

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
        self.corpus = Corpus(load_text(cfg.corpus))
        self.corpus.check(cfg.seq_len)
        self.shape = (cfg.microbatch_size, cfg.seq_len, cfg.d_model)

    # The boundaries on either side of this stage.
    @property
    def b_in(self) -> int:
        return self.index - 1

    @property
    def b_out(self) -> int:
        return self.index

    def train_step(self, step: int, lr: float) -> Optional[float]:
        """One GPipe step: forward every microbatch, then backward every one; AdamW. Returns the
        mean training loss on the last stage, None elsewhere."""
        cfg, timeout = self.cfg, self.cfg.timeout_s
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        self.model.train()
        losses = []
        for mb in range(cfg.microbatches):
            x, y = self.corpus.train_batch(cfg.seed, step + cfg.data_step_offset, mb,
                                           cfg.microbatch_size, cfg.seq_len)
            if self.first:
                inp = x
            else:
                inp = tp.recv_forward(self.sc, self.b_in, step, mb, timeout=timeout,
                                      shape=self.shape)
            out = self.model(inp)
            if self.last:
                # The last stage runs each microbatch's backward as soon as its forward is done:
                # in GPipe nothing downstream waits for it, and its activations are freed at once.
                loss = F.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1))
                (loss / cfg.microbatches).backward()
                losses.append(float(loss))
                tp.send_backward(self.sc, self.b_in, step, mb)
            else:
                tp.send_forward(self.sc, self.b_out, step, mb, out, token_ids=x)
        if not self.last:
            for mb in range(cfg.microbatches):
                tp.backward_from_peer(self.sc, self.b_out, step, mb, timeout=timeout)
                if not self.first:
                    tp.send_backward(self.sc, self.b_in, step, mb)
        self.opt.step()
        return sum(losses) / len(losses) if losses else None

    @torch.no_grad()
    def evaluate(self, step: int) -> Optional[float]:
        """Forward passes over the fixed validation set as microbatches M, M+1, ... of ``step``;
        returns the mean validation loss (nats a byte) on the last stage, None elsewhere."""
        cfg = self.cfg
        self.model.eval()
        total, count = 0.0, 0
        for j in range(cfg.eval_batches):
            mb = cfg.microbatches + j
            x, y = self.corpus.val_batch(j, cfg.microbatch_size, cfg.seq_len)
            if self.first:
                inp = x
            else:
                inp = tp.recv_forward(self.sc, self.b_in, step, mb, timeout=cfg.timeout_s,
                                      shape=self.shape, requires_grad=False)
            out = self.model(inp)
            if self.last:
                total += float(F.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1),
                                               reduction="sum"))
                count += y.numel()
            else:
                self.sc.send_activation(self.b_out, step, mb, out, token_ids=x)
        return total / count if self.last else None

    @torch.no_grad()
    def generate_byte(self, step: int, mb: int, context: list, temperature: float,
                      seed: int) -> Optional[int]:
        """One byte of text generation, forward only, through the sidecars like training: the
        context (the last seq_len bytes) goes in as microbatch ``mb`` of ``step``, one sequence
        of its length; the last stage samples the next byte from the logits of the last
        position (temperature, then the top 40) and returns it, the others return None."""
        cfg = self.cfg
        self.model.eval()
        ids = torch.tensor(context[-cfg.seq_len:], dtype=torch.long).unsqueeze(0)
        if self.first:
            inp = ids
        else:
            inp = tp.recv_forward(self.sc, self.b_in, step, mb, timeout=cfg.timeout_s,
                                  shape=(1, ids.shape[1], cfg.d_model), requires_grad=False)
        out = self.model(inp)
        if not self.last:
            self.sc.send_activation(self.b_out, step, mb, out, token_ids=ids)
            return None
        logits = out[0, -1].double() / max(temperature, 1e-6)
        top = torch.topk(logits, 40)
        probs = torch.softmax(top.values, dim=0)
        g = torch.Generator().manual_seed(seed * 1_000_003 + mb)
        return int(top.indices[torch.multinomial(probs, 1, generator=g)])

    def save(self, directory: str) -> str:
        path = checkpoint_path(directory, self.index)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), path)
        return str(path)

    def run_step(self, step: int, lr: float, do_eval: bool) -> Dict[str, Any]:
        start = time.perf_counter()
        loss = self.train_step(step, lr)
        evaluating = time.perf_counter()
        val = self.evaluate(step) if do_eval else None
        eval_s = time.perf_counter() - evaluating
        stats = self.sc.step(step, timeout=self.cfg.timeout_s)
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
                byte = trainer.generate_byte(int(cmd["step"]), int(cmd["mb"]), cmd["context"],
                                             float(cmd["temperature"]), trainer.cfg.seed)
                emit({"event": "generated", "stage": index, "byte": byte})
            elif cmd["cmd"] == "close":  # the end of a step that only generated
                sc.step(int(cmd["step"]), timeout=trainer.cfg.timeout_s)
                emit({"event": "closed", "stage": index})
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
