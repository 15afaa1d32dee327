"""The trainer's handle on its stage's mapld: shared-memory tensors and Send/Recv/Step/Stats.

A trainer process attaches once per stage. Most trainers then work in step scopes, whose
boundaries autograd drives (:mod:`mapl.torch_pipeline`)::

    with mapl.Sidecar.connect(stage=0) as sc:              # unix socket of mapld for stage 0
        with sc.step() as st:                              # numbers the step and microbatches
            st.send(model(x), token_ids=x).backward()      # dL/dh comes back into the graph
            opt.step()

Under the scopes are the calls that name (boundary, step, microbatch) themselves: blocking
``send_activation``/``recv_activation``/``send_gradient``/``recv_gradient``/``close_step``, and
non-blocking ``isend_*``/``irecv_*`` returning :class:`mapl.Work` handles.

Tensors travel through the shared buffers mapld hands out at attach time. A tensor that already
lives there (from :meth:`Sidecar.buffer_tensor`) is sent without a copy; any other tensor (CPU or
GPU, any float dtype) is copied once into a staging region. A received tensor comes back as it
was sent (shape, dtype, token ids): copied out of a staging region, or written by the daemon in
place into an ``out=`` tensor in shared memory.

A GPU trainer may ask for device buffers too (``Sidecar.connect(cuda=True)``): mapld then shares
device memory and events with it by CUDA IPC (:mod:`mapl.cuda_ipc`), CUDA tensors are handed
over in device memory (the trainer never copies them to the host; mapld does, to encode them),
and the trainer's stream and the daemon order their work by events instead of synchronizing.
Token ids always go through host memory.

Errors are :class:`mapl.MaplError` subclasses carrying the daemon's message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from typing import (Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple,
                    Union)

import torch

from . import _client
from .errors import FailedPrecondition, Internal, InvalidArgument, ResourceExhausted
from .work import Work, _Pools

__all__ = ["Sidecar", "BoundaryInfo", "BoundaryStats", "Record", "Stats", "SendResult",
           "default_socket_path", "FORWARD", "BACKWARD"]

FORWARD = 1   # mapl.v1.Direction: activations, upstream -> downstream
BACKWARD = 2  # gradients, downstream -> upstream

_F32, _BF16, _I32 = 1, 2, 3  # mapl.v1.DType
_MEMORY_HOST, _MEMORY_CUDA = 0, 1  # mapl.v1.Memory
_DTYPE_CODE = {torch.float32: _F32, torch.bfloat16: _BF16, torch.int32: _I32}
_CODE_DTYPE = {code: dtype for dtype, code in _DTYPE_CODE.items()}
_DIRECTION_NAME = {FORWARD: "activation", BACKWARD: "gradient"}

# Regions start on this boundary: cache lines never straddle two tensors, and any element type
# (and AVX-512 loads in the daemon) is aligned.
ALIGNMENT = 256

Shape = Union[int, Sequence[int], torch.Size]


def default_socket_path(stage: int) -> str:
    """Where mapld listens by default: ``$XDG_RUNTIME_DIR/mapld-<stage>.sock``, or
    ``/tmp/mapld-<uid>-<stage>.sock`` when XDG_RUNTIME_DIR is unset (DaemonConfig.local_socket)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, f"mapld-{stage}.sock")
    return f"/tmp/mapld-{os.getuid()}-{stage}.sock"


@dataclass(frozen=True)
class BoundaryInfo:
    """A boundary this stage takes part in, as mapld configured it."""
    id: int
    role: str          # "upstream" (sends activations) or "downstream" (receives them)
    d: int             # hidden size
    k: int             # projection rank
    method: str
    vocab: int
    max_tokens: int    # most rows of one microbatch tensor


class Record(dict):
    """A protobuf message as mapld sent it: a dict of every field of the message by name (unset
    fields at their defaults), whose fields also read as attributes: ``link.connected`` is
    ``link["connected"]``. Nested messages and map values are Records; repeated fields are lists;
    maps are Records keyed by the map's keys. A field named like a dict method (``items``) reads
    only by key."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{name!r}: no such field (the fields: {', '.join(self)})") \
                from None

    @classmethod
    def wrap(cls, value: Any) -> Any:
        """``value`` with every dict in it (at any depth) made a Record."""
        if isinstance(value, dict):
            return cls((k, cls.wrap(v)) for k, v in value.items())
        if isinstance(value, list):
            return [cls.wrap(v) for v in value]
        return value


# Conveniences that callers read besides the record's own fields: their names and how each is
# derived from the record.
_DERIVED: Dict[str, Callable[[Mapping[str, Any]], Any]] = {
    # Tensor bytes (as dense bf16) handed in or out, both directions.
    "raw_bytes": lambda r: r["raw_bytes_sent"] + r["raw_bytes_received"],
    # Frame bytes (payload, scales, token ids) and dictionary bytes on the link, both directions.
    "wire_payload_bytes": lambda r: r["payload_bytes_sent"] + r["payload_bytes_received"],
    "wire_dictionary_bytes": lambda r: r["dictionary_bytes_sent"] + r["dictionary_bytes_received"],
    "wire_bytes": lambda r: (r["payload_bytes_sent"] + r["payload_bytes_received"]
                             + r["dictionary_bytes_sent"] + r["dictionary_bytes_received"]),
    # The name this statistic had before the record was local.proto's.
    "last_step_relative_error": lambda r: r["rvq_relative_mse"],
}


class BoundaryStats:
    """One boundary's statistics: the record local.proto's BoundaryStats declares, as mapld sent
    it. Every field of the proto is an attribute (``frames_sent``, ``dictionary_version``,
    ``link.connected``, ``link.sent["frame"].bytes``); this class lists none of them, so a
    statistic added to the proto appears here as it is. Derived conveniences: ``raw_bytes``,
    ``wire_payload_bytes``, ``wire_dictionary_bytes`` (each sent + received), ``wire_bytes``
    (payload and dictionary) and ``last_step_relative_error`` (= ``rvq_relative_mse``).

    Instances are frozen dataclasses, so ``dataclasses.asdict`` gives a JSON-ready dict of the
    fields and the conveniences. Make them with :meth:`from_record`.
    """

    __slots__ = ()

    @staticmethod
    def from_record(record: Mapping[str, Any]) -> "BoundaryStats":
        """The view of ``record``, a dict of the proto's fields (what ``mapl._client`` returns)."""
        fields = {name: Record.wrap(value) for name, value in record.items()}
        proto_names = tuple(fields)
        # A proto field of a derived name would win: the record is the truth.
        fields.update({name: derive(fields) for name, derive in _DERIVED.items()
                       if name not in fields})
        return _stats_class(proto_names, tuple(fields))(**fields)

    def record(self) -> Dict[str, Any]:
        """The proto fields alone, without the derived conveniences."""
        return {name: getattr(self, name) for name in self._proto_names}

    def __reduce__(self):  # the class is made at run time: pickle through the record
        return (BoundaryStats.from_record, (self.record(),))

    def __getattr__(self, name: str) -> Any:  # only called for names that are not fields
        fields = ", ".join(f.name for f in dataclasses.fields(self)) \
            if dataclasses.is_dataclass(self) else ""
        raise AttributeError(f"BoundaryStats has no field {name!r} (local.proto declares the "
                             f"record; its fields here: {fields})")


@functools.lru_cache(maxsize=None)
def _stats_class(proto_names: Tuple[str, ...], names: Tuple[str, ...]) -> type:
    """The frozen dataclass of a record with these proto fields and, after them, the derived
    ones (one class per build of the proto, in practice)."""
    cls = dataclasses.make_dataclass("BoundaryStats", [(n, Any) for n in names],
                                     bases=(BoundaryStats,), frozen=True,
                                     namespace={"_proto_names": proto_names})
    cls.__module__ = __name__
    cls.__doc__ = BoundaryStats.__doc__
    return cls


@dataclass(frozen=True)
class Stats:
    """What Step and Stats return: the stage and its boundaries' counters."""
    stage: int
    boundaries: List[BoundaryStats]

    def boundary(self, boundary_id: int) -> BoundaryStats:
        for b in self.boundaries:
            if b.id == boundary_id:
                return b
        raise KeyError(f"no stats for boundary {boundary_id}")


@dataclass(frozen=True)
class SendResult:
    wire_bytes: int     # payload bytes of the frame put on the wire (0 unless wait=True)
    raw_bytes: int      # bytes of the tensor as handed in
    zero_copy: bool     # the tensor was already in shared memory: no staging copy


class _Arena:
    """First-fit allocator over the attached buffers; a region never spans two buffers.

    Free lists are kept per buffer, sorted by offset, and coalesced on free. Regions handed to
    user tensors are freed by the garbage collector (through ``defer_free``, which only appends
    to a deque, so a collection that runs inside ``alloc`` cannot re-enter the lock); staging
    regions are freed explicitly.

    A region may be freed behind a ``fence``: an object with ``query()`` (done yet?) and
    ``synchronize()`` (wait until done), on a CUDA session's device arena a ``torch.cuda.Event``
    recorded after the last work of the trainer's stream on the region. The region is reused only
    once its fence is done: ``alloc`` queries the pending fences and takes the regions of those
    that are done; only when nothing else fits does it wait, oldest fence first, and only as long
    as it must.
    """

    def __init__(self, sizes: Sequence[int], alignment: int = ALIGNMENT,
                 what: str = "shared memory",
                 too_small: str = "raise DaemonConfig.client_buffer_bytes",
                 too_few: str = "free shared tensors, or raise DaemonConfig.client_buffers"
                 ) -> None:
        self.alignment = alignment
        self.sizes = list(sizes)
        self._free: List[List[List[int]]] = [[[0, s]] if s > 0 else [] for s in self.sizes]
        self._lock = threading.Lock()
        self._deferred: Deque[Tuple[int, int, int, Any]] = deque()
        self._fenced: List[Tuple[int, int, int, Any]] = []  # freed, fence not done; oldest first
        self.used = 0
        self._what, self._too_small, self._too_few = what, too_small, too_few

    def _round(self, nbytes: int) -> int:
        return max(self.alignment, -(-nbytes // self.alignment) * self.alignment)

    def alloc(self, nbytes: int) -> Tuple[int, int, int]:
        """(buffer, offset, size) of a free region of at least nbytes, offset ALIGNMENT-aligned."""
        size = self._round(nbytes)
        biggest = max(self.sizes, default=0)
        while True:
            with self._lock:
                self._drain()
                got = self._take(size)
                if got is not None:
                    return got
                largest = max((length for free in self._free for _, length in free), default=0)
                # Nothing fits: wait for the oldest fenced region, unless none could help.
                fence = self._fenced[0][3] if self._fenced and size <= biggest else None
            if fence is None:
                break
            fence.synchronize()  # outside the lock: other threads free and allocate meanwhile
            with self._lock:  # done now, whatever query() said before
                for i, entry in enumerate(self._fenced):
                    if entry[3] is fence:
                        del self._fenced[i]
                        self._insert(*entry[:3])
                        break
        hint = (f"no attached buffer holds that many (buffers are {biggest} bytes: "
                f"{self._too_small})" if size > biggest else self._too_few)
        raise ResourceExhausted(
            f"{self._what} exhausted: {nbytes} bytes wanted, {self.used} of "
            f"{sum(self.sizes)} in use, largest free region {largest}: {hint}")

    def _take(self, size: int) -> Optional[Tuple[int, int, int]]:
        for b, free in enumerate(self._free):
            for i, (off, length) in enumerate(free):
                if length >= size:
                    if length == size:
                        del free[i]
                    else:
                        free[i][0] += size
                        free[i][1] -= size
                    self.used += size
                    return b, off, size
        return None

    def free(self, buffer: int, offset: int, size: int) -> None:
        with self._lock:
            self._drain()
            self._insert(buffer, offset, size)

    def defer_free(self, buffer: int, offset: int, size: int, fence: Any = None) -> None:
        """Free the region later: at the next alloc or free, once ``fence`` (if any) is done.
        Safe from a finalizer (takes no lock)."""
        self._deferred.append((buffer, offset, size, fence))

    def _drain(self) -> None:
        while self._deferred:
            entry = self._deferred.popleft()
            if entry[3] is None:
                self._insert(*entry[:3])
            else:
                self._fenced.append(entry)
        if self._fenced:
            pending = []
            for entry in self._fenced:
                if entry[3].query():
                    self._insert(*entry[:3])
                else:
                    pending.append(entry)
            self._fenced = pending

    def _insert(self, buffer: int, offset: int, size: int) -> None:
        free = self._free[buffer]
        i = 0
        while i < len(free) and free[i][0] < offset:
            i += 1
        free.insert(i, [offset, size])
        self.used -= size
        if i + 1 < len(free) and free[i][0] + free[i][1] == free[i + 1][0]:
            free[i][1] += free[i + 1][1]
            del free[i + 1]
        if i > 0 and free[i - 1][0] + free[i - 1][1] == free[i][0]:
            free[i - 1][1] += free[i][1]
            del free[i]

    def free_bytes(self) -> int:
        with self._lock:
            self._drain()
            return sum(length for free in self._free for _, length in free)


class _Staging:
    """An explicitly freed region and a (rows, cols) tensor view of it."""

    def __init__(self, sidecar: "Sidecar", rows: int, cols: int, dtype: torch.dtype) -> None:
        nbytes = rows * cols * _elem_size(dtype)
        self._arena = sidecar._arena
        self.buffer, self.offset, self._size = self._arena.alloc(nbytes)
        whole = sidecar._views[self.buffer]
        self.tensor = whole[self.offset:self.offset + nbytes].view(dtype).view(rows, cols)
        self.ref = (self.buffer, self.offset, rows, cols, _DTYPE_CODE[dtype])

    def __enter__(self) -> "_Staging":
        return self

    def __exit__(self, *exc) -> None:
        del self.tensor
        self._arena.free(self.buffer, self.offset, self._size)


class _DeviceStaging:
    """A region of a CUDA session's device arena and a (rows, cols) tensor view of it, for one
    call. Freed on exit: at once when ``done`` was set (the daemon has finished with it and the
    trainer's stream has nothing queued on it), else behind a fence recorded on ``stream``, so
    that it is not handed to the daemon again while the stream may still read or write it."""

    def __init__(self, sidecar: "Sidecar", rows: int, cols: int, dtype: torch.dtype,
                 stream: "torch.cuda.Stream") -> None:
        nbytes = rows * cols * _elem_size(dtype)
        self._arena = sidecar._cuda_arena
        self._stream = stream
        self.buffer, self.offset, self._size = self._arena.alloc(nbytes)
        whole = sidecar._cuda.views[self.buffer]
        self.tensor = whole[self.offset:self.offset + nbytes].view(dtype).view(rows, cols)
        self.done = False

    def __enter__(self) -> "_DeviceStaging":
        return self

    def __exit__(self, *exc) -> None:
        del self.tensor
        if self.done:
            self._arena.free(self.buffer, self.offset, self._size)
        else:
            _free_behind_fence(self._arena, self._stream, self.buffer, self.offset, self._size)


def _free_behind_fence(arena: _Arena, stream: "torch.cuda.Stream", buffer: int, offset: int,
                       size: int) -> None:
    """Frees a device region once what `stream` has queued so far is done."""
    fence = torch.cuda.Event()
    fence.record(stream)
    arena.defer_free(buffer, offset, size, fence)


def _free_device_tensor_region(arena: _Arena, device: torch.device, buffer: int, offset: int,
                               size: int) -> None:
    """Finalizer of a device buffer_tensor's region: frees it once the work queued on the
    device's current stream is done (the stream the trainer used it on, for a trainer that uses
    one). Never raises: when CUDA is gone (interpreter exit) the region stays taken."""
    try:
        _free_behind_fence(arena, torch.cuda.current_stream(device), buffer, offset, size)
    except Exception:  # noqa: BLE001 - a finalizer must not raise
        pass


def _elem_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _positive(name: str, value: Any) -> int:
    """`value` as an int >= 1, or InvalidArgument naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(f"{name} must be a positive int, got {value!r}")
    return value


def _timeout_ms(timeout: Optional[float]) -> int:
    """Seconds to the wire's milliseconds; None (and only None) means the daemon's default."""
    if timeout is None:
        return 0
    if timeout < 0 or not math.isfinite(timeout):
        raise InvalidArgument(f"timeout must be a finite number of seconds >= 0, got {timeout}")
    return min(max(1, round(timeout * 1000)), 2**32 - 1)


class Sidecar:
    """A session with one mapld. Thread-safe: a Recv may block on one thread while others Send.

    Create it with :meth:`connect`; close it with :meth:`close` or a ``with`` block. Closing ends
    the session (mapld frees its buffers); shared tensors handed out stay readable afterwards but
    are no longer shared.
    """

    def __init__(self, client: "_client.Client",
                 cuda_device: Optional[torch.device] = None) -> None:
        """Wraps an attached ``mapl._client.Client``; use :meth:`connect` instead. A client of
        a CUDA session has its device buffers and events opened here, on ``cuda_device``."""
        self._client = client
        self._cuda: Any = None  # mapl.cuda_ipc.CudaBuffers of a CUDA session
        self._cuda_arena: Optional[_Arena] = None
        self._cuda_events: Any = None  # mapl.cuda_ipc.EventPool
        info = client.cuda()
        if info is not None:
            from . import cuda_ipc
            self._cuda = cuda_ipc.CudaBuffers(info, cuda_device)
            self._cuda_arena = _Arena(
                [self._cuda.buffer_bytes] * len(self._cuda.views), what="CUDA buffer memory",
                too_small="connect with a larger cuda_buffer_bytes",
                too_few="free device buffer tensors, or connect with more cuda_buffers")
            self._cuda_events = cuda_ipc.EventPool(len(self._cuda.events))
        self._boundaries: Dict[int, BoundaryInfo] = {
            b["id"]: BoundaryInfo(**b) for b in client.boundaries()}
        sizes = [client.buffer_bytes(i) for i in range(client.buffer_count)]
        self._arena = _Arena(sizes)
        self._bases = [client.buffer_address(i) for i in range(client.buffer_count)]
        # One uint8 view per buffer, for staging slices and zero-copy detection.
        self._views = [torch.frombuffer(client.region(i, 0, s), dtype=torch.uint8) if s else
                       torch.empty(0, dtype=torch.uint8) for i, s in enumerate(sizes)]
        self._closed = False
        self._pools = _Pools(f"mapl-stage{client.stage}-session{client.session}")
        # The number the next step scope (:meth:`step` without a number) takes.
        self.next_step = 1
        self._scope: Any = None  # the open mapl.torch_pipeline.StepScope, if any
        # (step, next send, next receive) of a step an evaluation-only scope left open.
        self._cursor: Optional[Tuple[int, int, int]] = None
        # A Sidecar dropped without close() still ends its session.
        weakref.finalize(self, client.close)

    @classmethod
    def connect(cls, stage: int = 0, socket_path: Optional[str] = None,
                name: Optional[str] = None, timeout: float = 10.0, *,
                cuda: Union[None, bool, int, str, torch.device] = None,
                cuda_buffers: Optional[int] = None, cuda_buffer_bytes: Optional[int] = None,
                cuda_events: Optional[int] = None) -> "Sidecar":
        """Attach to the mapld of ``stage`` on ``socket_path`` (default:
        :func:`default_socket_path`), waiting up to ``timeout`` seconds for it to come up.

        ``cuda``: None (default), a host-only session: every tensor crosses through shared host
        memory, CUDA tensors with a copy to the host. True (torch's current device), a device
        index or a ``torch.device('cuda', i)``: also device buffers on that GPU, which mapld
        allocates and shares by CUDA IPC: CUDA tensors on that device are then sent and received
        through those buffers, ordered with the trainer's current stream by events: the trainer
        neither copies them to the host nor synchronizes its stream (mapld copies them across
        for encoding, on its own streams). Token ids still go through the host.
        ``cuda_buffers`` buffers of ``cuda_buffer_bytes`` bytes each (defaults: 8 of 64 MiB,
        what DaemonConfig gives host buffers by default; each must hold the largest tensor sent
        or received whole) and ``cuda_events`` events (default 64: at most that many device calls
        in flight order by events, more synchronize).

        Raises :class:`mapl.Unavailable` (a ``ConnectionError``) naming the socket when no
        daemon answers; :class:`mapl.FailedPrecondition` saying why when CUDA was asked for but
        cannot be had: this torch or process has no CUDA device (checked before attaching), no
        driver, or a mapld that cannot use CUDA.
        """
        path = socket_path if socket_path is not None else default_socket_path(stage)
        if name is None:
            name = f"trainer-{stage}-pid{os.getpid()}"
        if cuda is None:
            given = [k for k, v in (("cuda_buffers", cuda_buffers),
                                    ("cuda_buffer_bytes", cuda_buffer_bytes),
                                    ("cuda_events", cuda_events)) if v is not None]
            if given:
                raise InvalidArgument(f"{', '.join(given)} without cuda=: pass cuda=True (or a "
                                      "device) for device buffers")
            return cls(_client.Client.connect(path, name, _timeout_ms(timeout)))
        from . import cuda_ipc
        buffers = _positive("cuda_buffers", 8 if cuda_buffers is None else cuda_buffers)
        nbytes = _positive("cuda_buffer_bytes",
                           64 << 20 if cuda_buffer_bytes is None else cuda_buffer_bytes)
        events = 64 if cuda_events is None else cuda_events
        if isinstance(events, bool) or not isinstance(events, int) or events < 0:
            raise InvalidArgument(f"cuda_events must be an int >= 0, got {cuda_events!r}")
        device = cuda_ipc.resolve_device(cuda)  # FailedPrecondition without CUDA, before attaching
        client = _client.Client.connect(path, name, _timeout_ms(timeout), cuda_buffers=buffers,
                                        cuda_buffer_bytes=nbytes, cuda_events=events,
                                        cuda_device_uuid=cuda_ipc.device_uuid(device))
        try:
            return cls(client, cuda_device=device)
        except BaseException:
            client.close()
            raise

    # ---- session ----

    def close(self) -> None:
        """End the session: mapld frees this client's buffers. Idempotent."""
        self._closed = True
        self._client.close()  # receives in flight fail at once (Unavailable)
        self._pools.shutdown()
        # Drop this object's views: the mappings go once no handed-out tensor uses them.
        self._views = []
        self._bases = []
        if self._cuda is not None:
            self._cuda.release()  # each device mapping closes with its last tensor

    def __enter__(self) -> "Sidecar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def attached(self) -> bool:
        """Whether the session is alive (the Attach stream to mapld is open)."""
        return self._client.attached

    @property
    def session(self) -> int:
        return self._client.session

    @property
    def stage(self) -> int:
        return self._client.stage

    @property
    def socket_path(self) -> str:
        return self._client.socket_path

    @property
    def boundaries(self) -> Dict[int, BoundaryInfo]:
        """The boundaries of this stage, by id."""
        return dict(self._boundaries)

    def boundary(self, boundary_id: int) -> BoundaryInfo:
        try:
            return self._boundaries[boundary_id]
        except KeyError:
            raise InvalidArgument(
                f"boundary {boundary_id} is not configured on stage {self.stage} "
                f"(its boundaries: {sorted(self._boundaries)})") from None

    @property
    def buffer_sizes(self) -> List[int]:
        """Bytes of each attached shared buffer."""
        return list(self._arena.sizes)

    @property
    def buffer_names(self) -> List[str]:
        """Names of the attached buffers, memfds (``/proc/<pid>/maps`` shows ``/memfd:<name>``)."""
        return [self._client.buffer_name(i) for i in range(len(self._arena.sizes))]

    @property
    def shared_bytes_free(self) -> int:
        return self._arena.free_bytes()

    @property
    def cuda_device(self) -> Optional[torch.device]:
        """The device of a CUDA session's buffers (None for a host-only session)."""
        return self._cuda.device if self._cuda is not None else None

    @property
    def cuda_buffer_sizes(self) -> List[int]:
        """Bytes of each device buffer of a CUDA session (empty for a host-only session)."""
        return list(self._cuda_arena.sizes) if self._cuda_arena is not None else []

    @property
    def cuda_bytes_free(self) -> int:
        """Device buffer bytes free now (0 for a host-only session)."""
        return self._cuda_arena.free_bytes() if self._cuda_arena is not None else 0

    # ---- shared memory ----

    def buffer_tensor(self, shape: Shape, dtype: torch.dtype = torch.float32,
                      device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
        """An uninitialised CPU tensor of ``shape`` and ``dtype`` (float32, bfloat16 or int32)
        living in shared memory. Write h into it (``torch.matmul(..., out=t)``, ``t.copy_(h)``)
        and send it without a further copy. Its region returns to the allocator when the tensor
        and every view of it are gone.

        ``device="cuda"`` (a CUDA session only): a tensor on :attr:`cuda_device` in a device
        buffer, sent and received into (``out=``) with no copy. Its region returns to the
        allocator, when the tensor and its views are gone, behind an event recorded on the
        device's current stream then: work of other streams on it must be done by that time.
        """
        self._check_open()
        if dtype not in _DTYPE_CODE:
            raise InvalidArgument(f"shared tensors are float32, bfloat16 or int32, not {dtype}")
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        numel = math.prod(shape)
        nbytes = max(1, numel) * _elem_size(dtype)
        if device is not None and torch.device(device).type != "cpu":
            dev = self._session_device(device, "buffer_tensor")
            buffer, offset, size = self._cuda_arena.alloc(nbytes)
            whole, region = self._cuda.region(buffer, offset, nbytes)
            weakref.finalize(region, _free_device_tensor_region, self._cuda_arena, dev, buffer,
                             offset, size)
            return whole.view(dtype)[:numel].view(shape)
        buffer, offset, size = self._arena.alloc(nbytes)
        region = self._client.region(buffer, offset, nbytes)
        # The tensor's storage holds `region` (torch.frombuffer keeps its buffer object); when
        # the storage dies, the region does and its bytes go back to the arena.
        weakref.finalize(region, self._arena.defer_free, buffer, offset, size)
        return torch.frombuffer(region, dtype=dtype, count=max(1, numel))[:numel].view(shape)

    def is_shared(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is a contiguous tensor inside one attached buffer, host or device
        (sendable as is)."""
        if self._cuda is not None and t.is_cuda:
            return self._cuda.locate(t) is not None
        return self._locate(t) is not None

    def _session_device(self, device: Union[str, torch.device], what: str) -> torch.device:
        """`device` (a CUDA one) checked to be this CUDA session's device."""
        if self._cuda is None:
            raise FailedPrecondition(
                f"{what}(device={str(device)!r}): this session has no CUDA buffers; connect "
                "with Sidecar.connect(..., cuda=True) for them")
        dev = torch.device(device)
        if dev.type != "cuda" or (dev.index is not None and dev != self._cuda.device):
            raise InvalidArgument(f"{what}(device={str(device)!r}): this session's device "
                                  f"buffers are on {self._cuda.device}")
        return self._cuda.device

    def _cuda_stream(self, t: Optional[torch.Tensor]) -> Optional["torch.cuda.Stream"]:
        """The stream a call on CUDA tensor `t` orders with: the caller's current stream of the
        session's device (captured on the caller's thread: a Work runs on a pool thread, whose
        current stream is another). None when the call does not use the device buffers."""
        if self._cuda is None or not isinstance(t, torch.Tensor) or not t.is_cuda:
            return None
        return torch.cuda.current_stream(self._cuda.device)

    def _locate(self, t: torch.Tensor) -> Optional[Tuple[int, int]]:
        """(buffer, byte offset) of a contiguous CPU tensor inside an attached buffer, or None."""
        if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
            return None
        ptr = t.data_ptr()
        end = ptr + t.numel() * t.element_size()
        for i, base in enumerate(self._bases):
            if base <= ptr and end <= base + self._arena.sizes[i]:
                offset = ptr - base
                return (i, offset) if offset % t.element_size() == 0 else None
        return None

    # ---- send / recv ----
    #
    # Blocking calls take (boundary, step, microbatch) positionally, as they always have. The
    # non-blocking ones (isend_*, irecv_*) take them by keyword and find the boundary from this
    # stage's role when it is left out. Most trainers use neither directly but a step scope
    # (:meth:`step` without a number, mapl.torch_pipeline), which numbers everything itself.

    def send_activation(self, boundary: int, step: int, microbatch: int, h: torch.Tensor,
                        token_ids: Optional[torch.Tensor] = None, wait: bool = False,
                        evaluation: bool = False) -> SendResult:
        """Hand the activation h (..., d) (float32 or bfloat16 as is; other float dtypes as
        float32) with its token ids (integers, one per row of h: ``h.shape[:-1]``; required by
        METHOD_MAPL boundaries, carried to the peer by any) to the daemon, which encodes and
        ships it. h's shape and dtype travel with it: the peer receives it as it was sent. This
        stage must be the boundary's upstream. Returns once the daemon has taken h (h may then
        change); ``wait=True`` returns only once the frame is queued, with ``wire_bytes`` set.
        ``evaluation=True``: the tensor crosses as usual but no learner on either side learns
        from it (validation traffic). An earlier send on this boundary that failed in the
        daemon's background encoder is raised here (once)."""
        return self._send(boundary, FORWARD, step, microbatch, h, token_ids, wait, evaluation)

    def send_gradient(self, boundary: int, step: int, microbatch: int, g: torch.Tensor,
                      wait: bool = False) -> SendResult:
        """Ship dL/dh_hat g (..., d) back upstream, as :meth:`send_activation`. This stage must
        be the boundary's downstream."""
        return self._send(boundary, BACKWARD, step, microbatch, g, None, wait)

    def recv_activation(self, boundary: int, step: int, microbatch: int,
                        timeout: Optional[float] = None, rows: Optional[int] = None,
                        dtype: Optional[torch.dtype] = None,
                        device: Optional[Union[str, torch.device]] = None,
                        out: Optional[torch.Tensor] = None,
                        shape: Optional[Shape] = None) -> torch.Tensor:
        """Block until h_hat of (step, microbatch) is decoded; returns it as a new tensor of the
        shape it was sent with (e.g. (batch, seq, d)), of ``dtype`` (default: the dtype it was
        sent as, float32 or bfloat16) on ``device`` (default CPU). ``rows``: the most rows to
        expect (default: the boundary's max_tokens). ``shape``: the shape it must have; another
        is refused with :class:`mapl.InvalidArgument` and the tensor stays with the daemon. No
        tensor within ``timeout`` seconds (default: the daemon's recv_timeout_ms):
        :class:`mapl.DeadlineExceeded`. Use :meth:`irecv_activation` for its token ids.

        ``out``: receive into this contiguous CPU tensor of shape (rows, d) instead, float32 or
        bfloat16 (its dtype; ``rows`` defaults to its first dimension); returns ``out[:n]``. One
        from :meth:`buffer_tensor` is written by the daemon in place, with no copy at all; any
        other is filled with one copy and no allocation."""
        return self._recv(boundary, FORWARD, step, microbatch, timeout, rows, dtype, device, out,
                          shape)[0]

    def recv_gradient(self, boundary: int, step: int, microbatch: int,
                      timeout: Optional[float] = None, rows: Optional[int] = None,
                      dtype: Optional[torch.dtype] = None,
                      device: Optional[Union[str, torch.device]] = None,
                      out: Optional[torch.Tensor] = None,
                      shape: Optional[Shape] = None) -> torch.Tensor:
        """Block until dL/dh of (step, microbatch) arrives, as :meth:`recv_activation`."""
        return self._recv(boundary, BACKWARD, step, microbatch, timeout, rows, dtype, device, out,
                          shape)[0]

    # ---- non-blocking, torch.distributed-shaped ----

    def isend_activation(self, h: torch.Tensor, *, step: int, microbatch: int,
                         token_ids: Optional[torch.Tensor] = None,
                         boundary: Optional[int] = None, evaluation: bool = False) -> Work:
        """:meth:`send_activation` without waiting: a :class:`mapl.Work` whose ``wait()`` gives
        the SendResult. Leave h (and token_ids) unchanged until then, as with
        ``torch.distributed.isend``. ``boundary``: default, the one this stage is upstream of."""
        b = self._boundary_for(boundary, FORWARD, sending=True)
        self._check_open()
        return self._submit(False, self._what(b, FORWARD, step, microbatch, "send"),
                            self._send, b, FORWARD, step, microbatch, h, token_ids, False,
                            evaluation, self._cuda_stream(h))

    def isend_gradient(self, g: torch.Tensor, *, step: int, microbatch: int,
                       boundary: Optional[int] = None) -> Work:
        """:meth:`send_gradient` without waiting (see :meth:`isend_activation`)."""
        b = self._boundary_for(boundary, BACKWARD, sending=True)
        self._check_open()
        return self._submit(False, self._what(b, BACKWARD, step, microbatch, "send"),
                            self._send, b, BACKWARD, step, microbatch, g, None, False, False,
                            self._cuda_stream(g))

    def irecv_activation(self, *, step: int, microbatch: int, boundary: Optional[int] = None,
                         timeout: Optional[float] = None, shape: Optional[Shape] = None,
                         dtype: Optional[torch.dtype] = None,
                         out: Optional[torch.Tensor] = None, rows: Optional[int] = None) -> Work:
        """:meth:`recv_activation` without waiting: posts the receive and returns a
        :class:`mapl.Work` whose ``wait()`` gives the tensor, shaped as sent, and whose
        ``token_ids`` then holds the ids that travelled with it (int64, the tensor's leading
        shape; None when the sender gave none). ``out``: a tensor to receive into (see
        :meth:`recv_activation`). ``boundary``: default, the one this stage is downstream of."""
        b = self._boundary_for(boundary, FORWARD, sending=False)
        return self._irecv(b, FORWARD, step, microbatch, timeout, rows, dtype, out, shape)

    def irecv_gradient(self, *, step: int, microbatch: int, boundary: Optional[int] = None,
                       timeout: Optional[float] = None, shape: Optional[Shape] = None,
                       dtype: Optional[torch.dtype] = None,
                       out: Optional[torch.Tensor] = None, rows: Optional[int] = None) -> Work:
        """:meth:`recv_gradient` without waiting (see :meth:`irecv_activation`)."""
        b = self._boundary_for(boundary, BACKWARD, sending=False)
        return self._irecv(b, BACKWARD, step, microbatch, timeout, rows, dtype, out, shape)

    # ---- steps ----

    def step(self, step: Optional[int] = None, timeout: Optional[float] = None, *,
             evaluation: bool = False) -> Any:
        """Without ``step``: a step scope, ``with sc.step() as st:`` (see
        :class:`mapl.torch_pipeline.StepScope`), which numbers the step (:attr:`next_step`) and
        its microbatches itself and closes the step when the block ends; ``evaluation=True``
        makes a scope whose traffic trains nothing and which closes no step.

        With ``step`` (the low-level call, :meth:`close_step`): report that the optimizer
        finished ``step``; the compressors run their own update. Returns the Stats after it."""
        if step is None:
            from .torch_pipeline import StepScope
            return StepScope(self, evaluation=evaluation, timeout=timeout)
        if evaluation:
            raise InvalidArgument("evaluation=True makes a step scope: call step() without a "
                                  "step number")
        return self.close_step(step, timeout)

    def close_step(self, step: int, timeout: Optional[float] = None) -> Stats:
        """Report that the optimizer finished ``step`` (every stage, every step, increasing);
        the compressors run their own update. Returns the boundaries' stats after it. A send of
        this stage that failed in the daemon's background encoder since is raised here."""
        self._check_open()
        reply = self._client.step(step, _timeout_ms(timeout))  # local.proto StepReply
        self.next_step = max(self.next_step, step + 1)
        return Stats(self.stage, [BoundaryStats.from_record(b) for b in reply["boundaries"]])

    def stats(self) -> Stats:
        """Counters and dictionary state of every boundary of this stage."""
        self._check_open()
        reply = self._client.stats()  # local.proto StatsReply
        return Stats(reply["stage"],
                     [BoundaryStats.from_record(b) for b in reply["boundaries"]])

    def checkpoint(self) -> List[dict]:
        """Write every boundary's learned state (dictionary, learners, anchors) to the daemon's
        ``state_dir`` now; a restarted daemon restores it. Call it when the trainer saves its own
        checkpoint, after :meth:`step`. Returns one record per boundary: ``boundary``, ``path``,
        ``bytes``, ``last_step`` and ``dictionary_version``. Raises FailedPrecondition when the
        daemon has no ``state_dir``."""
        self._check_open()
        return list(self._client.checkpoint().get("boundaries", []))

    # ---- internals ----

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition("the Sidecar is closed")

    def _boundary_for(self, boundary: Optional[int], direction: int, sending: bool) -> int:
        """``boundary`` checked, or the one this stage's role makes the only fit: activations
        are sent by a boundary's upstream and received by its downstream, gradients the other
        way."""
        upstream_side = (direction == FORWARD) == sending
        role = "upstream" if upstream_side else "downstream"
        does = "sends" if sending else "receives"
        verb = f"{does} {_DIRECTION_NAME[direction]}s"
        if boundary is not None:
            info = self.boundary(boundary)
            if info.role != role:
                raise InvalidArgument(
                    f"stage {self.stage} is the {info.role} of boundary {boundary}: only its "
                    f"{role} {verb} there")
            return boundary
        fits = sorted(b.id for b in self._boundaries.values() if b.role == role)
        if len(fits) == 1:
            return fits[0]
        if not fits:
            where = "the last stage" if role == "upstream" else "the first stage"
            roles = {b.id: b.role for b in self._boundaries.values()}
            raise InvalidArgument(
                f"stage {self.stage} {does} no {_DIRECTION_NAME[direction]}s: it is the {role} "
                f"of no boundary ({where} of the pipeline; its boundaries: {roles})")
        raise InvalidArgument(f"stage {self.stage} is the {role} of boundaries {fits}: name one "
                              "with boundary=")

    @staticmethod
    def _what(boundary: int, direction: int, step: int, microbatch: int, verb: str) -> str:
        return (f"boundary {boundary}: {verb} of the {_DIRECTION_NAME[direction]} of step {step} "
                f"microbatch {microbatch}")

    def _submit(self, receive: bool, what: str, fn: Callable[..., Any], *args: Any) -> Work:
        return Work(self._pools.submit(receive, fn, *args), what)

    def _irecv(self, boundary: int, direction: int, step: int, microbatch: int,
               timeout: Optional[float], rows: Optional[int], dtype: Optional[torch.dtype],
               out: Optional[torch.Tensor], shape: Optional[Shape]) -> Work:
        self._check_open()
        # Checked here, not on the worker thread: a wrong call fails where it is made.
        self._check_recv_args(boundary, rows, dtype, out, shape)
        stream = self._cuda_stream(out)
        work: Work

        def receive() -> torch.Tensor:
            tensor, ids = self._recv(boundary, direction, step, microbatch, timeout, rows, dtype,
                                     None, out, shape, want_ids=direction == FORWARD,
                                     stream=stream)
            work.token_ids = ids
            return tensor

        work = self._submit(True, self._what(boundary, direction, step, microbatch, "receive"),
                            receive)
        return work

    def _send(self, boundary: int, direction: int, step: int, microbatch: int, t: torch.Tensor,
              token_ids: Optional[torch.Tensor], wait: bool = False,
              evaluation: bool = False,
              stream: Optional["torch.cuda.Stream"] = None) -> SendResult:
        self._check_open()
        if not isinstance(t, torch.Tensor):
            raise InvalidArgument(f"expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 1 or t.shape[-1] == 0:
            raise InvalidArgument(f"expected a tensor (..., d), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise InvalidArgument(f"expected a float tensor, got {t.dtype}")
        t = t.detach()
        cols = t.shape[-1]
        rows = t.numel() // cols
        with contextlib.ExitStack() as stack:
            device_staging = None
            if self._cuda is not None and t.is_cuda:
                tensor_ref, device_staging = self._place_cuda(
                    stack, t, rows, cols, stream or torch.cuda.current_stream(self._cuda.device))
                zero_copy = device_staging is None
            else:
                tensor_ref, zero_copy = self._place(stack, t, rows, cols)
            ids_ref = None
            if token_ids is not None:
                ids_ref = self._place_ids(stack, token_ids, rows)
            wire, raw = self._client.send(boundary, direction, step, microbatch, tensor_ref,
                                          ids_ref, wait, shape=tuple(t.shape),
                                          evaluation=evaluation)
            if device_staging is not None:
                device_staging.done = True  # the daemon has copied it out: free it at once
        return SendResult(wire, raw, zero_copy)

    def _place(self, stack: contextlib.ExitStack, t: torch.Tensor, rows: int,
               cols: int) -> Tuple[Tuple[int, int, int, int, int], bool]:
        """A TensorRef of t in shared memory: t itself when it is there, else a staging copy."""
        if t.dtype in (torch.float32, torch.bfloat16):
            where = self._locate(t)
            if where is not None:
                return (where[0], where[1], rows, cols, _DTYPE_CODE[t.dtype]), True
            dtype = t.dtype
        else:
            dtype = torch.float32
        staging = stack.enter_context(_Staging(self, rows, cols, dtype))
        staging.tensor.copy_(t.reshape(rows, cols))
        return staging.ref, False

    def _place_cuda(self, stack: contextlib.ExitStack, t: torch.Tensor, rows: int, cols: int,
                    stream: "torch.cuda.Stream"
                    ) -> Tuple[Tuple[int, ...], Optional[_DeviceStaging]]:
        """A MEMORY_CUDA TensorRef of CUDA tensor t in the device buffers: t itself when it is
        there, else a copy into a device staging region on `stream`; then an event recorded on
        `stream` after t's last write, which the daemon's copy waits for (with no event free,
        `stream` is synchronized instead). The event goes back to the pool, and the staging
        region to the arena, when the Send has returned: the daemon has copied the tensor out
        by then (the caller sets the staging's ``done`` once the Send succeeded; a failed one
        frees the region behind a fence instead). Returns (ref, the staging or None)."""
        where = self._cuda.locate(t) if t.dtype in (torch.float32, torch.bfloat16) else None
        staging = None
        if where is not None:
            dtype = t.dtype
        else:
            dtype = t.dtype if t.dtype in (torch.float32, torch.bfloat16) else torch.float32
            staging = stack.enter_context(_DeviceStaging(self, rows, cols, dtype, stream))
            with torch.cuda.stream(stream):
                staging.tensor.copy_(t.reshape(rows, cols))
            where = (staging.buffer, staging.offset)
        event = self._record_event(stack, stream)
        return ((where[0], where[1], rows, cols, _DTYPE_CODE[dtype], _MEMORY_CUDA, event),
                staging)

    def _record_event(self, stack: contextlib.ExitStack, stream: "torch.cuda.Stream") -> int:
        """TensorRef.event for a Send: a free event recorded on `stream` (returned to the pool
        when `stack` closes), or 0 after synchronizing `stream` when none is free."""
        index = self._cuda_events.acquire()
        if index is None:
            stream.synchronize()
            return 0
        stack.callback(self._cuda_events.release, index)
        self._cuda.events[index].record(stream)
        return index + 1

    def _place_ids(self, stack: contextlib.ExitStack, ids: torch.Tensor,
                   rows: int) -> Tuple[int, int, int, int, int]:
        if not isinstance(ids, torch.Tensor):
            raise InvalidArgument(f"token_ids: expected a torch.Tensor, got {type(ids).__name__}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise InvalidArgument(f"token_ids: expected an integer tensor, got {ids.dtype}")
        if ids.numel() != rows:
            raise InvalidArgument(f"token_ids: {ids.numel()} ids for {rows} rows of the tensor")
        ids = ids.detach()
        if ids.dtype == torch.int32:
            where = self._locate(ids)
            if where is not None:
                return (where[0], where[1], rows, 1, _I32)
        elif ids.numel() and (int(ids.min()) < -2**31 or int(ids.max()) >= 2**31):
            raise InvalidArgument("token_ids: ids do not fit in int32")
        staging = stack.enter_context(_Staging(self, rows, 1, torch.int32))
        staging.tensor.copy_(ids.reshape(rows, 1))
        return staging.ref

    def _check_recv_args(self, boundary: int, rows: Optional[int], dtype: Optional[torch.dtype],
                         out: Optional[torch.Tensor], shape: Optional[Shape]) -> None:
        info = self.boundary(boundary)
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16):
            raise InvalidArgument(f"received tensors are float32 or bfloat16, not {dtype}")
        if shape is not None:
            dims = _dims(shape)
            if not dims or dims[-1] != info.d or math.prod(dims) == 0:
                raise InvalidArgument(f"shape {dims}: a receive on boundary {boundary} gets "
                                      f"(..., d={info.d}) with no zero dimension")
        if out is not None:
            if dtype is not None and dtype != out.dtype:
                raise InvalidArgument(f"dtype={dtype} disagrees with out's {out.dtype}: give one")
            if (out.device.type not in ("cpu", "cuda") or out.dim() != 2
                    or out.shape[1] != info.d or out.dtype not in (torch.float32, torch.bfloat16)
                    or not out.is_contiguous() or out.shape[0] == 0):
                raise InvalidArgument(
                    f"out must be a contiguous CPU or CUDA float32 or bfloat16 tensor of shape "
                    f"(rows, d={info.d}) with rows >= 1, got {out.dtype} {tuple(out.shape)} on "
                    f"{out.device}" + ("" if out.is_contiguous() else ", not contiguous"))
            if rows is not None and int(rows) != out.shape[0]:
                raise InvalidArgument(f"rows={rows} disagrees with out's {out.shape[0]} rows: "
                                      "give one")
        elif rows is not None and int(rows) <= 0:
            raise InvalidArgument(f"rows must be positive, got {rows}")

    def _recv(self, boundary: int, direction: int, step: int, microbatch: int,
              timeout: Optional[float], rows: Optional[int], dtype: Optional[torch.dtype],
              device: Optional[Union[str, torch.device]], out: Optional[torch.Tensor] = None,
              shape: Optional[Shape] = None, want_ids: bool = False,
              stream: Optional["torch.cuda.Stream"] = None
              ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(tensor as sent, its token ids or None). Every check runs before the daemon hands
        anything over, so a wrong call never costs the tensor."""
        self._check_open()
        self._check_recv_args(boundary, rows, dtype, out, shape)
        info = self.boundary(boundary)
        dims = _dims(shape) if shape is not None else ()
        if out is not None:
            if device is not None and torch.device(device).type != out.device.type:
                raise InvalidArgument(f"out= receives on out's device ({out.device}): leave "
                                      "device unset and move the result yourself")
            capacity = out.shape[0]
        elif dims:
            capacity = math.prod(dims) // info.d
        else:
            capacity = info.max_tokens if rows is None else int(rows)
        on_device = self._cuda is not None and (
            out.is_cuda if out is not None
            else device is not None and torch.device(device).type == "cuda")
        if on_device:
            return self._recv_cuda(boundary, direction, step, microbatch, timeout, dtype, device,
                                   out, dims, capacity, want_ids, stream)
        with contextlib.ExitStack() as stack:
            ids_staging = (stack.enter_context(_Staging(self, capacity, 1, torch.int32))
                           if want_ids else None)
            where = self._locate(out) if out is not None else None
            if where is not None:  # in shared memory: the daemon writes there itself
                into = (where[0], where[1], capacity, info.d, _DTYPE_CODE[out.dtype])
                target = out
            else:
                # float32 unless told otherwise: a bf16 tensor comes through it exactly, and is
                # cast back to bf16 in the one copy out.
                stage_dtype = out.dtype if out is not None else (dtype or torch.float32)
                staging = stack.enter_context(_Staging(self, capacity, info.d, stage_dtype))
                into, target = staging.ref, staging.tensor
            n, got, sent_shape, sent_dtype, has_ids = self._client.recv(
                boundary, direction, step, microbatch, into, _timeout_ms(timeout),
                ids_ref=ids_staging.ref if ids_staging is not None else None,
                expect_shape=dims)
            if n * got > capacity * info.d or got != info.d or math.prod(sent_shape) != n * got:
                raise Internal(f"mapld reported ({n}, {got}) of shape {sent_shape} written into "
                               f"({capacity}, {info.d})")
            view = target.view(-1)[:n * got].view(n, got)
            ids = None
            if has_ids and ids_staging is not None:
                ids = ids_staging.tensor.view(-1)[:n].to(torch.int64).view(sent_shape[:-1])
            if out is not None:
                if where is None:
                    out[:n].copy_(view)  # to a CUDA out too, on a host-only session
                return out[:n], ids
            want = dtype or _CODE_DTYPE.get(sent_dtype, torch.float32)
            if device is None or torch.device(device).type == "cpu":
                result = view.to(want, copy=True)
            else:
                result = view.to(device=device, dtype=want)
            return result.view(tuple(sent_shape)), ids

    def _recv_cuda(self, boundary: int, direction: int, step: int, microbatch: int,
                   timeout: Optional[float], dtype: Optional[torch.dtype],
                   device: Optional[Union[str, torch.device]], out: Optional[torch.Tensor],
                   dims: Tuple[int, ...], capacity: int, want_ids: bool,
                   stream: Optional["torch.cuda.Stream"]
                   ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """_recv into the device buffers: into `out` itself when it is one of them, else into a
        device staging region. The daemon records an event after writing; `stream` (the
        caller's) waits on it, then reads (copies out of the staging region), and the region is
        freed behind a fence recorded after that read. Token ids come through host staging."""
        info = self.boundary(boundary)
        cuda = self._cuda
        stream = stream or torch.cuda.current_stream(cuda.device)
        with contextlib.ExitStack() as stack:
            ids_staging = (stack.enter_context(_Staging(self, capacity, 1, torch.int32))
                           if want_ids else None)
            where = cuda.locate(out) if out is not None else None
            if where is not None:  # a device buffer tensor: the daemon writes there itself
                into_dtype, target = out.dtype, out
            else:
                into_dtype = out.dtype if out is not None else (dtype or torch.float32)
                staging = stack.enter_context(
                    _DeviceStaging(self, capacity, info.d, into_dtype, stream))
                where, target = (staging.buffer, staging.offset), staging.tensor
            index = self._cuda_events.acquire()
            into = (where[0], where[1], capacity, info.d, _DTYPE_CODE[into_dtype], _MEMORY_CUDA,
                    0 if index is None else index + 1)
            try:
                n, got, sent_shape, sent_dtype, has_ids = self._client.recv(
                    boundary, direction, step, microbatch, into, _timeout_ms(timeout),
                    ids_ref=ids_staging.ref if ids_staging is not None else None,
                    expect_shape=dims)
            finally:
                if index is not None:
                    # Also after a failure: the event is reused only once a stream waited on it.
                    stream.wait_event(cuda.events[index])
                    self._cuda_events.release(index)
            if n * got > capacity * info.d or got != info.d or math.prod(sent_shape) != n * got:
                raise Internal(f"mapld reported ({n}, {got}) of shape {sent_shape} written into "
                               f"({capacity}, {info.d})")
            ids = None
            if has_ids and ids_staging is not None:
                ids = ids_staging.tensor.view(-1)[:n].to(torch.int64).view(sent_shape[:-1])
            with torch.cuda.stream(stream):
                view = target.view(-1)[:n * got].view(n, got)
                if out is not None:
                    if target is not out:
                        out[:n].copy_(view)
                    return out[:n], ids
                want = dtype or _CODE_DTYPE.get(sent_dtype, torch.float32)
                result = view.to(want, copy=True)  # out of the staging region, on `stream`
                if device is not None and torch.device(device).index is not None:
                    result = result.to(torch.device(device))  # another GPU than the session's
            return result.view(tuple(sent_shape)), ids


def _dims(shape: Shape) -> Tuple[int, ...]:
    return (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
