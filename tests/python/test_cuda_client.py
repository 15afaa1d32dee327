"""The client side of CUDA sessions where no GPU is: Sidecar.connect(cuda=...) refuses, saying
why, before it attaches; the native client carries the CUDA options and refs and refuses the
refs that cannot be right; the device arena's deferred free behind fences (pure allocator logic:
a fence is anything with query() and synchronize()); the event pool. What needs a GPU (opening
the IPC handles, the device send and receive paths) is not run here."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Iterator, List

import pytest

from conftest import mapld_binary, need_module, start_mapld

torch = need_module("torch")
mapl = need_module("mapl")
sidecar = need_module("mapl.sidecar")
cuda_ipc = need_module("mapl.cuda_ipc")

D, MAX_TOKENS = 16, 64
no_cuda_here = pytest.mark.skipif(torch.cuda.is_available(),
                                  reason="torch can use CUDA here: nothing to refuse")


@no_cuda_here
@pytest.mark.parametrize("cuda", [True, 0, "cuda", "cuda:0", torch.device("cuda", 0)],
                         ids=["True", "0", "cuda", "cuda:0", "device"])
def test_connect_with_cuda_without_a_cuda_torch_fails_before_attaching(short_tmp: Path, cuda):
    # No daemon at that path: an attach would have been UNAVAILABLE. FAILED_PRECONDITION says
    # the CUDA check came first.
    path = str(short_tmp / "nobody.sock")
    with pytest.raises(mapl.FailedPrecondition) as info:
        mapl.Sidecar.connect(socket_path=path, timeout=0.2, cuda=cuda)
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and info.value.code_name == "FAILED_PRECONDITION"
    reason = cuda_ipc.torch_cuda_unavailable_reason()
    assert reason is not None and reason in msg, msg
    assert "cuda=None" in msg, msg  # what to do instead


@pytest.mark.parametrize("kwargs,says", [
    ({"cuda": "cpu"}, "not a CUDA device"),
    ({"cuda": torch.device("cpu")}, "not a CUDA device"),
    ({"cuda": -1}, "index is >= 0"),
    ({"cuda": False}, "cuda=None"),
    ({"cuda": 1.5}, "not float"),
    ({"cuda": "gpu:0"}, "cuda='gpu:0'"),
    ({"cuda_buffers": 2}, "cuda_buffers without cuda="),
    ({"cuda_buffer_bytes": 1 << 20, "cuda_events": 4},
     "cuda_buffer_bytes, cuda_events without cuda="),
    ({"cuda": True, "cuda_buffers": 0}, "cuda_buffers must be a positive int, got 0"),
    ({"cuda": True, "cuda_buffer_bytes": -5}, "cuda_buffer_bytes must be a positive int"),
    ({"cuda": True, "cuda_events": -1}, "cuda_events must be an int >= 0, got -1"),
], ids=["cpu", "cpu device", "negative", "False", "float", "bad string", "buffers",
        "bytes and events", "zero buffers", "negative bytes", "negative events"])
def test_connect_refuses_a_wrong_cuda_argument_before_attaching(short_tmp: Path, kwargs, says):
    with pytest.raises(mapl.InvalidArgument) as info:
        mapl.Sidecar.connect(socket_path=str(short_tmp / "nobody.sock"), timeout=0.2, **kwargs)
    assert says in str(info.value), str(info.value)


def _driver_loads() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


@pytest.mark.skipif(_driver_loads(), reason="a CUDA driver is installed here")
def test_no_driver_is_failed_precondition_naming_it():
    with pytest.raises(mapl.FailedPrecondition) as info:
        cuda_ipc._Driver()
    assert "libcuda.so.1" in str(info.value) and "NVIDIA driver" in str(info.value)


@pytest.fixture(scope="module")
def daemon() -> Iterator[object]:
    mapld_binary()
    import shutil
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="mapl-py-", dir="/tmp"))
    proc = start_mapld(d, 1, [{"id": 0, "role": "ROLE_DOWNSTREAM", "d": D,
                               "method": "METHOD_DENSE", "max_tokens": MAX_TOKENS}],
                       {"peer_listen": "127.0.0.1:0"})
    proc.ready()
    yield proc
    proc.stop()
    shutil.rmtree(d, ignore_errors=True)


def test_native_client_asks_for_cuda_buffers_and_a_mapld_without_them_refuses(daemon):
    """The options reach the Attach: a mapld that cannot use CUDA (none here) refuses with
    FAILED_PRECONDITION saying so, and one that predates CUDA buffers attaches without them,
    which the client refuses the same way. Either way no CUDA session comes back."""
    client = need_module("mapl._client").Client
    with pytest.raises(mapl.FailedPrecondition) as info:
        client.connect(daemon.socket_path, "gpu-trainer", 5000, cuda_buffers=2,
                       cuda_buffer_bytes=1 << 20, cuda_events=4)
    assert "CUDA" in str(info.value), str(info.value)
    # Checked before dialing: a UUID is 16 bytes; CUDA fields need cuda_buffers.
    with pytest.raises(mapl.InvalidArgument, match="16"):
        client.connect(daemon.socket_path, "x", 5000, cuda_buffers=1, cuda_buffer_bytes=4096,
                       cuda_device_uuid=b"abc")
    with pytest.raises(mapl.InvalidArgument, match="without cuda_buffers"):
        client.connect(daemon.socket_path, "x", 5000, cuda_events=4)
    # The daemon still serves host sessions.
    c = client.connect(daemon.socket_path, "host-trainer", 5000)
    try:
        assert c.cuda() is None
    finally:
        c.close()


@pytest.mark.parametrize("ref,ids,error,says", [
    ((0, 0, 4, D, 1, 1, 0), None, "InvalidArgument", "no CUDA buffers"),
    ((0, 0, 4, D, 1, 1, 1), None, "InvalidArgument", "no CUDA buffers"),
    ((0, 0, 4, D, 1), (0, 4096, 4, 1, 3, 1, 0), "InvalidArgument", "always in host memory"),
    ((0, 0, 4, D, 1, 0, 3), None, "InvalidArgument", "event 3 on a host-memory ref"),
    ((0, 0, 4, D, 1, 5, 0), None, "ValueError", "unknown mapl memory code 5"),
    ((0, 0, 4, D, 1, 0), None, "TypeError", "got 6 items"),
    ((0, 0, 4, D, 1, 0, -1), None, "TypeError", "non-negative integers"),
], ids=["cuda tensor", "cuda tensor with event", "cuda ids", "event on host", "bad memory",
        "6-tuple", "negative event"])
def test_native_client_refuses_refs_that_cannot_be_right(daemon, ref, ids, error, says):
    c = need_module("mapl._client").Client.connect(daemon.socket_path, "refs", 5000)
    try:
        expected = {"InvalidArgument": mapl.InvalidArgument, "ValueError": ValueError,
                    "TypeError": TypeError}[error]
        with pytest.raises(expected) as info:
            c.send(0, 1, 1, 0, ref, ids)
        assert says in str(info.value), str(info.value)
        if error == "InvalidArgument":  # the client's own words, not the daemon's
            assert "CUDA" in str(info.value) or "host" in str(info.value)
    finally:
        c.close()


def test_a_host_ref_as_a_7_tuple_reaches_the_daemon(daemon):
    """(…, memory=0, event=0) is a host ref like the 5-tuple: the daemon answers it (this stage
    is the boundary's downstream, so it refuses the forward Send, in its own words)."""
    c = need_module("mapl._client").Client.connect(daemon.socket_path, "seven", 5000)
    try:
        for ref in [(0, 0, 4, D, 1), (0, 0, 4, D, 1, 0, 0)]:
            with pytest.raises(mapl.InvalidArgument) as info:
                c.send(0, 1, 1, 0, ref, None)
            assert "downstream of it" in str(info.value), str(info.value)
    finally:
        c.close()


def test_device_buffer_tensor_needs_a_cuda_session(daemon):
    sc = daemon.connect("host-only")
    try:
        assert sc.cuda_device is None and sc.cuda_buffer_sizes == [] and sc.cuda_bytes_free == 0
        with pytest.raises(mapl.FailedPrecondition, match="cuda=True"):
            sc.buffer_tensor((4, D), device="cuda")
        assert sc.buffer_tensor((4, D), device="cpu").device.type == "cpu"
    finally:
        sc.close()


class Fence:
    """A fence as the arena sees one: query() says whether it is done; synchronize() waits
    until it is (here: makes it done) and counts the waits."""

    def __init__(self) -> None:
        self.done = False
        self.waits = 0
        self.queries = 0

    def query(self) -> bool:
        self.queries += 1
        return self.done

    def synchronize(self) -> None:
        self.waits += 1
        self.done = True


def test_arena_reuses_a_fenced_region_only_once_its_fence_is_done():
    a = sidecar._Arena([4096], alignment=256)
    r0, r1 = a.alloc(1024), a.alloc(1024)
    f = Fence()
    a.defer_free(*r0, fence=f)
    # Room elsewhere: the fenced region is not taken, and nothing waits.
    assert a.alloc(1024) == (0, 2048, 1024)
    assert f.queries >= 1 and f.waits == 0
    assert a.used == 3072  # the fenced region still counts as in use
    f.done = True
    a.free(*r1)  # drains: r0 is free now, and coalesces with r1
    assert a.used == 2048 - 1024 and a.alloc(2048) == (0, 0, 2048)
    assert f.waits == 0


def test_arena_waits_for_fences_only_when_nothing_else_fits_oldest_first():
    a = sidecar._Arena([4096], alignment=256)
    regions = [a.alloc(1024) for _ in range(4)]
    fences: List[Fence] = [Fence() for _ in range(3)]
    for r, f in zip(regions, fences):
        a.defer_free(*r, fence=f)
    # Full: the oldest fence is waited for, and only it.
    assert a.alloc(1000) == regions[0]
    assert [f.waits for f in fences] == [1, 0, 0]
    # Regions 1 and 2 are adjacent but each behind its own fence: 2048 bytes needs both.
    assert a.alloc(2048) == (0, 1024, 2048)
    assert [f.waits for f in fences] == [1, 1, 1]
    # Nothing pending and nothing free: exhausted, with the device arena's hint.
    with pytest.raises(mapl.ResourceExhausted, match="shared memory exhausted"):
        a.alloc(256)


def test_arena_does_not_wait_for_what_could_never_fit():
    a = sidecar._Arena([1024], alignment=256, what="CUDA buffer memory",
                       too_small="connect with a larger cuda_buffer_bytes")
    r = a.alloc(1024)
    f = Fence()
    a.defer_free(*r, fence=f)
    with pytest.raises(mapl.ResourceExhausted) as info:
        a.alloc(2048)
    assert f.waits == 0
    msg = str(info.value)
    assert "CUDA buffer memory exhausted" in msg and "cuda_buffer_bytes" in msg, msg
    assert a.alloc(1024) == r and f.waits == 1  # it fits once the fence is done


def test_arena_takes_a_region_whose_fence_is_done_even_if_query_lags():
    """A fence that still says "not done" after synchronize() returned (query is a snapshot) is
    done all the same: alloc takes its region instead of waiting again."""
    class Lagging(Fence):
        def query(self) -> bool:
            self.queries += 1
            return False

    a = sidecar._Arena([1024], alignment=256)
    r = a.alloc(1024)
    f = Lagging()
    a.defer_free(*r, fence=f)
    assert a.alloc(512) == (0, 0, 512) and f.waits == 1


def test_event_pool_hands_each_event_to_one_call_at_a_time():
    pool = cuda_ipc.EventPool(2)
    a, b = pool.acquire(), pool.acquire()
    assert {a, b} == {0, 1} and pool.acquire() is None and pool.free() == 0
    pool.release(a)
    assert pool.acquire() == a
    pool.release(b)
    with pytest.raises(mapl.Internal, match="released twice"):
        pool.release(b)
    with pytest.raises(mapl.Internal):
        pool.release(7)
    assert cuda_ipc.EventPool(0).acquire() is None
