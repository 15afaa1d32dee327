"""A GPU trainer's side of CUDA IPC with its mapld: the device buffers and events of a CUDA
session (``Sidecar.connect(cuda=...)``), opened in this process.

mapld allocates the buffers and events on the device and hands out their IPC handles
(local.proto CudaBuffers); this module opens them with the CUDA *driver* API through ctypes
(``libcuda.so.1``), so the mapl package links nothing of CUDA and imports where there is none.
Each buffer becomes a torch uint8 CUDA tensor over the mapped memory, without a copy; each event
a ``torch.cuda.Event`` (``from_ipc_handle``).

Lifetime: an opened buffer is a :class:`_Mapping`, which exports ``__cuda_array_interface__``.
``torch.as_tensor`` of it keeps a reference to it in the tensor's storage (torch's
``tensor_from_cuda_array_interface`` increments the object's reference count and its deleter
decrements it), so the memory stays mapped while any view of it lives; the mapping is closed
(``cuIpcCloseMemHandle``) when the last one is gone. :class:`CudaBuffers` holds its own
references until :meth:`CudaBuffers.release`.

Device identity: mapld names the device by UUID (16 bytes). CUDA_VISIBLE_DEVICES may renumber
devices, so a device is found by its UUID (``cuDeviceGetUuid_v2``), and torch's index of it by
torch's own UUID (``get_device_properties(i).uuid``, newer torch), its PCI address
(``pci_bus_id``/``pci_device_id``/``pci_domain_id``, newer torch), or else by the ordinal, which
the runtime (torch) and the driver share within one process; the name and memory size must then
agree.
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple, Union

import torch

from .errors import FailedPrecondition, Internal, InvalidArgument, MaplError, ResourceExhausted

__all__ = ["CudaBuffers", "EventPool", "resolve_device", "device_uuid",
           "torch_cuda_unavailable_reason"]

CU_IPC_HANDLE_SIZE = 64
CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1
_UUID_BYTES = 16
_CUDA_ERROR_OUT_OF_MEMORY = 2
_ATTR_PCI_BUS_ID, _ATTR_PCI_DEVICE_ID, _ATTR_PCI_DOMAIN_ID = 33, 34, 50


class _IpcMemHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * CU_IPC_HANDLE_SIZE)]


class _Uuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_ubyte * _UUID_BYTES)]


_c_int_p = ctypes.POINTER(ctypes.c_int)
# argtypes of every driver entry point used here (cuda.h; CUdevice is int, CUdeviceptr is
# unsigned long long, CUcontext a pointer).
_SIGNATURES: Dict[str, Tuple[Any, ...]] = {
    "cuInit": (ctypes.c_uint,),
    "cuGetErrorName": (ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)),
    "cuDeviceGetCount": (_c_int_p,),
    "cuDeviceGet": (_c_int_p, ctypes.c_int),
    "cuDeviceGetUuid_v2": (ctypes.POINTER(_Uuid), ctypes.c_int),
    "cuDeviceGetUuid": (ctypes.POINTER(_Uuid), ctypes.c_int),
    "cuDeviceGetAttribute": (_c_int_p, ctypes.c_int, ctypes.c_int),
    "cuDeviceGetName": (ctypes.c_char_p, ctypes.c_int, ctypes.c_int),
    "cuDeviceTotalMem_v2": (ctypes.POINTER(ctypes.c_size_t), ctypes.c_int),
    "cuDevicePrimaryCtxRetain": (ctypes.POINTER(ctypes.c_void_p), ctypes.c_int),
    "cuDevicePrimaryCtxRelease_v2": (ctypes.c_int,),
    "cuCtxPushCurrent_v2": (ctypes.c_void_p,),
    "cuCtxPopCurrent_v2": (ctypes.POINTER(ctypes.c_void_p),),
    "cuIpcOpenMemHandle_v2": (ctypes.POINTER(ctypes.c_uint64), _IpcMemHandle, ctypes.c_uint),
    "cuIpcCloseMemHandle": (ctypes.c_uint64,),
}


class _Driver:
    """libcuda.so.1 through ctypes; every call's CUresult checked."""

    _instance: Optional["_Driver"] = None
    _instance_lock = threading.Lock()

    @classmethod
    def get(cls) -> "_Driver":
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def __init__(self) -> None:
        try:
            self._lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise FailedPrecondition(
                f"cannot load the CUDA driver (libcuda.so.1: {e}): a CUDA session needs the "
                "NVIDIA driver in this process's environment (in a container: the NVIDIA "
                "container toolkit); connect without cuda= for host buffers") from None
        self._fns: Dict[str, Any] = {}
        self.call("cuInit", 0)

    def fn(self, name: str) -> Any:
        f = self._fns.get(name)
        if f is None:
            try:
                f = getattr(self._lib, name)
            except AttributeError:
                raise FailedPrecondition(f"the CUDA driver has no {name}: it is too old for "
                                         "mapl's CUDA sessions; update the NVIDIA driver") from None
            f.restype = ctypes.c_int
            f.argtypes = _SIGNATURES[name]
            self._fns[name] = f
        return f

    def has(self, name: str) -> bool:
        return hasattr(self._lib, name)

    def error_name(self, result: int) -> str:
        s = ctypes.c_char_p()
        try:
            if self.fn("cuGetErrorName")(result, ctypes.byref(s)) == 0 and s.value:
                return s.value.decode(errors="replace")
        except MaplError:
            pass
        return f"CUresult {result}"

    def call(self, name: str, *args: Any, what: str = "") -> None:
        result = self.fn(name)(*args)
        if result != 0:
            raise self.error(name, result, what)

    def error(self, name: str, result: int, what: str = "") -> MaplError:
        text = f"{name} failed: {self.error_name(result)}" + (f" ({what})" if what else "")
        if result == _CUDA_ERROR_OUT_OF_MEMORY:
            return ResourceExhausted(text)
        return FailedPrecondition(text)

    # ---- devices ----

    def device_count(self) -> int:
        n = ctypes.c_int()
        self.call("cuDeviceGetCount", ctypes.byref(n))
        return n.value

    def device(self, ordinal: int) -> int:
        d = ctypes.c_int()
        self.call("cuDeviceGet", ctypes.byref(d), ordinal, what=f"ordinal {ordinal}")
        return d.value

    def uuid(self, dev: int) -> bytes:
        u = _Uuid()
        name = "cuDeviceGetUuid_v2" if self.has("cuDeviceGetUuid_v2") else "cuDeviceGetUuid"
        self.call(name, ctypes.byref(u), dev)
        return bytes(u.bytes)

    def attribute(self, attr: int, dev: int) -> int:
        v = ctypes.c_int()
        self.call("cuDeviceGetAttribute", ctypes.byref(v), attr, dev)
        return v.value

    def name(self, dev: int) -> str:
        buf = ctypes.create_string_buffer(256)
        self.call("cuDeviceGetName", buf, len(buf), dev)
        return buf.value.decode(errors="replace")

    def total_mem(self, dev: int) -> int:
        v = ctypes.c_size_t()
        self.call("cuDeviceTotalMem_v2", ctypes.byref(v), dev)
        return v.value


def _uuid_text(uuid: bytes) -> str:
    h = uuid.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}" if len(uuid) == 16 else h


def torch_cuda_unavailable_reason() -> Optional[str]:
    """Why this process's torch cannot use a CUDA device, or None when it can."""
    if torch.version.cuda is None:
        return (f"this PyTorch ({torch.__version__}) is built without CUDA "
                "(torch.version.cuda is None)")
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return ("torch.cuda.is_available() is False: no CUDA device or driver is usable by this "
                "process" + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""))
    return None


def resolve_device(cuda: Union[bool, int, str, torch.device]) -> torch.device:
    """The CUDA device a ``cuda=`` argument names: True, torch's current device; an int, that
    index; a torch.device or string of type cuda (no index: the current device). Raises
    FailedPrecondition when torch cannot use CUDA here, InvalidArgument for anything else."""
    if isinstance(cuda, bool):
        if not cuda:
            raise InvalidArgument("cuda=False: pass cuda=None for a host-only session")
        index = None
    elif isinstance(cuda, int):
        if cuda < 0:
            raise InvalidArgument(f"cuda={cuda}: a CUDA device index is >= 0")
        index = cuda
    elif isinstance(cuda, (str, torch.device)):
        try:
            dev = torch.device(cuda)
        except RuntimeError as e:
            raise InvalidArgument(f"cuda={cuda!r}: {e}") from None
        if dev.type != "cuda":
            raise InvalidArgument(f"cuda={cuda!r} is not a CUDA device; give True, an index or "
                                  "a torch.device('cuda', i)")
        index = dev.index
    else:
        raise InvalidArgument(f"cuda= takes None, True, a device index or a torch.device, not "
                              f"{type(cuda).__name__}")
    reason = torch_cuda_unavailable_reason()
    if reason is not None:
        raise FailedPrecondition(f"a CUDA session needs a CUDA device in this process: {reason}; "
                                 "connect with cuda=None for host buffers")
    count = torch.cuda.device_count()
    if index is None:
        index = torch.cuda.current_device()
    if index >= count:
        raise InvalidArgument(f"cuda={cuda!r}: torch sees {count} CUDA device(s) here")
    return torch.device("cuda", index)


def _torch_uuid(index: int) -> Optional[bytes]:
    """torch's UUID of device `index` when this torch exposes it (``props.uuid``), else None."""
    u = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if u is None:
        return None
    raw = getattr(u, "bytes", None)
    if raw is not None:
        b = bytes(raw)
        return b if len(b) == _UUID_BYTES else None
    text = str(u).lower()
    text = text[4:] if text.startswith("gpu-") else text
    try:
        b = bytes.fromhex(text.replace("-", ""))
    except ValueError:
        return None
    return b if len(b) == _UUID_BYTES else None


def _driver_device(drv: _Driver, index: int) -> int:
    """The driver's CUdevice of torch's device `index`."""
    props = torch.cuda.get_device_properties(index)
    count = drv.device_count()
    uuid = _torch_uuid(index)
    if uuid is not None:
        for o in range(count):
            dev = drv.device(o)
            if drv.uuid(dev) == uuid:
                return dev
        raise FailedPrecondition(f"torch's cuda:{index} ({_uuid_text(uuid)}) is not among the "
                                 f"CUDA driver's {count} devices")
    pci = tuple(getattr(props, a, None) for a in ("pci_domain_id", "pci_bus_id", "pci_device_id"))
    if None not in pci:
        for o in range(count):
            dev = drv.device(o)
            if (drv.attribute(_ATTR_PCI_DOMAIN_ID, dev), drv.attribute(_ATTR_PCI_BUS_ID, dev),
                    drv.attribute(_ATTR_PCI_DEVICE_ID, dev)) == pci:
                return dev
        raise FailedPrecondition(f"torch's cuda:{index} (PCI {pci}) is not among the CUDA "
                                 f"driver's {count} devices")
    # The runtime numbers the devices it sees as the driver does, within one process.
    if index >= count:
        raise FailedPrecondition(f"torch's cuda:{index} is past the CUDA driver's {count} "
                                 "devices")
    dev = drv.device(index)
    name, total = drv.name(dev), drv.total_mem(dev)
    if name != props.name or total != props.total_memory:
        raise FailedPrecondition(
            f"cannot tell which CUDA device is torch's cuda:{index} ({props.name}, "
            f"{props.total_memory} bytes): the driver's ordinal {index} is {name}, {total} "
            "bytes; use a torch that reports device UUIDs")
    return dev


def device_uuid(device: torch.device) -> bytes:
    """The 16-byte UUID of torch's CUDA `device` (what AttachRequest.cuda_device_uuid takes)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = _torch_uuid(index)
    if uuid is not None:
        return uuid
    drv = _Driver.get()
    return drv.uuid(_driver_device(drv, index))


class _PrimaryContext:
    """The device's primary context (torch's), retained while any mapping of this session is
    open; cuIpcOpenMemHandle and cuIpcCloseMemHandle run with it current."""

    def __init__(self, drv: _Driver, dev: int) -> None:
        self.drv, self.dev = drv, dev
        ctx = ctypes.c_void_p()
        drv.call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)
        self.ctx = ctx
        # Not at exit: the process's end releases it, and torch may be torn down by then.
        weakref.finalize(self, drv.fn("cuDevicePrimaryCtxRelease_v2"), dev).atexit = False

    def push(self) -> None:
        self.drv.call("cuCtxPushCurrent_v2", self.ctx)

    def pop(self) -> None:
        old = ctypes.c_void_p()
        self.drv.call("cuCtxPopCurrent_v2", ctypes.byref(old))


def _close_mapping(ctx: _PrimaryContext, ptr: int) -> None:
    """Finalizer of a _Mapping: unmaps it (errors cannot be raised from here; they are dropped:
    the process's end unmaps what is left)."""
    try:
        ctx.push()
        try:
            ctx.drv.fn("cuIpcCloseMemHandle")(ptr)
        finally:
            ctx.pop()
    except MaplError:
        pass


class _Mapping:
    """One opened cudaIpcMemHandle: `nbytes` bytes of device memory at `ptr`, unmapped once
    nothing refers to this object (tensors over it do, through torch.as_tensor)."""

    def __init__(self, ctx: _PrimaryContext, handle: bytes, nbytes: int, what: str) -> None:
        if len(handle) != CU_IPC_HANDLE_SIZE:
            raise Internal(f"{what}: a memory handle of {len(handle)} bytes, not "
                           f"{CU_IPC_HANDLE_SIZE}")
        ptr = ctypes.c_uint64()
        ctx.push()
        try:
            ctx.drv.call("cuIpcOpenMemHandle_v2", ctypes.byref(ptr),
                         _IpcMemHandle.from_buffer_copy(handle),
                         CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS,
                         what=f"{what}: mapld's device memory cannot be mapped here; the trainer "
                              "and mapld must share the host, its GPUs and (in containers) the "
                              "IPC namespace")
        finally:
            ctx.pop()
        self.ptr, self.nbytes = ptr.value, nbytes
        weakref.finalize(self, _close_mapping, ctx, self.ptr).atexit = False

    @property
    def __cuda_array_interface__(self) -> Dict[str, Any]:
        return {"shape": (self.nbytes,), "typestr": "|u1", "data": (self.ptr, False),
                "strides": None, "version": 2}


class _Region:
    """[offset, offset + nbytes) of a mapping, as its own object: a tensor made from it (torch
    .as_tensor) keeps it alive, so a finalizer on it runs when the last such tensor is gone. It
    holds the mapping."""

    def __init__(self, mapping: _Mapping, offset: int, nbytes: int) -> None:
        self.mapping, self.offset, self.nbytes = mapping, offset, nbytes

    @property
    def __cuda_array_interface__(self) -> Dict[str, Any]:
        return {"shape": (self.nbytes,), "typestr": "|u1",
                "data": (self.mapping.ptr + self.offset, False), "strides": None, "version": 2}


def _as_tensor(obj: Any, device: torch.device, ptr: int) -> torch.Tensor:
    """torch's uint8 view of `obj` (a _Mapping or _Region) on `device`, checked to be a view."""
    t = torch.as_tensor(obj, device=device)
    if t.data_ptr() != ptr or t.dtype != torch.uint8:
        raise Internal(f"torch copied the device memory at {ptr:#x} instead of viewing it "
                       f"(got {t.dtype} at {t.data_ptr():#x} on {t.device})")
    return t


class CudaBuffers:
    """A CUDA session's device buffers and events, opened in this process.

    ``views[i]``: a uint8 tensor over buffer i on :attr:`device`; ``bases[i]``: its address;
    ``events[j]``: the interprocess event j (TensorRef.event = j + 1)."""

    def __init__(self, info: Dict[str, Any], device: Optional[torch.device]) -> None:
        """Opens `info` (``mapl._client.Client.cuda()``) on the device whose UUID it names; that
        must be `device` (torch's) when given."""
        drv = _Driver.get()
        uuid = bytes(info["device_uuid"])
        index = self._torch_index(drv, uuid)
        if device is not None and device.index != index:
            raise FailedPrecondition(
                f"mapld put this session's CUDA buffers on cuda:{index} ({_uuid_text(uuid)}), "
                f"not on {device} as asked")
        self.device = torch.device("cuda", index)
        self.uuid = uuid
        self.buffer_bytes = int(info["buffer_bytes"])
        ctx = _PrimaryContext(drv, _driver_device(drv, index))
        self._mappings: List[_Mapping] = []
        self.views: List[torch.Tensor] = []
        for i, handle in enumerate(info["memory_handles"]):
            m = _Mapping(ctx, bytes(handle), self.buffer_bytes, f"CUDA buffer {i}")
            self._mappings.append(m)
            self.views.append(_as_tensor(m, self.device, m.ptr))
        self.bases = [m.ptr for m in self._mappings]
        self.events: List[torch.cuda.Event] = []
        for j, handle in enumerate(info["event_handles"]):
            try:
                self.events.append(torch.cuda.Event.from_ipc_handle(self.device, bytes(handle)))
            except RuntimeError as e:
                raise FailedPrecondition(f"opening CUDA event {j} of mapld "
                                         f"(torch.cuda.Event.from_ipc_handle): {e}") from None

    @staticmethod
    def _torch_index(drv: _Driver, uuid: bytes) -> int:
        """torch's index of the device whose UUID is `uuid`."""
        seen = []
        for i in range(torch.cuda.device_count()):
            u = _torch_uuid(i)
            if u is None:
                u = drv.uuid(_driver_device(drv, i))
            if u == uuid:
                return i
            seen.append(_uuid_text(u))
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise FailedPrecondition(
            f"mapld put this session's CUDA buffers on {_uuid_text(uuid)}, which this process "
            f"does not see (its devices: {', '.join(seen) or 'none'}"
            + (f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "")
            + "): make that GPU visible to the trainer, or pass its device as cuda=")

    def region(self, buffer: int, offset: int, nbytes: int) -> Tuple[torch.Tensor, _Region]:
        """A uint8 tensor over [offset, offset + nbytes) of buffer `buffer` and the object that
        tensor holds (finalize it to learn when the tensor and its views are gone)."""
        m = self._mappings[buffer]
        if offset < 0 or nbytes < 0 or offset + nbytes > m.nbytes:
            raise InvalidArgument(f"region [{offset}, +{nbytes}) exceeds CUDA buffer {buffer} of "
                                  f"{m.nbytes} bytes")
        r = _Region(m, offset, nbytes)
        return _as_tensor(r, self.device, m.ptr + offset), r

    def locate(self, t: torch.Tensor) -> Optional[Tuple[int, int]]:
        """(buffer, byte offset) of a contiguous tensor inside one of the buffers, or None."""
        if (t.device != self.device or not t.is_contiguous() or t.numel() == 0):
            return None
        ptr = t.data_ptr()
        end = ptr + t.numel() * t.element_size()
        for i, base in enumerate(self.bases):
            if base <= ptr and end <= base + self.buffer_bytes:
                offset = ptr - base
                return (i, offset) if offset % t.element_size() == 0 else None
        return None

    def release(self) -> None:
        """Drops this object's references: each mapping closes once no tensor over it is left."""
        self.views, self.events, self._mappings, self.bases = [], [], [], []


class EventPool:
    """Which of a session's events are free: one call names an event at a time (local.proto
    TensorRef.event). :meth:`acquire` gives None when all are taken; the caller then orders its
    work without one (synchronizes)."""

    def __init__(self, count: int) -> None:
        self._free: Deque[int] = deque(range(count))
        self._lock = threading.Lock()
        self.count = count

    def acquire(self) -> Optional[int]:
        with self._lock:
            return self._free.popleft() if self._free else None

    def release(self, index: int) -> None:
        with self._lock:
            if not 0 <= index < self.count or index in self._free:
                raise Internal(f"event {index} released twice or never acquired")
            self._free.append(index)

    def free(self) -> int:
        with self._lock:
            return len(self._free)
