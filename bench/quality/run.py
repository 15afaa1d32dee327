#!/usr/bin/python3
"""Quality benchmark: validation loss against total compression, paired by seed.

Trains the LLaMA-style model of examples/llama_pipeline through real mapld daemons (one per
stage, loopback, no rate cap: quality is measured here, not speed) with the same model, data and
token budget for each of:
  dense (bf16 both ways); the fixed random projection at four ranks k (d/4, d/8, d/16, d/64);
  MAPL (learned U and anchors) at the same ranks; MAPL with RVQ forward codes at 2, 4 and 8 levels;
  int8 backward codes throughout (the RVQ runs' can be int4 or bf16: --rvq-backward-codec), and
  one MAPL run with bf16 backward codes to show the difference.
Two scenarios: from scratch, and fine-tuning, where the benchmark first trains densely to a
checkpoint (once per seed) and inserts the compressed boundaries only then (MAPL's U starting
from the principal subspace of the activations there).

Runs are paired: every method of a seed starts from the same initialisation and sees the same
batches. The first seed runs the whole grid, every seed runs dense and both methods at the
smallest rank; the report gives per-seed differences MAPL - fixed and their spread.

    PYTHONPATH=build/python OPENBLAS_NUM_THREADS=1 /usr/bin/python3 bench/quality/run.py \\
        [--scenario scratch|finetune|both] [--seeds 0,1,2] [--out out/quality] [--smoke] \\
        [--only REGEX] [--boundary-option KEY=VALUE ...]

Writes OUT/results.json (one record per run), OUT/quality.png and OUT/report.md; each run's
summary, loss history and logs are under OUT/runs/<id>/. --resume reuses the finished runs of an
earlier results.json with the same setup (boundary options included). --only runs the entries
of the grid whose id matches a regular expression (--dry-run shows which); --boundary-option
sets a further BoundaryConfig field of every fixed and MAPL run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(HERE))

from llama_pipeline.config import (RunConfig, add_boundary_option_args,  # noqa: E402
                                   add_shape_args, parse_boundary_options)
from llama_pipeline.data import CorpusError, load_text  # noqa: E402

import report  # noqa: E402  (bench/quality/report.py)

SCENARIOS = ("scratch", "finetune")
DEFAULT_STEPS = 450  # of each from-scratch run; sized so that the default grid fits 90 minutes


@dataclass
class Spec:
    """One run of the grid."""
    scenario: str          # scratch | finetune | pretrain (the dense run a fine-tuning starts from)
    method: str            # DENSE | FIXED | MAPL
    seed: int
    k: int = 0             # 0 for DENSE
    forward_codec: str = "BF16"
    levels: int = 0        # RVQ levels; 0 unless the forward codec is RVQ
    backward_codec: str = "INT8"
    projector_init: str = "RANDOM"
    save_checkpoint: bool = False  # the dense run whose weights the seed's fine-tuning starts from

    @property
    def id(self) -> str:
        if self.method == "DENSE":
            what = "dense"
        else:
            fwd = self.forward_codec.lower() + (str(self.levels) if self.levels else "")
            what = f"{self.method.lower()}-k{self.k}-{fwd}-{self.backward_codec.lower()}"
            if self.projector_init != "RANDOM":
                what += "-" + self.projector_init.lower()
        return f"{self.scenario}-{what}-s{self.seed}"


def token_id_bytes(vocab: int) -> int:
    """The bytes of a token id in a MAPL forward frame: the narrowest width that holds vocab - 1
    (peer.proto Frame.token_id_bytes)."""
    return 1 if vocab <= 256 else 2 if vocab <= 65536 else 4


def _ranks(text: str, d: int) -> List[int]:
    """"d/4,d/16,64" -> [64, 16, 64] for d=256; each at least 1."""
    out = []
    for part in text.split(","):
        part = part.strip().replace(" ", "")
        if part.startswith("d/"):
            out.append(max(1, d // int(part[2:])))
        elif part:
            out.append(int(part))
    if not out or any(not 1 <= k <= d for k in out):
        raise ValueError(f"ranks must lie in [1, d={d}]: {text}")
    return out


def build_grid(args: argparse.Namespace) -> List[Spec]:
    """The runs in order: per scenario, per seed, the paired runs next to each other."""
    d = args.d_model
    ranks = _ranks(args.ranks, d)
    smallest = min(ranks)
    rvq_k = _ranks(args.rvq_k, d)[0]
    levels = [int(x) for x in args.rvq_levels.split(",") if x.strip()]
    scenarios = SCENARIOS if args.scenario == "both" else (args.scenario,)
    seeds = args.seed_list
    full_seeds = set(seeds[:max(1, args.full_seeds)])
    fwd = args.forward_codec
    # The from-scratch dense run is the fine-tuning checkpoint when the token budgets agree.
    reuse = "scratch" in scenarios and args.pretrain_steps == args.steps
    grid: List[Spec] = []
    for scenario in scenarios:
        mapl_init = args.finetune_projector_init if scenario == "finetune" else "RANDOM"
        for seed in seeds:
            if scenario == "finetune" and not reuse:
                grid.append(Spec("pretrain", "DENSE", seed, save_checkpoint=True))
            grid.append(Spec(scenario, "DENSE", seed,
                             save_checkpoint=scenario == "scratch" and "finetune" in scenarios))
            full = seed in full_seeds
            for k in (ranks if full else [smallest]):
                grid.append(Spec(scenario, "FIXED", seed, k, fwd))
                grid.append(Spec(scenario, "MAPL", seed, k, fwd, projector_init=mapl_init))
            if full and not args.smoke_methods:
                for lv in levels:
                    grid.append(Spec(scenario, "MAPL", seed, rvq_k, "RVQ", lv,
                                     backward_codec=args.rvq_backward_codec,
                                     projector_init=mapl_init))
                if args.bf16_backward:
                    grid.append(Spec(scenario, "MAPL", seed, rvq_k, fwd, backward_codec="BF16",
                                     projector_init=mapl_init))
            elif full and scenario == "scratch":  # smoke: one RVQ run on the first scenario
                grid.append(Spec(scenario, "MAPL", seed, rvq_k, "RVQ", levels[0],
                                 backward_codec=args.rvq_backward_codec))
    return grid


def run_config(args: argparse.Namespace, spec: Spec, corpus: str, checkpoint: Path) -> RunConfig:
    finetune = spec.scenario == "finetune"
    fields: Dict[str, Any] = dict(
        d_model=args.d_model, layers=args.layers, heads=args.heads, seq_len=args.seq_len,
        stages=args.stages, batch=args.batch, microbatches=args.microbatches,
        lr=args.finetune_lr if finetune else args.lr, seed=spec.seed,
        eval_batches=args.eval_batches, corpus=corpus, method=spec.method,
        send_rate_mbit=0.0, projector_init=spec.projector_init)
    if spec.method != "DENSE":
        fields.update(k=spec.k, forward_codec=spec.forward_codec,
                      rvq_levels=spec.levels or RunConfig.rvq_levels,
                      backward_codec=spec.backward_codec,
                      boundary_options=dict(args.boundary_options))
    if spec.save_checkpoint:
        fields["save_checkpoint"] = str(checkpoint)
    if finetune:
        fields.update(init_checkpoint=str(checkpoint), data_step_offset=args.pretrain_steps)
    return RunConfig(**fields)


def _steps(args: argparse.Namespace, spec: Spec) -> int:
    return {"scratch": args.steps, "pretrain": args.pretrain_steps,
            "finetune": args.finetune_steps}[spec.scenario]


def record(spec: Spec, cfg: RunConfig, summary: Dict[str, Any], wall: float) -> Dict[str, Any]:
    """One results.json record from a run's summary. Bytes per token are per token crossing one
    boundary: the codes from the codec's layout, the dictionary traffic as measured."""
    d, k = cfg.d_model, cfg.k
    mb_tokens = cfg.microbatch_size * cfg.seq_len
    fwd_tokens = bwd_tokens = 0
    dictionary = payload = 0
    for sides in summary["boundaries"].values():
        up, down = sides["upstream"], sides["downstream"]
        fwd_tokens += up["frames_sent"] * mb_tokens
        bwd_tokens += down["frames_sent"] * mb_tokens
        dictionary += up["wire_dictionary_bytes"]
        payload += up["wire_payload_bytes"]
    if spec.method == "DENSE":
        fwd_b, bwd_b, ids = 2 * d, 2 * d, 0
    else:
        # The codes, and a bf16 scale for int8 and int4 (two int4 codes a byte).
        scalar = {"INT8": k + 2, "INT4": (k + 1) // 2 + 2, "BF16": 2 * k}
        fwd_b = {"RVQ": spec.levels, **scalar}[spec.forward_codec]
        bwd_b = scalar[spec.backward_codec]
        ids = token_id_bytes(cfg.boundary(0)["vocab"]) if spec.method == "MAPL" else 0
    dict_per_token = dictionary / max(fwd_tokens, 1)
    return {
        "id": spec.id, "status": "ok", "scenario": spec.scenario, "seed": spec.seed,
        "method": spec.method, "k": k if spec.method != "DENSE" else None,
        "levels": spec.levels or None, "forward_codec": spec.forward_codec
        if spec.method != "DENSE" else "DENSE",
        "backward_codec": spec.backward_codec if spec.method != "DENSE" else "DENSE",
        "projector_init": spec.projector_init if spec.method == "MAPL" else None,
        "boundary_options": dict(cfg.boundary_options),
        "bytes_per_token": {"forward": fwd_b, "token_ids": ids, "backward": bwd_b,
                            "dictionary": dict_per_token,
                            "measured_payload_both_ways": payload / max(fwd_tokens, 1)},
        # As the daemons counted: raw bf16 bytes / wire bytes, evaluation frames included.
        "compression": summary["compression"],
        # Per training token: both directions of dense bf16 / (codes + ids + dictionary).
        "compression_per_train_token": 4 * d / (fwd_b + ids + bwd_b + dict_per_token),
        "final_val_loss": summary["final_val_loss"], "val_steps": summary["val_steps"],
        "val_loss": summary["val_loss"], "final_train_loss_mean10": summary["final_loss_mean10"],
        "first_train_loss": summary["first_loss"],
        "steps": summary["steps"], "tokens_trained": summary["tokens"],
        "forward_tokens": fwd_tokens, "backward_tokens": bwd_tokens,
        "train_seconds": summary["train_seconds"], "wall_seconds": wall,
        "tokens_per_second": summary["tokens_per_second"],
        "lr": cfg.lr, "init_checkpoint": cfg.init_checkpoint or None,
        "checkpoint": cfg.save_checkpoint or None,
        "out_dir": summary["out_dir"],
    }


def setup_of(args: argparse.Namespace) -> Dict[str, Any]:
    cfg = RunConfig(d_model=args.d_model, layers=args.layers, heads=args.heads,
                    seq_len=args.seq_len, stages=args.stages, batch=args.batch,
                    microbatches=args.microbatches)
    return {"d_model": args.d_model, "layers": args.layers, "heads": args.heads,
            "seq_len": args.seq_len, "stages": args.stages, "batch": args.batch,
            "microbatches": args.microbatches, "tokens_per_step": cfg.tokens_per_step,
            "steps": args.steps, "pretrain_steps": args.pretrain_steps,
            "finetune_steps": args.finetune_steps, "lr": args.lr,
            "finetune_lr": args.finetune_lr, "eval_batches": args.eval_batches,
            "corpus": args.corpus or "KJV Bible (Debian bible-kjv)",
            "send_rate_mbit": 0.0, "boundary_options": dict(args.boundary_options),
            "title": (f"LLaMA-style d={args.d_model}, {args.layers} layers, {args.stages} "
                      f"stages through mapld; {cfg.tokens_per_step:,} tokens/step")}


# Fields that must match for --resume to reuse a run.
_RESUME_KEYS = ("d_model", "layers", "heads", "seq_len", "stages", "batch", "microbatches",
                "steps", "pretrain_steps", "finetune_steps", "lr", "finetune_lr", "eval_batches",
                "corpus", "boundary_options")
# What a results.json written before a key existed had instead (it ran with the default).
_RESUME_DEFAULTS: Dict[str, Any] = {"boundary_options": {}}


def select(grid: List[Spec], only: str, stages: int, out: Path) -> List[Spec]:
    """The entries of ``grid`` whose id matches the regular expression ``only``, in grid order,
    plus the dense run that writes a selected fine-tuning run's checkpoint when that checkpoint
    is not in OUT yet. ValueError when nothing matches."""
    try:
        pattern = re.compile(only)
    except re.error as e:
        raise ValueError(f"--only {only!r} is not a regular expression: {e}") from None
    chosen = {s.id for s in grid if pattern.search(s.id)}
    if not chosen:
        raise ValueError(f"--only {only!r} matches none of the {len(grid)} runs of the grid "
                         "(--dry-run without --only lists them)")
    for spec in grid:
        if spec.id in chosen and spec.scenario == "finetune":
            checkpoint = out / "checkpoints" / f"seed{spec.seed}"
            if not all((checkpoint / f"stage{s}.pt").is_file() for s in range(stages)):
                chosen |= {s.id for s in grid if s.save_checkpoint and s.seed == spec.seed}
    return [s for s in grid if s.id in chosen]


def _eta(done: List[Dict[str, Any]], remaining: List[int]) -> Optional[float]:
    ok = [r for r in done if r.get("status") == "ok" and r["steps"]]
    if not ok:
        return None
    per_step = sum(r["train_seconds"] for r in ok) / sum(r["steps"] for r in ok)
    overhead = sum(r["wall_seconds"] - r["train_seconds"] for r in ok) / len(ok)
    return sum(s * per_step + overhead for s in remaining)


def _mmss(s: float) -> str:
    return f"{int(s // 60)}:{int(s % 60):02d}"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=_HelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]))
    d = RunConfig()
    ap.add_argument("--corpus", default="", help="a text file (default: the KJV Bible from "
                    "Debian's bible-kjv)")
    add_shape_args(ap)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                    help="steps of each from-scratch run (the token budget)")
    ap.add_argument("--pretrain-steps", type=int, default=0,
                    help="dense steps to the fine-tuning checkpoint (0: --steps)")
    ap.add_argument("--finetune-steps", type=int, default=0,
                    help="steps of each fine-tuning run (0: half of --steps)")
    ap.add_argument("--lr", type=float, default=d.lr, help="peak learning rate from scratch")
    ap.add_argument("--finetune-lr", type=float, default=1e-3,
                    help="peak learning rate when fine-tuning")
    ap.add_argument("--seed", type=int, default=None, help="one seed (same as --seeds N)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--full-seeds", type=int, default=1,
                    help="how many of the seeds (the first ones) run the whole grid; the others "
                    "run dense and both methods at the smallest rank")
    ap.add_argument("--ranks", default="d/4,d/8,d/16,d/64", help="ranks k of fixed and MAPL")
    ap.add_argument("--forward-codec", default="INT8", type=str.upper,
                    choices=("INT8", "INT4", "BF16"),
                    help="forward codec of the fixed and MAPL runs at each rank")
    ap.add_argument("--rvq-levels", default="2,4,8", help="RVQ levels of the MAPL+RVQ runs")
    ap.add_argument("--rvq-k", default="d/16", help="rank of the MAPL+RVQ and bf16-backward runs")
    ap.add_argument("--rvq-backward-codec", default="INT8", type=str.upper,
                    choices=("INT8", "INT4", "BF16"),
                    help="backward codec of the MAPL+RVQ runs (their ids name it: "
                    "scratch-mapl-k16-rvq4-int4-s0)")
    ap.add_argument("--no-bf16-backward", dest="bf16_backward", action="store_false",
                    help="skip the MAPL run with bf16 backward codes")
    ap.add_argument("--finetune-projector-init", default="PCA", type=str.upper,
                    choices=("PCA", "RANDOM"), help="MAPL's initial U when fine-tuning")
    ap.add_argument("--eval-batches", type=int, default=32,
                    help="validation microbatches per evaluation (the same held-out set for "
                    "every run)")
    ap.add_argument("--scenario", default="both", choices=("scratch", "finetune", "both"))
    ap.add_argument("--out", type=Path, default=REPO / "out" / "quality")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the finished runs of OUT/results.json (same setup)")
    ap.add_argument("--only", default="", metavar="REGEX",
                    help="run only the grid entries whose id matches this regular expression "
                    "(re.search; --dry-run lists the ids and marks the chosen ones); a chosen "
                    "fine-tuning run brings its dense checkpoint run unless OUT has the "
                    "checkpoint")
    add_boundary_option_args(ap)
    ap.add_argument("--dry-run", action="store_true", help="list the runs and stop")
    ap.add_argument("--smoke", action="store_true",
                    help="a ~2-minute version: tiny model, few steps, one seed, few methods")
    args = ap.parse_args(argv)
    args.smoke_methods = False
    if args.smoke:
        # Only what the user did not set explicitly changes.
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        smoke = {"--d-model": ("d_model", 64), "--layers": ("layers", 2),
                 "--steps": ("steps", 80), "--finetune-steps": ("finetune_steps", 40),
                 "--eval-batches": ("eval_batches", 8),
                 "--ranks": ("ranks", "d/16"), "--rvq-levels": ("rvq_levels", "2")}
        for flag, (name, value) in smoke.items():
            if flag not in given:
                setattr(args, name, value)
        if "--seeds" not in given and args.seed is None:
            args.seeds = "0"
        args.smoke_methods = True
    args.seed_list = [args.seed] if args.seed is not None else [
        int(s) for s in args.seeds.split(",") if s.strip()]
    args.pretrain_steps = args.pretrain_steps or args.steps
    args.finetune_steps = args.finetune_steps or max(1, args.steps // 2)
    try:
        args.boundary_options = parse_boundary_options(args.boundary_option)
        full_grid = build_grid(args)
        for spec in full_grid:  # validates every configuration before anything runs
            run_config(args, spec, "", Path("/"))
        grid = (select(full_grid, args.only, args.stages, args.out.resolve()) if args.only
                else full_grid)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    steps = [_steps(args, s) for s in grid]
    print(f"quality benchmark: {len(grid)} runs"
          + (f" of the grid's {len(full_grid)} (--only {args.only})" if args.only else "")
          + f", {sum(steps):,} steps in all; out: {args.out}"
          + "".join(f"\n  boundary option (fixed and MAPL): {k}={v}"
                    for k, v in args.boundary_options.items()))
    if args.dry_run:
        chosen = {s.id for s in grid}
        matched = re.compile(args.only).search if args.only else None
        for spec in full_grid:
            mark = "*" if args.only and spec.id in chosen else " "
            why = ("  (writes a chosen fine-tuning run's checkpoint)"
                   if matched and spec.id in chosen and not matched(spec.id) else "")
            print(f" {mark} {spec.id}  ({_steps(args, spec)} steps){why}")
        if args.only:
            print("(* : chosen by --only)")
        return 0
    try:
        import mapl  # noqa: F401
    except ImportError:
        print("error: the mapl Python package is not importable: build the project and run "
              "with PYTHONPATH=build/python", file=sys.stderr)
        return 2
    from llama_pipeline.run import PipelineError, run as run_pipeline

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        if args.corpus:
            corpus = str(Path(args.corpus).resolve())
            load_text(corpus)
        else:
            corpus = str(out / "corpus.txt")
            if not Path(corpus).is_file():
                Path(corpus).write_bytes(load_text(None))
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    setup = setup_of(args)
    results_path = out / "results.json"
    previous: Dict[str, Dict[str, Any]] = {}
    if args.resume and results_path.is_file():
        old = json.loads(results_path.read_text())
        old_setup = old.get("setup", {})
        diff = [k for k in _RESUME_KEYS
                if old_setup.get(k, _RESUME_DEFAULTS.get(k)) != setup.get(k)]
        if diff:
            print(f"error: --resume: {results_path} has another setup ({', '.join(diff)})",
                  file=sys.stderr)
            return 2
        previous = {r["id"]: r for r in old["runs"] if r.get("status") == "ok"}
    results: Dict[str, Any] = {"setup": setup, "runs": []}

    def save() -> Dict[str, Any]:
        # Finished runs of the earlier results.json that this pass has not reached yet (or that
        # --only left out) are kept, so an interrupted --resume loses nothing.
        done = {r["id"] for r in results["runs"]}
        later = [previous[s.id] for s in full_grid if s.id in previous and s.id not in done]
        whole = {**results, "runs": results["runs"] + later}
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(whole, indent=1))
        tmp.replace(results_path)
        return whole

    started = time.monotonic()
    failed_pretrain: set = set()
    try:
        for i, (spec, n) in enumerate(zip(grid, steps)):
            checkpoint = out / "checkpoints" / f"seed{spec.seed}"
            if spec.id in previous and (not spec.save_checkpoint or all(
                    (checkpoint / f"stage{s}.pt").is_file() for s in range(args.stages))):
                results["runs"].append(previous[spec.id])
                print(f"[{i + 1}/{len(grid)}] {spec.id}: reused from {results_path.name}")
                continue
            if spec.scenario == "finetune" and spec.seed in failed_pretrain:
                results["runs"].append({**asdict(spec), "id": spec.id, "status": "skipped",
                                        "error": "its dense checkpoint run failed"})
                save()
                continue
            cfg = run_config(args, spec, corpus, checkpoint)
            run_dir = out / "runs" / spec.id
            run_dir.mkdir(parents=True, exist_ok=True)
            eta = _eta(results["runs"], steps[i:])
            print(f"[{i + 1}/{len(grid)}] {spec.id}: {n} steps"
                  + (f"  (elapsed {_mmss(time.monotonic() - started)}, about {_mmss(eta)} "
                     "left)" if eta is not None else ""), flush=True)
            with open(run_dir / "run.log", "w") as logf:
                def log(line: str) -> None:
                    logf.write(line + "\n")
                    logf.flush()
                t = time.monotonic()
                try:
                    summary = run_pipeline(cfg, run_dir, max_steps=n, log=log, plot=False)
                except (PipelineError, ValueError, CorpusError) as e:
                    print(f"    FAILED: {str(e).splitlines()[0]} (log: {run_dir / 'run.log'})")
                    log(f"error: {e}")
                    results["runs"].append({**asdict(spec), "id": spec.id, "status": "failed",
                                            "error": str(e)})
                    if spec.save_checkpoint:
                        failed_pretrain.add(spec.seed)
                    save()
                    continue
                wall = time.monotonic() - t
            r = record(spec, cfg, summary, wall)
            results["runs"].append(r)
            save()
            print(f"    val {r['final_val_loss']:.4f}  compression {r['compression']:.1f}x  "
                  f"{r['tokens_per_second']:,.0f} tok/s  {wall:.0f} s", flush=True)
    except KeyboardInterrupt:
        save()
        print(f"\ninterrupted: stopped every process; {len(results['runs'])} runs done in this "
              f"pass; {results_path} keeps every finished run (--resume continues)",
              file=sys.stderr)
        return 130
    results["wall_seconds"] = time.monotonic() - started
    whole = save()  # the report covers the runs kept from an earlier pass too
    png = out / "quality.png"
    text = report.report(whole, png)
    (out / "report.md").write_text(text)
    print()
    print(text)
    print(f"results: {results_path}\nplot: {png}\nwall time {_mmss(results['wall_seconds'])}")
    return 0 if all(r.get("status") == "ok" for r in results["runs"]) else 1


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
