"""An unauthenticated crowd at a mapld's peer port: 1,000 connections whose streams never say
Hello, a 256 MiB first message and a brute force of the token. The daemon's threads and memory
stay under the ceilings its config sets, the crowd learns nothing, everything is counted, and the
real peer keeps training throughout."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import in_ci, missing, need_module, start_pair
from test_daemon_ops import sample, scrape

torch = need_module("torch")

D = 64
BOUNDARY = {"d": D, "k": 8, "vocab": 100, "max_tokens": 128, "method": "METHOD_DENSE"}
MAX_PENDING = 32  # peer_max_pending_streams, the default
HELLO_TIMEOUT_MS = 2000


def abuse_binary() -> Path:
    path = os.environ.get("MAPL_PEER_ABUSE") or str(
        Path(__file__).resolve().parents[2] / "build/tests/server/transport/peer_abuse")
    if not Path(path).exists():
        if in_ci():
            missing(f"peer_abuse is not built ({path})")
        pytest.skip(f"peer_abuse is not built ({path})")
    return Path(path)


def proc_status(pid: int) -> Dict[str, int]:
    """Threads and VmRSS (KiB) of a process, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Threads", "VmRSS"):
            out[key] = int(value.split()[0])
    return out


class Watch:
    """Samples a process's threads and RSS every 20 ms until stopped; keeps the maxima."""

    def __init__(self, pid: int):
        self.pid = pid
        self.max = proc_status(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            now = proc_status(self.pid)
            for k, v in now.items():
                self.max[k] = max(self.max[k], v)

    def stop(self) -> Dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.max


class Trainer:
    """The real peer: forward microbatches through the boundary, one after another, until
    stopped; records when each arrived intact."""

    def __init__(self, up, down):
        self.up, self.down = up, down
        self.arrived: List[float] = []
        self.errors: List[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        step, mb = 1, 0
        while not self._stop.is_set():
            h = torch.randn(64, D)
            try:
                self.up.send_activation(0, step, mb, h, torch.randint(0, 100, (64,)))
                got = self.down.recv_activation(0, step, mb, timeout=20)
                if not torch.equal(got, h.to(torch.bfloat16).to(torch.float32)):
                    self.errors.append(f"step {step} mb {mb}: wrong contents")
                self.arrived.append(time.monotonic())
            except Exception as e:  # noqa: BLE001 - every failure is a finding here
                self.errors.append(f"step {step} mb {mb}: {e}")
            mb += 1
            if mb == 8:
                step, mb = step + 1, 0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def run_abuse(port: int, *args: str) -> Dict[str, int]:
    r = subprocess.run([str(abuse_binary()), f"--target=127.0.0.1:{port}", *args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_an_unauthenticated_crowd_stays_under_the_ceilings_and_training_goes_on(short_tmp: Path):
    abuse_binary()
    up_proc, down_proc = start_pair(short_tmp, BOUNDARY,
                                    {"peer_hello_timeout_ms": HELLO_TIMEOUT_MS,
                                     "peer_keepalive_ms": 2000})
    trainer = None
    try:
        up, down = up_proc.connect("up"), down_proc.connect("down")
        pid = down_proc.proc.pid
        port = down_proc.ready()["peer_port"]
        trainer = Trainer(up, down)
        time.sleep(1.0)
        base = proc_status(pid)
        watch = Watch(pid)
        phases = {}
        for name, args in (("silent", ["--silent=1000", f"--hold_ms={3 * HELLO_TIMEOUT_MS}"]),
                           ("big", [f"--big_bytes={256 << 20}"]),
                           ("brute", ["--brute=2000"])):
            start = time.monotonic()
            ended = run_abuse(port, *args)
            end = time.monotonic()
            during = [t for t in trainer.arrived if start <= t <= end]
            phases[name] = (ended, end - start, len(during))
        peak = watch.stop()
        trainer.stop()
        for name, (ended, seconds, delivered) in phases.items():
            print(f"{name}: {ended} in {seconds:.1f} s; the real peer delivered {delivered} "
                  f"microbatches meanwhile")
        print(f"daemon threads {base['Threads']} before, at most {peak['Threads']} during; "
              f"RSS {base['VmRSS'] // 1024} MiB before, at most {peak['VmRSS'] // 1024} MiB")
        assert trainer.errors == [], trainer.errors[:5]

        silent, _, silent_delivered = phases["silent"]
        # Each stream was ended by the server (Hello deadline) or refused at once (limit).
        assert sum(silent.values()) == 1000
        assert set(silent) <= {"CANCELLED", "RESOURCE_EXHAUSTED"}, silent
        big, _, _ = phases["big"]
        # Over max_message_bytes (RESOURCE_EXHAUSTED), or cut by the Hello deadline while it
        # trickles in (CANCELLED): refused either way, and never buffered (the RSS bound below).
        assert sum(big.values()) == 1 and set(big) <= {"RESOURCE_EXHAUSTED", "CANCELLED"}, big
        brute, _, _ = phases["brute"]
        assert brute == {"UNAUTHENTICATED": 2000}, brute
        for name, (_, _, delivered) in phases.items():
            assert delivered > 0, f"the real peer delivered nothing during the {name} phase"

        # Ceilings: gRPC's threads for the peer server are max_pending + 2 per boundary + 8; its
        # memory quota 4 x max_message_bytes + 64 MiB (max_message_bytes here: 128 x 65 x 4
        # bytes + 1 MiB, raised to the 4 MiB floor).
        assert peak["Threads"] <= base["Threads"] + MAX_PENDING + 2 + 8, (base, peak)
        assert peak["VmRSS"] - base["VmRSS"] <= (4 * 4 + 64) * 1024, (base, peak)

        m = scrape(down_proc.ready()["metrics_port"])
        where = {"stage": "1"}
        assert sample(m, "mapl_peer_server_rejected_unauthenticated_total", **where) >= 2000
        assert (sample(m, "mapl_peer_server_rejected_hello_timeout_total", **where)
                + sample(m, "mapl_peer_server_rejected_over_limit_total", **where)) >= 1
        assert sample(m, "mapl_peer_server_pending_streams", **where) == 0
        up.close()
        down.close()
    finally:
        if trainer is not None:
            trainer.stop()
        up_proc.stop()
        down_proc.stop()
