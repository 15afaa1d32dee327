"""Soak: two mapld daemons stream thousands of microbatches through a fault-injecting relay
(fault_relay.py) that cuts, resets, black-holes, stalls and corrupts the peer link at random,
while each daemon is killed with SIGKILL and restarted once (same config; its trainer
reattaches).

What is held (per attempt, i.e. per (step, microbatch) a trainer sends):
  - each tensor is delivered exactly once with the right contents: METHOD_DENSE travels as bf16,
    so the received tensor equals the sender's tensor rounded to bf16, bit for bit (METHOD_MAPL:
    its error stays within a bound measured on the same pair before any fault), or
  - the call fails within its deadline with UNAVAILABLE, DEADLINE_EXCEEDED or DATA_LOSS, and the
    exception names the boundary, the step and the microbatch.
A logical microbatch whose attempt failed is retried under a new key in a later step, until it
gets through: it is then "recovered". METHOD_MAPL also holds both sides' dictionary version and
checksum equal after every step once the link is up.

The soak runs once per method (a module fixture); the checks are separate tests, so that each
requirement passes or fails on its own. The figures are printed (delivered, failed, recovered, longest
recovery, faults injected, kills).

SOAK_SEED=<n> in the environment replays a run's fault schedule.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest

from conftest import mapld_binary, need_module, start_mapld
from fault_relay import BOTH, DOWN, UP, FaultRelay

torch = need_module("torch")
mapl = need_module("mapl")
launch = need_module("mapl.launch")

D, K, VOCAB, MAX_TOKENS = 64, 8, 256, 64
MICROBATCHES = 8           # a step's microbatches
STEP_BUDGET = 2.0          # seconds a step's receives may wait, in all
SEND_TIMEOUT_MS = 1500     # DaemonConfig.send_timeout_ms: a Send waiting for a down link
SLACK = 1.5                # a failure may come this long after its deadline (a loaded CI host)
MAX_ATTEMPTS = 12          # a logical microbatch not through after this many attempts is lost
ALLOWED = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "DATA_LOSS"}

# The daemons' config: short timeouts, so that a fault is found in about a second.
DAEMON_FIELDS = {
    "recv_timeout_ms": 3000,
    "send_timeout_ms": SEND_TIMEOUT_MS,
    "peer_keepalive_ms": 1000,      # the shortest gRPC allows
    "peer_hello_timeout_ms": 2000,
    "peer_connect_timeout_ms": 3000,
}

SEED = int(os.environ.get("SOAK_SEED", "20240611"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tensors(step: int, mb: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The activation, its token ids and the gradient of attempt (step, mb): a pure function of
    the key, so every check knows what was sent. Activations lie in a fixed rank-K subspace
    (plus a little noise), which METHOD_MAPL's projector can learn."""
    g = torch.Generator().manual_seed(step * 1000 + mb)
    rows = int(torch.randint(16, MAX_TOKENS + 1, (1,), generator=g))
    basis = torch.Generator().manual_seed(1)
    b = torch.randn(K, D, generator=basis)
    h = torch.randn(rows, K, generator=g) @ b + 0.01 * torch.randn(rows, D, generator=g)
    ids = torch.randint(0, VOCAB, (rows,), generator=g)
    grad = torch.randn(rows, D, generator=g)
    return h, ids, grad


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@dataclasses.dataclass
class Outcome:
    ok: bool
    value: object = None
    error: Optional[BaseException] = None
    elapsed: float = 0.0
    timeout: float = 0.0
    what: str = ""  # "send_activation", "recv_gradient", ...


@dataclasses.dataclass
class Report:
    method: str
    seed: int
    attempts: int = 0
    attempts_ok: int = 0
    delivered: int = 0            # logical microbatches through (forward and backward)
    recovered: int = 0            # of those, after at least one failed attempt
    lost: int = 0                 # never through within MAX_ATTEMPTS
    failed_ops: Dict[str, int] = dataclasses.field(default_factory=dict)  # by code
    failures: List[Tuple[str, str, str, float, float]] = dataclasses.field(default_factory=list)
    wrong_contents: List[str] = dataclasses.field(default_factory=list)
    unnamed: List[str] = dataclasses.field(default_factory=list)
    local_gone: List[str] = dataclasses.field(default_factory=list)  # calls to a killed daemon
    bad_code: List[str] = dataclasses.field(default_factory=list)
    late: List[str] = dataclasses.field(default_factory=list)
    faults: Dict[str, int] = dataclasses.field(default_factory=dict)
    kills: Dict[str, int] = dataclasses.field(default_factory=dict)
    recoveries: List[Tuple[str, float]] = dataclasses.field(default_factory=list)
    longest_gap: float = 0.0
    stalled_out: bool = False     # the run stopped: nothing was delivered for 45 s
    seconds: float = 0.0
    relay: Dict[str, int] = dataclasses.field(default_factory=dict)
    error_bound: float = 0.0      # METHOD_MAPL: from the fault-free warm-up
    max_error: float = 0.0
    dict_checks: int = 0
    dict_mismatch: List[str] = dataclasses.field(default_factory=list)
    dict_unsettled: List[str] = dataclasses.field(default_factory=list)
    logs: Dict[str, str] = dataclasses.field(default_factory=dict)
    kept_logs: str = ""           # where the daemons' logs were kept, after a failure

    def summary(self) -> str:
        longest = max(self.recoveries, key=lambda r: r[1], default=("-", 0.0))
        failed = sum(self.failed_ops.values())
        lines = [
            f"soak {self.method} (SOAK_SEED={self.seed}): {self.seconds:.1f} s",
            f"  microbatches delivered {self.delivered} (attempts {self.attempts}, "
            f"{self.attempts_ok} through), recovered {self.recovered}, lost {self.lost}",
            f"  failed calls {failed}: {dict(sorted(self.failed_ops.items()))}",
            f"  longest recovery {longest[1]:.2f} s (after {longest[0]}), longest gap without a "
            f"delivery {self.longest_gap:.2f} s",
            f"  faults injected {sum(self.faults.values())}: {dict(sorted(self.faults.items()))}",
            f"  kills (SIGKILL + restart): {self.kills}",
            f"  relay: {dict(sorted(self.relay.items()))}",
            f"  wrong contents {len(self.wrong_contents)}, codes outside {sorted(ALLOWED)} "
            f"{len(self.bad_code)}, not naming boundary/step/microbatch {len(self.unnamed)}, "
            f"past their deadline {len(self.late)}; calls cut by their own daemon's SIGKILL "
            f"{len(self.local_gone)}",
        ]
        if self.method == "METHOD_MAPL":
            lines.append(f"  decode error: max {self.max_error:.4f}, bound {self.error_bound:.4f};"
                         f" dictionary checks {self.dict_checks}, checksum mismatches "
                         f"{len(self.dict_mismatch)}, unsettled {len(self.dict_unsettled)}")
        if self.stalled_out:
            lines.append("  STOPPED: nothing was delivered for 45 s")
        if self.kept_logs:
            lines.append(f"  daemon logs kept in {self.kept_logs}")
        for name, items in (("wrong contents", self.wrong_contents), ("bad code", self.bad_code),
                            ("unnamed", self.unnamed), ("late", self.late),
                            ("cut by SIGKILL", self.local_gone),
                            ("dictionary mismatch", self.dict_mismatch),
                            ("dictionary unsettled", self.dict_unsettled)):
            for item in items[:4]:
                lines.append(f"  e.g. {name}: {item}")
        return "\n".join(lines)


class Soak:
    """Two daemons of boundary 0 (stage 0 upstream, stage 1 downstream) with the relay between
    them, a trainer Sidecar on each, and a chaos thread."""

    def __init__(self, directory: Path, method: str, microbatches: int, faults: int,
                 seed: int) -> None:
        self.dir = directory
        self.method = method
        self.total = microbatches
        self.rng = random.Random(seed)
        self.report = Report(method, seed)
        self.boundary = {"id": 0, "d": D, "k": K, "method": method, "vocab": VOCAB,
                         "max_tokens": MAX_TOKENS, "seed": 7}
        if method == "METHOD_MAPL":
            self.boundary.update(forward_codec="CODEC_BF16", backward_codec="CODEC_INT8")
        down_port = free_port()
        self.relay = FaultRelay(("127.0.0.1", down_port), seed=seed).start()
        self.lock = threading.Lock()
        self.cv = threading.Condition(self.lock)
        self.procs: Dict[int, object] = {}
        self.alive = {0: False, 1: False}
        self.gen = {0: 0, 1: 0}
        self.sc: Dict[int, object] = {}
        self.sc_gen = {0: -1, 1: -1}
        self.procs[1] = start_mapld(self.dir, 1, [dict(self.boundary, role="ROLE_DOWNSTREAM")],
                                    dict(DAEMON_FIELDS, peer_listen=f"127.0.0.1:{down_port}"))
        self.procs[1].ready()
        self.procs[0] = start_mapld(
            self.dir, 0, [dict(self.boundary, role="ROLE_UPSTREAM",
                               peer_address=f"127.0.0.1:{self.relay.listen_port}")],
            dict(DAEMON_FIELDS))
        self.procs[0].ready()
        self.alive = {0: True, 1: True}
        self.restarts = {0: 0, 1: 0}
        self.pool = ThreadPoolExecutor(2)
        # Progress, for the chaos thread and the recovery times.
        self.delivered_count = 0
        self.last_delivery = time.monotonic()
        self.fault_active = False
        self.pending_recovery: List[Tuple[str, float]] = []
        self.stop = threading.Event()
        self.schedule = self._schedule(faults)
        self.begun = 0  # schedule entries the chaos thread has started

    # ---- daemons and trainers ----

    def trainer(self, stage: int):
        """This stage's Sidecar, reattached when its daemon was restarted (waits for it)."""
        with self.cv:
            self.cv.wait_for(lambda: self.alive[stage] or self.stop.is_set(), timeout=60)
            gen = self.gen[stage]
        if self.sc_gen[stage] != gen:
            old = self.sc.pop(stage, None)
            if old is not None:
                try:
                    old.close()
                except mapl.MaplError:
                    pass
            self.sc[stage] = self.procs[stage].connect(f"soak-{stage}-{gen}")
            self.sc_gen[stage] = gen
        return self.sc[stage]

    def kill_and_restart(self, stage: int) -> None:
        old = self.procs[stage]
        with self.cv:
            self.alive[stage] = False
        old.kill()  # SIGKILL, reaped
        old.stop()  # closes its log
        time.sleep(self.rng.uniform(0.2, 1.0))
        self.restarts[stage] += 1
        # The same command line, hence the same config file; a log of its own.
        old.ready_file.unlink(missing_ok=True)
        new = launch.Daemon(old.argv, self.dir / f"s{stage}.restart{self.restarts[stage]}.log",
                            old.socket_path, old.ready_file)
        new.ready()
        with self.cv:
            self.procs[stage] = new
            self.gen[stage] += 1
            self.alive[stage] = True
            self.cv.notify_all()

    def dump_stacks(self) -> None:
        """Every live daemon's thread stacks (gdb, where installed) into the kept directory, for
        the post-mortem of a stall."""
        gdb = shutil.which("gdb")
        if gdb is None:
            return
        for stage, p in self.procs.items():
            if p.proc.poll() is None:
                with open(self.dir / f"s{stage}.stacks.txt", "w") as out:
                    subprocess.run([gdb, "-p", str(p.proc.pid), "-batch", "-ex",
                                    "thread apply all bt"], stdout=out, stderr=subprocess.STDOUT,
                                   timeout=60, check=False)

    def close(self) -> None:
        if self.report.stalled_out:
            self.dump_stacks()
        self.stop.set()
        with self.cv:
            self.cv.notify_all()
        self.pool.shutdown()
        for sc in self.sc.values():
            try:
                sc.close()
            except mapl.MaplError:
                pass
        self.relay.close()
        for stage, p in self.procs.items():
            p.stop(timeout=20)
        for log in sorted(self.dir.glob("*.log")):
            self.report.logs[log.name] = log.read_text(errors="replace")

    # ---- chaos ----

    def _schedule(self, faults: int) -> List[Tuple[int, str]]:
        """(delivered-microbatch threshold, event) for every fault and both kills, spread over
        the run in random order (each kind at least faults // 6 times)."""
        kinds = ["partition_refuse", "partition_drop", "reset", "reset_mid_message",
                 "black_hole", "corrupt", "stall", "slow"]
        core = ["partition_refuse", "reset", "reset_mid_message", "black_hole", "corrupt"]
        events = list(kinds)  # every kind at least once
        events += [core[i % len(core)] for i in range(max(0, faults * 3 // 4 - len(kinds)))]
        events += [self.rng.choice(kinds) for _ in range(faults - len(events))]
        self.rng.shuffle(events)
        events.insert(len(events) // 3, "kill_upstream")
        events.insert(2 * len(events) // 3, "kill_downstream")
        # The first 5% of the run is fault-free (METHOD_MAPL measures its error bound there).
        start, end = int(self.total * 0.05), int(self.total * 0.95)
        gap = (end - start) / len(events)
        return [(int(start + i * gap), e) for i, e in enumerate(events)]

    def chaos(self) -> None:
        for threshold, event in self.schedule:
            with self.cv:
                self.cv.wait_for(lambda: self.delivered_count >= threshold or
                                 self.stop.is_set())
            if self.stop.is_set():
                return
            with self.cv:
                self.begun += 1  # the trainers may go on
                self.cv.notify_all()
            time.sleep(self.rng.uniform(0.0, 0.05))  # land anywhere within a step
            self.fault_active = True
            self.inject(event)
            with self.lock:
                self.pending_recovery.append((event, time.monotonic()))
            self.fault_active = False

    def inject(self, event: str) -> None:
        r, rng = self.relay, self.rng
        report = self.report
        if event.startswith("kill_"):
            stage = 0 if event == "kill_upstream" else 1
            report.kills[event] = report.kills.get(event, 0) + 1
            self.kill_and_restart(stage)
            return
        report.faults[event] = report.faults.get(event, 0) + 1
        hold = rng.uniform(0.3, 1.2)
        direction = rng.choice([UP, DOWN, BOTH])
        if event == "partition_refuse":
            r.partition("refuse")
            time.sleep(hold)
            r.heal()
        elif event == "partition_drop":
            r.partition("drop")
            time.sleep(hold)
            r.heal()
        elif event == "reset":
            r.reset()
        elif event == "reset_mid_message":
            # Cut the upstream's stream inside a frame (frames are 2 KiB to 8 KiB of bf16).
            r.reset(UP, after_bytes=rng.randrange(1, 6000))
            time.sleep(hold)
            r.clear()
            r.reset()  # if no frame came to cut, cut now
        elif event == "black_hole":
            r.black_hole(direction)
            time.sleep(hold)
            r.clear()
        elif event == "corrupt":
            r.corrupt(rng.choice([UP, DOWN]), chunks=rng.randint(1, 3))
            time.sleep(hold)
            r.clear()
        elif event == "stall":
            r.stall(direction)
            time.sleep(hold)
            r.resume(direction)
        elif event == "slow":
            r.set_delay(rng.uniform(0.005, 0.03))
            r.set_bandwidth(rng.uniform(100e3, 400e3))
            time.sleep(hold)
            r.clear()
        else:
            raise AssertionError(event)

    # ---- one step ----

    def call(self, what: str, fn: Callable[[], object], timeout: float) -> Outcome:
        start = time.monotonic()
        try:
            return Outcome(True, fn(), None, time.monotonic() - start, timeout, what)
        except mapl.MaplError as e:
            return Outcome(False, None, e, time.monotonic() - start, timeout, what)

    def judge(self, o: Outcome, step: int, mb: int) -> None:
        """Holds a failed call to the rules: an allowed code, naming what failed, in time."""
        e = o.error
        code = getattr(e, "code_name", type(e).__name__)
        key = f"{o.what}(step {step}, microbatch {mb}) after {o.elapsed:.2f} s: {code}: {e}"
        gone = self.local_daemon_gone(o.what)
        with self.lock:
            self.report.failed_ops[code] = self.report.failed_ops.get(code, 0) + 1
            self.report.failures.append((o.what, code, str(e), o.elapsed, o.timeout))
            if code not in ALLOWED:
                self.report.bad_code.append(key)
            msg = str(e)
            if not ("boundary 0" in msg and f"step {step}" in msg and f"microbatch {mb}" in msg):
                if gone:
                    # The client's own error for a daemon that died under the call (it names the
                    # call too: test_call_to_a_killed_daemon_names_what_failed).
                    self.report.local_gone.append(key)
                else:
                    self.report.unnamed.append(key)
            if o.elapsed > o.timeout + SLACK:
                self.report.late.append(f"{key} (deadline {o.timeout:.2f} s)")

    def local_daemon_gone(self, what: str) -> bool:
        """Whether the daemon this call went to was killed since its trainer attached."""
        stage = 0 if what in ("send_activation", "recv_gradient") else 1
        with self.lock:
            return not self.alive[stage] or self.gen[stage] != self.sc_gen[stage]

    def run_step(self, step: int, ids: List[int]) -> List[bool]:
        """Sends logical microbatches `ids` as microbatches 0.. of `step`, forward and back;
        returns which got through both ways."""
        n = len(ids)
        fwd = [threading.Event() for _ in range(n)]
        fwd_ok = [False] * n
        bwd = [threading.Event() for _ in range(n)]
        bwd_ok = [False] * n
        through = [False] * n
        errors: List[float] = []

        def up() -> None:
            try:
                sc = self.trainer(0)
                for mb in range(n):
                    h, ids_, _ = tensors(step, mb)
                    o = self.call("send_activation",
                                  lambda: sc.send_activation(0, step, mb, h, ids_),
                                  SEND_TIMEOUT_MS / 1000)
                    fwd_ok[mb] = o.ok
                    if not o.ok:
                        self.judge(o, step, mb)
                    fwd[mb].set()
                deadline = time.monotonic() + STEP_BUDGET
                for mb in range(n):
                    bwd[mb].wait(60)
                    if not bwd_ok[mb]:
                        continue
                    _, _, g = tensors(step, mb)
                    t = max(0.2, deadline - time.monotonic())
                    o = self.call("recv_gradient",
                                  lambda: sc.recv_gradient(0, step, mb, timeout=t, rows=MAX_TOKENS),
                                  t)
                    if not o.ok:
                        self.judge(o, step, mb)
                        continue
                    self.check_gradient(o.value, g, step, mb)
                    through[mb] = True
                self.call("step", lambda: sc.step(step, timeout=STEP_BUDGET), STEP_BUDGET)
            finally:
                for e in fwd:
                    e.set()

        def down() -> None:
            try:
                sc = self.trainer(1)
                deadline = time.monotonic() + STEP_BUDGET + SEND_TIMEOUT_MS / 1000
                for mb in range(n):
                    fwd[mb].wait(60)
                    if not fwd_ok[mb]:
                        bwd[mb].set()
                        continue
                    h, _, g = tensors(step, mb)
                    t = max(0.2, deadline - time.monotonic())
                    o = self.call("recv_activation",
                                  lambda: sc.recv_activation(0, step, mb, timeout=t,
                                                             rows=MAX_TOKENS), t)
                    if not o.ok:
                        self.judge(o, step, mb)
                        bwd[mb].set()
                        continue
                    err = self.check_activation(o.value, h, step, mb)
                    if err is not None:
                        errors.append(err)
                    o = self.call("send_gradient", lambda: sc.send_gradient(0, step, mb, g),
                                  SEND_TIMEOUT_MS / 1000)
                    bwd_ok[mb] = o.ok
                    if not o.ok:
                        self.judge(o, step, mb)
                    bwd[mb].set()
                self.call("step", lambda: sc.step(step, timeout=STEP_BUDGET), STEP_BUDGET)
            finally:
                for e in bwd:
                    e.set()

        fu, fd = self.pool.submit(up), self.pool.submit(down)
        fu.result(timeout=300)
        fd.result(timeout=300)
        self.step_errors = errors
        return through

    def check_activation(self, got: torch.Tensor, h: torch.Tensor, step: int,
                         mb: int) -> Optional[float]:
        if got.shape != h.shape:
            self.report.wrong_contents.append(
                f"forward (step {step}, microbatch {mb}): shape {tuple(got.shape)}, sent "
                f"{tuple(h.shape)}")
            return None
        if self.method == "METHOD_DENSE":
            want = h.bfloat16().float()
            if not torch.equal(got, want):
                self.report.wrong_contents.append(
                    f"forward (step {step}, microbatch {mb}): differs from the bf16 tensor sent "
                    f"(relative error {rel(got, h):.3g})")
            return None
        err = rel(got, h)
        if self.report.error_bound:
            self.report.max_error = max(self.report.max_error, err)
        if self.report.error_bound and err > self.report.error_bound:
            self.report.wrong_contents.append(
                f"forward (step {step}, microbatch {mb}): relative error {err:.4f} over the "
                f"fault-free bound {self.report.error_bound:.4f}")
        return err

    def check_gradient(self, got: torch.Tensor, g: torch.Tensor, step: int, mb: int) -> None:
        if got.shape != g.shape:
            self.report.wrong_contents.append(
                f"backward (step {step}, microbatch {mb}): shape {tuple(got.shape)}, sent "
                f"{tuple(g.shape)}")
        elif self.method == "METHOD_DENSE" and not torch.equal(got, g.bfloat16().float()):
            self.report.wrong_contents.append(
                f"backward (step {step}, microbatch {mb}): differs from the bf16 tensor sent")

    def check_dictionary(self, step: int) -> None:
        """METHOD_MAPL, with no fault on and both daemons up: the two sides agree on the
        dictionary (the last delta travels after the upstream's Step: wait for it)."""
        if self.fault_active or not all(self.alive.values()):
            return
        deadline = time.monotonic() + 3.0
        while True:
            try:
                bu = self.trainer(0).stats().boundary(0)
                bd = self.trainer(1).stats().boundary(0)
            except mapl.MaplError:
                return  # a daemon went down meanwhile
            if not (bu.link.connected and bd.link.connected) or self.fault_active:
                return
            same_version = bu.dictionary_version == bd.dictionary_version
            if same_version and bu.dictionary_checksum == bd.dictionary_checksum:
                self.report.dict_checks += 1
                return
            if time.monotonic() > deadline:
                what = (f"after step {step}: upstream version {bu.dictionary_version} checksum "
                        f"{bu.dictionary_checksum:#x}, downstream version {bd.dictionary_version} "
                        f"checksum {bd.dictionary_checksum:#x}")
                (self.report.dict_mismatch if same_version
                 else self.report.dict_unsettled).append(what)
                return
            time.sleep(0.02)

    # ---- the run ----

    def run(self) -> Report:
        rep = self.report
        chaos = threading.Thread(target=self.chaos, daemon=True, name="chaos")
        start = time.monotonic()
        chaos.start()
        queue: List[Tuple[int, int]] = []  # (logical id, attempts so far) waiting for a retry
        next_id = 0
        step = 0
        warmup_errors: List[float] = []
        warmup = int(self.total * 0.05)
        while next_id < self.total or queue:
            if time.monotonic() - self.last_delivery > 45:
                rep.stalled_out = True  # the link never came back: stop, and say so
                break
            # The trainers do not outrun the schedule: every fault due by now has begun (a fast
            # run would otherwise end before most of them were injected).
            with self.cv:
                due = sum(threshold <= self.delivered_count for threshold, _ in self.schedule)
                self.cv.wait_for(lambda: self.begun >= due, timeout=30)
            step += 1
            batch = queue[:MICROBATCHES]
            queue = queue[MICROBATCHES:]
            while len(batch) < MICROBATCHES and next_id < self.total:
                batch.append((next_id, 0))
                next_id += 1
            through = self.run_step(step, [lid for lid, _ in batch])
            now = time.monotonic()
            rep.attempts += len(batch)
            for (lid, tries), ok in zip(batch, through):
                if ok:
                    rep.attempts_ok += 1
                    rep.delivered += 1
                    rep.recovered += tries > 0
                elif tries + 1 >= MAX_ATTEMPTS:
                    rep.lost += 1
                else:
                    queue.append((lid, tries + 1))
            if any(through):
                with self.cv:
                    rep.longest_gap = max(rep.longest_gap, now - self.last_delivery)
                    self.last_delivery = now
                    self.delivered_count = rep.delivered
                    for event, at in self.pending_recovery:
                        rep.recoveries.append((event, now - at))
                    self.pending_recovery = []
                    self.cv.notify_all()
            if self.method == "METHOD_MAPL":
                if rep.delivered <= warmup:
                    warmup_errors.extend(self.step_errors)
                elif not rep.error_bound:
                    # The bound: the worst decode error of the fault-free start, doubled (U still
                    # learns, so later steps should only do better).
                    rep.error_bound = 2 * max(warmup_errors) + 1e-3
                self.check_dictionary(step)
        self.stop.set()
        with self.cv:
            self.cv.notify_all()
        chaos.join(timeout=60)
        rep.seconds = time.monotonic() - start
        rep.relay = {k: v for k, v in self.relay.counters().items()
                     if k.startswith(("fault_", "closed_", "connections", "reset_", "bytes_c"))}
        return rep


def run_soak(method: str, microbatches: int, faults: int) -> Report:
    mapld_binary()
    directory = Path(tempfile.mkdtemp(prefix="mapl-soak-", dir="/tmp"))
    soak = None
    try:
        soak = Soak(directory, method, microbatches, faults, SEED)
        report = soak.run()
    finally:
        if soak is not None:
            soak.close()
        keep = soak is None or soak.report.stalled_out or soak.report.wrong_contents or \
            soak.report.unnamed or soak.report.lost
        if keep:  # the daemons' logs stay for a post-mortem; the summary names the directory
            if soak is not None:
                soak.report.kept_logs = str(directory)
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return report


def test_relay_faults_on_an_echo_server():
    """The relay itself, against an echo server: each fault does what fault_relay.py says."""
    server = socket.create_server(("127.0.0.1", 0))

    def echo() -> None:
        while True:
            try:
                c, _ = server.accept()
            except OSError:
                return

            def serve(c=c) -> None:
                try:
                    while (data := c.recv(65536)):
                        c.sendall(data)
                except OSError:
                    pass
            threading.Thread(target=serve, daemon=True).start()

    threading.Thread(target=echo, daemon=True).start()
    with FaultRelay(server.getsockname()) as relay:
        def connect() -> socket.socket:
            return socket.create_connection(("127.0.0.1", relay.listen_port), timeout=3)

        def round_trip(c: socket.socket, n: int = 1000) -> bytes:
            c.sendall(b"x" * n)
            got = b""
            while len(got) < n:
                got += c.recv(65536)
            return got

        c = connect()
        assert round_trip(c) == b"x" * 1000
        relay.set_delay(0.1)  # both directions
        start = time.monotonic()
        round_trip(c)
        assert time.monotonic() - start >= 0.2
        relay.clear()
        relay.corrupt(UP)
        assert sum(a != ord("x") for a in round_trip(c)) == 1
        relay.black_hole(UP)
        c.sendall(b"y" * 100)
        c.settimeout(0.3)
        with pytest.raises(TimeoutError):
            c.recv(10)
        relay.clear()
        c.settimeout(3)
        assert round_trip(c) == b"x" * 1000  # the connection survived, the 100 bytes did not
        relay.reset(UP, after_bytes=500)
        c.sendall(b"q" * 2000)
        with pytest.raises(ConnectionResetError):
            while c.recv(65536):
                pass
        relay.partition()
        # Refused: the relay accepts and resets at once, which the client sees on its first
        # read, or already while connecting when the reset wins the race.
        with pytest.raises(ConnectionResetError):
            refused = socket.create_connection(("127.0.0.1", relay.listen_port), timeout=3)
            refused.recv(10)
        relay.heal()
        assert round_trip(connect()) == b"x" * 1000
        counts = relay.counters()
    server.close()
    assert counts["bytes_corrupted_up"] == 1 and counts["bytes_black_holed_up"] == 100
    assert counts["reset_mid_stream_fired"] == 1 and counts["connections_refused"] == 1


@pytest.fixture(scope="module")
def dense() -> Report:
    return run_soak("METHOD_DENSE", 2000, 24)


def show(report: Report, capsys) -> None:
    with capsys.disabled():
        print("\n" + report.summary())


def test_dense_soak_delivers_exactly_once_or_fails_in_time(dense: Report, capsys):
    show(dense, capsys)
    assert not dense.stalled_out, "nothing was delivered for 45 s: the link never came back"
    assert dense.delivered + dense.lost == 2000
    assert sum(dense.faults.values()) >= 20
    assert dense.kills == {"kill_upstream": 1, "kill_downstream": 1}
    assert dense.wrong_contents == [], dense.wrong_contents[:5]
    assert dense.lost == 0
    assert dense.late == [], dense.late[:5]
    assert dense.recovered > 0  # the faults did cost attempts, and they were made good


def test_dense_soak_failures_have_the_documented_codes(dense: Report):
    assert dense.bad_code == [], dense.bad_code[:5]


def test_dense_soak_failures_name_boundary_step_and_microbatch(dense: Report):
    assert dense.unnamed == [], dense.unnamed[:5]


@pytest.fixture(scope="module")
def learned() -> Report:
    return run_soak("METHOD_MAPL", 600, 10)


def test_mapl_soak_decodes_within_the_fault_free_bound(learned: Report, capsys):
    show(learned, capsys)
    assert not learned.stalled_out, "nothing was delivered for 45 s: the link never came back"
    assert learned.delivered == 600 and learned.lost == 0
    assert learned.kills == {"kill_upstream": 1, "kill_downstream": 1}
    assert learned.error_bound > 0
    assert learned.wrong_contents == [], learned.wrong_contents[:5]
    assert learned.late == [] and learned.unnamed == []


# After a SIGKILL restart (METHOD_MAPL) the restarted daemon starts its dictionary afresh at
# version 0 while the survivor holds the other lineage. The link tells each side's engine of the
# peer's restart: a downstream drops the dead upstream's versions, an upstream sends its restarted
# downstream the current dictionary at once, and a frame naming a version a snapshot brings waits
# for it. So no frame is refused for its dictionary version. A step that closes while that first
# snapshot is still on its way may find the restarted side at version 0, at most once a restart.


def test_mapl_soak_failures_have_the_documented_codes(learned: Report):
    assert learned.bad_code == [], learned.bad_code[:5]


def test_mapl_soak_dictionaries_agree_after_every_step(learned: Report):
    assert learned.dict_checks > 0
    assert learned.dict_mismatch == [], learned.dict_mismatch[:5]
    in_flight = [f for f in learned.dict_unsettled if "version 0 " in f]
    others = [f for f in learned.dict_unsettled if f not in in_flight]
    assert others == [], others[:5]
    assert len(in_flight) <= sum(learned.kills.values()), in_flight


def test_call_to_a_killed_daemon_names_what_failed(short_tmp: Path):
    proc = start_mapld(short_tmp, 1, [{"id": 0, "role": "ROLE_DOWNSTREAM", "d": D,
                                       "method": "METHOD_DENSE", "max_tokens": MAX_TOKENS}],
                       {"peer_listen": "127.0.0.1:0"})
    try:
        sc = proc.connect("doomed")
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(sc.recv_activation, 0, 5, 3, timeout=20.0)
            time.sleep(0.5)  # the Recv waits in the daemon
            proc.kill()
            with pytest.raises(mapl.Unavailable) as info:
                waiting.result(timeout=30)
        msg = str(info.value)
        assert "boundary 0" in msg and "step 5" in msg and "microbatch 3" in msg, msg
    finally:
        proc.stop()
