"""mapl.Sidecar against real mapld daemons: stage 0 (upstream of boundary 0) and stage 1
(downstream), linked over loopback, each with a trainer thread. Skips while build/server/mapld
does not exist."""

from __future__ import annotations

import tempfile
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Tuple

import pytest

torch = pytest.importorskip("torch")

import mapl  # noqa: E402
from mapl import torch_pipeline as tp  # noqa: E402

from conftest import mapld_binary, start_mapld, start_pair  # noqa: E402

D, K, VOCAB, MAX_TOKENS = 64, 8, 1000, 256
TIMEOUT = 20.0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


class Pair:
    def __init__(self, method: str) -> None:
        self.method = method
        self.dir = Path(tempfile.mkdtemp(prefix="mapl-py-", dir="/tmp"))
        common = {"d": D, "k": K, "method": method, "vocab": VOCAB, "max_tokens": MAX_TOKENS,
                  "seed": 7}
        self.up_proc, self.down_proc = start_pair(self.dir, common)
        self.up = self.up_proc.connect("stage0")
        self.down = self.down_proc.connect("stage1")
        self.pool = ThreadPoolExecutor(2)

    def both(self, up_fn, down_fn) -> Tuple[object, object]:
        """Run the two trainers' parts concurrently (a Recv blocks until the peer sends)."""
        fu, fd = self.pool.submit(up_fn, self.up), self.pool.submit(down_fn, self.down)
        return fu.result(timeout=2 * TIMEOUT), fd.result(timeout=2 * TIMEOUT)

    def close(self) -> None:
        self.pool.shutdown()
        for s in (self.up, self.down):
            s.close()
        for p in (self.up_proc, self.down_proc):
            p.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module", params=["METHOD_DENSE", "METHOD_MAPL"])
def pair(request) -> Iterator[Pair]:
    mapld_binary()  # skips when not built
    p = Pair(request.param)
    yield p
    p.close()


def low_rank(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, K, generator=g) @ torch.randn(K, D, generator=g)


def test_attach_reports_boundaries_and_buffers(pair: Pair):
    up, down = pair.up.boundary(0), pair.down.boundary(0)
    assert (up.role, down.role) == ("upstream", "downstream")
    assert up.d == down.d == D and up.max_tokens == MAX_TOKENS
    assert pair.up.stage == 0 and pair.down.stage == 1
    assert pair.up.buffer_sizes == [4 << 20] * 4


def test_forward_and_backward_round_trip(pair: Pair):
    h, ids = low_rank(100, 1), torch.randint(0, VOCAB, (100,))
    g = low_rank(100, 2)

    def up(sc):
        r = sc.send_activation(0, 0, 0, h, ids, wait=True)
        return r, sc.recv_gradient(0, 0, 0, timeout=TIMEOUT)

    def down(sc):
        h_hat = sc.recv_activation(0, 0, 0, timeout=TIMEOUT)
        sc.send_gradient(0, 0, 0, g)
        return h_hat

    (sent, g_hat), h_hat = pair.both(up, down)
    assert sent.raw_bytes == h.numel() * 4 and sent.wire_bytes > 0
    assert h_hat.shape == (100, D) and g_hat.shape == (100, D)
    assert torch.isfinite(h_hat).all() and torch.isfinite(g_hat).all()
    if pair.method == "METHOD_DENSE":  # bf16 both ways
        assert rel(h_hat, h) < 1e-2 and rel(g_hat, g) < 1e-2
    else:
        assert sent.wire_bytes < sent.raw_bytes


def test_shared_tensor_is_sent_without_copy(pair: Pair):
    h = pair.up.buffer_tensor((2, 50, D))
    h.copy_(low_rank(100, 3).view(2, 50, D))
    ids = pair.up.buffer_tensor(100, torch.int32)
    ids.copy_(torch.randint(0, VOCAB, (100,)))

    def up(sc):
        return sc.send_activation(0, 1, 0, h, ids)

    def down(sc):
        return sc.recv_activation(0, 1, 0, timeout=TIMEOUT, rows=100)

    r, h_hat = pair.both(up, down)
    assert r.zero_copy and h_hat.shape == (100, D)
    if pair.method == "METHOD_DENSE":
        assert rel(h_hat, h.view(100, D)) < 1e-2


def test_two_stage_pipeline_trains_through_the_sidecars(pair: Pair):
    torch.manual_seed(0)
    stage0, stage1 = torch.nn.Linear(D, D), torch.nn.Linear(D, 1)
    ref0, ref1 = torch.nn.Linear(D, D), torch.nn.Linear(D, 1)
    ref0.load_state_dict(stage0.state_dict())
    ref1.load_state_dict(stage1.state_dict())
    xs = [torch.randn(32, D) for _ in range(2)]
    ids = [torch.randint(0, VOCAB, (32,)) for _ in range(2)]
    step = 10

    def up(sc):  # GPipe: all forwards, then all backwards
        for mb, x in enumerate(xs):
            tp.send_forward(sc, 0, step, mb, stage0(x), ids[mb])
        for mb in range(len(xs)):
            tp.backward_from_peer(sc, 0, step, mb, timeout=TIMEOUT)
        return sc.step(step, timeout=TIMEOUT)

    def down(sc):
        for mb in range(len(xs)):
            h = tp.recv_forward(sc, 0, step, mb, shape=(32, D), timeout=TIMEOUT)
            stage1(h).pow(2).mean().backward()
            tp.send_backward(sc, 0, step, mb)
        return sc.step(step, timeout=TIMEOUT)

    st_up, st_down = pair.both(up, down)
    assert tp.pending(pair.up) == [] and tp.pending(pair.down) == []
    for x in xs:
        ref1(ref0(x)).pow(2).mean().backward()
    assert stage0.weight.grad is not None and torch.isfinite(stage0.weight.grad).all()
    if pair.method == "METHOD_DENSE":
        assert rel(stage0.weight.grad, ref0.weight.grad) < 3e-2
        assert rel(stage1.weight.grad, ref1.weight.grad) < 3e-2
    bu, bd = st_up.boundary(0), st_down.boundary(0)
    assert bu.frames_sent >= 2 and bd.frames_received >= 2
    if pair.method == "METHOD_MAPL":
        assert bu.orthogonality_error < 1e-3
        assert bd.dictionary_version <= bu.dictionary_version


def test_stats_agree_on_the_dictionary(pair: Pair):
    su, sd = pair.up.stats(), pair.down.stats()
    assert (su.stage, sd.stage) == (0, 1)
    bu, bd = su.boundary(0), sd.boundary(0)
    assert bu.raw_bytes > 0 and bd.raw_bytes > 0 and bu.wire_payload_bytes > 0
    if bu.dictionary_version == bd.dictionary_version:
        assert bu.dictionary_checksum == bd.dictionary_checksum


def test_recv_of_nothing_is_deadline_exceeded(pair: Pair):
    with pytest.raises(mapl.DeadlineExceeded) as info:
        pair.down.recv_activation(0, 999, 7, timeout=0.2)
    assert isinstance(info.value, TimeoutError) and str(info.value)


def test_bad_calls_are_value_errors_with_the_daemons_message(pair: Pair):
    with pytest.raises(ValueError) as info:  # wrong width
        pair.up.send_activation(0, 50, 0, torch.zeros(4, D + 1), torch.zeros(4, dtype=torch.int32))
    assert isinstance(info.value, mapl.MaplError) and str(info.value)
    with pytest.raises(ValueError):  # activations go downstream only
        pair.down.send_activation(0, 50, 0, torch.zeros(4, D), torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError):  # more rows than max_tokens
        pair.up.send_activation(0, 50, 1, torch.zeros(MAX_TOKENS + 1, D),
                                torch.zeros(MAX_TOKENS + 1, dtype=torch.int32))


def test_sessions_end_and_reconnect(pair: Pair):
    extra = pair.up_proc.connect("extra")
    session = extra.session
    extra.close()
    again = pair.up_proc.connect("again")
    assert again.session != session and again.attached
    again.close()


def test_daemon_gone_is_unavailable(short_tmp: Path):
    proc = start_mapld(short_tmp, 1, [{"id": 0, "role": "ROLE_DOWNSTREAM", "d": D,
                                       "method": "METHOD_DENSE", "max_tokens": MAX_TOKENS}],
                       {"peer_listen": "127.0.0.1:0"})
    try:
        sc = proc.connect("doomed")
        proc.kill()
        with pytest.raises(mapl.Unavailable) as info:
            sc.stats()
        assert isinstance(info.value, ConnectionError) and proc.socket_path in str(info.value)
        sc.close()
    finally:
        proc.stop()
