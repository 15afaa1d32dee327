#!/usr/bin/python3
"""The main job: a LLaMA-style model trained across pipeline stages whose only link is mapl.

Starts one mapld per stage on loopback (each capping its send rate to emulate a slow link), one
trainer process per stage, drives them in lock step, shows progress (step, training loss,
tokens/s, wire bytes a step and the compression the daemons measured), evaluates the validation
loss a few times and at the end, prints a summary, writes the loss curve as a PNG (with the
codec's health below it: each boundary's forward relative error, and codec against wire seconds
per microbatch, from the daemons' stats of each step), and stops every process it started, also
on Ctrl-C or when one of them fails (then it says which and why).

    PYTHONPATH=build/python OPENBLAS_NUM_THREADS=1 /usr/bin/python3 \\
        examples/llama_pipeline/run.py [--minutes 3] [--method MAPL|FIXED|DENSE] [--k 16]

From Python (the CI test does this)::

    summary = run(RunConfig(d_model=64, layers=2), out_dir=Path("out"), max_steps=40)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_pipeline.config import (BACKWARD_CODECS, CODECS, METHODS,  # noqa: E402
                                   PROJECTOR_INITS, TRANSPORTS, RunConfig, add_shape_args)
from llama_pipeline.data import Corpus, CorpusError, load_text  # noqa: E402
from llama_pipeline.model import layer_ranges  # noqa: E402

__all__ = ["RunConfig", "PipelineError", "StagePlacement", "run", "main"]

EXAMPLES_DIR = Path(__file__).resolve().parents[1]
DEFAULT_OUT = EXAMPLES_DIR.parent / "out" / "llama_pipeline"
# The dense run the demo compares itself with (run.py --method DENSE --write-reference ...; the
# command and the machine are in the README's "The main job" section).
DENSE_REFERENCE = EXAMPLES_DIR / "llama_pipeline" / "dense_reference.json"
EVAL_FRACTIONS = (0.25, 0.5, 0.75)  # of the run, besides the final evaluation
Log = Callable[[str], None]


class PipelineError(RuntimeError):
    """A daemon or a stage process failed; the message says which, why, and ends with its log."""


@dataclass
class StagePlacement:
    """Where one stage's daemon and trainer run, and how its peer links connect. The default is
    this machine's loopback. ``wrap`` prefixes both processes' command lines (for example
    ``["ip", "netns", "exec", "ns0"]``: a network namespace; the wrapper must exec the command).
    ``peer_listen``: where the stage's daemon accepts the link from the stage before it.
    ``dial``: the address its daemon dials for the link to the next stage (a relay, say);
    empty: 127.0.0.1 and the port the next stage's daemon got. ``daemon_wrap`` prefixes the
    daemon's command line only, after ``wrap`` (for example ``buildah run CONTAINER --``: the daemon
    in a container, the trainer outside it; $MAPLD then names mapld's path in the container)."""
    wrap: List[str] = field(default_factory=list)
    peer_listen: str = "127.0.0.1:0"
    dial: str = ""
    daemon_wrap: List[str] = field(default_factory=list)


# How the log names each pipeline schedule (config.SCHEDULES).
SCHEDULE_NAMES = {"gpipe": "GPipe", "1f1b": "1F1B"}


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return "  (no log)"
    return "\n".join("  | " + line for line in text[-lines:])


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class _StageProc:
    """A stage trainer process and the thread that reads its protocol lines."""

    def __init__(self, index: int, argv: List[str], env: Dict[str, str], log: Path,
                 events: "queue.Queue[tuple]") -> None:
        self.index, self.log_path = index, log
        self._log = open(log, "wb")
        # A session of its own: Ctrl-C reaches the launcher only, which stops the stages in order.
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, env=env, text=True, bufsize=1,
                                     start_new_session=True)
        self.error: Optional[str] = None
        self._reader = threading.Thread(target=self._read, args=(events,), daemon=True)
        self._reader.start()

    def _read(self, events: "queue.Queue[tuple]") -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                events.put((self.index, json.loads(line)))
            except json.JSONDecodeError:
                continue
        events.put((self.index, None))  # EOF: the process is gone or going

    def send(self, message: Dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # it died; the reader reports it

    def stop(self, timeout: float, graceful: bool = True) -> None:
        """Graceful: ask it to stop after its current step; otherwise (a peer failed, so it may
        be blocked waiting for a tensor) SIGTERM at once. SIGKILL after a grace period."""
        if self.proc.poll() is None:
            if graceful:
                self.send({"cmd": "stop"})
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        self._log.close()


def pipeline_description(cfg: RunConfig) -> Any:
    """The run's mapl.pipeline.Description: cfg.pipeline's file, checked against the model
    (d of every boundary is d_model, one [[stages]] table per stage, max_tokens holds a
    microbatch), or else one made from the run's own settings (method, k, codecs, seeds,
    send_rate_mbit), so that both make the daemons' configs the same way. ValueError
    (mapl.pipeline.DescriptionError) naming the file and what differs."""
    from mapl import pipeline
    if not cfg.pipeline:
        data: Dict[str, Any] = {
            "pipeline": {"name": "llama"},
            "daemon": {"send_rate_mbit": cfg.send_rate_mbit} if cfg.send_rate_mbit > 0 else {},
            "stages": [{"site": "local"} for _ in range(cfg.stages)],
            "boundaries": {str(b): {k: v for k, v in cfg.boundary(b).items() if k != "id"}
                           for b in range(cfg.stages - 1)}}
        return pipeline.parse(data, "<the run's settings>")
    desc = pipeline.load(cfg.pipeline)
    if len(desc.stages) != cfg.stages:
        raise pipeline.DescriptionError(
            f"{cfg.pipeline}: {len(desc.stages)} stages ([[stages]] tables), but the run has "
            f"{cfg.stages}: pass --stages {len(desc.stages)} (and at least as many --layers)")
    rows = cfg.microbatch_size * cfg.seq_len
    for b in desc.boundaries:
        if b.fields["d"] != cfg.d_model:
            raise pipeline.DescriptionError(
                f"{cfg.pipeline}: boundary {b.index} has d = {b.fields['d']}, but the model's "
                f"d_model is {cfg.d_model}: pass --d-model {b.fields['d']} or change d in "
                "[boundary] / [boundaries.N]")
        if b.fields.get("max_tokens", 4096) < rows:
            raise pipeline.DescriptionError(
                f"{cfg.pipeline}: boundary {b.index} has max_tokens = "
                f"{b.fields.get('max_tokens', 4096)}, fewer than a microbatch's {rows} rows "
                f"({cfg.microbatch_size} sequences of {cfg.seq_len}): raise max_tokens or "
                "shrink --batch / --seq-len")
    return desc


def _described_settings(cfg: RunConfig, log: Log = print) -> Dict[str, Any]:
    """RunConfig fields that cfg.pipeline's description fixes, so that the run's log and summary
    tell its truth: the send cap, and the method, k and codecs when every boundary has the same
    (otherwise the log's boundary line shows the command line's, and this logs each)."""
    desc = pipeline_description(cfg)
    out: Dict[str, Any] = {"send_rate_mbit": float(desc.daemon.get("send_rate_mbit", 0.0))}
    keys = ("method", "k", "forward_codec", "backward_codec", "rvq_levels", "transport")
    first = desc.boundaries[0].fields
    if all(b.fields.get(k) == first.get(k) for b in desc.boundaries for k in keys):
        out["transport"] = first.get("transport", "TRANSPORT_GRPC")[len("TRANSPORT_"):].lower()
        if out["transport"] == "unspecified":
            out["transport"] = "grpc"
        out["method"] = first.get("method", "METHOD_MAPL")[len("METHOD_"):]
        for key in ("forward_codec", "backward_codec"):
            if key in first:
                out[key] = first[key][len("CODEC_"):]
        for key in ("k", "rvq_levels"):
            if key in first:
                out[key] = first[key]
    else:
        for b in desc.boundaries:
            log(f"pipeline {Path(cfg.pipeline).name}: boundary {b.index}: "
                + ", ".join(f"{k} {b.fields[k]}" for k in keys if k in b.fields))
    return out


class Pipeline:
    """The daemons and stage processes of one run; a context manager that stops them all."""

    def __init__(self, cfg: RunConfig, log_dir: Path,
                 placement: Optional[List[StagePlacement]] = None) -> None:
        self.cfg, self.log_dir = cfg, log_dir
        self.placement = placement or [StagePlacement() for _ in range(cfg.stages)]
        self.events: "queue.Queue[tuple]" = queue.Queue()
        self.daemons: Dict[int, Any] = {}  # stage -> mapl.launch.Daemon
        self.stages: List[_StageProc] = []
        self.ready: Dict[int, Dict[str, Any]] = {}
        # Sockets, configs and ready files: a short path (Unix sockets hold 107 bytes).
        self.tmp = Path(tempfile.mkdtemp(prefix="mapl-llama-", dir="/tmp"))

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(graceful=exc_type is None)

    def start(self, config_path: Path) -> None:
        from mapl import launch  # the daemons' side of the package; needs the built mapld

        cfg = self.cfg
        desc = pipeline_description(cfg)
        tensor_bytes = cfg.microbatch_size * cfg.seq_len * cfg.d_model * 4
        extra: Dict[str, Any] = {
            "client_buffers": 4, "client_buffer_bytes": max(4 << 20, 8 * tensor_bytes),
            "recv_timeout_ms": int(cfg.timeout_s * 1000)}
        # Each boundary's listener starts first (by default the downstream: from the last
        # stage); a placement's dial address is where its stage dials the next one.
        peer_address = {s + 1: p.dial for s, p in enumerate(self.placement) if p.dial}
        try:
            # Loopback delivers in milliseconds: a short drain bounds the stop when a peer is
            # gone.
            self.daemons.update(launch.start_pipeline(
                desc, self.tmp, daemon=extra, args=["--drain_seconds", "5"],
                peer_listen={s: p.peer_listen for s, p in enumerate(self.placement)},
                peer_address=peer_address,
                wrap={s: p.wrap + p.daemon_wrap for s, p in enumerate(self.placement)
                      if p.wrap or p.daemon_wrap}))
        except launch.LaunchError as e:
            raise PipelineError(str(e)) from None
        daemons = self.daemons
        import mapl
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join(
            [str(EXAMPLES_DIR), str(Path(mapl.__file__).resolve().parents[1])]
            + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        for s in range(cfg.stages):
            argv = [sys.executable, "-m", "llama_pipeline.stage", "--config", str(config_path),
                    "--stage", str(s), "--socket", daemons[s].socket_path]
            self.stages.append(_StageProc(s, self.placement[s].wrap + argv, env,
                                          self.log_dir / f"stage{s}.log", self.events))
        self.ready = self.wait("ready", timeout=120)

    def send_all(self, message: Dict[str, Any]) -> None:
        for st in self.stages:
            st.send(message)

    def wait(self, event: str, timeout: float) -> Dict[int, Dict[str, Any]]:
        """The next ``event`` message of every stage; PipelineError naming the culprit if a
        process dies, reports an error, or the stages do not all answer within ``timeout``."""
        got: Dict[int, Dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(self.stages):
            try:
                index, msg = self.events.get(timeout=0.25)
            except queue.Empty:
                self.check_daemons()
                if time.monotonic() > deadline:
                    missing = sorted(set(range(len(self.stages))) - set(got))
                    raise PipelineError(
                        f"stage {missing[0]} did not report '{event}' within {timeout:.0f} s; "
                        f"its log ({self.stages[missing[0]].log_path}) ends:\n"
                        f"{_tail(self.stages[missing[0]].log_path)}")
                continue
            st = self.stages[index]
            if msg is not None and msg.get("event") == "error":
                st.error = msg.get("message")
                continue
            if msg is None:
                self.check_daemons()  # a dead daemon is the likelier root cause
                code = st.proc.wait()
                how = (f"was killed by {signal.Signals(-code).name}" if code < 0 else
                       f"exited with code {code}")
                why = f": {st.error}" if st.error else ""
                raise PipelineError(f"stage {index} (pid {st.proc.pid}) {how}{why}\n"
                                    f"its log ({st.log_path}) ends:\n{_tail(st.log_path)}")
            if msg.get("event") == event:
                got[index] = msg
        return got

    def check_daemons(self) -> None:
        for s, d in self.daemons.items():
            code = d.proc.poll()
            if code is not None:
                how = (f"was killed by {signal.Signals(-code).name}" if code < 0 else
                       f"exited with code {code}")
                raise PipelineError(f"mapld of stage {s} (pid {d.proc.pid}) {how}; its log "
                                    f"({self.log_dir / ('mapld-' + d.log_path.stem + '.log')}) "
                                    f"ends:\n{_tail(d.log_path)}")

    def close(self, graceful: bool = True) -> None:
        """Stages first (they hold sessions on the daemons), then the daemons (they drain)."""
        for st in self.stages:
            st.stop(timeout=15 if graceful else 5, graceful=graceful)
        for d in self.daemons.values():
            try:
                d.stop(timeout=20)
            except Exception:  # noqa: BLE001 - best effort: stop the others too
                d.kill()
        for d in self.daemons.values():
            try:
                shutil.copy(d.log_path, self.log_dir / f"mapld-{d.log_path.stem}.log")
            except OSError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class History:
    steps: List[int] = field(default_factory=list)
    loss: List[float] = field(default_factory=list)
    seconds: List[float] = field(default_factory=list)      # since training started
    val_steps: List[int] = field(default_factory=list)
    val_loss: List[float] = field(default_factory=list)
    # Training seconds at each evaluation: since training started, minus the time evaluations
    # took (the slowest stage's, as the stages report it), this one's included.
    val_train_seconds: List[float] = field(default_factory=list)
    eval_seconds: float = 0.0
    boundaries: Dict[int, Dict[str, Dict[str, Any]]] = field(default_factory=dict)
    # Per step, per boundary (str id): the codec-health gauges the daemons report for the step.
    health: List[Dict[str, Dict[str, float]]] = field(default_factory=list)


# The gauges of each step the plot draws (local.proto BoundaryStats, about the step just closed):
# the forward relative error (upstream side), and per direction the sending side's codec and
# wire seconds per microbatch.
def _health(history: History) -> Dict[str, Dict[str, float]]:
    out = {}
    for bid, sides in sorted(history.boundaries.items()):
        up, down = sides.get("upstream", {}), sides.get("downstream", {})
        out[str(bid)] = {
            "forward_relative_error": up.get("forward_relative_error", 0.0),
            "forward_code_relative_error": up.get("forward_code_relative_error", 0.0),
            "forward_rvq_levels": up.get("forward_rvq_levels_mean", 0.0),
            "forward_budget_fallbacks": up.get("forward_budget_fallbacks", 0),
            "forward_compute_s": up.get("compute_seconds_per_microbatch", 0.0),
            "forward_wire_s": up.get("wire_seconds_per_microbatch", 0.0),
            "backward_compute_s": down.get("compute_seconds_per_microbatch", 0.0),
            "backward_wire_s": down.get("wire_seconds_per_microbatch", 0.0)}
    return out


def _boundary_totals(history: History) -> Dict[str, float]:
    """raw, payload and dictionary bytes over all boundaries, as their upstream daemons count
    them (one side counts each byte once: what it sent plus what it received)."""
    raw = payload = dictionary = 0
    for sides in history.boundaries.values():
        up = sides["upstream"]
        raw += up["raw_bytes"]
        payload += up["wire_payload_bytes"]
        dictionary += up["wire_dictionary_bytes"]
    return {"raw": raw, "payload": payload, "dictionary": dictionary,
            "wire": payload + dictionary}


def _record(history: History, reports: Dict[int, Dict[str, Any]]) -> None:
    for msg in reports.values():
        for b in msg["boundaries"]:
            history.boundaries.setdefault(b["id"], {})[b["role"]] = b


def _settle(pipe: Pipeline, history: History, timeout: float = 10.0) -> None:
    """Final stats, once each downstream has applied the last dictionary delta (it travels after
    the upstream's last Step), so that both sides can be compared."""
    deadline = time.monotonic() + timeout
    while True:
        pipe.send_all({"cmd": "stats"})
        _record(history, pipe.wait("stats", timeout=timeout))
        if all(b["upstream"]["dictionary_version"] == b["downstream"]["dictionary_version"]
               for b in history.boundaries.values()) or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def _lr(cfg: RunConfig, step: int, progress: float) -> float:
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def run(cfg: RunConfig, out_dir: Path = DEFAULT_OUT, minutes: float = 0.0, max_steps: int = 0,
        log: Log = print, plot: bool = True,
        placement: Optional[List[StagePlacement]] = None,
        eval_fractions: Optional[List[float]] = None,
        stop_below: Optional[float] = None,
        on_train_start: Optional[Callable[[float], None]] = None,
        sample_bytes: int = 0, reference: Optional[Path] = None) -> Dict[str, Any]:
    """Trains until ``max_steps`` or ``minutes`` of training (whichever comes first; 0: no
    limit, but one is needed) and returns the summary (also written to out_dir/summary.json).
    ``placement``: one StagePlacement per stage (default: all on loopback).
    ``eval_fractions``: when to evaluate, as fractions of the run, besides at the end (default
    EVAL_FRACTIONS). ``stop_below``: end the run at the first evaluation whose validation loss
    is at or below this. ``on_train_start``: called with time.monotonic() of the moment
    training starts (the zero of the history's seconds), once every process is up.
    ``sample_bytes``: after training, generate this much text through the pipeline (and so
    through the sidecars) from a held-out prompt. ``reference``: a reference run's curve
    (written by --write-reference) to compare the validation loss with, step by step."""
    fractions_eval = sorted(EVAL_FRACTIONS if eval_fractions is None else eval_fractions)
    if minutes <= 0 and max_steps <= 0:
        raise ValueError("give a time budget (minutes) or a number of steps")
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = out_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    text = load_text(cfg.corpus or None)
    default_corpus = not cfg.corpus
    if not cfg.corpus:
        cfg.corpus = str(out_dir / "corpus.txt")
        Path(cfg.corpus).write_bytes(text)
    corpus = Corpus(text)
    corpus.check(cfg.seq_len)
    if cfg.init_checkpoint:
        missing = [f"stage{s}.pt" for s in range(cfg.stages)
                   if not (Path(cfg.init_checkpoint) / f"stage{s}.pt").is_file()]
        if missing:
            raise ValueError(f"checkpoint {cfg.init_checkpoint} lacks {', '.join(missing)}")
    config_path = out_dir / "run.json"
    cfg.save(config_path)
    ranges = layer_ranges(cfg.layers, cfg.stages)
    log(f"corpus: {cfg.corpus}: {corpus.size:,} bytes, {len(corpus.train):,} for training, "
        f"{len(corpus.val):,} held out")
    log(f"model: d={cfg.d_model}, {cfg.layers} layers, {cfg.heads} heads, sequences of "
        f"{cfg.seq_len} bytes; {cfg.stages} stages (layers "
        + " | ".join(f"{a}-{b - 1}" for a, b in ranges) + ")")
    link = (f"capped at {cfg.send_rate_mbit:g} Mbit/s per direction" if cfg.send_rate_mbit > 0
            else "not capped")
    compress = ("dense bf16 both ways" if cfg.method == "DENSE" else
                f"k={cfg.k}, forward {cfg.forward_codec}"
                + (f" x{cfg.rvq_levels}" if cfg.forward_codec == "RVQ" else "")
                + f", backward {cfg.backward_codec}")
    where = "loopback link" if placement is None else "link (placed by the caller)"
    if cfg.transport != "grpc":
        where += f" over {cfg.transport.upper()}"
    log(f"boundaries: {cfg.method} ({compress}); {where} {link}")
    if cfg.init_checkpoint:
        log(f"weights: from the checkpoint {cfg.init_checkpoint}"
            + ("; MAPL's U from the principal subspace of the first batch"
               if cfg.method == "MAPL" and cfg.projector_init == "PCA" else ""))
    log(f"schedule: {SCHEDULE_NAMES[cfg.schedule]}, {cfg.batch} sequences a step in "
        f"{cfg.microbatches} microbatches "
        f"({cfg.tokens_per_step:,} tokens), AdamW lr {cfg.lr:g}; validation: "
        f"{cfg.eval_batches * cfg.microbatch_size} held-out sequences")

    history = History()
    started = time.monotonic()
    with Pipeline(cfg, log_dir, placement) as pipe:
        pipe.start(config_path)
        params = [pipe.ready[s]["params"] for s in range(cfg.stages)]
        log(f"started {cfg.stages} mapld and {cfg.stages} stage processes in "
            f"{time.monotonic() - started:.1f} s ({' + '.join(f'{p / 1e6:.2f}M' for p in params)}"
            f" parameters); logs in {log_dir}")
        budget = minutes * 60
        t0 = time.monotonic()
        if on_train_start is not None:
            on_train_start(t0)
        step, step_s, eval_s = 0, 0.0, 0.0
        next_eval = 0
        last_print, mark = t0, (0, 0, {"raw": 0, "wire": 0})
        while True:
            step += 1
            elapsed = time.monotonic() - t0
            fractions = [elapsed / budget if budget else 0.0,
                         step / max_steps if max_steps else 0.0]
            progress = max(fractions)
            last = (max_steps and step >= max_steps) or (
                budget and elapsed + 1.5 * step_s + eval_s >= budget)
            do_eval = bool(last)
            if next_eval < len(fractions_eval) and progress >= fractions_eval[next_eval]:
                do_eval, next_eval = True, next_eval + 1
            lr = _lr(cfg, step, progress)
            begun = time.monotonic()
            pipe.send_all({"cmd": "step", "step": step, "lr": lr, "eval": do_eval})
            done = pipe.wait("step", timeout=cfg.timeout_s * (cfg.stages + 1))
            took = time.monotonic() - begun
            if do_eval:
                eval_s = max(eval_s, took - step_s) if step_s else 0.0
            else:
                step_s = took if step_s == 0 else 0.8 * step_s + 0.2 * took
            now = time.monotonic()
            history.steps.append(step)
            history.loss.append(done[cfg.stages - 1]["loss"])
            history.seconds.append(now - t0)
            _record(history, done)
            history.health.append(_health(history))
            val = done[cfg.stages - 1]["val_loss"]
            if do_eval:
                history.eval_seconds += max(m.get("eval_seconds", 0.0) for m in done.values())
            if val is not None:
                history.val_steps.append(step)
                history.val_loss.append(val)
                history.val_train_seconds.append(now - t0 - history.eval_seconds)
            if stop_below is not None and val is not None and val <= stop_below and not last:
                log(f"step {step:5d}  val {val:6.3f} <= {stop_below:.3f}: stopping here")
                last = True
            if now - last_print >= 10 or do_eval or step == 1:
                totals = _boundary_totals(history)
                steps_done = step - mark[0]
                wire = totals["wire"] - mark[2]["wire"]
                raw = totals["raw"] - mark[2]["raw"]
                rate = steps_done * cfg.tokens_per_step / max(now - last_print, 1e-9)
                if step == 1:
                    rate = cfg.tokens_per_step / max(now - t0, 1e-9)
                recent = history.loss[-min(10, len(history.loss)):]
                log(f"step {step:5d}  loss {sum(recent) / len(recent):6.3f}"
                    + (f"  val {val:6.3f}" if val is not None else " " * 12)
                    + f"  {rate:7,.0f} tok/s  wire {_human(wire / max(steps_done, 1)):>9}/step"
                    f"  compression {raw / max(wire, 1):6.1f}x  [{now - t0:5.0f} s]")
                last_print, mark = now, (step, now, totals)
            if last:
                break
        train_s = time.monotonic() - t0
        _settle(pipe, history)
        sample = None
        if sample_bytes > 0:
            sample = _generate(pipe, cfg, _prompt(text), sample_bytes)
        if cfg.save_checkpoint:
            pipe.send_all({"cmd": "save", "dir": cfg.save_checkpoint})
            pipe.wait("saved", timeout=60)
            log(f"checkpoint: {cfg.save_checkpoint}")
    summary = _summary(cfg, history, train_s, params, out_dir)
    summary["train_started_monotonic"] = t0
    summary["sample"], summary["default_corpus"] = sample, default_corpus
    summary["max_steps"], summary["minutes"] = max_steps, minutes
    summary["reference"] = _reference(summary, reference) if reference else None
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    _print_summary(summary, log)
    if plot:
        png = _plot(cfg, history, summary, out_dir / "loss.png")
        summary["plot"] = str(png)
        log(f"loss curve: {png}")
    log(f"total wall time {time.monotonic() - started:.0f} s")
    return summary


# Text generation after training: sampling settings, and the prompt taken from held-out text.
SAMPLE_TEMPERATURE = 0.5
HELD_OUT_FRACTION = 0.9  # data.Corpus: the first 90 % of the bytes train, the rest is held out


def _prompt(text: bytes) -> bytes:
    """The start of the first whole line of the held-out text, cut after a word, about 30 bytes:
    a prompt the model never trained on."""
    held_out = text[int(len(text) * HELD_OUT_FRACTION):]
    start = held_out.find(b"\n") + 1
    end = held_out.find(b" ", start + 30)
    if end < 0 or b"\n" in held_out[start:end]:
        end = start + 30
    return held_out[start:end + 1]


def _generate(pipe: Pipeline, cfg: RunConfig, prompt: bytes, n: int) -> Dict[str, Any]:
    """``n`` bytes after ``prompt``, each a forward pass through every stage and its sidecars
    (evaluation traffic: no compressor learns from it)."""
    context = list(prompt)
    begun = time.monotonic()
    for i in range(n):
        pipe.send_all({"cmd": "generate", "index": i, "context": context[-cfg.seq_len:],
                       "temperature": SAMPLE_TEMPERATURE})
        context.append(pipe.wait("generated", timeout=cfg.timeout_s)[cfg.stages - 1]["byte"])
    return {"prompt": prompt.decode("utf-8", "replace"), "bytes": n,
            "text": bytes(context[len(prompt):]).decode("utf-8", "replace"),
            "seconds": time.monotonic() - begun, "temperature": SAMPLE_TEMPERATURE}


# What must agree for a reference curve to compare step by step: the model, the data, the
# optimizer and its schedule (which follows the step budget), and the evaluation set.
_REFERENCE_KEYS = ("d_model", "layers", "heads", "seq_len", "stages", "batch", "microbatches",
                   "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "seed", "eval_batches",
                   "init_checkpoint", "data_step_offset")


def _reference_record(s: Dict[str, Any]) -> Dict[str, Any]:
    """What --write-reference keeps of a run: its settings and its validation curve."""
    cfg = s["config"]
    return {"settings": {k: cfg[k] for k in _REFERENCE_KEYS},
            "default_corpus": s["default_corpus"], "max_steps": s["max_steps"],
            "method": cfg["method"], "send_rate_mbit": cfg["send_rate_mbit"],
            "val_steps": s["val_steps"], "val_loss": s["val_loss"],
            "raw_bytes": s["raw_bytes"],
            "wire_bytes": s["wire_payload_bytes"] + s["wire_dictionary_bytes"]}


def _reference(s: Dict[str, Any], path: Path) -> Dict[str, Any]:
    """The reference curve at this run's evaluation steps (linear between its points), or why it
    does not apply: {"path", "method", "val_loss" (None where out of its range), ...}."""
    try:
        ref = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {"path": str(path), "unusable": f"cannot read it: {e}"}
    mine = _reference_record(s)
    differ = [k for k in _REFERENCE_KEYS if ref["settings"].get(k) != mine["settings"][k]]
    if ref["default_corpus"] != mine["default_corpus"]:
        differ.append("corpus")
    if not s["max_steps"] or s["minutes"] or ref["max_steps"] != s["max_steps"]:
        differ.append(f"step budget (the reference ran --steps {ref['max_steps']} and no "
                      "time budget; the learning-rate schedule follows the budget)")
    if differ:
        return {"path": str(path), "unusable": "its run differs in " + ", ".join(differ)}
    xs, ys = ref["val_steps"], ref["val_loss"]

    def at(step: int) -> Optional[float]:
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            if x0 <= step <= x1:
                return y0 + (y1 - y0) * (step - x0) / max(x1 - x0, 1)
        return ys[0] if xs and step == xs[0] else None
    return dict(ref, path=str(path), at_val_steps=[at(st) for st in s["val_steps"]])


def _summary(cfg: RunConfig, history: History, train_s: float, params: List[int],
             out_dir: Path) -> Dict[str, Any]:
    steps = len(history.steps)
    totals = _boundary_totals(history)
    head = history.loss[:min(5, steps)]
    tail = history.loss[-min(10, steps):]
    return {
        "config": asdict(cfg), "parameters": params, "steps": steps,
        "microbatches": cfg.microbatches, "eval_batches": cfg.eval_batches,
        "evaluations": len(history.val_steps),
        "tokens": steps * cfg.tokens_per_step, "train_seconds": train_s,
        "tokens_per_second": steps * cfg.tokens_per_step / max(train_s, 1e-9),
        "first_loss": history.loss[0], "first_loss_mean5": sum(head) / len(head),
        "final_loss_mean10": sum(tail) / len(tail),
        "val_steps": history.val_steps, "val_loss": history.val_loss,
        "final_val_loss": history.val_loss[-1] if history.val_loss else None,
        "val_train_seconds": history.val_train_seconds, "eval_seconds": history.eval_seconds,
        "raw_bytes": totals["raw"], "wire_payload_bytes": totals["payload"],
        "wire_dictionary_bytes": totals["dictionary"],
        "wire_bytes_per_step": totals["wire"] / max(steps, 1),
        "compression": totals["raw"] / max(totals["wire"], 1),
        "boundaries": {str(k): v for k, v in sorted(history.boundaries.items())},
        "history": {"step": history.steps, "loss": history.loss, "seconds": history.seconds,
                    "health": history.health},
        "out_dir": str(out_dir),
    }


def _print_summary(s: Dict[str, Any], log: Log) -> None:
    cfg = s["config"]
    log("")
    log("== summary ==")
    log(f"{s['steps']} steps, {s['tokens']:,} tokens in {s['train_seconds']:.0f} s: "
        f"{s['tokens_per_second']:,.0f} tokens/s")
    log(f"training loss: {s['first_loss']:.3f} at step 1 -> {s['final_loss_mean10']:.3f} "
        f"(mean of the last 10 steps); ln 256 = {math.log(256):.3f} is a uniform guess")
    if s["val_loss"]:
        log("validation loss: " + ", ".join(
            f"{v:.3f} (step {st})" for st, v in zip(s["val_steps"], s["val_loss"])))
    log(f"boundaries ({cfg['method']}): {_human(s['raw_bytes'])} as dense bf16 -> "
        f"{_human(s['wire_payload_bytes'] + s['wire_dictionary_bytes'])} on the wire "
        f"({_human(s['wire_payload_bytes'])} codes + {_human(s['wire_dictionary_bytes'])} "
        f"dictionary): {s['compression']:.1f}x, {_human(s['wire_bytes_per_step'])} a step")
    for bid, sides in s["boundaries"].items():
        up, down = sides["upstream"], sides["downstream"]
        log(f"  boundary {bid}: frames forward {up['frames_sent']} sent / "
            f"{down['frames_received']} decoded, backward {down['frames_sent']} sent / "
            f"{up['frames_received']} decoded; dictionary version {up['dictionary_version']}"
            + ("" if up["dictionary_version"] == down["dictionary_version"] else
               f" (downstream at {down['dictionary_version']})")
            + (", checksums equal" if up["dictionary_checksum"] == down["dictionary_checksum"]
               else ", checksums DIFFER"))
        if cfg["method"] != "DENSE":
            log(f"    last step: forward relative error {up['forward_relative_error']:.3f} "
                f"({up['forward_subspace_energy_share']:.1%} of |h|^2 inside U), backward "
                f"gradient energy outside U {down['gradient_outside_energy_share']:.1%}")
        log("    last step, ms per microbatch: forward codec "
            f"{1e3 * up['compute_seconds_per_microbatch']:.2f} / wire "
            f"{1e3 * up['wire_seconds_per_microbatch']:.2f}, backward codec "
            f"{1e3 * down['compute_seconds_per_microbatch']:.2f} / wire "
            f"{1e3 * down['wire_seconds_per_microbatch']:.2f}")
    _print_outcome(s, log)


def _print_outcome(s: Dict[str, Any], log: Log) -> None:
    """The one screen a user reads: what the model learned (its text, its validation loss
    against the dense reference's at the same steps) and what the compression saved."""
    cfg, ref, sample = s["config"], s.get("reference"), s.get("sample")
    if sample:
        log("")
        log(f"== text the trained model wrote through the sidecars ({len(sample['text'])} bytes "
            f"after a held-out prompt, temperature {sample['temperature']:g}, "
            f"{sample['seconds']:.1f} s) ==")
        log(f"  prompt: {sample['prompt']}")
        for i, line in enumerate(sample["text"].split("\n")):
            log(("  model:  " if i == 0 else "          ") + line)
    if s["val_loss"]:
        log("")
        ok = ref is not None and "unusable" not in ref
        log("== validation loss, nats per byte (ln 256 = 5.545 is a uniform guess) ==")
        what = "this run" if cfg["method"] == "DENSE" else f"{cfg['method']} ({s['compression']:.1f}x)"
        log(f"  {'step':>6}  {what:>16}" + (f"  {'dense bf16 (reference)':>24}" if ok else ""))
        for i, (st, v) in enumerate(zip(s["val_steps"], s["val_loss"])):
            r = ref["at_val_steps"][i] if ok else None
            log(f"  {st:>6}  {v:>16.3f}" + (f"  {r:>24.3f}" if r is not None else ""))
        if ok:
            gap = (s["val_loss"][-1] / ref["at_val_steps"][-1] - 1) * 100
            log(f"  at step {s['val_steps'][-1]}: {gap:+.1f} % against dense, for "
                f"{s['compression']:.1f}x fewer bytes (reference: {ref['path']}, the same "
                "run with METHOD_DENSE, bf16 both ways)")
        elif ref is not None:
            log(f"  (no dense reference: {ref['path']}: {ref['unusable']})")
    if cfg["method"] != "DENSE" and s["raw_bytes"]:
        wire = s["wire_payload_bytes"] + s["wire_dictionary_bytes"]
        saved = s["raw_bytes"] - wire
        log("")
        log(f"== bytes: the boundaries carried {_human(s['raw_bytes'])} of activations and "
            f"gradients (dense bf16) as {_human(wire)}: {_human(saved)} saved, "
            f"{s['compression']:.1f}x ==")


def _plot(cfg: RunConfig, history: History, summary: Dict[str, Any], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (ax, err_ax, time_ax) = plt.subplots(
        3, 1, figsize=(8, 10), dpi=110, sharex=True, gridspec_kw={"height_ratios": [2, 1, 1]})
    ax.plot(history.steps, history.loss, color="tab:blue", alpha=0.35, lw=0.8,
            label="training loss")
    window = 20
    if len(history.loss) >= window:
        smooth = [sum(history.loss[i - window:i]) / window
                  for i in range(window, len(history.loss) + 1)]
        ax.plot(history.steps[window - 1:], smooth, color="tab:blue", lw=1.6,
                label=f"training loss ({window}-step mean)")
    if history.val_loss:
        ax.plot(history.val_steps, history.val_loss, "o-", color="tab:red",
                label="validation loss (held out)")
    ref = summary.get("reference")
    if ref and "unusable" not in ref:
        ax.plot(ref["val_steps"], ref["val_loss"], "s--", color="gray",
                label=f"validation loss, dense bf16 reference ({Path(ref['path']).name})")
    ax.set_ylabel("cross-entropy (nats per byte)")
    method = cfg.method if cfg.method == "DENSE" else f"{cfg.method}, k={cfg.k}"
    ax.set_title(f"{cfg.stages}-stage LLaMA-style pipeline through mapl ({method}): "
                 f"{summary['compression']:.1f}x compression", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    _plot_health(history, err_ax, time_ax, dense=cfg.method == "DENSE")
    time_ax.set_xlabel(f"step ({cfg.tokens_per_step:,} tokens each)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_health(history: History, err_ax: Any, time_ax: Any, dense: bool) -> None:
    """The codec-health panels: each boundary's forward relative error |h - h_hat| / |h| (before
    the anchor), and per direction the sending daemon's codec seconds (encode + decode) against
    its wire seconds (bytes on the link / measured goodput) per microbatch: whichever is larger
    bounds the pipeline."""
    bids = sorted({b for step in history.health for b in step}, key=int)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for i, bid in enumerate(bids):
        color = colors[i % len(colors)]
        steps = [s for s, h in zip(history.steps, history.health) if bid in h]
        series = lambda key: [h[bid][key] for h in history.health if bid in h]  # noqa: E731
        if not dense:
            err_ax.plot(steps, series("forward_relative_error"), color=color, lw=1.2,
                        label=f"boundary {bid}")
        for direction, style in (("forward", "-"), ("backward", ":")):
            time_ax.plot(steps, [1e3 * v for v in series(f"{direction}_compute_s")],
                         color=color, ls=style, lw=1.2,
                         label=f"b{bid} {direction}: codec")
            time_ax.plot(steps, [1e3 * v for v in series(f"{direction}_wire_s")],
                         color=color, ls=style, lw=2.2, alpha=0.45,
                         label=f"b{bid} {direction}: wire")
    err_ax.set_ylabel("forward relative error")
    if dense:
        err_ax.text(0.5, 0.5, "dense bf16: no projection", transform=err_ax.transAxes,
                    ha="center", va="center", color="gray")
    elif bids:
        err_ax.set_ylim(bottom=0)
        err_ax.legend(fontsize=8)
    err_ax.grid(alpha=0.3)
    time_ax.set_ylabel("ms per microbatch")
    time_ax.set_yscale("log")  # 0 (nothing measured yet) is left out
    time_ax.grid(alpha=0.3)
    if bids:
        time_ax.legend(fontsize=7, ncol=2)


def main(argv: Optional[List[str]] = None) -> int:
    d = RunConfig()
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--corpus", default="", help="a text file (default: the KJV Bible from "
                    "Debian's bible-kjv)")
    ap.add_argument("--minutes", type=float, default=3.0,
                    help="training time budget (0: none; then --steps)")
    ap.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: none)")
    ap.add_argument("--evals", type=int, default=len(EVAL_FRACTIONS) + 1,
                    help="validation passes, evenly spread over the run, the last at its end")
    ap.add_argument("--sample-bytes", type=int, default=0,
                    help="after training, generate this many bytes of text through the pipeline")
    ap.add_argument("--reference", type=Path, default=DENSE_REFERENCE,
                    help="a reference curve to print and plot the validation loss against, when "
                    "its run had the same settings and step budget")
    ap.add_argument("--write-reference", type=Path, default=None,
                    help="write this run's settings and validation curve here (a reference)")
    ap.add_argument("--method", default=d.method, type=str.upper, choices=METHODS)
    ap.add_argument("--k", type=int, default=0, help="projection rank (0: d_model / 16)")
    ap.add_argument("--forward-codec", default=d.forward_codec, type=str.upper, choices=CODECS)
    ap.add_argument("--rvq-levels", type=int, default=d.rvq_levels)
    ap.add_argument("--backward-codec", default=d.backward_codec, type=str.upper,
                    choices=BACKWARD_CODECS)
    ap.add_argument("--send-rate-mbit", type=float, default=d.send_rate_mbit,
                    help="each daemon's send cap per peer link (emulates a slow link); 0: none")
    ap.add_argument("--transport", default=d.transport, type=str.lower, choices=TRANSPORTS,
                    help="every boundary's data plane: the gRPC stream, or UCX (for fast links "
                    "inside a site; a mapld built with UCX)")
    add_shape_args(ap)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--eval-batches", type=int, default=d.eval_batches,
                    help="validation microbatches per evaluation")
    ap.add_argument("--projector-init", default=d.projector_init, type=str.upper,
                    choices=PROJECTOR_INITS, help="MAPL's initial U: random from the shared "
                    "seed, or the principal subspace of the first batch's activations")
    ap.add_argument("--init-checkpoint", default="", help="start from the weights in this "
                    "directory (stage<i>.pt, written by --save-checkpoint) instead of the seed's")
    ap.add_argument("--save-checkpoint", default="", help="write each stage's weights to this "
                    "directory after the last step")
    ap.add_argument("--data-step-offset", type=int, default=d.data_step_offset,
                    help="step s trains on the batches of step s + this (to continue a run)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="summary, plot and logs")
    ap.add_argument("--pipeline", type=Path, default=None, metavar="FILE",
                    help="a pipeline description (TOML, e.g. deploy/pipelines/two-stage.toml): "
                    "its boundary and daemon settings replace --method, --k, the codecs and "
                    "--send-rate-mbit; --stages and --d-model must match it")
    args = ap.parse_args(argv)
    try:
        cfg = RunConfig(
            d_model=args.d_model, layers=args.layers, heads=args.heads, seq_len=args.seq_len,
            stages=args.stages, batch=args.batch,
            microbatches=args.microbatches, schedule=args.schedule,
            schedule_lead=args.schedule_lead, lr=args.lr, seed=args.seed,
            eval_batches=args.eval_batches,
            corpus=str(Path(args.corpus).resolve()) if args.corpus else "",
            method=args.method, k=args.k, forward_codec=args.forward_codec,
            rvq_levels=args.rvq_levels, backward_codec=args.backward_codec,
            send_rate_mbit=args.send_rate_mbit, transport=args.transport,
            projector_init=args.projector_init,
            init_checkpoint=str(Path(args.init_checkpoint).resolve()) if args.init_checkpoint
            else "",
            save_checkpoint=str(Path(args.save_checkpoint).resolve()) if args.save_checkpoint
            else "",
            data_step_offset=args.data_step_offset,
            pipeline=str(args.pipeline.resolve()) if args.pipeline else "")
        if cfg.pipeline:  # a bad description stops the run before any setup
            from dataclasses import replace
            cfg = replace(cfg, **_described_settings(cfg))
        if args.evals < 1:
            raise ValueError(f"--evals must be at least 1, got {args.evals}")
        summary = run(cfg, args.out.resolve(), minutes=args.minutes, max_steps=args.steps,
                      eval_fractions=[i / args.evals for i in range(1, args.evals)],
                      sample_bytes=args.sample_bytes,
                      reference=args.reference if args.reference.is_file() else None)
        if args.write_reference:
            record = dict(_reference_record(summary), command=" ".join(
                ["examples/llama_pipeline/run.py"] + list(sys.argv[1:] if argv is None else argv)))
            args.write_reference.write_text(json.dumps(record, indent=1) + "\n")
            print(f"reference: {args.write_reference}")
    except (ValueError, CorpusError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PipelineError as e:
        print(f"\nerror: {e}\nstopped every process this run started.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: stopped every process this run started.", file=sys.stderr)
        return 130
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)  # the same orderly stop as Ctrl-C
    sys.exit(main())
