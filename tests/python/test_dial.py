"""Either side may dial: two mapld processes of boundary 0 where the downstream (stage 1) dials
the upstream's (stage 0) listener (BoundaryConfig.dial), as a downstream behind NAT must. A tensor
goes forward and its gradient backward; then the downstream is killed and started again, redials,
and the next step's tensors travel both ways, the upstream having seen its peer restart."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from conftest import mapld_binary, need_module, start_mapld

torch = need_module("torch")
mapl = need_module("mapl")

D, VOCAB, MAX_TOKENS, ROWS = 64, 1000, 256, 100
TIMEOUT = 20.0
# METHOD_DENSE sends bf16 both ways: 8 significant bits, so each value moves by at most 2^-8 of
# itself; float32 arithmetic adds a little.
BF16_ROUNDOFF = 2.0 ** -8 + 1e-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def await_link(sidecar, done, what: str):
    """Polls boundary 0's link record until done(link) holds; fails naming `what` otherwise."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        link = sidecar.stats().boundary(0).link
        if done(link):
            return link
        assert time.monotonic() < deadline, f"{what}: {link}"
        time.sleep(0.02)


def round_trip(up, down, step: int) -> None:
    """One microbatch forward from the upstream's trainer and its gradient back."""
    g = torch.Generator().manual_seed(step)
    h = torch.randn(ROWS, D, generator=g)
    ids = torch.randint(0, VOCAB, (ROWS,), generator=g)
    grad = torch.randn(ROWS, D, generator=g)
    up.send_activation(0, step, 0, h, ids, wait=True)
    h_hat = down.recv_activation(0, step, 0, timeout=TIMEOUT)
    down.send_gradient(0, step, 0, grad)
    g_hat = up.recv_gradient(0, step, 0, timeout=TIMEOUT)
    assert h_hat.shape == (ROWS, D) and g_hat.shape == (ROWS, D)
    assert rel(h_hat, h) <= BF16_ROUNDOFF
    assert rel(g_hat, grad) <= BF16_ROUNDOFF


def test_downstream_dials_its_upstream_and_redials_after_a_restart():
    mapld_binary()  # skips (fails under CI=true) when not built
    directory = Path(tempfile.mkdtemp(prefix="mapl-dial-", dir="/tmp"))
    boundary = {"id": 0, "d": D, "method": "METHOD_DENSE", "vocab": VOCAB,
                "max_tokens": MAX_TOKENS}
    procs, sidecars = [], []
    try:
        # The upstream listens (it must name its peer_listen); the downstream has no listener.
        up_proc = start_mapld(directory, 0, [dict(boundary, role="ROLE_UPSTREAM", dial=False)],
                              {"peer_listen": "127.0.0.1:0"})
        procs.append(up_proc)
        port = up_proc.ready()["peer_port"]
        assert port > 0
        down_boundary = dict(boundary, role="ROLE_DOWNSTREAM", dial=True,
                             peer_address=f"127.0.0.1:{port}")
        down_proc = start_mapld(directory, 1, [down_boundary])
        procs.append(down_proc)
        assert down_proc.ready()["peer_port"] == 0
        up = up_proc.connect("stage0")
        sidecars.append(up)
        down = down_proc.connect("stage1")
        sidecars.append(down)
        round_trip(up, down, 1)
        await_link(down, lambda l: l.connected and l.peer_restarts == 0, "the downstream dialed")

        # The downstream dies and comes back as a new instance: it dials again, and the
        # upstream, which only listens, sees its peer restart.
        down.close()
        down_proc.kill()
        down_proc = start_mapld(directory, 1, [down_boundary])
        procs.append(down_proc)
        down = down_proc.connect("stage1")
        sidecars.append(down)
        await_link(up, lambda l: l.connected and l.peer_restarts == 1,
                   "the upstream sees the restarted downstream")
        round_trip(up, down, 2)
    finally:
        for s in sidecars:
            s.close()
        for p in procs:
            p.stop()
        shutil.rmtree(directory, ignore_errors=True)
