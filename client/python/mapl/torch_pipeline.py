"""Pipeline stages in plain PyTorch over mapl: a step scope that numbers steps and microbatches,
and boundaries that autograd drives.

A stage's training step, whatever its place in the pipeline::

    with sc.step() as st:                  # step number and microbatch ids are the scope's
        for x, y in microbatches:
            h = st.recv() if not first else x      # the activation, as sent: (b, s, d), with grad
            out = model(h)
            if last:
                loss = F.cross_entropy(out.flatten(0, 1), y.flatten())
                (loss / M).backward()      # its gradient goes upstream through st.recv's tensor
            else:
                st.send(out, token_ids=x if first else None).backward()
        opt.step()
    # leaving the block closes the step on the sidecar (the compressor's own update)

``st.send(out)`` ships the activation and returns a scalar (zero) that stands for the rest of the
pipeline: its ``backward()`` receives dL/dout from the next stage and carries it into this
stage's graph, whose way back through ``st.recv``'s tensor ships the gradient to the previous
stage. Nothing is kept outside the autograd graph: a tensor lives as long as the graph needs it.
A middle stage forwards the token ids that came with a microbatch without giving them.

``with st.evaluate():`` (or a whole ``with sc.step(evaluation=True)``) crosses the boundaries
without training: no gradients, no learning in the compressors, and an evaluation-only scope
closes no step (its microbatches share the next training step's number).

Non-blocking forms, for schedules that overlap transfer with compute (1F1B): ``st.irecv()``
posts the next microbatch's receive and returns a :class:`mapl.Work`; each ``st.send`` posts the
receive of its gradient at once, so it is on its way while the stage computes.

Misuse fails at once with a :class:`mapl.MaplError` that says what to do: scopes that nest, a
send on the last stage or a receive on the first, a step that ends with gradients never
exchanged or receives never waited for, a scope used after it ended.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Dict, Iterator, Optional, Tuple

import torch

from .errors import DeadlineExceeded, FailedPrecondition
from .sidecar import FORWARD, Sidecar, Stats
from .work import Work

__all__ = ["StepScope", "Boundary"]


class _Outbound:
    """An activation this stage sent that waits for its gradient: the receive was posted when it
    was sent; :meth:`gradient` (run by autograd) takes it."""

    def __init__(self, scope: "StepScope", mb: int, h: torch.Tensor) -> None:
        self.scope, self.mb = scope, mb
        self.shape, self.dtype, self.device = h.shape, h.dtype, h.device
        sc = scope.sidecar
        rows = h.numel() // h.shape[-1]
        # The daemon writes the gradient straight into shared memory: no copy on the way in
        # (device memory, for a CUDA activation on a CUDA session).
        recv_dtype = h.dtype if h.dtype in (torch.float32, torch.bfloat16) else torch.float32
        device = sc.cuda_device if h.is_cuda and h.device == sc.cuda_device else None
        out = sc.buffer_tensor((rows, h.shape[-1]), recv_dtype, device=device)
        self.work = sc.irecv_gradient(step=scope.number, microbatch=mb, boundary=scope.out_b,
                                      out=out, timeout=scope.timeout)

    def gradient(self) -> torch.Tensor:
        scope = self.scope
        try:
            g = self.work.wait()
        except DeadlineExceeded:
            # Posted at send time, the receive may time out before the backward pass comes;
            # the gradient then waits in the daemon: receive it now.
            g = scope.sidecar.recv_gradient(scope.out_b, scope.number, self.mb,
                                            timeout=scope.timeout)
        scope._answered(self.mb)
        return g.view(self.shape).to(device=self.device, dtype=self.dtype)


class _SendBoundary(torch.autograd.Function):
    """Forward: nothing more (the activation was handed to the sidecar); returns a zero scalar
    that stands for the downstream stages. Backward: dL/dh from the downstream stage."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, link: _Outbound) -> torch.Tensor:  # type: ignore
        ctx.link = link
        return h.new_zeros(())

    @staticmethod
    def backward(ctx: Any, _grad: torch.Tensor) -> Tuple[torch.Tensor, None]:  # type: ignore
        link, ctx.link = ctx.link, None
        if link is None:
            raise FailedPrecondition("the gradient of this activation was already received: "
                                     "backward through st.send's result runs once (pass "
                                     "retain_graph=False)")
        return link.gradient(), None


class _RecvBoundary(torch.autograd.Function):
    """Forward: the received activation, made part of the graph. Backward: ships dL/dh_hat to
    the upstream stage."""

    @staticmethod
    def forward(ctx: Any, _anchor: torch.Tensor, h: torch.Tensor,  # type: ignore
                scope: "StepScope", mb: int) -> torch.Tensor:
        ctx.scope, ctx.mb = scope, mb
        return h

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[None, None, None, None]:  # type: ignore
        scope, ctx.scope = ctx.scope, None
        if scope is None:
            raise FailedPrecondition("this activation's gradient was already sent: backward "
                                     "through st.recv's tensor runs once")
        scope._send_gradient(ctx.mb, grad)
        return None, None, None, None


class StepScope:
    """One step of this stage, made by ``sidecar.step()``; use it as a ``with`` block. See the
    module doc. ``number`` is the step; ``stats`` the sidecar's stats once the block closed it."""

    def __init__(self, sidecar: Sidecar, evaluation: bool = False,
                 timeout: Optional[float] = None) -> None:
        self.sidecar = sidecar
        self.evaluation_only = evaluation
        self.timeout = timeout
        self.number: Optional[int] = None
        self.stats: Optional[Stats] = None
        self._state = "new"  # new -> open -> closed
        self._evaluating = evaluation
        self._lock = threading.Lock()
        self._next = {"send": 0, "recv": 0}  # microbatch ids of the next send and receive
        self._ids: Dict[int, Optional[torch.Tensor]] = {}  # token ids received, to forward
        self._outbound: Dict[int, _Outbound] = {}           # sent, gradient not yet received
        self._inbound: Dict[int, bool] = {}                 # received, gradient not yet sent
        self._posted: Dict[int, Work] = {}                  # receives posted, not yet waited
        self.in_b = self._role_boundary("downstream")
        self.out_b = self._role_boundary("upstream")

    def _role_boundary(self, role: str) -> Optional[int]:
        fits = [b.id for b in self.sidecar.boundaries.values() if b.role == role]
        return fits[0] if len(fits) == 1 else None

    # ---- the scope ----

    def __enter__(self) -> "StepScope":
        sc = self.sidecar
        sc._check_open()
        if self._state != "new":
            raise FailedPrecondition("a step scope is entered once: make a new one with "
                                     "sidecar.step()")
        if sc._scope is not None:
            raise FailedPrecondition(
                f"step {sc._scope.number} is still open on this sidecar: step scopes do not "
                "nest; end that block first")
        cursor = sc._cursor  # a step an evaluation-only scope left open
        if cursor is not None:
            self.number, self._next["send"], self._next["recv"] = cursor
        else:
            self.number = sc.next_step
        sc._cursor = None
        sc._scope = self
        self._state = "open"
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        sc = self.sidecar
        try:
            if exc_type is not None:
                self._discard()
                return
            self._finish()
        finally:
            self._state = "closed"
            sc._scope = None

    def _discard(self) -> None:
        """After an exception: drop this step's state; the sidecar does not close it (its
        compressors must not learn from half a step), and the next scope takes the next
        number (the daemon drops what was left of this one when that step closes)."""
        with self._lock:
            self._outbound.clear()
            self._inbound.clear()
            self._posted.clear()
            self._ids.clear()
        self.sidecar.next_step = max(self.sidecar.next_step, (self.number or 0) + 1)

    def _finish(self) -> None:
        sc = self.sidecar
        problems = []
        with self._lock:
            if self._posted:
                problems.append(f"receives of microbatch(es) {sorted(self._posted)} were posted "
                                "and never waited for (call wait() on each Work st.irecv "
                                "returned)")
            if self._outbound:
                problems.append(f"the gradients of microbatch(es) {sorted(self._outbound)} were "
                                "never received: call backward() on what st.send returned (or "
                                "on a loss that depends on it) before the step ends")
            if self._inbound:
                problems.append(f"the activations received as microbatch(es) "
                                f"{sorted(self._inbound)} never had their gradient sent back: "
                                "run the backward pass through them before the step ends (or "
                                "receive them in st.evaluate())")
        if problems:
            self._discard()
            raise FailedPrecondition(f"step {self.number} ends unfinished and is not closed: "
                                     + "; ".join(problems))
        if self.evaluation_only:
            # Nothing to learn: the step stays open for the next scope to continue and close.
            sc._cursor = (self.number, self._next["send"], self._next["recv"])
            return
        try:
            self.stats = sc.close_step(self.number, timeout=self.timeout)
        finally:  # a Step that failed leaves this number used: the next scope takes the next one
            sc.next_step = max(sc.next_step, self.number + 1)

    def _check_open(self) -> None:
        if self._state != "open":
            raise FailedPrecondition(
                "this step scope is not open: use it inside its `with sidecar.step() as st:` "
                "block" if self._state == "new" else
                f"step {self.number} has ended: its scope takes no more calls")

    @contextlib.contextmanager
    def evaluate(self) -> Iterator["StepScope"]:
        """Inside: forward only, under ``torch.no_grad()``; the microbatches cross the
        boundaries as evaluation traffic, which trains no compressor."""
        self._check_open()
        before = self._evaluating
        self._evaluating = True
        try:
            with torch.no_grad():
                yield self
        finally:
            self._evaluating = before

    @property
    def evaluating(self) -> bool:
        return self._evaluating

    def _take(self, what: str) -> int:
        """The microbatch id of the next send or receive ("send", "recv"): call order."""
        with self._lock:
            mb = self._next[what]
            self._next[what] += 1
        return mb

    # ---- sending ----

    def send(self, h: torch.Tensor,
             token_ids: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Send the next microbatch's activation h (..., d) downstream, with its token ids
        (default: the ids that came with the same microbatch from upstream, on a middle stage).
        Training: returns a zero scalar whose ``backward()`` brings the gradient back into h's
        graph. Evaluating, or h without grad: returns None."""
        self._check_open()
        if self.out_b is None:
            self.sidecar._boundary_for(None, FORWARD, sending=True)  # raises, saying why
        mb = self._take("send")
        with self._lock:
            forwarded = self._ids.pop(mb, None)
        ids = token_ids if token_ids is not None else forwarded
        self.sidecar.send_activation(self.out_b, self.number, mb, h, ids,
                                     evaluation=self._evaluating)
        if self._evaluating or not (torch.is_grad_enabled() and h.requires_grad):
            return None
        link = _Outbound(self, mb, h)
        with self._lock:
            self._outbound[mb] = link
        return _SendBoundary.apply(h, link)

    def _answered(self, mb: int) -> None:
        with self._lock:
            self._outbound.pop(mb, None)

    # ---- receiving ----

    def recv(self, timeout: Optional[float] = None) -> torch.Tensor:
        """The next microbatch's activation from upstream, shaped as it was sent. Training: it
        requires grad, and the backward pass through it sends its gradient upstream.
        Evaluating: a plain tensor."""
        return self.irecv(timeout).wait()

    def irecv(self, timeout: Optional[float] = None) -> Work:
        """:meth:`recv` posted without waiting: a :class:`mapl.Work` whose ``wait()`` gives the
        tensor (wait for each one before the step ends)."""
        self._check_open()
        if self.in_b is None:
            self.sidecar._boundary_for(None, FORWARD, sending=False)  # raises, saying why
        mb = self._take("recv")
        training = not self._evaluating and torch.is_grad_enabled()
        work = self.sidecar.irecv_activation(step=self.number, microbatch=mb,
                                             boundary=self.in_b,
                                             timeout=timeout or self.timeout)

        def arrived(h: torch.Tensor) -> torch.Tensor:
            with self._lock:
                self._ids[mb] = work.token_ids
                if training:
                    self._inbound[mb] = True
            if not training:
                return h
            with torch.enable_grad():
                anchor = torch.empty(0, requires_grad=True)
                return _RecvBoundary.apply(anchor, h, self, mb)

        def waited() -> None:
            with self._lock:
                self._posted.pop(mb, None)

        chained = work.then(arrived)
        chained._on_wait = waited
        with self._lock:
            self._posted[mb] = chained
        return chained

    def token_ids(self, microbatch: int) -> Optional[torch.Tensor]:
        """The token ids that came with received microbatch ``microbatch`` (until a send of the
        same microbatch forwards them), or None."""
        with self._lock:
            return self._ids.get(microbatch)

    def _send_gradient(self, mb: int, grad: torch.Tensor) -> None:
        with self._lock:
            expected = self._inbound.pop(mb, None)
        if expected is None:
            raise FailedPrecondition(f"step {self.number} microbatch {mb}: the step has ended, "
                                     "so its gradient cannot be sent: run backward before the "
                                     "`with` block ends")
        self.sidecar.send_gradient(self.in_b, self.number, mb, grad)


class Boundary(torch.nn.Module):
    """An ``nn.Module`` form of a stage's boundaries for ``nn.Sequential`` models: as the first
    module of a stage it receives (``forward()`` ignores its input, which may be None), as the
    last it sends and returns the scalar whose ``backward()`` brings the gradient back. Each call
    acts in the sidecar's open step scope (``with sidecar.step():``)."""

    def __init__(self, sidecar: Sidecar, role: str) -> None:
        super().__init__()
        if role not in ("recv", "send"):
            raise ValueError(f"Boundary role is 'recv' or 'send', not {role!r}")
        self.sidecar, self.role = sidecar, role

    def forward(self, h: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        scope = self.sidecar._scope
        if scope is None:
            raise FailedPrecondition(f"mapl.Boundary({self.role!r}) runs inside a step scope: "
                                     "`with sidecar.step():`")
        if self.role == "recv":
            return scope.recv()
        if h is None:
            raise ValueError("mapl.Boundary('send') needs the activation to send")
        return scope.send(h)
