"""Two daemons of the installed package carry one boundary, driven by the installed Python
package: python3 drive_installed.py ROOT WORKDIR (tests/package/test_package.sh). Checks that
`mapl` and mapld come from ROOT (a scratch root the .deb was unpacked into), sends activations
down and gradients up through METHOD_DENSE, and prints the downstream's socket for the C++
consumer, then waits for a line on stdin before stopping the daemons."""
import sys
from pathlib import Path

import torch

root, work = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
import mapl  # noqa: E402  (imported after the arguments, to say where it came from)
from mapl import launch  # noqa: E402

assert Path(mapl.__file__).resolve().is_relative_to(root), mapl.__file__
assert launch.find_mapld().resolve().is_relative_to(root), launch.find_mapld()
# Pipeline descriptions are checked against the installed config.proto, not the source tree's.
from mapl import pipeline  # noqa: E402
assert pipeline.find_config_proto().resolve().is_relative_to(root), pipeline.find_config_proto()
description = Path(__file__).resolve().parents[2] / "deploy" / "pipelines" / "two-stage.toml"
pipeline.load(description)
boundary = {"d": 64, "k": 8, "method": "METHOD_DENSE", "vocab": 256, "max_tokens": 64, "seed": 7}
up, down = launch.start_pair(work, boundary, {"client_buffers": 2,
                                              "client_buffer_bytes": 1 << 20})
try:
    su, sd = up.connect("installed-up"), down.connect("installed-down")
    for mb in range(4):
        h = torch.randn(64, 64)
        su.send_activation(0, 1, mb, h)
        got = sd.recv_activation(0, 1, mb, timeout=30)
        assert torch.equal(got, h.bfloat16().float()), f"microbatch {mb}: activation differs"
        g = torch.randn(64, 64)
        sd.send_gradient(0, 1, mb, g)
        back = su.recv_gradient(0, 1, mb, timeout=30)
        assert torch.equal(back, g.bfloat16().float()), f"microbatch {mb}: gradient differs"
    su.step(1, timeout=30)
    sd.step(1, timeout=30)
    print(f"mapl {Path(mapl.__file__).parent}, mapld {launch.find_mapld()}: 4 microbatches "
          "each way", flush=True)
    print(f"socket {down.socket_path}", flush=True)
    sys.stdin.readline()  # the C++ consumer runs meanwhile
    su.close()
    sd.close()
finally:
    for d in (up, down):
        d.stop()
