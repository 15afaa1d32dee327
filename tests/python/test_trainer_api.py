"""The trainer's API over two real mapld daemons (boundary 0: stage 0 upstream, stage 1
downstream): step scopes, autograd-native boundaries, non-blocking Work handles, self-describing
frames, and a clear, immediate error for each misuse. Each test makes its own steps."""

from __future__ import annotations

import inspect
import math
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Tuple

import pytest

from conftest import REPO, TrainerPair, mapld_binary, need_module, start_pair

torch = need_module("torch")
mapl = need_module("mapl")
errors = need_module("mapl.errors")

D, VOCAB, MAX_TOKENS = 32, 256, 512
TIMEOUT = 20.0


def rel(a: "torch.Tensor", b: "torch.Tensor") -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


class Pair(TrainerPair):
    def __init__(self, method: str) -> None:
        super().__init__({"d": D, "k": 8, "method": method, "vocab": VOCAB,
                          "max_tokens": MAX_TOKENS, "seed": 3}, TIMEOUT)

    def fresh(self) -> None:
        """Both sidecars' next step scope gets a number no test used (steps only move forward:
        a test that failed midway leaves its step open)."""
        n = max(self.up.next_step, self.down.next_step) + 1
        self.up.next_step = self.down.next_step = n

    def both(self, up_fn: Callable, down_fn: Callable) -> Tuple[object, object]:
        self.fresh()
        return super().both(up_fn, down_fn)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    mapld_binary()
    p = Pair("METHOD_DENSE")
    yield p
    p.close()


@pytest.fixture(scope="module")
def mapl_pair() -> Iterator[Pair]:
    mapld_binary()
    p = Pair("METHOD_MAPL")
    yield p
    p.close()


# ---- autograd drives the boundary ----

def test_loss_backward_alone_matches_one_process(pair: Pair):
    """Stage 0 (Linear, tanh) and stage 1 (Linear to 1, MSE) train with nothing but
    ``st.send(...).backward()`` / ``loss.backward()`` and their optimizers; with the dense codec
    (bf16 on the wire) the gradients of every step are a single-process model's, to bf16."""
    torch.manual_seed(0)
    body, head = torch.nn.Linear(D, D), torch.nn.Linear(D, 1)
    ref_body, ref_head = torch.nn.Linear(D, D), torch.nn.Linear(D, 1)
    ref_body.load_state_dict(body.state_dict())
    ref_head.load_state_dict(head.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (body, head)]
    ref_opt = torch.optim.SGD(list(ref_body.parameters()) + list(ref_head.parameters()), lr=0.05)
    steps, microbatches = 4, 3
    w = torch.randn(D, 1) / math.sqrt(D)
    data = [[torch.randn(2, 8, D) for _ in range(microbatches)] for _ in range(steps)]
    grads = {0: [], 1: []}

    def up(sc):
        for xs in data:
            with sc.step() as st:
                for x in xs:
                    st.send(torch.tanh(body(x))).backward()
                grads[0].append(body.weight.grad.clone())
                opts[0].step()
                opts[0].zero_grad()

    def down(sc):
        for xs in data:
            with sc.step() as st:
                for x in xs:
                    h = st.recv()
                    assert h.shape == (2, 8, D) and h.requires_grad
                    ((head(h) - x @ w).pow(2).mean() / microbatches).backward()
                grads[1].append(head.weight.grad.clone())
                opts[1].step()
                opts[1].zero_grad()

    pair.both(up, down)
    for s, xs in enumerate(data):
        for x in xs:
            ((ref_head(torch.tanh(ref_body(x))) - x @ w).pow(2).mean() / microbatches).backward()
        assert rel(grads[0][s], ref_body.weight.grad) < 3e-2, s
        assert rel(grads[1][s], ref_head.weight.grad) < 3e-2, s
        ref_opt.step()
        ref_opt.zero_grad()


def test_one_backward_over_every_microbatch(pair: Pair):
    """GPipe written as one ``backward()`` over the sum of the sends' scalars: autograd receives
    every microbatch's gradient, whatever order it takes them in."""
    body = torch.nn.Linear(D, D)
    xs = [torch.randn(4, D) for _ in range(3)]

    def up(sc):
        with sc.step() as st:
            sum(st.send(body(x)) for x in xs).backward()
        return body.weight.grad.norm()

    def down(sc):
        with sc.step() as st:
            hs = [st.recv() for _ in xs]
            sum((h * h).sum() for h in hs).backward()
        return len(hs)

    g, n = pair.both(up, down)
    assert n == 3 and float(g) > 0


def test_boundary_module_in_a_sequential(pair: Pair):
    head = torch.nn.Sequential(mapl.Boundary(pair.down, "recv"), torch.nn.Linear(D, 1))
    body = torch.nn.Sequential(torch.nn.Linear(D, D), mapl.Boundary(pair.up, "send"))

    def up(sc):
        with sc.step():
            body(torch.randn(5, D)).backward()
        return body[0].weight.grad is not None

    def down(sc):
        with sc.step():
            head(None).sum().backward()
        return head[1].weight.grad is not None

    assert pair.both(up, down) == (True, True)


# ---- self-describing frames ----

def test_recv_returns_the_tensor_as_sent_with_its_ids(mapl_pair: Pair):
    """Shape, dtype and token ids travel with the frame: the downstream gets (b, s, d) in the
    dtype it was sent in, and the ids it must forward, without a copy of the data."""
    x = torch.randn(3, 5, D).to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (3, 5))

    def up(sc):
        with sc.step() as st:
            with st.evaluate():
                st.send(x, token_ids=ids)
        return None

    def down(sc):
        with sc.step() as st:
            with st.evaluate():
                work = st.irecv()
                h = work.wait()
                return h, st.token_ids(0)

    _, (h, got_ids) = mapl_pair.both(up, down)
    assert h.shape == (3, 5, D) and h.dtype == torch.bfloat16
    assert got_ids is not None and torch.equal(got_ids, ids)


def test_recv_of_a_wrong_shape_is_refused_and_the_tensor_stays(pair: Pair):
    pair.fresh()
    step = pair.up.next_step
    pair.up.send_activation(0, step, 0, torch.randn(4, 6, D))
    with pytest.raises(mapl.InvalidArgument) as info:
        pair.down.recv_activation(0, step, 0, shape=(6, 4, D), timeout=TIMEOUT)
    assert "(6, 4" in str(info.value).replace("[", "(") or "6, 4" in str(info.value), \
        str(info.value)
    h = pair.down.recv_activation(0, step, 0, shape=(4, 6, D), timeout=TIMEOUT)
    assert h.shape == (4, 6, D)
    for sc in (pair.up, pair.down):
        sc.close_step(step, timeout=TIMEOUT)


# ---- non-blocking calls ----

def test_work_handles_and_the_batch_form(pair: Pair):
    pair.fresh()
    step = pair.up.next_step
    work = pair.down.irecv_activation(step=step, microbatch=0, timeout=TIMEOUT)
    time.sleep(0.2)
    assert not work.is_completed()  # nothing sent yet: the receive is posted and waits
    x = torch.randn(7, D)
    sent = mapl.batch_isend_irecv([
        mapl.P2POp(pair.up.isend_activation, x, step=step, microbatch=0),
        mapl.P2POp(pair.up.isend_activation, 2 * x, step=step, microbatch=1),
    ])
    assert [type(w.wait(TIMEOUT)).__name__ for w in sent] == ["SendResult", "SendResult"]
    out = torch.empty(16, D)
    second = mapl.batch_isend_irecv([
        mapl.P2POp(pair.down.irecv_activation, out, step=step, microbatch=1, timeout=TIMEOUT)])
    assert rel(work.wait(TIMEOUT), x) < 1e-2 and work.is_completed()
    got = second[0].wait(TIMEOUT)
    assert got.data_ptr() == out.data_ptr() and rel(got, 2 * x) < 1e-2  # into the caller's
    for sc in (pair.up, pair.down):
        sc.close_step(step, timeout=TIMEOUT)


def test_overlapped_receives_complete_out_of_order(pair: Pair):
    """1F1B's prefetch: receives of several microbatches posted at once complete as their
    tensors come, in whatever order they are sent."""
    pair.fresh()
    step = pair.up.next_step
    works = [pair.down.irecv_activation(step=step, microbatch=m, timeout=TIMEOUT)
             for m in range(4)]
    for m in (3, 1, 0, 2):
        pair.up.send_activation(0, step, m, torch.full((2, D), float(m)))
    assert [float(w.wait(TIMEOUT)[0, 0]) for w in works] == [0.0, 1.0, 2.0, 3.0]
    for sc in (pair.up, pair.down):
        sc.close_step(step, timeout=TIMEOUT)


# ---- evaluation ----

def test_evaluation_scope_trains_nothing_and_keeps_numbering(mapl_pair: Pair):
    """An evaluation-only scope crosses the boundary without gradients and closes no step; the
    training scope after it continues its step's microbatch numbering and closes it."""
    p = mapl_pair
    ids = torch.randint(0, VOCAB, (2, 4))

    def up(sc):
        before = sc.stats().boundary(0)
        with sc.step(evaluation=True) as ev:
            assert ev.send(torch.randn(2, 4, D, requires_grad=True), token_ids=ids) is None
        after = sc.stats().boundary(0)
        with sc.step() as st:
            st.send(torch.randn(2, 4, D, requires_grad=True), token_ids=ids).backward()
        return ev.number, st.number, before.steps, after.steps, st.stats.boundary(0).steps

    def down(sc):
        with sc.step(evaluation=True) as ev:
            h = ev.recv()
            assert not h.requires_grad
        with sc.step() as st:
            st.recv().sum().backward()
        return ev.number, st.number

    (ev_up, st_up, steps0, steps1, steps2), (ev_down, st_down) = p.both(up, down)
    assert ev_up == st_up == ev_down == st_down  # one step: the evaluation left it open
    assert steps1 == steps0 and steps2 == steps0 + 1


# ---- misuse: each gets a clear error at once ----

def test_scopes_do_not_nest_and_are_entered_once(pair: Pair):
    pair.fresh()
    with pair.up.step() as st:
        with pytest.raises(mapl.FailedPrecondition, match="do not nest"):
            with pair.up.step():
                pass
    with pytest.raises(mapl.FailedPrecondition, match="entered once"):
        with st:
            pass
    with pytest.raises(mapl.FailedPrecondition, match="has ended"):
        st.send(torch.zeros(2, D))


def test_send_on_the_last_stage_and_recv_on_the_first_fail_at_once(pair: Pair):
    pair.fresh()
    start = time.monotonic()
    with pair.down.step(evaluation=True) as st:
        with pytest.raises(mapl.InvalidArgument, match="sends no activations"):
            st.send(torch.zeros(2, D))
    with pair.up.step(evaluation=True) as st:
        with pytest.raises(mapl.InvalidArgument, match="receives no activations"):
            st.recv()
    with pytest.raises(mapl.InvalidArgument, match="only its downstream"):
        pair.up.irecv_activation(step=1, microbatch=0, boundary=0)
    assert time.monotonic() - start < 2.0


def test_a_step_that_ends_without_its_gradients_is_refused(pair: Pair):
    """Forgetting backward is not silent: the step is not closed, the error says what to do,
    and the next step works."""
    body = torch.nn.Linear(D, D)

    def up(sc):
        with pytest.raises(mapl.FailedPrecondition, match="never received: call backward"):
            with sc.step():
                sc._scope.send(body(torch.randn(3, D)))  # the scalar dropped: no backward
        with sc.step() as st:
            st.send(body(torch.randn(3, D))).backward()
        return st.stats is not None

    def down(sc):
        with pytest.raises(mapl.FailedPrecondition, match="never had their gradient sent"):
            with sc.step() as st:
                st.recv()  # received with grad, never backpropagated
        with sc.step() as st:
            st.recv().sum().backward()
        return st.stats is not None

    assert pair.both(up, down) == (True, True)


def test_a_receive_never_waited_for_is_refused(pair: Pair):
    pair.fresh()
    with pytest.raises(mapl.FailedPrecondition, match="never waited"):
        with pair.down.step(evaluation=True) as st:
            st.irecv(timeout=0.5)
    pair.down.next_step += 1


def test_an_exception_discards_the_step(pair: Pair):
    pair.fresh()
    n = pair.up.next_step
    with pytest.raises(RuntimeError, match="boom"):
        with pair.up.step():
            raise RuntimeError("boom")
    assert pair.up._scope is None and pair.up.next_step == n + 1


def test_keyword_only_nonblocking_calls(pair: Pair):
    """The non-blocking calls take step and microbatch by name: they cannot be transposed."""
    with pytest.raises(TypeError):
        pair.up.isend_activation(torch.zeros(2, D), 1, 0)  # type: ignore[misc]
    for fn in (pair.up.isend_activation, pair.down.irecv_activation):
        params = inspect.signature(fn).parameters
        assert params["step"].kind is inspect.Parameter.KEYWORD_ONLY
        assert params["microbatch"].kind is inspect.Parameter.KEYWORD_ONLY


def test_a_closed_sidecar_refuses_everything(short_tmp: Path):
    up, down = start_pair(short_tmp, {"d": D, "method": "METHOD_DENSE",
                                      "max_tokens": MAX_TOKENS})
    try:
        sc = up.connect("closing")
        sc.close()

        def enter_a_step():
            with sc.step():
                pass

        for call in (lambda: sc.buffer_tensor((2, D)), enter_a_step,
                     lambda: sc.isend_activation(torch.zeros(2, D), step=1, microbatch=0),
                     lambda: sc.stats()):
            with pytest.raises(mapl.FailedPrecondition, match="closed"):
                call()
    finally:
        up.stop()
        down.stop()


# ---- errors and types, without a daemon ----

def test_every_error_class_is_exported_and_classified():
    names = [n for n in errors.__all__ if n != "error_from_status"]
    for name in names:
        assert getattr(mapl, name) is getattr(errors, name), name
    transient = {c for c in range(17) if errors.error_from_status(c, "x").retryable}
    assert transient == {10, 14}  # ABORTED, UNAVAILABLE
    for code in transient:
        e = errors.error_from_status(code, "x")
        assert isinstance(e, mapl.Transient) and not isinstance(e, ValueError)
    for code in (3, 6, 9, 11):  # misuse
        assert isinstance(errors.error_from_status(code, "x"), ValueError)
    for code, cls in ((5, mapl.NotFound), (13, mapl.Internal), (15, mapl.DataLoss)):
        assert type(errors.error_from_status(code, "x")) is cls


def _stub_names(path: Path) -> set:
    """Top-level names of a stub file, and Class.member for its classes' members."""
    import ast
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef):
            names.add(node.name)
            for m in node.body:
                if isinstance(m, ast.FunctionDef):
                    names.add(f"{node.name}.{m.name}")
                elif isinstance(m, ast.AnnAssign) and isinstance(m.target, ast.Name):
                    names.add(f"{node.name}.{m.target.id}")
        elif isinstance(node, ast.FunctionDef):
            names.add(node.name)
    return names


@pytest.mark.parametrize("module", ["_client", "_mapl"])
def test_native_stubs_match_the_modules(module):
    """py.typed ships with stubs of the native modules: every public name of the module is in
    its stub, and the stub declares nothing the module lacks."""
    native = need_module(f"mapl.{module}")
    stub = REPO / "client" / "python" / "mapl" / f"{module}.pyi"
    declared = {n for n in _stub_names(stub) if "." not in n}
    public = {n for n in dir(native) if not n.startswith("_")}
    assert declared == public
    for cls in [c for c in public if inspect.isclass(getattr(native, c))]:
        members = {n for n in dir(getattr(native, cls)) if not n.startswith("_")}
        in_stub = {n.split(".", 1)[1] for n in _stub_names(stub) if n.startswith(cls + ".")}
        assert members == in_stub - {"__init__"}, cls
    assert (REPO / "client" / "python" / "mapl" / "py.typed").exists()


def test_close_ends_a_receive_in_flight(pair: Pair):
    """Closing a Sidecar cancels its calls in flight: a posted receive fails at once, saying
    the client was closed, instead of waiting for its deadline (and no worker thread outlives
    the close)."""
    sc = pair.down_proc.connect("closing-while-receiving")
    work = sc.irecv_activation(step=10**6, microbatch=0, timeout=60.0)
    time.sleep(0.3)
    start = time.monotonic()
    sc.close()
    with pytest.raises(mapl.FailedPrecondition, match="closed while this call waited"):
        work.wait(10.0)
    assert time.monotonic() - start < 5.0
    prefix = f"mapl-stage{sc.stage}-session{sc.session}-"
    assert not [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


def test_a_send_that_fails_in_the_background_is_reported_on_both_sides(mapl_pair: Pair):
    """A gradient for a microbatch the downstream never received is taken (Send returns), then
    refused by the daemon's encoder: the upstream's receive fails at once as a retryable
    mapl.Aborted, and the downstream's next Send and its Step each report it, once."""
    p = mapl_pair
    p.fresh()
    step = p.up.next_step
    g = torch.randn(8, D)
    p.down.send_gradient(0, step, 7, g)  # (step, 7) never crossed forward
    start = time.monotonic()
    with pytest.raises(mapl.Aborted) as info:
        p.up.recv_gradient(0, step, 7, timeout=TIMEOUT)
    assert time.monotonic() - start < 5.0 and info.value.retryable
    assert "failed to encode" in str(info.value), str(info.value)
    time.sleep(0.2)
    with pytest.raises(mapl.FailedPrecondition, match="an earlier Send failed in the background"):
        p.down.send_gradient(0, step, 8, g)
    with pytest.raises(mapl.FailedPrecondition, match="an earlier Send failed in the background"):
        p.down.close_step(step, timeout=TIMEOUT)
    # Reported once: the step now closes (the upstream's Step waits for the downstream's).
    up_closed = p.pool.submit(p.up.close_step, step, TIMEOUT)
    p.down.close_step(step, timeout=TIMEOUT)
    up_closed.result(timeout=2 * TIMEOUT)
