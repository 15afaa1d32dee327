"""mapl: learned subspace compression for pipeline-parallel training over slow links.

So far the package holds the codec (``mapl.codec``); the sidecar client comes with the daemon.

    import numpy as np, mapl
    rvq = mapl.codec.RVQ(dim=64, levels=4)
    rvq.fit(x)                      # x: float32 (n, 64)
    codes = rvq.encode(x)           # uint8 (n, 4)
    x_hat = rvq.decode(codes)       # float32 (n, 64)
"""

from . import codec

__all__ = ["codec"]
__version__ = "0.1.0"
