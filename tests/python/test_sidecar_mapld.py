"""mapl.Sidecar against real mapld daemons: stage 0 (upstream of boundary 0) and stage 1
(downstream), linked over loopback, each with a trainer thread. Every test makes its own traffic
under its own step numbers, so the tests pass in any order and on their own."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from conftest import TrainerPair, mapld_binary, need_module, proto_fields, start_mapld

torch = need_module("torch")
mapl = need_module("mapl")

D, K, VOCAB, MAX_TOKENS = 64, 8, 1000, 256
TIMEOUT = 20.0

# bf16 keeps 8 significant bits, so rounding to nearest moves a value by at most 2^-8 of itself.
BF16_ROUNDOFF = 2.0 ** -8
# CODEC_INT8 codes each row c (k values) as round(c / s) * s with s = max|c| / 127 rounded UP to
# a bf16 value (so no code clips; kernels/cpu/scalar_codec.cc): each element errs by at most
# s / 2, and s <= (1 + 2^-7) max|c| / 127 <= (1 + 2^-7) |c| / 127, so a row errs by at most
# sqrt(k) (1 + 2^-7) / 254 of its norm.
INT8_ROUNDOFF = math.sqrt(K) * (1 + 2.0 ** -7) / 254
# float32 arithmetic (projections, lifts, our SVD) on top of a codec's own error.
F32_SLACK = 1e-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


class Pair(TrainerPair):
    """Two daemons of boundary 0 and a trainer Sidecar on each."""

    def __init__(self, method: str) -> None:
        self.method = method
        # bf16 forward and int8 backward: codecs whose error has a bound (above) the tests can
        # hold the reconstruction to. RVQ forward is covered by test_boundary_learning.py.
        boundary = {"d": D, "k": K, "method": method, "vocab": VOCAB, "max_tokens": MAX_TOKENS,
                    "seed": 7}
        if method != "METHOD_DENSE":  # DENSE sends bf16 both ways and takes no codec option
            boundary.update(forward_codec="CODEC_BF16", backward_codec="CODEC_INT8")
        super().__init__(boundary, TIMEOUT)
        self._step = 0

    def new_step(self) -> int:
        """A step number no test has used on these daemons (steps only move forward)."""
        self._step += 1
        return self._step

    def settled_stats(self) -> Tuple[object, object]:
        """Both sides' boundary-0 stats once the downstream holds the upstream's dictionary
        version (the last delta travels after the upstream's Step), or at the deadline."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            bu, bd = self.up.stats().boundary(0), self.down.stats().boundary(0)
            if bu.dictionary_version == bd.dictionary_version or time.monotonic() > deadline:
                return bu, bd
            time.sleep(0.01)


@pytest.fixture(scope="module", params=["METHOD_DENSE", "METHOD_MAPL"])
def pair(request) -> Iterator[Pair]:
    mapld_binary()  # skips (fails under CI=true) when not built
    p = Pair(request.param)
    yield p
    p.close()


@pytest.fixture(params=["METHOD_DENSE", "METHOD_MAPL"])
def fresh_pair(request) -> Iterator[Pair]:
    """A pair no other test has trained: its anchors are still zero (boundary.cc: P starts at
    zero) and U is the seed's orthonormal one."""
    mapld_binary()
    p = Pair(request.param)
    yield p
    p.close()


def low_rank(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, K, generator=g) @ torch.randn(K, D, generator=g)


def subspace(x: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """An orthonormal basis (d, rank) of the top-`rank` row space of x, and x's singular
    values, in float64."""
    _, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return vh[:rank].T, s


def test_attach_reports_boundaries_and_buffers(pair: Pair):
    up, down = pair.up.boundary(0), pair.down.boundary(0)
    assert (up.role, down.role) == ("upstream", "downstream")
    assert up.d == down.d == D and up.max_tokens == MAX_TOKENS
    assert up.method == down.method == pair.method
    assert pair.up.stage == 0 and pair.down.stage == 1
    assert pair.up.buffer_sizes == [4 << 20] * 4


def test_forward_and_backward_round_trip(fresh_pair: Pair):
    pair = fresh_pair
    step = pair.new_step()
    h, ids = low_rank(100, 1), torch.randint(0, VOCAB, (100,))
    g = low_rank(100, 2)

    def up(sc):
        r = sc.send_activation(0, step, 0, h, ids, wait=True)
        return r, sc.recv_gradient(0, step, 0, timeout=TIMEOUT)

    def down(sc):
        h_hat = sc.recv_activation(0, step, 0, timeout=TIMEOUT)
        sc.send_gradient(0, step, 0, g)
        return h_hat

    (sent, g_hat), h_hat = pair.both(up, down)
    assert sent.raw_bytes == h.numel() * 4 and sent.wire_bytes > 0
    assert h_hat.shape == (100, D) and g_hat.shape == (100, D)
    if pair.method == "METHOD_DENSE":  # bf16 both ways, elementwise
        assert rel(h_hat, h) <= BF16_ROUNDOFF + F32_SLACK
        assert rel(g_hat, g) <= BF16_ROUNDOFF + F32_SLACK
        assert sent.wire_bytes >= h.numel() * 2  # nothing is projected away
        return
    # MAPL: the upstream sends z = h U (k = 8 coefficients a token) and the downstream lifts
    # h_hat = z_hat U^T plus the anchor's part orthogonal to U (zero on a fresh pair); the
    # gradient comes back as g_hat = code(g U) U^T. So g_hat has rank k, its row space is U's,
    # and in that basis each side's tensor agrees with what the other sent to its codec's error.
    assert sent.wire_bytes < sent.raw_bytes
    u, s = subspace(g_hat, K)
    assert s[K] <= 1e-5 * s[0], f"g_hat is not rank {K}: singular values {s[:K + 2].tolist()}"
    # The dictionary's U is orthonormal to its published error eps, which the projection and
    # the lift each carry (|U^T U - I| <= k eps in norm).
    eps = max(pair.up.stats().boundary(0).orthogonality_error,
              pair.down.stats().boundary(0).orthogonality_error)
    slack = 2 * K * eps + F32_SLACK
    hd, hh = h.double(), h_hat.double()
    assert rel(hh @ u, hd @ u) <= BF16_ROUNDOFF + slack  # the projections agree
    assert rel(hh, (hh @ u) @ u.T) <= slack  # h_hat lies in U's span: nothing else was added
    assert rel(g_hat, (g.double() @ u) @ u.T) <= INT8_ROUNDOFF + slack


def shm_ranges(names: List[str]) -> List[Tuple[int, int]]:
    """[start, end) of this process's mappings of the daemon's memfds `names`, as the kernel
    lists them in /proc/self/maps (/memfd:<name>)."""
    paths = {"/memfd:" + n for n in names}
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip().removesuffix(" (deleted)") in paths:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def inside(t: torch.Tensor, ranges: List[Tuple[int, int]]) -> bool:
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    return any(lo <= start and end <= hi for lo, hi in ranges)


def test_shared_tensor_is_sent_without_copy(pair: Pair):
    step = pair.new_step()
    h = pair.up.buffer_tensor((2, 50, D))
    h.copy_(low_rank(100, 3).view(2, 50, D))
    ids = pair.up.buffer_tensor(100, torch.int32)
    ids.copy_(torch.randint(0, VOCAB, (100,)))
    private = low_rank(100, 4)
    # Observed, not taken from the client: the kernel says where the daemon's buffers are mapped.
    ranges = shm_ranges(pair.up.buffer_names)
    assert len(ranges) == len(pair.up.buffer_names)
    assert inside(h, ranges) and inside(ids, ranges)
    assert not inside(private, ranges)

    def up(sc):
        return (sc.send_activation(0, step, 0, h, ids),
                sc.send_activation(0, step, 1, private, ids))

    def down(sc):
        return (sc.recv_activation(0, step, 0, timeout=TIMEOUT, rows=100),
                sc.recv_activation(0, step, 1, timeout=TIMEOUT, rows=100))

    (shared_sent, private_sent), (h_hat, private_hat) = pair.both(up, down)
    assert shared_sent.zero_copy and not private_sent.zero_copy
    # Each arrives in the shape it was sent in (the frame carries it).
    assert h_hat.shape == (2, 50, D) and private_hat.shape == (100, D)
    if pair.method == "METHOD_DENSE":  # what the daemon read in place is what arrived
        assert rel(h_hat, h) <= BF16_ROUNDOFF + F32_SLACK
        assert rel(private_hat, private) <= BF16_ROUNDOFF + F32_SLACK


def test_recv_into_a_callers_tensor(pair: Pair):
    """out=: a shared tensor is written by the daemon in place; a private one is filled with
    one copy; both return out[:n] and hold what a plain recv would have returned."""
    step = pair.new_step()
    h, ids = low_rank(60, 5), torch.randint(0, VOCAB, (60,))
    shared = pair.down.buffer_tensor((100, D))
    private = torch.full((100, D), 7.0, dtype=torch.bfloat16)
    ranges = shm_ranges(pair.down.buffer_names)
    assert inside(shared, ranges) and not inside(private, ranges)

    def up(sc):
        for mb in range(3):
            sc.send_activation(0, step, mb, h, ids)

    def down(sc):
        return (sc.recv_activation(0, step, 0, timeout=TIMEOUT, out=shared),
                sc.recv_activation(0, step, 1, timeout=TIMEOUT, out=private),
                sc.recv_activation(0, step, 2, timeout=TIMEOUT, rows=100))

    _, (a, b, plain) = pair.both(up, down)
    assert a.shape == b.shape == plain.shape == (60, D)
    assert a.data_ptr() == shared.data_ptr() and b.data_ptr() == private.data_ptr()
    assert torch.equal(a, plain)  # the same frame decoded the same way, in place
    assert rel(b.float(), plain) <= BF16_ROUNDOFF + F32_SLACK
    assert torch.all(private[60:] == 7.0)  # rows past n are left alone


@pytest.mark.parametrize("out,says", [
    (lambda: torch.zeros(10, D + 1), f"(rows, d={D})"),
    (lambda: torch.zeros(10, D, dtype=torch.float64), "float32 or bfloat16"),
    (lambda: torch.zeros(D, 10).T, "not contiguous"),
], ids=["wrong width", "wrong dtype", "not contiguous"])
def test_recv_into_a_wrong_tensor_is_refused_before_the_tensor_leaves(pair: Pair, out, says):
    step = pair.new_step()
    h, ids = low_rank(10, 6), torch.randint(0, VOCAB, (10,))
    pair.up.send_activation(0, step, 0, h, ids, wait=True)
    with pytest.raises(mapl.InvalidArgument) as info:
        pair.down.recv_activation(0, step, 0, timeout=TIMEOUT, out=out())
    assert says in str(info.value), str(info.value)
    # The refusal cost nothing: the tensor is still there for a correct receive.
    h_hat = pair.down.recv_activation(0, step, 0, timeout=TIMEOUT, out=torch.empty(10, D))
    assert h_hat.shape == (10, D)
    g = low_rank(10, 7)
    pair.down.send_gradient(0, step, 0, g)
    pair.up.recv_gradient(0, step, 0, timeout=TIMEOUT)


def test_two_stage_pipeline_trains_through_the_sidecars(pair: Pair):
    """Stage 0 (Linear D -> D) and stage 1 (Linear D -> 1) fit y = x w together, GPipe-style
    (all forwards, then all backwards), each with its own optimizer, in step scopes whose
    boundaries autograd drives, the activations and gradients going only through the daemons;
    the loss must fall."""
    torch.manual_seed(0)
    stage0, stage1 = torch.nn.Linear(D, D), torch.nn.Linear(D, 1)
    ref0, ref1 = torch.nn.Linear(D, D), torch.nn.Linear(D, 1)
    ref0.load_state_dict(stage0.state_dict())
    ref1.load_state_dict(stage1.state_dict())
    opt0 = torch.optim.Adam(stage0.parameters(), lr=1e-2)
    opt1 = torch.optim.Adam(stage1.parameters(), lr=1e-2)
    steps, microbatches, rows = 15, 2, 32
    w = torch.randn(D, 1) / math.sqrt(D)
    data = []
    for _ in range(steps):
        xs = [torch.randn(rows, D) for _ in range(microbatches)]
        data.append((xs, [x @ w for x in xs],
                     [torch.randint(0, VOCAB, (rows,)) for _ in range(microbatches)]))
    first_grad = {}  # each stage's weight gradient of the first step
    start = pair.new_step()
    for sc in (pair.up, pair.down):  # the step scopes number the steps from here
        sc.next_step = start

    def up(sc):
        for xs, _, ids in data:
            with sc.step(timeout=TIMEOUT) as st:
                outs = [st.send(stage0(x), ids[mb]) for mb, x in enumerate(xs)]
                for out in outs:  # GPipe: every forward, then every backward
                    out.backward()
                first_grad.setdefault(0, stage0.weight.grad.clone())
                opt0.step()
                opt0.zero_grad()
        return st.stats

    def down(sc):
        losses = []
        for xs, ys, _ in data:
            total = 0.0
            with sc.step(timeout=TIMEOUT) as st:
                for mb in range(microbatches):
                    h = st.recv()
                    assert h.shape == (rows, D)
                    loss = (stage1(h) - ys[mb]).pow(2).mean() / microbatches
                    loss.backward()
                    total += float(loss)
                first_grad.setdefault(1, stage1.weight.grad.clone())
                opt1.step()
                opt1.zero_grad()
            losses.append(total)
        return losses

    st_up, losses = pair.both(up, down)
    pair._step = max(pair.up.next_step, pair.down.next_step) - 1
    assert all(math.isfinite(x) for x in losses)
    # Training works through the boundary: the loss of the last steps is well below the first.
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    if pair.method == "METHOD_DENSE":
        # The first step's gradients are those of the same model run in one process, to bf16.
        xs, ys, _ = data[0]
        for x, y in zip(xs, ys):
            ((ref1(ref0(x)) - y).pow(2).mean() / microbatches).backward()
        assert rel(first_grad[0], ref0.weight.grad) < 3e-2
        assert rel(first_grad[1], ref1.weight.grad) < 3e-2
    bu, bd = pair.settled_stats()
    assert st_up.boundary(0).frames_sent >= steps * microbatches
    assert bu.frames_sent >= steps * microbatches and bd.frames_received >= steps * microbatches
    assert bu.dictionary_version == bd.dictionary_version
    assert bu.dictionary_checksum == bd.dictionary_checksum
    print(f"{pair.method}: loss by step {[round(x, 4) for x in losses]}")
    if pair.method == "METHOD_MAPL":
        # The replica is the owner's published U bit for bit (the checksums), so its measured
        # orthogonality is the same number. (It is not near 0 here: the published U takes only
        # the rows the dictionary budget, a fraction of these small frames, lets through.)
        assert bu.orthogonality_error == bd.orthogonality_error
        assert bu.dictionary_version > 0  # the learned U moved and the downstream followed
        assert bu.wire_dictionary_bytes > 0 and bd.dictionary_bytes_received > 0


def one_step(pair: Pair, step: int, rows: int = 40) -> None:
    """One microbatch forward and back, then both sides' Step."""
    h, ids, g = low_rank(rows, 5), torch.randint(0, VOCAB, (rows,)), low_rank(rows, 6)

    def up(sc):
        sc.send_activation(0, step, 0, h, ids)
        sc.recv_gradient(0, step, 0, timeout=TIMEOUT)
        return sc.step(step, timeout=TIMEOUT)

    def down(sc):
        sc.recv_activation(0, step, 0, timeout=TIMEOUT)
        sc.send_gradient(0, step, 0, g)
        return sc.step(step, timeout=TIMEOUT)

    pair.both(up, down)


def test_stats_agree_on_the_dictionary_and_the_traffic(pair: Pair):
    before_up, before_down = pair.settled_stats()
    rows = 40
    one_step(pair, pair.new_step(), rows)
    one_step(pair, pair.new_step(), rows)
    su, sd = pair.up.stats(), pair.down.stats()
    assert (su.stage, sd.stage) == (0, 1)
    bu, bd = pair.settled_stats()

    def delta(after, before, name):
        return getattr(after, name) - getattr(before, name)

    # Two microbatches each way; raw bytes count each tensor as dense bf16 (rows x d x 2).
    raw = 2 * rows * D * 2
    assert delta(bu, before_up, "frames_sent") == delta(bd, before_down, "frames_received") == 2
    assert delta(bd, before_down, "frames_sent") == delta(bu, before_up, "frames_received") == 2
    assert delta(bu, before_up, "raw_bytes_sent") == delta(bd, before_down,
                                                           "raw_bytes_received") == raw
    assert delta(bu, before_up, "raw_bytes") == delta(bd, before_down, "raw_bytes") == 2 * raw
    # What one side put on the wire, the other took off it.
    assert delta(bu, before_up, "payload_bytes_sent") == delta(bd, before_down,
                                                               "payload_bytes_received") > 0
    assert delta(bd, before_down, "payload_bytes_sent") == delta(bu, before_up,
                                                                 "payload_bytes_received") > 0
    # After a Step both sides hold the same dictionary: the same version, bit for bit.
    assert bu.dictionary_version == bd.dictionary_version, (bu.dictionary_version,
                                                            bd.dictionary_version)
    assert bu.dictionary_checksum == bd.dictionary_checksum
    if pair.method == "METHOD_MAPL":
        assert bu.dictionary_version > before_up.dictionary_version  # the steps published
        assert bu.dictionary_bytes_sent > before_up.dictionary_bytes_sent
        assert bd.dictionary_bytes_received == bu.dictionary_bytes_sent
    else:  # DENSE has no dictionary to keep in step
        assert bu.dictionary_version == 0 and bu.wire_dictionary_bytes == 0
        assert bd.wire_dictionary_bytes == 0


def test_stats_carry_every_field_of_the_proto_record(pair: Pair):
    """The client reads the record itself: every field local.proto declares, in its order, with
    no list of them in the client."""
    for sc in (pair.up, pair.down):
        b = sc.stats().boundary(0)
        assert list(b.record()) == proto_fields("BoundaryStats")
        assert list(b.link) == proto_fields("LinkStats")
        assert isinstance(b.link.sent, dict) and isinstance(b.dictionary_checksum, int)


def test_recv_of_nothing_is_deadline_exceeded(pair: Pair):
    step = pair.new_step()
    start = time.monotonic()
    with pytest.raises(mapl.DeadlineExceeded) as info:
        pair.down.recv_activation(0, step, 7, timeout=0.2)
    assert time.monotonic() - start >= 0.19
    e = info.value
    assert isinstance(e, TimeoutError) and e.code == 4 and e.code_name == "DEADLINE_EXCEEDED"
    assert f"step {step}" in str(e) and "microbatch 7" in str(e), str(e)


@pytest.mark.parametrize("call,says", [
    (lambda p, s: p.up.send_activation(0, s, 0, torch.zeros(4, D + 1),
                                       torch.zeros(4, dtype=torch.int32)),
     f"hidden size d = {D}"),
    (lambda p, s: p.down.send_activation(0, s, 0, torch.zeros(4, D),
                                         torch.zeros(4, dtype=torch.int32)),
     "downstream of it"),
    (lambda p, s: p.up.send_activation(0, s, 1, torch.zeros(MAX_TOKENS + 1, D),
                                       torch.zeros(MAX_TOKENS + 1, dtype=torch.int32)),
     "max_tokens"),
    (lambda p, s: p.up.send_activation(0, s, 2, torch.full((4, D), float("nan")),
                                       torch.zeros(4, dtype=torch.int32)),
     "non-finite"),
], ids=["wrong width", "forward from the downstream", "too many rows", "nan"])
def test_bad_calls_are_value_errors_with_the_daemons_message(pair: Pair, call, says):
    with pytest.raises(ValueError) as info:
        call(pair, pair.new_step())
    e = info.value
    assert isinstance(e, mapl.InvalidArgument) and isinstance(e, mapl.MaplError)
    assert e.code == 3 and e.code_name == "INVALID_ARGUMENT"
    assert says in str(e), str(e)


def test_sessions_end_and_reconnect(pair: Pair):
    extra = pair.up_proc.connect("extra")
    session = extra.session
    extra.close()
    assert not extra.attached
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
        e = info.value
        assert isinstance(e, ConnectionError) and e.code == 14
        assert proc.socket_path in str(e) and "still running" in str(e), str(e)
        sc.close()
    finally:
        proc.stop()
