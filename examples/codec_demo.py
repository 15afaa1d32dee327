#!/usr/bin/python3
"""The MAPL codecs alone on real activations, without daemons: bytes, compression and error.

The main job (examples/llama_pipeline) runs the same codecs through mapld; docs/METHOD.md has
the math.

1. Trains a tiny byte-level causal transformer on a text corpus (the King James Bible from
   Debian's bible-kjv by default) for a few seconds with PyTorch.
2. Takes the hidden states after its first block (the boundary a pipeline would cut at) on
   held-out text: those are the activations a sidecar would ship.
3. Compresses them the MAPL way and prints, for each codec, the bytes a token costs on the wire,
   the compression against dense bf16 and the relative reconstruction error |h - h_hat| / |h|:
   fixed random U, U learned with SPEL (Stiefel steepest descent on the activations' second
   moment), and the learned U followed by int8 or by residual vector quantization.

    PYTHONPATH=build/python /usr/bin/python3 examples/codec_demo.py [--corpus FILE]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np


def load_corpus(path: str | None) -> bytes:
    if path:
        with open(path, "rb") as f:
            return f.read()
    if shutil.which("bible") is None:
        sys.exit("error: no --corpus given and Debian's bible-kjv is not installed "
                 "(apt-get install bible-kjv, or run deploy/install-deps.sh)")
    return subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], check=True,
                          capture_output=True).stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", help="text file to train on (default: the KJV Bible)")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16, help="k, the projection's rank")
    ap.add_argument("--steps", type=int, default=300, help="language-model training steps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import torch
    import mapl
    from mapl import codec

    torch.manual_seed(args.seed)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    data = np.frombuffer(load_corpus(args.corpus), dtype=np.uint8)
    split = int(len(data) * 0.9)
    train, held_out = torch.from_numpy(data[:split].astype(np.int64)), torch.from_numpy(
        data[split:].astype(np.int64))
    print(f"corpus: {len(data):,} bytes ({split:,} train, {len(data) - split:,} held out)")

    d, ctx = args.d_model, 128

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0,
                                                          batch_first=True, norm_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mask = torch.triu(torch.full((x.shape[1], x.shape[1]), float("-inf")), 1)
            return self.layer(x, src_mask=mask)

    emb = torch.nn.Embedding(256, d)
    pos = torch.nn.Parameter(torch.randn(ctx, d) * 0.02)
    blocks = torch.nn.ModuleList([Block(), Block()])
    head = torch.nn.Linear(d, 256)
    params = list(emb.parameters()) + [pos] + list(blocks.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)

    def hidden(x: torch.Tensor, upto: int) -> torch.Tensor:
        h = emb(x) + pos[: x.shape[1]]
        for b in blocks[:upto]:
            h = b(h)
        return h

    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(train) - ctx - 1, (16,), generator=g)
        x = torch.stack([train[i:i + ctx] for i in idx])
        y = torch.stack([train[i + 1:i + ctx + 1] for i in idx])
        loss = torch.nn.functional.cross_entropy(head(hidden(x, 2)).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step % 50 == 0:
            print(f"  lm step {step:4d}  loss {loss.item():.3f} nats/byte  ({time.time() - t0:.0f} s)")

    def boundary_activations(src: torch.Tensor, n_seq: int, seed: int) -> np.ndarray:
        gg = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, len(src) - ctx - 1, (n_seq,), generator=gg)
        with torch.no_grad():
            h = hidden(torch.stack([src[i:i + ctx] for i in idx]), 1)
        return h.reshape(-1, d).numpy().astype(np.float32)

    fit_h = boundary_activations(train, 64, 1)       # what the sidecar has learned from
    h = boundary_activations(held_out, 64, 2)       # what it now has to ship
    n, k = h.shape[0], args.rank
    print(f"boundary activations: {n} held-out tokens x d = {d}; rank k = {k}")

    def rel_err(h_hat: np.ndarray) -> float:
        return float(np.linalg.norm(h - h_hat) / np.linalg.norm(h))

    rng = np.random.default_rng(args.seed)
    u_fixed = codec.retract(rng.standard_normal((d, k)).astype(np.float32))
    # SPEL maximising tr(U^T S U) (descending its negation), S the activations' second moment:
    # converges to the principal subspace, the sidecar's learned projection without any gradient
    # from the model.
    # SPEL's direction msign(xi) has unit singular values, so the step size does not depend on
    # the scale of S.
    s = (fit_h.T @ fit_h / len(fit_h)).astype(np.float32)
    u = u_fixed.copy()
    m = np.zeros_like(u)
    for _ in range(200):
        u, m = codec.spel_step(u, -2 * s @ u, m, 0.05, 0.9)
    eigvec = np.linalg.eigh(s.astype(np.float64))[1][:, ::-1][:, :k].astype(np.float32)

    rows = []
    dense_bytes = 2 * d
    rows.append(("dense bf16", dense_bytes, 0.0))
    for name, basis in (("fixed random U, bf16 z", u_fixed), ("SPEL-learned U, bf16 z", u)):
        z = codec.project(h, basis)
        rows.append((name, 2 * k, rel_err(codec.lift(z, basis))))
    z = codec.project(h, u)
    q, sc = codec.Int8Codec().encode(z)
    rows.append(("learned U, int8 z", k + 4, rel_err(codec.lift(codec.Int8Codec().decode(q, sc), u))))
    z_fit = codec.project(fit_h, u)
    for levels in (2, 4):
        rvq = codec.RVQ(k, levels, 256, seed=args.seed).fit(z_fit)
        zq = rvq.decode(rvq.encode(z))
        rows.append((f"learned U, RVQ {levels} x 256", levels, rel_err(codec.lift(zq, u))))

    print(f"\n{'codec':28s} {'bytes/token':>11s} {'compression':>11s} {'rel. error':>10s}")
    for name, b, e in rows:
        print(f"{name:28s} {b:11d} {dense_bytes / b:10.1f}x {e:10.3f}")
    floor = rel_err(codec.lift(codec.project(h, eigvec), eigvec))
    print(f"\nfloor at rank {k} (exact top-{k} eigenvectors, numpy): {floor:.3f}; "
          f"mapl {mapl.__version__}, RVQ kernel: {codec.distance_kernel()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
