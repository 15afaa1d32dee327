#!/usr/bin/python3
"""mapl's RVQ against FAISS's ResidualQuantizer on the same data, one thread, in one process.

Data: 65,536 vectors of dimension 64 from a Gaussian with a decaying spectrum (std of
coordinate j is exp(-j/16)), 4 levels of 256 centroids. Each library trains its own codebooks
with its default training; encoding is greedy (FAISS: max_beam_size = 1). Throughput is the
best of --repeats encodes of all vectors. Prints a table and whether the targets hold:
mapl's greedy encode >= 2x FAISS's throughput with relative MSE no worse than FAISS's.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=build/python /usr/bin/python3 bench/rvq_vs_faiss.py
"""

import argparse
import json
import os
import sys
import time

import numpy as np


def relative_mse(x: np.ndarray, y: np.ndarray) -> float:
    return float(((x - y) ** 2).sum() / (x ** 2).sum())


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--levels", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    if os.environ.get("OPENBLAS_NUM_THREADS") != "1":
        print("note: set OPENBLAS_NUM_THREADS=1 for a one-thread comparison", file=sys.stderr)
    try:
        import faiss
    except ImportError:
        print("error: FAISS is missing; install python3-faiss (deploy/install-deps.sh)", file=sys.stderr)
        return 2
    import mapl

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    spectrum = np.exp(-np.arange(args.dim) / 16.0).astype(np.float32)
    x = (rng.standard_normal((args.n, args.dim)).astype(np.float32) * spectrum)

    rows = []

    rq = faiss.ResidualQuantizer(args.dim, args.levels, 8)
    t = time.perf_counter()
    rq.train(x)
    faiss_train = time.perf_counter() - t
    rq.max_beam_size = 1
    codes = rq.compute_codes(x)
    faiss_mse = relative_mse(x, rq.decode(codes))
    faiss_enc = best_time(lambda: rq.compute_codes(x), args.repeats)
    rows.append(("faiss ResidualQuantizer", faiss_train, args.n / faiss_enc, faiss_mse))

    rvq = mapl.codec.RVQ(args.dim, args.levels, 256, seed=args.seed)
    t = time.perf_counter()
    rvq.fit(x)
    mapl_train = time.perf_counter() - t
    codes = rvq.encode(x)
    mapl_mse = relative_mse(x, rvq.decode(codes))
    mapl_enc = best_time(lambda: rvq.encode(x), args.repeats)
    rows.append((f"mapl RVQ ({mapl.codec.distance_kernel()})", mapl_train, args.n / mapl_enc,
                 mapl_mse))
    beam_n = min(args.n, 8192)
    beam_codes = rvq.encode(x[:beam_n], beam=4)
    beam_mse = relative_mse(x[:beam_n], rvq.decode(beam_codes))
    beam_enc = best_time(lambda: rvq.encode(x[:beam_n], beam=4), 1)
    rows.append(("mapl RVQ beam 4", float("nan"), beam_n / beam_enc, beam_mse))

    print(f"{args.n} x {args.dim}, {args.levels} levels x 256, one thread, "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    print(f"{'':28s} {'train s':>8s} {'encode vec/s':>13s} {'rel. MSE':>9s}")
    for name, tr, thr, mse in rows:
        print(f"{name:28s} {tr:8.2f} {thr:13.0f} {mse:9.4f}")
    speedup = faiss_enc / mapl_enc
    ok = speedup >= 2.0 and mapl_mse <= faiss_mse
    print(f"greedy encode speed-up over FAISS: {speedup:.2f}x (target >= 2x); "
          f"relative MSE {mapl_mse:.4f} vs FAISS {faiss_mse:.4f} (target: no worse): "
          f"{'PASS' if ok else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"faiss_encode_per_s": args.n / faiss_enc, "faiss_rel_mse": faiss_mse,
                       "mapl_encode_per_s": args.n / mapl_enc, "mapl_rel_mse": mapl_mse,
                       "mapl_beam4_rel_mse": beam_mse, "speedup": speedup, "pass": ok}, f,
                      indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
