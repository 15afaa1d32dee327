"""mapld as operators meet it: a bad config stops startup naming the field, metrics are served,
and SIGTERM delivers what is in flight before the daemon exits 0."""

from __future__ import annotations

import re
import subprocess
import urllib.request
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import mapld_binary, start_pair  # noqa: E402

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


def test_metrics_are_served_per_boundary_and_direction(short_tmp: Path):
    up_proc, down_proc = start_pair(short_tmp, BOUNDARY)
    try:
        up, down = up_proc.connect("up"), down_proc.connect("down")
        h = torch.randn(100, D)
        up.send_activation(0, 1, 0, h, torch.randint(0, 100, (100,)))
        down.recv_activation(0, 1, 0, timeout=10)
        for proc, role in ((up_proc, "upstream"), (down_proc, "downstream")):
            port = proc.ready()["metrics_port"]
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
            text = text.decode()
            frames = re.search(r'mapl_frames_total\{[^}]*direction="forward"[^}]*event="'
                               + ("sent" if role == "upstream" else "received")
                               + r'"[^}]*\} (\S+)', text)
            assert frames and float(frames.group(1)) == 1.0, text[:3000]
            payload = re.search(r'mapl_wire_bytes_total\{[^}]*direction="forward"[^}]*'
                                r'kind="payload"[^}]*\} (\S+)', text)
            assert payload and float(payload.group(1)) > 0
            assert "mapl_codec_seconds_bucket" in text
            assert f'role="{role}"' in text
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
