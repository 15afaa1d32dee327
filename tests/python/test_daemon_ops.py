"""mapld as operators meet it: a bad config stops startup naming the field, metrics are served,
and SIGTERM delivers what is in flight before the daemon exits 0."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Dict, FrozenSet, Tuple

import pytest

from conftest import mapld_binary, need_module, start_mapld, start_pair

torch = need_module("torch")

D = 64
BOUNDARY = {"d": D, "k": 8, "vocab": 100, "max_tokens": 128, "forward_codec": "CODEC_INT8"}


def test_invalid_config_names_the_field_and_exits_2(short_tmp: Path):
    cfg = short_tmp / "bad.textproto"
    cfg.write_text('stage: 1\nauth_token: "t"\n'
                   'boundaries { id: 0 role: ROLE_DOWNSTREAM d: 64 k: 128 vocab: 10 }\n')
    r = subprocess.run([str(mapld_binary()), "--config", str(cfg)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2
    assert "boundaries[0].k" in r.stderr, r.stderr
    r = subprocess.run([str(mapld_binary()), "--config", str(cfg), "--set", "boundaries[0].k=8",
                        "--set", "local_socket=" + str(short_tmp / "x.sock"), "--print_config"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "k: 8" in r.stdout and "rvq_levels: 4" in r.stdout  # defaults filled in


Series = Dict[Tuple[str, FrozenSet[Tuple[str, str]]], float]


def scrape(port: int) -> Series:
    """Every sample of a Prometheus text exposition: (name, labels) -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples: Series = {}
    for line in text.splitlines():
        m = re.fullmatch(r'([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)', line)
        if m is None or line.startswith("#"):
            continue
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def sample(samples: Series, name: str, **labels: str) -> float:
    """The one sample of `name` whose labels include `labels`."""
    want = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and want <= ls]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


# The exporter derives its series from the stats record (server/metrics.cc): every field of
# BoundaryStats with a (metric) option is mapl_boundary_<field>, every such field of its LinkStats
# mapl_link_<field>, counters with _total.
def boundary(field: str) -> str:
    return f"mapl_boundary_{field}"


def test_metrics_agree_with_the_stats_record(short_tmp: Path):
    """Each exported series equals what the Stats record of the same daemon says, after a
    forward and a backward microbatch and a Step (so every counter has moved)."""
    up_proc, down_proc = start_pair(short_tmp, BOUNDARY)
    try:
        up, down = up_proc.connect("up"), down_proc.connect("down")
        h = torch.randn(100, D)
        up.send_activation(0, 1, 0, h, torch.randint(0, 100, (100,)))
        down.send_gradient(0, 1, 0, down.recv_activation(0, 1, 0, timeout=10))
        up.recv_gradient(0, 1, 0, timeout=10)
        down.step(1, timeout=10)
        up.step(1, timeout=10)
        for proc, sc, role in ((up_proc, up, "upstream"), (down_proc, down, "downstream")):
            b = sc.stats().boundary(0)
            m = scrape(proc.ready()["metrics_port"])
            where = {"stage": str(sc.stage), "boundary": "0", "role": role}
            assert b.frames_sent == b.frames_received == 1
            for counter in ("frames_sent", "frames_received", "raw_bytes_sent",
                            "raw_bytes_received", "payload_bytes_sent", "payload_bytes_received",
                            "dictionary_bytes_sent", "dictionary_bytes_received", "steps",
                            "frames_rejected", "bad_peer_messages"):
                assert sample(m, boundary(counter) + "_total", **where) == getattr(b, counter)
            assert b.raw_bytes_sent > 0 and b.payload_bytes_received > 0 and b.steps == 1
            assert (sample(m, boundary("dictionary_version"), **where)
                    == b.dictionary_version > 0)
            assert sample(m, boundary("has_dictionary"), **where) == 1
            assert (sample(m, boundary("orthogonality_error"), **where)
                    == pytest.approx(b.orthogonality_error, rel=1e-12, abs=0))
            # Prometheus values are doubles: the checksum is exported as its low 53 bits.
            assert (sample(m, boundary("dictionary_checksum"), **where)
                    == b.dictionary_checksum & ((1 << 53) - 1))
            # The link's record: what this side wrote, per message type and in all. The link
            # lives on after the Step (the delta it published, acks, heartbeats), so its
            # counters may move between the record read above and the scrape: the exported
            # value lies between that record and one read after the scrape.
            after = sc.stats().boundary(0).link
            assert sample(m, "mapl_link_connected", **where) == 1
            assert (0 < b.link.messages_sent
                    <= sample(m, "mapl_link_messages_sent_total", **where)
                    <= after.messages_sent)
            assert (0 < b.link.bytes_sent <= sample(m, "mapl_link_bytes_sent_total", **where)
                    <= after.bytes_sent)
            assert (1 <= b.link.sent["frame"].messages
                    <= sample(m, "mapl_link_sent_messages_total", body="frame", **where)
                    <= after.sent["frame"].messages)
            # One encode and one decode each side.
            for op in ("encode", "decode"):
                assert sample(m, "mapl_codec_seconds_count", op=op, **where) == 1
        assert up.stats().boundary(0).dictionary_bytes_sent > 0  # the Step published a delta
        up.close()
        down.close()
    finally:
        up_proc.stop()
        down_proc.stop()


def test_sigterm_delivers_in_flight_frames_then_exits_0(short_tmp: Path):
    up_proc, down_proc = start_pair(short_tmp, BOUNDARY)
    try:
        up, down = up_proc.connect("up"), down_proc.connect("down")
        sent = []
        for mb in range(4):
            h = torch.randn(128, D)
            up.send_activation(0, 1, mb, h, torch.randint(0, 100, (128,)))
            sent.append(h)
        up.close()
        up_proc.stop()  # SIGTERM right after the sends: the queue must drain first
        assert up_proc.proc.returncode == 0, up_proc.log()
        assert "drained" in up_proc.log(), up_proc.log()
        for mb in range(4):
            h_hat = down.recv_activation(0, 1, mb, timeout=10)
            assert h_hat.shape == (128, D)
        down.close()
    finally:
        up_proc.stop()
        down_proc.stop()
    assert down_proc.proc.returncode == 0, down_proc.log()


@pytest.mark.parametrize("environment", [["-u", "OPENBLAS_NUM_THREADS"], ["OPENBLAS_NUM_THREADS=4"]],
                         ids=["unset", "four"])
def test_sigterm_drains_whatever_the_blas_environment(short_tmp: Path, environment):
    """Started as an operator would, without OPENBLAS_NUM_THREADS=1, OpenBLAS starts its own
    threads before main runs (one a core when unset, 3 more with 4), threads that block no
    signal. SIGTERM must still start the drain wherever the kernel delivers it, and the daemon's
    BLAS threads come from its config (compute_threads, default 1), not from the environment."""
    proc = start_mapld(short_tmp, 1, [dict(BOUNDARY, id=0, role="ROLE_DOWNSTREAM")],
                       {"peer_listen": "127.0.0.1:0"}, wrap=["env"] + environment)
    try:
        proc.ready()
        tasks = Path(f"/proc/{proc.proc.pid}/task")
        assert len(list(tasks.iterdir())) > 1
    finally:
        code = proc.stop(timeout=30)
    log = proc.log()
    assert code == 0, log
    assert "signal received, draining" in log and "drained" in log, log
    assert "compute_threads=1" in log, log


def test_the_token_is_random_private_and_never_printed(short_tmp: Path):
    """The launcher makes a random token per launching process, writes it to a config only its
    user can read, and neither the daemon's log nor --print_config shows it."""
    launch = need_module("mapl.launch")
    token = launch.LAUNCH_TOKEN
    assert len(token) >= 32 and token != need_module("importlib").reload(launch).LAUNCH_TOKEN
    proc = start_mapld(short_tmp, 1, [dict(BOUNDARY, id=0, role="ROLE_DOWNSTREAM")],
                       {"peer_listen": "127.0.0.1:0", "auth_token": token})
    try:
        proc.ready()
        config = short_tmp / "stage1.textproto"
        assert config.stat().st_mode & 0o777 == 0o600
        assert token in config.read_text()
        r = subprocess.run([str(mapld_binary()), "--config", str(config), "--print_config"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert token not in r.stdout and 'auth_token: "<redacted>"' in r.stdout
    finally:
        proc.stop()
    assert token not in proc.log()


def _probe(socket: str, service: str) -> Tuple[int, str]:
    """mapl-health, built next to mapld, against `socket`: (exit status, what it printed)."""
    probe = mapld_binary().parent / "mapl-health"
    r = subprocess.run([str(probe), "--socket", socket, "--service", service,
                        "--timeout_ms", "2000"], capture_output=True, text=True, timeout=30)
    return r.returncode, r.stdout + r.stderr


def test_health_probe_follows_readiness_and_liveness(short_tmp: Path):
    """mapl-health (the containers' and Kubernetes' probe) over the local socket: a daemon whose
    peer is away is alive but not ready; once its peer links it is ready; a stopped one is
    unreachable (exit 2, not 1, so a probe log tells the two apart)."""
    alone = start_mapld(short_tmp, 1, [dict(BOUNDARY, id=0, role="ROLE_DOWNSTREAM")],
                        {"peer_listen": "127.0.0.1:0"})
    try:
        alone.ready()
        assert _probe(alone.socket_path, "liveness") == (0, "liveness: SERVING\n")
        code, out = _probe(alone.socket_path, "")
        assert (code, out) == (1, "readiness: NOT_SERVING\n")
        code, out = _probe(alone.socket_path, "boundary/0")
        assert (code, out) == (1, "boundary/0: NOT_SERVING\n")
        code, out = _probe(alone.socket_path, "boundary/7")
        assert code == 1 and "SERVICE_UNKNOWN" in out, out
    finally:
        alone.stop()
    code, out = _probe(alone.socket_path, "liveness")
    assert code == 2 and "UNREACHABLE" in out, out

    (short_tmp / "p").mkdir()
    up_proc, down_proc = start_pair(short_tmp / "p", BOUNDARY)
    try:
        for proc in (up_proc, down_proc):
            deadline = time.monotonic() + 20
            while _probe(proc.socket_path, "")[0] != 0:
                assert time.monotonic() < deadline, _probe(proc.socket_path, "")
                time.sleep(0.2)
            assert _probe(proc.socket_path, "boundary/0") == (0, "boundary/0: SERVING\n")
    finally:
        up_proc.stop()
        down_proc.stop()
