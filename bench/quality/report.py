#!/usr/bin/python3
"""Tables and the plot of the quality benchmark, from its results.json.

    /usr/bin/python3 bench/quality/report.py out/quality/results.json   # table, PNG beside it
    /usr/bin/python3 bench/quality/report.py base/results.json bf16/results.json --png x.png

``run.py`` calls these at the end of a grid; this script redoes them from a results file (for
example after editing the plot, or for a grid that was interrupted and resumed), or from several
of the same setup that differ only in their boundary options (run.py --boundary-option), so that
runs with other options are compared with the same dense run, each in its own row.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["series_label", "table", "paired_differences", "plot", "merge", "main"]

SCENARIO_TITLES = {"scratch": "from scratch",
                   "finetune": "fine-tuning from a dense checkpoint"}
# Plot order and style of each series.
SERIES_STYLE = {
    "fixed": dict(color="tab:orange", marker="s"),
    "MAPL": dict(color="tab:blue", marker="o"),
    "MAPL+RVQ": dict(color="tab:green", marker="^"),
    "MAPL, bwd BF16": dict(color="tab:purple", marker="D"),
}
# Colours of the series with boundary options (run.py --boundary-option), in order.
EXTRA_COLORS = ["tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]


def options_label(r: Dict[str, Any]) -> str:
    """The run's extra BoundaryConfig fields (run.py --boundary-option), "" when none."""
    return ", ".join(f"{k}={v}" for k, v in sorted((r.get("boundary_options") or {}).items()))


def series_label(r: Dict[str, Any]) -> str:
    """The line a record belongs to: one per method (RVQ and the bf16 backward separately) and
    per set of boundary options."""
    if r["method"] == "DENSE":
        return "dense"
    if r["method"] == "FIXED":
        name = "fixed"
    elif r["forward_codec"] == "RVQ":  # run.py --rvq-backward-codec: a series of its own
        name = "MAPL+RVQ" + (f", bwd {r['backward_codec']}" if r["backward_codec"] != "INT8"
                             else "")
    elif r["backward_codec"] != "INT8":
        name = f"MAPL, bwd {r['backward_codec']}"
    else:
        name = "MAPL"
    options = options_label(r)
    return f"{name} [{options}]" if options else name


def config_key(r: Dict[str, Any]) -> Tuple:
    """What identifies a configuration across seeds."""
    return (r["scenario"], r["method"], r["k"], r["forward_codec"], r["levels"],
            r["backward_codec"], r.get("projector_init", "RANDOM"), options_label(r))


def _ok(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [r for r in records if r.get("status") == "ok" and r.get("final_val_loss") is not None
            and r["scenario"] != "pretrain"]


def _spread(xs: Sequence[float]) -> Optional[float]:
    return statistics.stdev(xs) if len(xs) > 1 else None


def _fmt(x: Optional[float], digits: int = 3, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _codec(r: Dict[str, Any]) -> str:
    if r["method"] == "DENSE":
        return "bf16 / bf16 (dense)"
    fwd = r["forward_codec"] + (f"x{r['levels']}" if r["forward_codec"] == "RVQ" else "")
    return f"{fwd} / {r['backward_codec']}"


def _dense_by_seed(records: Sequence[Dict[str, Any]], scenario: str) -> Dict[int, float]:
    return {r["seed"]: r["final_val_loss"] for r in records
            if r["scenario"] == scenario and r["method"] == "DENSE"}


def table(records: Sequence[Dict[str, Any]]) -> str:
    """Markdown: one row per configuration, seeds pooled; the loss relative to dense is the mean
    of the per-seed (paired) relative differences."""
    ok = _ok(records)
    groups: Dict[Tuple, List[Dict[str, Any]]] = defaultdict(list)
    for r in ok:
        groups[config_key(r)].append(r)
    lines = ["| scenario | method | k | forward / backward | B/token fwd+ids+bwd+dict | "
             "compression | seeds | val loss (per seed) | mean | vs dense (paired) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = {"scratch": 0, "finetune": 1}
    series = ["dense"] + list(SERIES_STYLE)

    def sort_key(key: Tuple) -> Tuple:
        name = series_label(groups[key][0]).split(" [")[0]
        return (order.get(key[0], 9), key[1] != "DENSE", -(key[2] or 0),
                series.index(name) if name in series else len(series), key[4] or 0, key[7])

    for key in sorted(groups, key=sort_key):
        rs = sorted(groups[key], key=lambda r: r["seed"])
        dense = _dense_by_seed(ok, key[0])
        losses = [r["final_val_loss"] for r in rs]
        rel = [(r["final_val_loss"] - dense[r["seed"]]) / dense[r["seed"]] * 100
               for r in rs if r["seed"] in dense]
        b = rs[0]["bytes_per_token"]
        per_tok = (f"{b['forward']:.0f}+{b['token_ids']:.0f}+{b['backward']:.0f}"
                   f"+{statistics.mean(r['bytes_per_token']['dictionary'] for r in rs):.2f}")
        comp = statistics.mean(r["compression"] for r in rs)
        rel_s = "-" if rs[0]["method"] == "DENSE" or not rel else (
            f"{statistics.mean(rel):+.2f} %" + (f" (sd {_spread(rel):.2f})" if len(rel) > 1
                                               else ""))
        label = series_label(rs[0]) + (" (PCA init)" if rs[0].get("projector_init") == "PCA"
                                       else "")
        lines.append(
            f"| {key[0]} | {label} | {rs[0]['k'] if rs[0]['method'] != 'DENSE' else '-'} | "
            f"{_codec(rs[0])} | {per_tok} | {comp:.1f}x | "
            f"{','.join(str(r['seed']) for r in rs)} | "
            f"{', '.join(f'{x:.3f}' for x in losses)} | {statistics.mean(losses):.3f} | "
            f"{rel_s} |")
    return "\n".join(lines)


def paired_differences(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per scenario and rank: val loss of MAPL minus fixed, seed by seed (same init and data)."""
    ok = _ok(records)
    out = []
    for scenario in sorted({r["scenario"] for r in ok}, key=lambda s: s != "scratch"):
        def pick(method: str) -> Dict[Tuple[int, int], Dict[str, Any]]:
            return {(r["k"], r["seed"]): r for r in ok
                    if r["scenario"] == scenario and r["method"] == method
                    and r["forward_codec"] != "RVQ" and r["backward_codec"] == "INT8"
                    and not options_label(r)}
        fixed, mapl = pick("FIXED"), pick("MAPL")
        for k in sorted({k for k, _ in fixed} & {k for k, _ in mapl}, reverse=True):
            seeds = sorted(s for kk, s in fixed if kk == k and (k, s) in mapl)
            diffs = [mapl[(k, s)]["final_val_loss"] - fixed[(k, s)]["final_val_loss"]
                     for s in seeds]
            if not diffs:
                continue
            out.append({"scenario": scenario, "k": k, "seeds": seeds,
                        "fixed": [fixed[(k, s)]["final_val_loss"] for s in seeds],
                        "mapl": [mapl[(k, s)]["final_val_loss"] for s in seeds],
                        "diff": diffs, "mean": statistics.mean(diffs), "sd": _spread(diffs),
                        "min": min(diffs), "max": max(diffs),
                        "compression_fixed": statistics.mean(
                            fixed[(k, s)]["compression"] for s in seeds),
                        "compression_mapl": statistics.mean(
                            mapl[(k, s)]["compression"] for s in seeds)})
    return out


def paired_table(diffs: Sequence[Dict[str, Any]]) -> str:
    lines = ["| scenario | k | seeds | fixed | MAPL | MAPL - fixed (per seed) | mean | sd | "
             "mean / sd |",
             "|---|---|---|---|---|---|---|---|---|"]
    for d in diffs:
        ratio = (d["mean"] / d["sd"]) if d["sd"] else None
        lines.append(
            f"| {d['scenario']} | {d['k']} | {','.join(map(str, d['seeds']))} | "
            f"{', '.join(f'{x:.3f}' for x in d['fixed'])} | "
            f"{', '.join(f'{x:.3f}' for x in d['mapl'])} | "
            f"{', '.join(f'{x:+.3f}' for x in d['diff'])} | {d['mean']:+.3f} | "
            f"{_fmt(d['sd'])} | {_fmt(ratio, 1, signed=True)} |")
    return "\n".join(lines)


def plot(records: Sequence[Dict[str, Any]], path: Path, title: str = "") -> Path:
    """Validation loss against total compression (log x), one panel per scenario, one line per
    method (mean over the seeds a point has; bars: min to max over them), dense as a horizontal
    line (mean over its seeds; band: min to max)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib import ticker

    ok = _ok(records)
    scenarios = [s for s in ("scratch", "finetune") if any(r["scenario"] == s for r in ok)]
    scenarios += sorted({r["scenario"] for r in ok} - set(scenarios))
    fig, axes = plt.subplots(1, max(1, len(scenarios)), figsize=(6.2 * max(1, len(scenarios)),
                                                                 4.8), dpi=110, squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        rs = [r for r in ok if r["scenario"] == scenario]
        dense = [r["final_val_loss"] for r in rs if r["method"] == "DENSE"]
        if dense:
            mean = statistics.mean(dense)
            ax.axhline(mean, color="black", lw=1.3, ls="--",
                       label=f"dense bf16 (1x), {len(dense)} seed{'s' * (len(dense) > 1)}")
            if len(dense) > 1:
                ax.axhspan(min(dense), max(dense), color="black", alpha=0.08, lw=0)
        by_series: Dict[str, Dict[Tuple, List[Dict[str, Any]]]] = defaultdict(
            lambda: defaultdict(list))
        for r in rs:
            if r["method"] != "DENSE":
                by_series[series_label(r)][config_key(r)].append(r)
        names = [n for n in SERIES_STYLE if n in by_series]
        names += sorted(set(by_series) - set(names))
        extra_colors = iter(EXTRA_COLORS * len(names))
        for name in names:
            style = SERIES_STYLE.get(name)
            if style is None:  # a method with boundary options: its method's marker, own colour
                base = SERIES_STYLE.get(name.split(" [")[0], dict(marker="x"))
                style = dict(base, color=next(extra_colors))
            pts = []
            for key, group in by_series[name].items():
                losses = [r["final_val_loss"] for r in group]
                x = statistics.mean(r["compression"] for r in group)
                y = statistics.mean(losses)
                tag = (f"L={group[0]['levels']}" if group[0]["forward_codec"] == "RVQ"
                       else f"k={group[0]['k']}")
                if len(group) > 1:
                    tag += f" ({len(group)} seeds)"
                pts.append((x, y, min(losses), max(losses), tag))
            pts.sort()
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            init = ""
            if scenario == "finetune" and name.startswith("MAPL"):
                inits = {r.get("projector_init", "RANDOM") for g in by_series[name].values()
                         for r in g}
                init = " (U from PCA)" if inits == {"PCA"} else ""
            ax.plot(xs, ys, lw=1.4, ms=6, label=name + init, **style)
            for x, y, lo, hi, tag in pts:
                if hi > lo:
                    ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], color=style["color"],
                                capsize=3, lw=1)
                ax.annotate(tag, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=style["color"])
        ax.set_xscale("log")
        xs_all = [r["compression"] for r in rs] or [1.0]
        ax.set_xlim(0.8, max(xs_all) * 1.6)  # dense (1x) at the left edge
        ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("total compression against dense bf16, both directions (log)")
        ax.set_ylabel("final validation loss (nats per byte)")
        ax.set_title(SCENARIO_TITLES.get(scenario, scenario), fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def report(results: Dict[str, Any], png: Path) -> str:
    """The markdown report (also printed by run.py at the end) and the PNG."""
    records = results["runs"]
    failed = [r for r in records if r.get("status") != "ok"]
    setup = results.get("setup", {})
    head = ""
    if setup:
        head = (f"model d={setup.get('d_model')}, {setup.get('layers')} layers, "
                f"{setup.get('stages')} stages; {setup.get('tokens_per_step'):,} tokens a step; "
                f"scratch {setup.get('steps')} steps, fine-tuning {setup.get('finetune_steps')} "
                f"steps after {setup.get('pretrain_steps')} dense ones\n\n")
        if setup.get("boundary_options"):
            head += ("boundary options of every fixed and MAPL run: " + ", ".join(
                f"{k}={v}" for k, v in setup["boundary_options"].items()) + "\n\n")
    pre = [r for r in records if r.get("checkpoint") and r.get("status") == "ok"]
    if pre:
        head += "dense checkpoints (fine-tuning starts here): " + ", ".join(
            f"seed {r['seed']} val {r['final_val_loss']:.3f} ({r['id']})" for r in pre) + "\n\n"
    text = head + "### Runs\n\n" + table(records) + "\n\n"
    text += ("B/token: bytes a token crosses one boundary with: forward codes + token ids + "
             "backward codes + dictionary traffic (measured); dense bf16 is "
             f"{2 * setup.get('d_model', 0)}+0+{2 * setup.get('d_model', 0)}. compression: "
             "raw bf16 bytes / wire bytes, as the daemons counted them (evaluation frames "
             "included).\n\n")
    diffs = paired_differences(records)
    if diffs:
        text += ("### Paired differences, MAPL - fixed (validation loss; negative: MAPL "
                 "better)\n\n" + paired_table(diffs) + "\n")
    if failed:
        text += "\n### Failed runs\n\n" + "\n".join(
            f"- {r['id']}: {r.get('error', '?').splitlines()[0]}" for r in failed) + "\n"
    title = setup.get("title", "") + "".join(
        f"; {k}={v}" for k, v in (setup.get("boundary_options") or {}).items())
    plot(records, png, title=title)
    return text


# Setup fields that must agree for results files to be reported together (run.py's resume
# keys, boundary options aside: those are per row).
_MERGE_KEYS = ("d_model", "layers", "heads", "seq_len", "stages", "batch", "microbatches",
               "steps", "pretrain_steps", "finetune_steps", "lr", "finetune_lr", "eval_batches",
               "corpus")


def merge(named: Sequence[Tuple[str, Dict[str, Any]]]) -> Tuple[Dict[str, Any], List[str]]:
    """One results dict from several (name, results) of the same setup, and warnings. A run
    present in more than one file with the same boundary options is taken from the first; the
    setup is the first file's, without boundary options (they are shown per row).
    ValueError when the setups differ in anything else."""
    first_name, first = named[0]
    setup = dict(first.get("setup", {}))
    runs: List[Dict[str, Any]] = []
    seen: Dict[Tuple[str, str], str] = {}
    warnings: List[str] = []
    for name, results in named:
        other = results.get("setup", {})
        diff = [k for k in _MERGE_KEYS if other.get(k) != setup.get(k)]
        if diff:
            raise ValueError(f"{name} has another setup than {first_name} "
                             f"({', '.join(diff)}): report them separately")
        for r in results["runs"]:
            r = dict(r)
            # A record of a run that predates per-run options ran with its file's options.
            if r.get("method") != "DENSE" and "boundary_options" not in r:
                r["boundary_options"] = dict(other.get("boundary_options") or {})
            key = (r["id"], options_label(r))
            if key in seen:
                warnings.append(f"{r['id']} ({options_label(r) or 'no options'}) is in both "
                                f"{seen[key]} and {name}: kept the one of {seen[key]}")
                continue
            seen[key] = name
            runs.append(r)
    if len(named) > 1:
        setup.pop("boundary_options", None)
    return {"setup": setup, "runs": runs}, warnings


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, nargs="+",
                    help="results.json of bench/quality/run.py; several: reported together")
    ap.add_argument("--png", type=Path, default=None,
                    help="default: quality.png beside the (first) results file")
    args = ap.parse_args(argv)
    try:
        results, warnings = merge([(str(p), json.loads(p.read_text())) for p in args.results])
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    png = args.png or args.results[0].with_name("quality.png")
    print(report(results, png))
    print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
