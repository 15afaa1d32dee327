"""Checkpoints across restarts: two mapld processes of a METHOD_MAPL boundary, each with its own
state_dir. The upstream checkpoints every 5 steps, the downstream on the trainer's Checkpoint call
and at SIGTERM. The upstream is then killed with SIGKILL and restarted: it comes back with the
dictionary it had checkpointed (same version and checksum, not version 0), sends it whole to the
downstream, and training goes on from there with both ends' dictionaries equal after every step.
The downstream is then stopped with SIGTERM, which checkpoints it, and restarted from that."""

from __future__ import annotations

import re
import time
from pathlib import Path

from conftest import mapld_binary, need_module, start_mapld

torch = need_module("torch")
mapl = need_module("mapl")

D, K, VOCAB, ROWS = 64, 8, 100, 96
TIMEOUT = 20.0
BOUNDARY = {"id": 0, "d": D, "k": K, "vocab": VOCAB, "max_tokens": 128,
            "method": "METHOD_MAPL"}


def train_step(up, down, step: int) -> float:
    """Two microbatches forward and back, then both sides' Step; the forward's relative error."""
    err = norm = 0.0
    for mb in range(2):
        g = torch.Generator().manual_seed(1000 * step + mb)
        h = torch.randn(ROWS, D, generator=g)
        ids = torch.randint(0, VOCAB, (ROWS,), generator=g)
        up.send_activation(0, step, mb, h, ids)
        h_hat = down.recv_activation(0, step, mb, timeout=TIMEOUT)
        err += float((h_hat - h).norm() ** 2)
        norm += float(h.norm() ** 2)
        down.send_gradient(0, step, mb, h_hat - h)
        up.recv_gradient(0, step, mb, timeout=TIMEOUT)
    down.step(step, timeout=TIMEOUT)
    up.step(step, timeout=TIMEOUT)
    return (err / norm) ** 0.5


def dictionaries(up, down):
    """Both ends' (version, checksum) once they agree: the step's delta is still on its way when
    the upstream's Step returns. Fails after TIMEOUT naming both."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        u, d = up.stats().boundary(0), down.stats().boundary(0)
        ours = (u.dictionary_version, u.dictionary_checksum)
        theirs = (d.dictionary_version, d.dictionary_checksum)
        if ours == theirs:
            return ours
        assert time.monotonic() < deadline, f"dictionaries differ: upstream {ours}, downstream {theirs}"
        time.sleep(0.02)


def test_state_survives_sigkill_and_sigterm(short_tmp: Path):
    mapld_binary()  # skips (fails under CI=true) when not built
    up_state, down_state = short_tmp / "state0", short_tmp / "state1"

    def start_down():
        return start_mapld(short_tmp, 1, [dict(BOUNDARY, role="ROLE_DOWNSTREAM")],
                           {"peer_listen": "127.0.0.1:0", "state_dir": str(down_state)})

    procs = []
    sidecars = []
    try:
        down_proc = start_down()
        procs.append(down_proc)
        port = down_proc.ready()["peer_port"]
        up_boundary = dict(BOUNDARY, role="ROLE_UPSTREAM", peer_address=f"127.0.0.1:{port}")
        up_extra = {"state_dir": str(up_state), "checkpoint_every_steps": 5}
        up_proc = start_mapld(short_tmp, 0, [up_boundary], up_extra)
        procs.append(up_proc)
        up, down = up_proc.connect("up"), down_proc.connect("down")
        sidecars += [up, down]
        assert "no saved state: starting afresh" in up_proc.log(), up_proc.log()

        for step in range(1, 11):
            train_step(up, down, step)
        # Steps 5 and 10 were checkpointed by the upstream on its own.
        assert len(re.findall(r'msg=checkpoint .*why="every 5 steps"', up_proc.log())) == 2, \
            up_proc.log()
        assert up.stats().boundary(0).checkpoints_written == 2
        written = down.checkpoint()
        assert [w["boundary"] for w in written] == [0]
        assert written[0]["last_step"] == 10 and written[0]["bytes"] > 0
        assert Path(written[0]["path"]) == down_state / "boundary-0.state"
        assert (down_state / "boundary-0.state").stat().st_mode & 0o777 == 0o600
        up_dict = dictionaries(up, down)
        assert up_dict[0] >= 10, up_dict

        # SIGKILL: nothing is written at the end; the step-10 checkpoint is what comes back.
        up.close()
        up_proc.kill()
        up_proc = start_mapld(short_tmp, 0, [up_boundary], up_extra)
        procs.append(up_proc)
        up = up_proc.connect("up")
        sidecars.append(up)
        log = up_proc.log()
        assert f'msg="restored state" boundary=0' in log and "last_step=10" in log, log
        assert f"dictionary_version={up_dict[0]}" in log, log
        # Restored, not relearned from version 0; it goes to the downstream ahead of the first
        # frame.
        b = up.stats().boundary(0)
        assert (b.dictionary_version, b.dictionary_checksum) == up_dict

        for step in range(11, 14):
            train_step(up, down, step)
            assert dictionaries(up, down)[0] > up_dict[0], "it continues from the restored one"

        # SIGTERM: the downstream checkpoints after its drain and restores it at start.
        down.close()
        assert down_proc.stop() == 0
        assert 'why=shutdown' in down_proc.log(), down_proc.log()
        down_proc = start_down()
        procs.append(down_proc)
        # It listens on a new port and the upstream's config names the old one: restart the
        # upstream too, which checkpoints at its SIGTERM as well.
        up.close()
        assert up_proc.stop() == 0
        up_boundary["peer_address"] = f"127.0.0.1:{down_proc.ready()['peer_port']}"
        up_proc = start_mapld(short_tmp, 0, [up_boundary], up_extra)
        procs.append(up_proc)
        # In this same process as the clients of the daemons that stopped: each client has a
        # connection of its own, never the stopped daemon's.
        up, down = up_proc.connect("up"), down_proc.connect("down")
        sidecars += [up, down]
        assert 'msg="restored state" boundary=0' in down_proc.log(), down_proc.log()
        assert "last_step=13" in down_proc.log(), down_proc.log()
        assert "last_step=13" in up_proc.log(), up_proc.log()
        restored = up.stats().boundary(0).dictionary_version
        assert restored >= 13
        train_step(up, down, 14)
        assert dictionaries(up, down)[0] > restored
    finally:
        for s in sidecars:
            s.close()
        for p in procs:
            p.stop()


def test_checkpoint_call_says_what_is_wrong(short_tmp: Path):
    """Without a state_dir the call names the setting; a state_dir that cannot be written any
    more fails the call naming the file, is counted, and leaves the last checkpoint in place."""
    mapld_binary()
    boundary = dict(BOUNDARY, role="ROLE_DOWNSTREAM")
    proc = start_mapld(short_tmp, 1, [boundary], {"peer_listen": "127.0.0.1:0"})
    try:
        sidecar = proc.connect("trainer")
        try:
            sidecar.checkpoint()
            raise AssertionError("checkpoint() without a state_dir succeeded")
        except mapl.FailedPrecondition as e:
            assert "state_dir" in str(e), e
        sidecar.close()
    finally:
        assert proc.stop() == 0

    state = short_tmp / "state"
    proc = start_mapld(short_tmp, 1, [boundary],
                       {"peer_listen": "127.0.0.1:0", "state_dir": str(state)})
    try:
        sidecar = proc.connect("trainer")
        written = sidecar.checkpoint()
        kept = Path(written[0]["path"]).read_bytes()
        stats = sidecar.stats().boundary(0)
        assert stats.checkpoints_written == 1 and stats.checkpoint_failures == 0
        assert abs(stats.last_checkpoint_unix_seconds - time.time()) < 60
        # The directory is replaced by a file: nothing can be written under it.
        state.rename(short_tmp / "state.moved")
        state.write_text("not a directory")
        try:
            sidecar.checkpoint()
            raise AssertionError("checkpoint() into a file succeeded")
        except mapl.Unavailable as e:
            assert "boundary-0.state.tmp" in str(e) and "previous checkpoint is kept" in str(e), e
        assert sidecar.stats().boundary(0).checkpoint_failures == 1
        assert (short_tmp / "state.moved" / "boundary-0.state").read_bytes() == kept
        sidecar.close()
    finally:
        proc.stop()
    assert "checkpoint at shutdown failed" in proc.log(), proc.log()
