"""Autograd-aware send/recv over mapl, for pipeline schedules (GPipe, 1F1B) that would otherwise
call ``torch.distributed.send/recv`` for activations and gradients.

Upstream stage (sends activations over ``boundary``, receives their gradients)::

    h = stage(x)                                               # (..., d), requires grad
    send_forward(sc, boundary, step, mb, h, token_ids)         # keeps h for the backward
    ...
    backward_from_peer(sc, boundary, step, mb)                 # h.backward(dL/dh from the peer)

Downstream stage (receives activations, sends their gradients)::

    h = recv_forward(sc, boundary, step, mb, shape=(b, s, d))  # leaf, requires_grad=True
    loss = head(h).mean(); loss.backward()
    send_backward(sc, boundary, step, mb)                      # ships h.grad

Each send_forward / recv_forward keeps its tensor until the matching backward call, keyed by
(boundary, step, microbatch); :func:`pending` lists what is still held.
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .errors import FailedPrecondition
from .sidecar import SendResult, Sidecar

__all__ = ["send_forward", "backward_from_peer", "recv_forward", "send_backward", "pending",
           "clear"]

_Key = Tuple[int, int, int]
# Per sidecar: the activations waiting for their backward pass.
_SAVED: "weakref.WeakKeyDictionary[Sidecar, Dict[_Key, torch.Tensor]]" = (
    weakref.WeakKeyDictionary())


def _saved(sidecar: Sidecar) -> Dict[_Key, torch.Tensor]:
    return _SAVED.setdefault(sidecar, {})


def _take(sidecar: Sidecar, key: _Key, what: str) -> torch.Tensor:
    try:
        return _saved(sidecar).pop(key)
    except KeyError:
        raise FailedPrecondition(
            f"boundary {key[0]}: step {key[1]} microbatch {key[2]}: no activation held for "
            f"{what}; call {'send_forward' if what == 'backward_from_peer' else 'recv_forward'}"
            " first") from None


def send_forward(sidecar: Sidecar, boundary: int, step: int, microbatch: int, h: torch.Tensor,
                 token_ids: Optional[torch.Tensor] = None) -> SendResult:
    """Send activation h (..., d) downstream and, when h requires grad, keep it so that
    :func:`backward_from_peer` can run its backward pass with the peer's gradient."""
    result = sidecar.send_activation(boundary, step, microbatch, h, token_ids)
    if h.requires_grad:
        _saved(sidecar)[(boundary, step, microbatch)] = h
    return result


def backward_from_peer(sidecar: Sidecar, boundary: int, step: int, microbatch: int,
                       timeout: Optional[float] = None) -> torch.Tensor:
    """Receive dL/dh for the h sent by :func:`send_forward` and call ``h.backward(grad)``.

    Returns the gradient, shaped and typed like h (on h's device)."""
    h = _take(sidecar, (boundary, step, microbatch), "backward_from_peer")
    d = h.shape[-1]
    grad = sidecar.recv_gradient(boundary, step, microbatch, timeout=timeout,
                                 rows=h.numel() // d, device=h.device)
    grad = grad.view(h.shape).to(h.dtype)
    h.backward(grad)
    return grad


def recv_forward(sidecar: Sidecar, boundary: int, step: int, microbatch: int,
                 timeout: Optional[float] = None, shape: Optional[Sequence[int]] = None,
                 dtype: torch.dtype = torch.float32,
                 device: Optional[Union[str, torch.device]] = None,
                 requires_grad: bool = True) -> torch.Tensor:
    """Receive h_hat (n, d) (viewed as ``shape`` when given) as a leaf tensor of ``dtype`` on
    ``device`` with ``requires_grad``; :func:`send_backward` ships its ``.grad`` back."""
    rows = None
    if shape is not None:
        numel = 1
        for s in shape:
            numel *= int(s)
        rows = numel // int(shape[-1])
    h = sidecar.recv_activation(boundary, step, microbatch, timeout=timeout, rows=rows,
                                dtype=dtype, device=device)
    if shape is not None:
        h = h.view(tuple(shape))
    if requires_grad:
        h.requires_grad_(True)
        _saved(sidecar)[(boundary, step, microbatch)] = h
    return h


def send_backward(sidecar: Sidecar, boundary: int, step: int, microbatch: int,
                  grad: Optional[torch.Tensor] = None) -> SendResult:
    """Ship dL/dh_hat upstream: ``grad`` if given, else the ``.grad`` of the tensor
    :func:`recv_forward` returned (after the local backward pass)."""
    h = _take(sidecar, (boundary, step, microbatch), "send_backward")
    if grad is None:
        grad = h.grad
        if grad is None:
            _saved(sidecar)[(boundary, step, microbatch)] = h
            raise FailedPrecondition(
                f"boundary {boundary}: step {step} microbatch {microbatch}: the received "
                "activation has no .grad yet; run the backward pass through it first")
    return sidecar.send_gradient(boundary, step, microbatch, grad)


def pending(sidecar: Sidecar) -> List[_Key]:
    """(boundary, step, microbatch) of the activations still waiting for their backward."""
    return sorted(_saved(sidecar))


def clear(sidecar: Sidecar) -> None:
    """Drop every held activation (e.g. after an aborted step)."""
    _saved(sidecar).clear()
