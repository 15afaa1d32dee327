"""Byte-level corpus with a held-out split and batches that are a pure function of the seed.

Every stage process builds its own ``Corpus`` from the same file and seed, so the first stage
(which needs the input tokens) and the last stage (which needs the targets) agree on every batch
without exchanging anything::

    corpus = Corpus(load_text(None))             # the KJV Bible (Debian's bible-kjv)
    x, y = corpus.train_batch(seed=0, step=1, microbatch=0, batch=4, seq_len=128)
    x, y = corpus.val_batch(index=0, batch=4, seq_len=128)   # the same every time
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Optional, Tuple

import torch

__all__ = ["CorpusError", "load_text", "Corpus"]

BIBLE_RANGE = "Gen1:1-Rev22:21"


class CorpusError(RuntimeError):
    """The corpus cannot be read or is too small."""


def load_text(path: Optional[str]) -> bytes:
    """The bytes of ``path``, or the King James Bible from Debian's ``bible`` when None."""
    if path:
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise CorpusError(f"--corpus {path}: {e.strerror}") from None
    if shutil.which("bible") is None:
        raise CorpusError("no --corpus given and Debian's bible-kjv is not installed: run "
                          "deploy/install-deps.sh (or apt-get install bible-kjv)")
    out = subprocess.run(["bible", "-f", BIBLE_RANGE], capture_output=True)
    if out.returncode != 0 or not out.stdout:
        raise CorpusError(f"bible -f {BIBLE_RANGE} failed ({out.returncode}): "
                          f"{out.stderr.decode(errors='replace')[-500:]}")
    return out.stdout


class Corpus:
    """The first ``train_fraction`` of the bytes for training, the rest held out."""

    def __init__(self, text: bytes, train_fraction: float = 0.9) -> None:
        data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
        split = int(len(data) * train_fraction)
        self.train, self.val = data[:split], data[split:]
        self.size = len(data)

    def check(self, seq_len: int) -> None:
        for name, part in (("training", self.train), ("validation", self.val)):
            if len(part) <= seq_len + 1:
                raise CorpusError(f"the corpus is too small: its {name} part holds {len(part)} "
                                  f"bytes, fewer than a sequence of {seq_len + 1}")

    def train_batch(self, seed: int, step: int, microbatch: int, batch: int,
                    seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (batch, seq_len) of (step, microbatch): random windows of the
        training part, drawn from a generator seeded by (seed, step, microbatch)."""
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 4099 + microbatch)
        return self._windows(self.train, torch.randint(0, len(self.train) - seq_len - 1,
                                                       (batch,), generator=g), seq_len)

    def val_batch(self, index: int, batch: int, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index`` of the fixed validation set: windows of the held-out part, the same
        for every run, seed and method. Window i starts at frac(i * golden ratio) of the part
        (a low-discrepancy sequence), so any number of batches covers all of it evenly."""
        span = len(self.val) - seq_len - 1
        i = torch.arange(index * batch, (index + 1) * batch, dtype=torch.float64)
        starts = (torch.frac(i * 0.6180339887498949) * span).long()
        return self._windows(self.val, starts, seq_len)

    @staticmethod
    def _windows(part: torch.Tensor, starts: torch.Tensor,
                 seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + torch.arange(seq_len + 1)
        seq = part[idx]
        return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
