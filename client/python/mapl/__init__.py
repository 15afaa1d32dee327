"""mapl: learned subspace compression for pipeline-parallel training over slow links.

The codec on numpy arrays (``mapl.codec``)::

    import numpy as np, mapl
    rvq = mapl.codec.RVQ(dim=64, levels=4)
    rvq.fit(x)                      # x: float32 (n, 64)
    codes = rvq.encode(x)           # uint8 (n, 4)
    x_hat = rvq.decode(codes)       # float32 (n, 64)

The trainer's side of the stage's sidecar daemon, mapld (``mapl.Sidecar``, needs PyTorch)::

    with mapl.Sidecar.connect(stage=0) as sc:
        with sc.step() as st:                          # numbers the step and microbatches
            st.send(model(x), token_ids=x).backward()  # the gradient comes back through autograd
            opt.step()

``mapl.torch_pipeline`` holds the step scope and the autograd boundaries; ``Sidecar.isend_*`` and
``irecv_*`` return ``mapl.Work`` handles. Errors from the daemon are ``mapl.MaplError``
subclasses carrying its message: ``mapl.Transient`` ones may succeed if retried, the
``ValueError`` ones are misuse.
"""

from typing import TYPE_CHECKING, Any

from . import codec
from .errors import (Aborted, AlreadyExists, Cancelled, DataLoss, DeadlineExceeded,
                     FailedPrecondition, Internal, InvalidArgument, MaplError, NotFound,
                     OutOfRange, ResourceExhausted, Transient, Unavailable)

__all__ = ["codec", "Sidecar", "default_socket_path", "torch_pipeline", "StepScope", "Boundary",
           "Work", "P2POp", "batch_isend_irecv", "MaplError", "Transient", "Cancelled",
           "InvalidArgument", "DeadlineExceeded", "NotFound", "AlreadyExists",
           "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange", "Internal",
           "Unavailable", "DataLoss"]
__version__ = "0.1.0"

if TYPE_CHECKING:  # what the lazy attributes below are, for type checkers and IDEs
    from . import torch_pipeline
    from .sidecar import Sidecar, default_socket_path
    from .torch_pipeline import Boundary, StepScope
    from .work import P2POp, Work, batch_isend_irecv

# The sidecar client loads PyTorch and gRPC; codec users should not pay for them.
_LAZY = {"Sidecar": "sidecar", "default_socket_path": "sidecar", "torch_pipeline": None,
         "StepScope": "torch_pipeline", "Boundary": "torch_pipeline", "Work": "work",
         "P2POp": "work", "batch_isend_irecv": "work"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'mapl' has no attribute {name!r}")
    import importlib
    module = importlib.import_module(f".{_LAZY[name] or name}", __name__)
    value = module if _LAZY[name] is None else getattr(module, name)
    globals()[name] = value
    return value
