"""mapl: learned subspace compression for pipeline-parallel training over slow links.

The codec on numpy arrays (``mapl.codec``)::

    import numpy as np, mapl
    rvq = mapl.codec.RVQ(dim=64, levels=4)
    rvq.fit(x)                      # x: float32 (n, 64)
    codes = rvq.encode(x)           # uint8 (n, 4)
    x_hat = rvq.decode(codes)       # float32 (n, 64)

The trainer's side of the stage's sidecar daemon, mapld (``mapl.Sidecar``, needs PyTorch)::

    with mapl.Sidecar.connect(stage=0) as sc:
        sc.send_activation(0, step, mb, h, token_ids)   # h (..., d) float32/bfloat16
        g = sc.recv_gradient(0, step, mb)              # float32 (n, d)
        sc.step(step)

``mapl.torch_pipeline`` holds the autograd-aware helpers for pipeline schedules. Errors from the
daemon are ``mapl.MaplError`` subclasses carrying its message.
"""

from typing import Any

from . import codec
from .errors import (AlreadyExists, DeadlineExceeded, FailedPrecondition, InvalidArgument,
                     MaplError, OutOfRange, ResourceExhausted, Unavailable)

__all__ = ["codec", "Sidecar", "default_socket_path", "torch_pipeline", "MaplError",
           "InvalidArgument", "AlreadyExists", "FailedPrecondition", "OutOfRange", "DeadlineExceeded",
           "Unavailable", "ResourceExhausted"]
__version__ = "0.1.0"

# The sidecar client loads PyTorch and gRPC; codec users should not pay for them.
_LAZY = {"Sidecar": "sidecar", "default_socket_path": "sidecar", "torch_pipeline": None}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'mapl' has no attribute {name!r}")
    import importlib
    module = importlib.import_module(f".{_LAZY[name] or name}", __name__)
    value = module if _LAZY[name] is None else getattr(module, name)
    globals()[name] = value
    return value
