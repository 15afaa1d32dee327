#!/usr/bin/python3
"""bench/wan: time to a target validation loss over a slow link, dense against fixed against MAPL.

The two stages of the LLaMA-style pipeline (examples/llama_pipeline) run in two network
namespaces joined by a veth pair. Each veth end has a `tbf` qdisc (the rate, default 20 Mbit/s,
per direction). The one-way delay (default 50 ms) is added in user space by a TCP relay
(bench/wan/relay.py) in the upstream namespace, on the peer link between the two daemons: the
upstream mapld dials the relay on its namespace's loopback, and the relay forwards every chunk
`delay` later across the shaped veth to the downstream mapld. Each stage's trainer and its mapld
run in the stage's namespace (ip netns exec); their Unix sockets and shared memory live in /tmp
and /dev/shm, which the namespaces share.

It first measures the link: iperf3 (server in the downstream namespace, client in the upstream
one) in both directions, directly over the veth and through the relay, and the round trip
through the relay. Then it trains each method for its budget (dense first: its final
validation loss plus 3 % is the target), evaluating every --eval-every of the budget, and prints
each method's time to the target, the speed-ups, and the link utilisation during transfers:

    utilisation = bytes the daemons moved / transfer time / iperf3's rate

- bytes the daemons moved: the upstream daemon's wire bytes of the boundary (Sidecar stats:
  payload plus dictionary, both directions; the frames' codes, scales and token ids and the
  dictionary deltas, without protocol framing);
- transfer time: the sum over both directions of the time the veth was busy in that direction,
  from its byte counters sampled every --sample-ms: an interval is busy when it carried at least
  --busy-fraction of what the shaped rate allows in it (so TCP acks and heartbeats do not count,
  and a partly used interval counts whole: this errs low);
- iperf3's rate: the mean of the two directions' iperf3 goodput over the shaped veth.

The numbers per direction, with the bytes the relay delivered (everything on the peer link:
frames, deltas, learning signals, acks, gRPC framing), are in results.json.

    sudo PYTHONPATH=build/python OPENBLAS_NUM_THREADS=1 /usr/bin/python3 bench/wan/run.py \\
        [--rate-mbit 20] [--delay-ms 50] [--minutes DENSE=8,FIXED=4,MAPL=4] [--smoke]

Needs root (network namespaces, veth, tc); without it, it says so and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RELAY = HERE / "relay.py"
sys.path.insert(0, str(REPO / "examples"))
if importlib.util.find_spec("mapl") is None:  # not on PYTHONPATH: this checkout's build
    sys.path.insert(0, str(REPO / "build" / "python"))

from llama_pipeline.config import add_boundary_option_args, parse_boundary_options  # noqa: E402

METHOD_ORDER = ("DENSE", "FIXED", "MAPL")
UP_IP, DOWN_IP = "10.77.0.1", "10.77.0.2"
PEER_PORT0 = 7100       # the downstream mapld's peer port: 7100 + run index
RELAY_PORT = 7001       # the relay in the upstream namespace, on its loopback
IPERF_PORT, IPERF_RELAY_PORT = 5201, 5202
ECHO_PORT, ECHO_RELAY_PORT = 7200, 7201
PY = sys.executable


class Skip(Exception):
    """The benchmark cannot run here (no root, no namespaces): exit 0 with the reason."""


class BenchError(RuntimeError):
    pass


def log(msg: str = "") -> None:
    print(msg, flush=True)


def sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise BenchError(f"`{' '.join(argv)}` failed ({p.returncode}): "
                         f"{(p.stderr or p.stdout).strip()[-400:]}")
    return p


# ---------------------------------------------------------------------------------------------
# The link: two namespaces, a veth pair, tbf on both ends, and the processes run inside them.

@dataclass
class Link:
    rate_mbit: float
    delay_ms: float
    tag: str = field(default_factory=lambda: str(os.getpid()))
    procs: List[subprocess.Popen] = field(default_factory=list)
    created: List[str] = field(default_factory=list)

    @property
    def up(self) -> str:
        return f"mapl-wan-{self.tag}-up"

    @property
    def down(self) -> str:
        return f"mapl-wan-{self.tag}-down"

    @property
    def if_up(self) -> str:
        return f"mwan{self.tag}u"[-15:]

    @property
    def if_down(self) -> str:
        return f"mwan{self.tag}d"[-15:]

    @staticmethod
    def tbf_args(rate_mbit: float) -> List[str]:
        """The tbf settings of a rate: a burst of 2 ms of the rate, at least two full-size
        packets (short messages get no free ride), and a queue of 100 ms of the rate (a
        router's buffer)."""
        burst = max(3028, int(rate_mbit * 1e6 / 8 * 0.002))
        return ["tbf", "rate", f"{int(rate_mbit * 1000)}kbit", "burst", str(burst),
                "latency", "100ms"]

    def netns(self, ns: str) -> List[str]:
        return ["ip", "netns", "exec", ns]

    def setup(self) -> None:
        if os.geteuid() != 0:
            raise Skip("needs root for network namespaces (run it as root or with sudo)")
        if shutil.which("ip") is None or shutil.which("tc") is None:
            raise Skip("needs root for network namespaces, and iproute2 (ip, tc) is missing")
        for ns in (self.up, self.down):
            p = sh("ip", "netns", "add", ns, check=False)
            if p.returncode != 0:
                raise Skip(f"needs root for network namespaces: `ip netns add` failed: "
                           f"{p.stderr.strip()}")
            self.created.append(ns)
        p = sh("ip", "link", "add", self.if_up, "netns", self.up, "type", "veth", "peer",
               "name", self.if_down, "netns", self.down, check=False)
        if p.returncode != 0:
            raise Skip(f"needs root for network namespaces: cannot create a veth pair: "
                       f"{p.stderr.strip()}")
        for ns, ifc, ip in ((self.up, self.if_up, UP_IP), (self.down, self.if_down, DOWN_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", ifc)
            sh("ip", "-n", ns, "link", "set", ifc, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("tc", "-n", ns, "qdisc", "add", "dev", ifc, "root", *self.tbf_args(self.rate_mbit))

    def set_rate(self, rate_mbit: float) -> None:
        """Changes the tbf rate of both ends (the burst and queue follow the rate, as in
        setup); what the queues hold stays."""
        for ns, ifc in ((self.up, self.if_up), (self.down, self.if_down)):
            sh("tc", "-n", ns, "qdisc", "change", "dev", ifc, "root", *self.tbf_args(rate_mbit))

    def qdisc(self) -> str:
        return sh("tc", "-n", self.up, "qdisc", "show", "dev", self.if_up).stdout.strip()

    def spawn(self, ns: str, argv: List[str], log_path: Path) -> subprocess.Popen:
        f = open(log_path, "wb")
        p = subprocess.Popen(self.netns(ns) + argv, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        f.close()
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, timeout: float = 10) -> None:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p in self.procs:
            self.procs.remove(p)

    def start_relay(self, maps: List[str], work: Path, name: str,
                    samples: Optional[Path] = None, sample_ms: float = 10) -> subprocess.Popen:
        ready = work / f"{name}.ready"
        ready.unlink(missing_ok=True)
        argv = [PY, str(RELAY), "relay", "--delay-ms", str(self.delay_ms), "--ready", str(ready)]
        for m in maps:
            argv += ["--map", m]
        if samples is not None:
            argv += ["--iface", self.if_up, "--samples", str(samples), "--sample-ms",
                     str(sample_ms)]
        p = self.spawn(self.up, argv, work / f"{name}.log")
        _wait_file(ready, p, work / f"{name}.log")
        return p

    def teardown(self) -> None:
        """Stops what this benchmark started in the namespaces (by pid), then deletes them (the
        veth pair and its qdiscs go with them). A second Ctrl-C does not cut it short."""
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self._teardown()
        finally:
            signal.signal(signal.SIGINT, old)

    def _teardown(self) -> None:
        for p in list(self.procs):
            self.stop(p, timeout=5)
        for ns in self.created:
            left = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in left:  # only our processes can be in namespaces we created
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
        for ns in reversed(self.created):
            sh("ip", "netns", "del", ns, check=False)
        self.created.clear()


def _wait_file(path: Path, proc: subprocess.Popen, log_path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log_path.read_text(errors="replace")[-1500:] if log_path.exists() else ""
            raise BenchError(f"{' '.join(proc.args[:6])}... did not start:\n{tail}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# Calibration: the round trip through the relay and iperf3 over the shaped link.

def calibrate(link: Link, work: Path, seconds: float) -> Dict[str, Any]:
    out: Dict[str, Any] = {"iperf3": None}
    echo_ready = work / "echo.ready"
    echo = link.spawn(link.down, [PY, str(RELAY), "echo", "--listen", f"{DOWN_IP}:{ECHO_PORT}",
                                  "--ready", str(echo_ready)], work / "echo.log")
    _wait_file(echo_ready, echo, work / "echo.log")
    maps = [f"127.0.0.1:{ECHO_RELAY_PORT}={DOWN_IP}:{ECHO_PORT}",
            f"127.0.0.1:{IPERF_RELAY_PORT}={DOWN_IP}:{IPERF_PORT}"]
    relay = link.start_relay(maps, work, "relay-calibration")
    try:
        for name, target in (("direct", f"{DOWN_IP}:{ECHO_PORT}"),
                             ("relay", f"127.0.0.1:{ECHO_RELAY_PORT}")):
            p = sh(*link.netns(link.up), PY, str(RELAY), "rtt", "--connect", target,
                   "--count", "10")
            out[f"rtt_{name}_ms"] = json.loads(p.stdout)["median_s"] * 1000
        log(f"round trip of 64 bytes: {out['rtt_direct_ms']:.2f} ms over the veth, "
            f"{out['rtt_relay_ms']:.1f} ms through the relay (2 x {link.delay_ms:g} ms delay)")
        if shutil.which("iperf3") is None:
            log("iperf3 is not installed (bash deploy/install-deps.sh installs it): no reference "
                "rate, so no link utilisation")
            return out
        server = link.spawn(link.down, ["iperf3", "-s", "-B", DOWN_IP, "-p", str(IPERF_PORT)],
                            work / "iperf3-server.log")
        try:
            res: Dict[str, float] = {}
            for path, host, port in (("direct", DOWN_IP, IPERF_PORT),
                                     ("relay", "127.0.0.1", IPERF_RELAY_PORT)):
                for direction, extra in (("forward", []), ("backward", ["-R"])):
                    res[f"{path}_{direction}_mbit"] = _iperf(link, host, port, seconds, extra)
            out["iperf3"] = res
        finally:
            link.stop(server)
        log("iperf3 goodput (Mbit/s; forward: upstream to downstream namespace): over the veth "
            f"{res['direct_forward_mbit']:.2f} forward, {res['direct_backward_mbit']:.2f} "
            f"backward; through the relay {res['relay_forward_mbit']:.2f}, "
            f"{res['relay_backward_mbit']:.2f}  (tbf rate {link.rate_mbit:g})")
    finally:
        link.stop(relay)
        link.stop(echo)
    return out


def _iperf(link: Link, host: str, port: int, seconds: float, extra: List[str]) -> float:
    argv = link.netns(link.up) + ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds),
                                  "-O", "1", "-J"] + extra
    for attempt in range(20):  # the server may still be starting
        p = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        try:
            data = json.loads(p.stdout)
        except json.JSONDecodeError:
            data = {"error": p.stderr or p.stdout}
        if "error" not in data:
            return data["end"]["sum_received"]["bits_per_second"] / 1e6
        transient = ("refused" in str(data["error"]) or "busy" in str(data["error"]))
        if not transient or attempt == 19:  # a server starting, or finishing the last test
            raise BenchError(f"iperf3 failed: {data['error']}")
        time.sleep(0.5)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# One training run through the namespaces, and what the link did meanwhile.

def read_samples(samples: Path) -> List[Tuple[float, int, int, int, int]]:
    """The relay's samples: (monotonic seconds, veth tx, veth rx, relay forward, relay
    backward bytes)."""
    rows = []
    for line in samples.read_text().splitlines():
        parts = line.split()
        if len(parts) == 5:
            rows.append((float(parts[0]), *(int(x) for x in parts[1:])))
    return rows


def link_use(rows: List[Tuple[float, int, int, int, int]], t0: float, t1: float,
             rate_at: Callable[[float], float], busy_fraction: float) -> Dict[str, float]:
    """What the link did between t0 and t1 (monotonic): busy seconds per direction, where an
    interval is busy when it carried at least busy_fraction of what the tbf rate of that moment
    (rate_at(t), Mbit/s) allows, and the bytes moved."""
    rows = [r for r in rows if t0 <= r[0] <= t1]
    busy = {"forward": 0.0, "backward": 0.0}
    for a, b in zip(rows, rows[1:]):
        dt = b[0] - a[0]
        if dt <= 0:
            continue
        allowed = busy_fraction * rate_at(a[0]) * 1e6 / 8 * dt
        if b[1] - a[1] >= allowed:
            busy["forward"] += dt
        if b[2] - a[2] >= allowed:
            busy["backward"] += dt
    if len(rows) < 2:
        return {}
    first, last = rows[0], rows[-1]
    return {"window_s": last[0] - first[0], "samples": len(rows),
            "busy_forward_s": busy["forward"], "busy_backward_s": busy["backward"],
            "veth_forward_bytes": last[1] - first[1], "veth_backward_bytes": last[2] - first[2],
            "relay_forward_bytes": last[3] - first[3], "relay_backward_bytes": last[4] - first[4]}


def time_to_target(times: List[float], vals: List[float], target: float
                   ) -> Tuple[Optional[float], Optional[float]]:
    """(first evaluation at or below target, linear interpolation from the one before)."""
    for i, (t, v) in enumerate(zip(times, vals)):
        if v <= target:
            if i == 0:
                return t, t
            t_prev, v_prev = times[i - 1], vals[i - 1]
            return t, t_prev + (t - t_prev) * (v_prev - target) / (v_prev - v)
    return None, None


class RateChanges:
    """Applies --rate-schedule during one run: after training starts, a thread changes the tbf
    rate at the given seconds; stop() restores the base rate. events holds (monotonic time,
    Mbit/s) from the start of training on, the rates the link had."""

    def __init__(self, link: Link, base_mbit: float, changes: List[Tuple[float, float]]) -> None:
        self.link, self.base, self.changes = link, base_mbit, changes
        self.events: List[Tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None

    def start(self, t0: float) -> None:
        self.events.append((t0, self.base))
        if self.changes:
            self._thread = threading.Thread(target=self._loop, args=(t0,), daemon=True)
            self._thread.start()

    def _loop(self, t0: float) -> None:
        for at, rate in self.changes:
            if self._stop.wait(max(0.0, t0 + at - time.monotonic())):
                return
            try:
                self.link.set_rate(rate)
            except BenchError as e:  # reported by stop(): the run's figures would be wrong
                self.error = e
                return
            self.events.append((time.monotonic(), rate))
            log(f"[link] {at:g} s into training: tbf rate now {rate:g} Mbit/s each way")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            if len(self.events) > 1:
                self.link.set_rate(self.base)
        if self.error is not None:
            raise BenchError(f"changing the link's rate failed: {self.error}")

    def rate_at(self, t: float) -> float:
        rate = self.base
        for when, r in self.events:
            if when <= t:
                rate = r
        return rate


def train(method: str, index: int, args: argparse.Namespace, link: Link, work: Path,
          out: Path, corpus: Path, stop_below: Optional[float]) -> Dict[str, Any]:
    from llama_pipeline.run import RunConfig, StagePlacement, run

    cfg = RunConfig(d_model=args.d_model, layers=args.layers, heads=args.heads,
                    seq_len=args.seq_len, batch=args.batch, microbatches=args.microbatches,
                    schedule=args.schedule, schedule_lead=args.schedule_lead, seed=args.seed,
                    eval_batches=args.eval_batches,
                    corpus=str(corpus),
                    method=method, k=args.k or max(1, args.d_model // 8),
                    forward_codec=args.forward_codec, backward_codec=args.backward_codec,
                    rvq_levels=args.rvq_levels, send_rate_mbit=0.0, timeout_s=300.0,
                    boundary_options={} if method == "DENSE" else dict(args.boundary_options))
    peer_port = PEER_PORT0 + index
    placement = [StagePlacement(wrap=link.netns(link.up), dial=f"127.0.0.1:{RELAY_PORT}"),
                 StagePlacement(wrap=link.netns(link.down),
                                peer_listen=f"{DOWN_IP}:{peer_port}")]
    samples = work / f"samples-{method}.txt"
    relay = link.start_relay([f"127.0.0.1:{RELAY_PORT}={DOWN_IP}:{peer_port}"], work,
                             f"relay-{method}", samples=samples, sample_ms=args.sample_ms)
    minutes, steps = args.budget_minutes[method], args.budget_steps[method]
    n = max(1, round(1 / args.eval_every))
    fractions = [i / n for i in range(1, n)]
    rates = RateChanges(link, args.rate_mbit, args.rate_changes)
    t0 = time.monotonic()
    try:
        summary = run(cfg, out / method.lower(), minutes=minutes, max_steps=steps,
                      log=lambda m: log(f"[{method}] {m}" if m else ""), plot=False,
                      placement=placement, eval_fractions=fractions, stop_below=stop_below,
                      on_train_start=rates.start)
    finally:
        t1 = time.monotonic()
        rates.stop()
        link.stop(relay)
    rows = read_samples(samples)
    use = link_use(rows, t0, t1, rates.rate_at, args.busy_fraction)
    hist = summary["history"]
    val_wall = [hist["seconds"][s - 1] for s in summary["val_steps"]]
    dense = method == "DENSE"
    rec = {"method": method, "k": None if dense else cfg.k,
           "forward_codec": None if dense else cfg.forward_codec,
           "backward_codec": None if dense else cfg.backward_codec,
           "rvq_levels": cfg.rvq_levels if cfg.forward_codec == "RVQ" and not dense else None,
           "boundary_options": {} if dense else dict(cfg.boundary_options),
           "budget_minutes": minutes, "budget_steps": steps,
           "steps": summary["steps"], "tokens": summary["tokens"],
           "train_seconds": summary["train_seconds"], "eval_seconds": summary["eval_seconds"],
           "tokens_per_second": summary["tokens_per_second"],
           "final_val_loss": summary["final_val_loss"],
           "val_steps": summary["val_steps"], "val_loss": summary["val_loss"],
           "val_train_seconds": summary["val_train_seconds"], "val_wall_seconds": val_wall,
           "compression": summary["compression"],
           "daemon_wire_bytes": summary["wire_payload_bytes"]
           + summary["wire_dictionary_bytes"],
           "daemon_wire_bytes_per_step": summary["wire_bytes_per_step"],
           "raw_bytes": summary["raw_bytes"], "link": use,
           "stopped_at_target": stop_below is not None and summary["final_val_loss"] is not None
           and summary["final_val_loss"] <= stop_below,
           "out_dir": summary["out_dir"]}
    if args.rate_changes:
        start = summary["train_started_monotonic"]
        rec["rate_events"] = [(t - start, r) for t, r in rates.events]
        rec["phases"] = phases(rec["rate_events"], hist, summary["val_steps"], rows, start,
                               start + summary["train_seconds"], rates.rate_at, args)
        rec["timeline"] = timeline(hist, summary["val_steps"], rows, start, rates.rate_at, args)
    return rec


def _step_table(hist: Dict[str, Any], val_steps: List[int]) -> List[Dict[str, Any]]:
    """Per training step (evaluation steps left out): its end (training seconds), duration and
    the boundary-0 health gauges the daemons reported for it."""
    out, prev, evals = [], 0.0, set(val_steps)
    for step, t, health in zip(hist["step"], hist["seconds"], hist["health"]):
        if step not in evals:
            out.append({"t": t, "step_s": t - prev, **health.get("0", {})})
        prev = t
    return out


def phases(events: List[Tuple[float, float]], hist: Dict[str, Any], val_steps: List[int],
           rows: List[Tuple[float, int, int, int, int]], start: float, end: float,
           rate_at: Callable[[float], float], args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Per stretch of constant rate: step time, what the link and the sidecars did, and the
    forward codes' depth and error."""
    table = _step_table(hist, val_steps)
    bounds = [t for t, _ in events] + [end - start]
    out = []
    for (a, rate), b in zip(events, bounds[1:]):
        steps = [r for r in table if a < r["t"] <= b]
        use = link_use(rows, start + a, start + b, rate_at, args.busy_fraction)
        mean = lambda key: (sum(r.get(key, 0.0) for r in steps) / len(steps)  # noqa: E731
                            if steps else None)
        ph: Dict[str, Any] = {"from_s": a, "to_s": b, "rate_mbit": rate, "steps": len(steps),
                              "step_s": mean("step_s")}
        if use:
            ph["busy_forward_share"] = use["busy_forward_s"] / max(use["window_s"], 1e-9)
            ph["busy_backward_share"] = use["busy_backward_s"] / max(use["window_s"], 1e-9)
        if steps:
            mb = args.microbatches
            ph.update({
                "forward_rvq_levels": mean("forward_rvq_levels"),
                "forward_relative_error_mean": mean("forward_relative_error"),
                "forward_code_error_mean": mean("forward_code_relative_error"),
                "forward_code_error_max": max(r.get("forward_code_relative_error", 0.0)
                                              for r in steps),
                # per step: microbatches x the per-microbatch gauges
                "sidecar_compute_s": mb * ((mean("forward_compute_s") or 0.0)
                                           + (mean("backward_compute_s") or 0.0)),
                "wire_forward_s": mb * (mean("forward_wire_s") or 0.0),
                "wire_backward_s": mb * (mean("backward_wire_s") or 0.0),
                "budget_fallbacks": steps[-1].get("forward_budget_fallbacks", 0)
                - steps[0].get("forward_budget_fallbacks", 0)})
        out.append(ph)
    return out


def timeline(hist: Dict[str, Any], val_steps: List[int],
             rows: List[Tuple[float, int, int, int, int]], start: float,
             rate_at: Callable[[float], float], args: argparse.Namespace,
             window_s: float = 5.0) -> Dict[str, Any]:
    """For the plot: per training step, and the link's busy share per window_s."""
    table = _step_table(hist, val_steps)
    busy: Dict[str, List[float]] = {"t": [], "forward": [], "backward": []}
    end = hist["seconds"][-1] if hist["seconds"] else 0.0
    a = 0.0
    while a < end:
        use = link_use(rows, start + a, start + a + window_s, rate_at, args.busy_fraction)
        if use:
            busy["t"].append(a + window_s / 2)
            busy["forward"].append(use["busy_forward_s"] / max(use["window_s"], 1e-9))
            busy["backward"].append(use["busy_backward_s"] / max(use["window_s"], 1e-9))
        a += window_s
    return {"steps": table, "busy": busy}


def utilisation(rec: Dict[str, Any], iperf: Optional[Dict[str, float]]) -> Dict[str, Any]:
    use = rec["link"]
    if not use:
        return {}
    busy = use["busy_forward_s"] + use["busy_backward_s"]
    u: Dict[str, Any] = {"busy_forward_s": use["busy_forward_s"],
                         "busy_backward_s": use["busy_backward_s"],
                         "busy_share": busy / max(2 * use["window_s"], 1e-9)}
    if iperf is None:
        return u
    fwd_bps = iperf["direct_forward_mbit"] * 1e6 / 8
    bwd_bps = iperf["direct_backward_mbit"] * 1e6 / 8
    if busy > 0:
        u["daemon_rate_mbit"] = rec["daemon_wire_bytes"] * 8 / busy / 1e6
        u["utilisation"] = rec["daemon_wire_bytes"] / busy / ((fwd_bps + bwd_bps) / 2)
    if use["busy_forward_s"] > 0:
        u["relay_forward_utilisation"] = (use["relay_forward_bytes"] / use["busy_forward_s"]
                                          / fwd_bps)
    if use["busy_backward_s"] > 0:
        u["relay_backward_utilisation"] = (use["relay_backward_bytes"]
                                           / use["busy_backward_s"] / bwd_bps)
    return u


# ---------------------------------------------------------------------------------------------

def plot(results: Dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    colors = {"DENSE": "tab:gray", "FIXED": "tab:orange", "MAPL": "tab:blue"}
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    for rec in results["runs"]:
        m = rec["method"]
        label = m if m == "DENSE" else f"{m} (k={rec['k']}, {rec['compression']:.0f}x)"
        ax.plot(rec["val_train_seconds"], rec["val_loss"], "o-", ms=3, color=colors.get(m),
                label=label)
        ttt = rec.get("time_to_target_s")
        if ttt is not None:
            ax.axvline(ttt, color=colors.get(m), ls=":", lw=1)
    ax.axhline(results["target"], color="black", ls="--", lw=1,
               label=f"target {results['target']:.3f}")
    ax.set_xlabel("training wall time, s (evaluations excluded)")
    ax.set_ylabel("validation loss (nats per byte)")
    ax.set_title(f"2 stages over {results['rate_mbit']:g} Mbit/s, {results['delay_ms']:g} ms "
                 "one way (tbf + user-space delay)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _per_method(text: str, methods: List[str], kind: type, what: str) -> Dict[str, Any]:
    """'8' (every method) or 'DENSE=8,MAPL=4' (the others: the first value's default)."""
    out: Dict[str, Any] = {}
    default = None
    for part in text.split(","):
        part = part.strip()
        if "=" in part:
            k, v = part.split("=", 1)
            k = k.strip().upper()
            if k not in METHOD_ORDER:
                raise ValueError(f"--{what}: unknown method {k}")
            out[k] = kind(v)
        elif part:
            default = kind(part)
    for m in methods:
        out.setdefault(m, default if default is not None else kind(0))
    return out


def parse_rate_schedule(text: str) -> List[Tuple[float, float]]:
    """'150=5,300=1.5' -> [(150.0, 5.0), (300.0, 1.5)] (ValueError naming the bad item)."""
    out: List[Tuple[float, float]] = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        at, sep, rate = item.partition("=")
        try:
            change = (float(at), float(rate))
        except ValueError:
            change = (-1.0, -1.0)
        if not sep or change[0] < 0 or change[1] <= 0:
            raise ValueError(f"--rate-schedule {item!r}: expected SECONDS=MBIT with SECONDS >= 0 "
                             "and MBIT > 0, for example 150=5")
        out.append(change)
    if [a for a, _ in out] != sorted(a for a, _ in out):
        raise ValueError(f"--rate-schedule {text!r}: give the changes in time order")
    return out


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--rate-mbit", type=float, default=20.0, help="tbf rate, each direction")
    ap.add_argument("--delay-ms", type=float, default=50.0, help="one-way delay (user space)")
    ap.add_argument("--methods", default="DENSE,FIXED,MAPL",
                    help="comma-separated; DENSE runs first (its final loss sets the target)")
    ap.add_argument("--minutes", default="DENSE=8,FIXED=4,MAPL=4",
                    help="training budget per method: '8' for every method, or 'DENSE=8,MAPL=4'")
    ap.add_argument("--steps", default="0", help="step budget per method, like --minutes "
                    "(0: none; the first of the two budgets ends a run)")
    ap.add_argument("--target", type=float, default=0.0,
                    help="target validation loss (default: dense's final one x (1 + margin))")
    ap.add_argument("--target-margin", type=float, default=0.03)
    ap.add_argument("--no-stop-at-target", action="store_true",
                    help="run every method for its whole budget (default: the compressed "
                    "methods stop at the first evaluation that reaches the target)")
    ap.add_argument("--eval-every", type=float, default=0.025,
                    help="evaluate every this fraction of the budget")
    ap.add_argument("--iperf-seconds", type=float, default=10.0)
    ap.add_argument("--sample-ms", type=float, default=10.0,
                    help="the veth byte counters' sampling period (link utilisation)")
    ap.add_argument("--busy-fraction", type=float, default=0.1,
                    help="an interval is busy when it carried at least this fraction of the rate")
    ap.add_argument("--corpus", default="", help="a text file (default: the KJV Bible)")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2, help="one a stage: see README, sizing")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--schedule", default="gpipe", choices=("gpipe", "1f1b"),
                    help="the stages' pipeline schedule")
    ap.add_argument("--schedule-lead", type=int, default=0,
                    help="1f1b: microbatches each stage runs ahead beyond stages - index - 1")
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--k", type=int, default=0, help="projection rank (0: d_model / 8)")
    ap.add_argument("--forward-codec", default="INT8", type=str.upper,
                    choices=("RVQ", "INT8", "INT4", "BF16"),
                    help="fixed's and MAPL's forward codes")
    ap.add_argument("--rvq-levels", type=int, default=4, help="with --forward-codec RVQ")
    ap.add_argument("--backward-codec", default="INT8", type=str.upper,
                    choices=("INT8", "INT4", "BF16"), help="fixed's and MAPL's backward codes")
    add_boundary_option_args(ap)
    ap.add_argument("--rate-schedule", default="",
                    help="change the link's rate during each run: 'SECONDS=MBIT,...', seconds "
                    "after training starts, e.g. '150=5' drops 20 Mbit/s to 5 after 150 s; "
                    "adds a per-rate table and adaptive.png")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "out" / "wan",
                    help="results.json, val_loss_vs_time.png and each run's logs")
    ap.add_argument("--smoke", action="store_true",
                    help="a ~2-minute version: a small model, 20 s a method, 3 s of iperf3")
    args = ap.parse_args(argv)
    if args.smoke:
        args.d_model, args.layers, args.seq_len, args.batch = 128, 2, 64, 8
        args.microbatches, args.eval_batches, args.eval_every = 2, 4, 0.2
        args.iperf_seconds = 3.0
        if args.minutes == ap.get_default("minutes"):
            args.minutes = "0.33"
    try:
        args.boundary_options = parse_boundary_options(args.boundary_option)
        args.rate_changes = parse_rate_schedule(args.rate_schedule)
    except ValueError as e:
        ap.error(str(e))
    args.method_list = [m.strip().upper() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.method_list if m not in METHOD_ORDER]
    if bad or not args.method_list:
        ap.error(f"--methods: use {', '.join(METHOD_ORDER)}")
    args.method_list = [m for m in METHOD_ORDER if m in args.method_list]
    if "DENSE" not in args.method_list and args.target <= 0:
        ap.error("without DENSE in --methods, give --target")
    try:
        args.budget_minutes = _per_method(args.minutes, args.method_list, float, "minutes")
        args.budget_steps = _per_method(args.steps, args.method_list, int, "steps")
    except ValueError as e:
        ap.error(str(e))
    for m in args.method_list:
        if args.budget_minutes[m] <= 0 and args.budget_steps[m] <= 0:
            ap.error(f"{m} has no budget: give --minutes or --steps")
    if not 0 < args.eval_every <= 0.5:
        ap.error("--eval-every must be in (0, 0.5]")
    return args


def bench(args: argparse.Namespace) -> Dict[str, Any]:
    from llama_pipeline.data import load_text

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "link"
    work.mkdir(exist_ok=True)
    corpus = Path(args.corpus).resolve() if args.corpus else out / "corpus.txt"
    if not args.corpus:
        corpus.write_bytes(load_text(None))
    link = Link(args.rate_mbit, args.delay_ms)
    results: Dict[str, Any] = {"rate_mbit": args.rate_mbit, "delay_ms": args.delay_ms,
                               "rate_schedule": args.rate_changes,
                               "methods": args.method_list, "smoke": args.smoke, "runs": []}
    try:
        link.setup()
        results["tbf"] = link.qdisc()
        results["namespaces"] = [link.up, link.down]
        log(f"link: namespaces {link.up} and {link.down}, veth {link.if_up} <-> {link.if_down}; "
            f"{results['tbf']}")
        results.update(calibrate(link, work, args.iperf_seconds))
        target = args.target if args.target > 0 else None
        for i, method in enumerate(args.method_list):
            stop = None if (method == "DENSE" or args.no_stop_at_target) else target
            log("")
            log(f"== {method}: budget {args.budget_minutes[method]:g} min"
                + (f" / {args.budget_steps[method]} steps" if args.budget_steps[method] else "")
                + (f"; stops at validation loss <= {stop:.3f}" if stop is not None else ""))
            rec = train(method, i, args, link, work, out, corpus, stop)
            results["runs"].append(rec)
            if method == "DENSE" and target is None:
                target = rec["final_val_loss"] * (1 + args.target_margin)
                log(f"target: dense's final validation loss {rec['final_val_loss']:.4f} "
                    f"+ {args.target_margin:.0%} = {target:.4f}")
        results["target"] = target
        results["target_rule"] = (f"--target {args.target}" if args.target > 0 else
                                  f"dense final x {1 + args.target_margin:g}")
    finally:
        link.teardown()
    return results


def report(results: Dict[str, Any], out: Path) -> None:
    target = results["target"]
    iperf = results.get("iperf3")
    for rec in results["runs"]:
        first, interp = time_to_target(rec["val_train_seconds"], rec["val_loss"], target)
        rec["time_to_target_s"], rec["time_to_target_interp_s"] = first, interp
        fw, _ = time_to_target(rec["val_wall_seconds"], rec["val_loss"], target)
        rec["time_to_target_wall_s"] = fw
        # iperf3 measured the base rate: with a schedule the utilisation figure has no reference
        rec["utilisation"] = utilisation(rec, None if results.get("rate_schedule") else iperf)
    by = {r["method"]: r for r in results["runs"]}
    speedups = {}
    for a, b in (("DENSE", "MAPL"), ("DENSE", "FIXED"), ("FIXED", "MAPL")):
        if a in by and b in by:
            ta, tb = by[a]["time_to_target_s"], by[b]["time_to_target_s"]
            speedups[f"{b}_vs_{a}"] = (ta / tb) if ta and tb else None
    results["speedups"] = speedups
    (out / "results.json").write_text(json.dumps(results, indent=1))
    png = out / "val_loss_vs_time.png"
    plot(results, png)

    log("")
    log(f"== bench/wan: 2 stages, {results['rate_mbit']:g} Mbit/s (tbf) and "
        f"{results['delay_ms']:g} ms one way (relay; measured round trip "
        f"{results.get('rtt_relay_ms', float('nan')):.1f} ms) ==")
    log(f"target validation loss: {target:.4f} ({results['target_rule']})")
    codes = [r for r in results["runs"] if r["method"] != "DENSE"]
    if codes:
        r = codes[0]
        log(f"compressed methods: k = {r['k']}, forward codes {r['forward_codec']}"
            + (f" x {r['rvq_levels']}" if r.get("rvq_levels") else "")
            + f", backward {r['backward_codec'].lower()}"
            + "".join(f", {k}={v}" for k, v in r["boundary_options"].items()))
    log(f"{'method':7} {'steps':>6} {'train s':>8} {'final val':>9} {'compr.':>7} "
        f"{'to target (s)':>14} {'interp.':>8} {'w/ evals':>9} {'util.':>6} {'link busy':>9}")
    for rec in results["runs"]:
        t = rec["time_to_target_s"]
        u = rec["utilisation"]

        def fmt(x: Optional[float], w: int) -> str:
            return f"{x:{w}.1f}" if x is not None else f"{'-':>{w}}"
        log(f"{rec['method']:7} {rec['steps']:6d} {rec['train_seconds']:8.1f} "
            f"{rec['final_val_loss']:9.4f} {rec['compression']:6.1f}x "
            f"{fmt(t, 14) if t is not None else 'not reached':>14} "
            f"{fmt(rec['time_to_target_interp_s'], 8)} {fmt(rec['time_to_target_wall_s'], 9)} "
            + (f"{u['utilisation']:6.0%}" if "utilisation" in u else f"{'-':>6}")
            + (f" {u['busy_share']:9.0%}" if "busy_share" in u else f" {'-':>9}"))
    for name, v in speedups.items():
        b, a = name.split("_vs_")
        log(f"speed-up to target, {b} against {a}: "
            + (f"{v:.2f}x" if v is not None else "n/a (a method did not reach the target)"))
    if iperf:
        ref = (iperf["direct_forward_mbit"] + iperf["direct_backward_mbit"]) / 2
        log(f"iperf3 over the shaped veth: {ref:.2f} Mbit/s (mean of both directions; through "
            f"the relay {iperf['relay_forward_mbit']:.2f} / {iperf['relay_backward_mbit']:.2f})")
        for rec in results["runs"]:
            u = rec["utilisation"]
            if "utilisation" in u:
                log(f"  {rec['method']:6} during transfers: {u['daemon_rate_mbit']:.2f} Mbit/s of "
                    f"daemon wire bytes = {u['utilisation']:.0%} of iperf3 (busy "
                    f"{u['busy_forward_s']:.1f} s forward + {u['busy_backward_s']:.1f} s "
                    f"backward); everything on the peer link: "
                    f"{u.get('relay_forward_utilisation', float('nan')):.0%} forward, "
                    f"{u.get('relay_backward_utilisation', float('nan')):.0%} backward")
    if results.get("rate_schedule"):
        report_phases(results)
        adaptive = out / "adaptive.png"
        plot_adaptive(results, adaptive)
        log(f"per-step codes, errors and link use against time: {adaptive}")
    log(f"results: {out / 'results.json'}; plot: {png}")


def report_phases(results: Dict[str, Any]) -> None:
    """One line per run and stretch of constant rate: is the link or the compute the pace?"""
    log("")
    log("per rate: seconds a step; link busy share per direction; per step, the sidecars' "
        "codec seconds and the wire seconds each direction needs at the measured goodput; "
        "forward RVQ levels (mean over the RVQ frames), the codes' relative error |z - zq| / |z| "
        "(what forward_error_budget bounds), and frames sent as int8 over the budget")
    log(f"{'method':7} {'Mbit/s':>6} {'from s':>7} {'steps':>5} {'s/step':>7} {'busy f/b':>9} "
        f"{'codec s':>8} {'wire f/b s':>11} {'levels':>6} {'code err avg/max':>16} {'int8':>5}")
    for rec in results["runs"]:
        for ph in rec.get("phases", []):
            def f(key: str, fmt: str) -> str:
                v = ph.get(key)
                return format(v, fmt) if v is not None else "-"
            busy = (f"{ph['busy_forward_share']:.0%}/{ph['busy_backward_share']:.0%}"
                    if "busy_forward_share" in ph else "-")
            wire = (f"{ph['wire_forward_s']:.2f}/{ph['wire_backward_s']:.2f}"
                    if "wire_forward_s" in ph else "-")
            err = (f"{ph['forward_code_error_mean']:.3f}/{ph['forward_code_error_max']:.3f}"
                   if "forward_code_error_mean" in ph else "-")
            log(f"{rec['method']:7} {ph['rate_mbit']:6g} {ph['from_s']:7.1f} {ph['steps']:5d} "
                f"{f('step_s', '.3f'):>7} {busy:>9} {f('sidecar_compute_s', '.3f'):>8} "
                f"{wire:>11} {f('forward_rvq_levels', '.2f'):>6} {err:>16} "
                f"{f('budget_fallbacks', 'd'):>5}")


def plot_adaptive(results: Dict[str, Any], path: Path) -> None:
    """Against training time: step seconds and the link's busy share (the rate changes
    marked), the forward codes' depth, and their relative error against the budget."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    colors = {"DENSE": "tab:gray", "FIXED": "tab:orange", "MAPL": "tab:blue"}
    fig, (ax_t, ax_l, ax_e) = plt.subplots(3, 1, figsize=(8, 8.5), dpi=110, sharex=True)
    busy_ax = ax_t.twinx()
    for rec in results["runs"]:
        tl, m = rec.get("timeline"), rec["method"]
        if not tl:
            continue
        c = colors.get(m)
        t = [r["t"] for r in tl["steps"]]
        ax_t.plot(t, [r["step_s"] for r in tl["steps"]], ".", ms=3, color=c,
                  label=f"{m}: seconds a step")
        busy_ax.plot(tl["busy"]["t"], tl["busy"]["forward"], "-", lw=1, color=c, alpha=0.6,
                     label=f"{m}: link busy, forward")
        busy_ax.plot(tl["busy"]["t"], tl["busy"]["backward"], ":", lw=1, color=c, alpha=0.6,
                     label=f"{m}: link busy, backward")
        if m != "DENSE":
            ax_l.plot(t, [r.get("forward_rvq_levels", 0) for r in tl["steps"]], ".", ms=3,
                      color=c, label=m)
            ax_e.plot(t, [r.get("forward_code_relative_error", 0.0) for r in tl["steps"]], ".",
                      ms=3, color=c, label=f"{m}: codes, |z - zq| / |z|")
            ax_e.plot(t, [r.get("forward_relative_error", 0.0) for r in tl["steps"]], "x",
                      ms=2, color=c, alpha=0.35,
                      label=f"{m}: activation, |h - zq U^T| / |h| (also what U misses)")
            budget = rec["boundary_options"].get("forward_error_budget")
            if budget:  # it bounds the codes' error
                ax_e.axhline(budget, color=c, ls="--", lw=1, label=f"{m}: error budget")
        for when, rate in rec.get("rate_events", [])[1:]:
            for ax in (ax_t, ax_l, ax_e):
                ax.axvline(when, color="black", lw=0.8, ls=":")
            ax_t.annotate(f"{rate:g} Mbit/s", (when, 1), xycoords=("data", "axes fraction"),
                          xytext=(3, -12), textcoords="offset points", fontsize=8)
    ax_t.set_ylabel("seconds a step")
    ax_t.set_ylim(bottom=0)
    busy_ax.set_ylabel("link busy share (5 s windows)")
    busy_ax.set_ylim(0, 1.05)
    h1, l1 = ax_t.get_legend_handles_labels()
    h2, l2 = busy_ax.get_legend_handles_labels()
    ax_t.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    ax_l.set_ylabel("forward RVQ levels\n(mean of a step's RVQ frames)")
    ax_l.set_ylim(bottom=0)
    ax_e.set_ylabel("forward relative error\n(mean of a step's frames)")
    ax_e.set_ylim(bottom=0)
    ax_e.set_xlabel("training wall time, s")
    for ax in (ax_l, ax_e):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_t.grid(alpha=0.3)
    ax_t.set_title(f"2 stages over a link whose rate changes ({results['rate_mbit']:g} Mbit/s "
                   f"at the start), {results['delay_ms']:g} ms one way", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also where a parent left SIGINT ignored
    try:
        results = bench(args)
    except Skip as e:
        log(f"skipped: {e}")
        return 0
    except KeyboardInterrupt:
        log("\ninterrupted: stopped every process, deleted the namespaces")
        return 130
    except Exception as e:  # noqa: BLE001 - say what failed; cleanup already ran
        from llama_pipeline.run import PipelineError
        if isinstance(e, (BenchError, PipelineError, ValueError)):
            log(f"\nerror: {e}\nstopped every process, deleted the namespaces")
            return 1
        raise
    report(results, args.out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
