"""mapl.Sidecar without a daemon: the error for a missing mapld, the socket path default, the
exception classes and the shared-memory allocator."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import mapl  # noqa: E402
from mapl import errors, sidecar  # noqa: E402


def test_connect_without_daemon_is_unavailable_and_says_what_to_do(short_tmp: Path):
    path = str(short_tmp / "nobody.sock")
    start = time.monotonic()
    with pytest.raises(mapl.Unavailable) as info:
        mapl.Sidecar.connect(stage=2, socket_path=path, timeout=0.2)
    assert time.monotonic() - start < 5
    e = info.value
    assert isinstance(e, ConnectionError) and isinstance(e, mapl.MaplError)
    assert e.code == 14 and e.code_name == "UNAVAILABLE"
    msg = str(e)
    assert f"unix:{path}" in msg and "no socket file" in msg and "start mapld" in msg


def test_default_socket_path_matches_the_daemon(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    assert mapl.default_socket_path(3) == "/run/user/1234/mapld-3.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    import os
    assert mapl.default_socket_path(0) == f"/tmp/mapld-{os.getuid()}-0.sock"


@pytest.mark.parametrize("code,cls,builtin", [
    (3, mapl.InvalidArgument, ValueError),
    (9, mapl.FailedPrecondition, ValueError),
    (11, mapl.OutOfRange, ValueError),
    (4, mapl.DeadlineExceeded, TimeoutError),
    (14, mapl.Unavailable, ConnectionError),
    (8, mapl.ResourceExhausted, RuntimeError),
    (7, mapl.MaplError, RuntimeError),  # PERMISSION_DENIED: no subclass
])
def test_errors_map_codes_to_classes(code, cls, builtin):
    e = errors.error_from_status(code, "boundary 0: step 5 microbatch 2: bad")
    assert type(e) is cls and isinstance(e, builtin) and isinstance(e, RuntimeError)
    assert e.code == code and str(e) == "boundary 0: step 5 microbatch 2: bad"


def test_arena_first_fit_alignment_and_coalescing():
    a = sidecar._Arena([4096, 1024], alignment=256)
    b0 = a.alloc(1)
    b1 = a.alloc(300)
    assert b0 == (0, 0, 256) and b1 == (0, 256, 512)
    big = a.alloc(3000)
    assert big == (0, 768, 3072)
    small = a.alloc(1000)  # 256 bytes left in buffer 0: first fit moves on to buffer 1
    assert small == (1, 0, 1024)
    tail = a.alloc(10)
    assert tail == (0, 3840, 256)
    with pytest.raises(mapl.ResourceExhausted, match="shared memory exhausted"):
        a.alloc(10)
    a.free(*b1)
    a.defer_free(*b0)  # as the garbage collector does
    assert a.alloc(700) == (0, 0, 768)  # b0 and b1 coalesced
    for r in [(0, 0, 768), big, small, tail]:
        a.free(*r)
    assert a.free_bytes() == 4096 + 1024 and a.used == 0
    with pytest.raises(mapl.ResourceExhausted, match="client_buffer_bytes"):
        a.alloc(5000)
