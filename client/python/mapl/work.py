"""Non-blocking sends and receives shaped like ``torch.distributed``'s: each ``isend_*`` and
``irecv_*`` of a :class:`mapl.Sidecar` returns a :class:`Work` at once, and the call runs on one
of the Sidecar's worker threads (the native client releases the GIL while it waits on mapld)::

    work = sc.irecv_activation(step=s, microbatch=1)     # posted: the daemon will fill it
    out = model(x0)                                      # computes meanwhile
    h1 = work.wait()                                     # the tensor, shaped as it was sent

:func:`batch_isend_irecv` posts a list of :class:`P2POp` together, as
``torch.distributed.batch_isend_irecv`` does. Receives and sends run on separate pools, so a
receive waiting for its peer never holds up a send that the peer waits for.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as _FutureTimeout
from typing import Any, Callable, List, Optional, Tuple

from .errors import DeadlineExceeded, FailedPrecondition, InvalidArgument

__all__ = ["Work", "P2POp", "batch_isend_irecv"]


class Work:
    """A send or receive in flight. :meth:`wait` returns its result (the received tensor, or the
    send's :class:`mapl.SendResult`) or raises its error, a :class:`mapl.MaplError`;
    :meth:`is_completed` says whether it is done without waiting. ``what`` names the call
    (boundary, direction, step, microbatch) for messages."""

    def __init__(self, future: "Future[Any]", what: str) -> None:
        self._future = future
        self.what = what
        # Set by a receive: the token ids that travelled with the tensor (None when none did).
        self.token_ids: Any = None
        self._on_wait: Optional[Callable[[], None]] = None  # run once, by the first wait()

    def wait(self, timeout: Optional[float] = None) -> Any:
        """Block until done (at most ``timeout`` seconds, which only bounds this wait: the call
        itself keeps its own deadline) and return the result, or raise the call's error.
        ``timeout`` passing first raises :class:`mapl.DeadlineExceeded`; the call goes on."""
        try:
            result = self._future.result(timeout)
        except _FutureTimeout:
            raise DeadlineExceeded(f"{self.what}: not done after {timeout} s of wait(); the "
                                   "call is still in flight (wait again)") from None
        finally:
            if self._future.done() and self._on_wait is not None:
                on_wait, self._on_wait = self._on_wait, None
                on_wait()
        return result

    def is_completed(self) -> bool:
        """Whether the call has finished, successfully or not (``wait`` will not block)."""
        return self._future.done()

    def exception(self) -> Optional[BaseException]:
        """The call's error once it is done, else None (does not wait)."""
        return self._future.exception() if self._future.done() else None

    def then(self, fn: Callable[[Any], Any]) -> "Work":
        """A Work whose result is ``fn(result)``, run on the completing thread (errors pass)."""
        chained: "Future[Any]" = Future()

        def done(f: "Future[Any]") -> None:
            try:
                chained.set_result(fn(f.result()))
            except BaseException as e:  # the chained Work reports it at wait()
                chained.set_exception(e)

        self._future.add_done_callback(done)
        return Work(chained, self.what)

    def __repr__(self) -> str:
        state = "done" if self.is_completed() else "pending"
        return f"<mapl.Work {self.what} {state}>"


class _Pool:
    """Daemon threads running submitted calls, started on demand up to ``size``. Daemon threads:
    a receive blocked on mapld never holds up the interpreter's exit (a ThreadPoolExecutor's
    workers would be joined at exit, each up to its receive's deadline)."""

    def __init__(self, name: str, size: int) -> None:
        self._name, self._size = name, size
        self._tasks: "queue.SimpleQueue[Optional[Tuple[Future, Callable[[], Any]]]]" = (
            queue.SimpleQueue())
        self._lock = threading.Lock()
        self._threads: List[threading.Thread] = []
        self._idle = 0
        self._closed = False

    def submit(self, fn: Callable[[], Any]) -> "Future[Any]":
        future: "Future[Any]" = Future()
        with self._lock:
            if self._closed:
                raise FailedPrecondition("the Sidecar is closed")
            self._tasks.put((future, fn))
            if self._idle <= 0 and len(self._threads) < self._size:
                t = threading.Thread(target=self._work, daemon=True,
                                     name=f"{self._name}-{len(self._threads)}")
                self._threads.append(t)
                t.start()
            else:
                self._idle -= 1  # an idle worker takes it
        return future

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            future, fn = task
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:  # the Work reports it at wait()
                    future.set_exception(e)
            with self._lock:
                self._idle += 1

    def close(self, deadline: float) -> None:
        """Cancels what has not started and waits (until the ``time.monotonic()`` deadline) for
        the threads to end: call it after the client is closed, which ends the calls in flight.
        No thread of the pool should be running when the interpreter exits: one that takes the
        GIL back during finalization is unwound through native frames and aborts the process."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task[0].cancel()
        for _ in threads:
            self._tasks.put(None)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))


class _Pools:
    """A Sidecar's worker threads: receives and sends on separate pools (see the module doc)."""

    # Receives block until their tensor comes: a stage posts up to a step's microbatches of
    # activation receives and as many gradient receives at once.
    RECEIVERS = 64
    SENDERS = 4

    def __init__(self, name: str) -> None:
        self._recv = _Pool(f"{name}-recv", self.RECEIVERS)
        self._send = _Pool(f"{name}-send", self.SENDERS)

    def submit(self, receive: bool, fn: Callable[..., Any], *args: Any) -> "Future[Any]":
        return (self._recv if receive else self._send).submit(lambda: fn(*args))

    def shutdown(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        self._recv.close(deadline)
        self._send.close(deadline)


class P2POp:
    """One operation of :func:`batch_isend_irecv`: ``op`` is a Sidecar's non-blocking method
    (``sc.isend_activation``, ``sc.irecv_gradient``, ...), ``tensor`` what a send sends (or the
    ``out`` a receive fills; None allocates), and the keyword arguments the method takes
    (``step``, ``microbatch``, ``token_ids``, ``boundary``, ...)."""

    def __init__(self, op: Callable[..., Work], tensor: Any = None, **kwargs: Any) -> None:
        name = getattr(op, "__name__", "")
        if not (name.startswith("isend_") or name.startswith("irecv_")):
            raise InvalidArgument(f"P2POp: op must be a Sidecar's isend_* or irecv_* method, "
                                  f"got {op!r}")
        if name.startswith("isend_") and tensor is None:
            raise InvalidArgument(f"P2POp({name}): a send needs the tensor to send")
        self.op, self.tensor, self.kwargs = op, tensor, kwargs

    def __repr__(self) -> str:
        return f"P2POp({getattr(self.op, '__name__', self.op)}, {self.kwargs})"

    def start(self) -> Work:
        if self.op.__name__.startswith("isend_"):
            return self.op(self.tensor, **self.kwargs)
        if self.tensor is not None:
            return self.op(out=self.tensor, **self.kwargs)
        return self.op(**self.kwargs)


def batch_isend_irecv(ops: List[P2POp]) -> List[Work]:
    """Post every operation of ``ops`` and return their Works in the same order, like
    ``torch.distributed.batch_isend_irecv``. Receives are posted before sends, so that a pair of
    stages exchanging both ways never waits on its own send. A bad op is refused before any is
    posted."""
    for op in ops:
        if not isinstance(op, P2POp):
            raise InvalidArgument(f"batch_isend_irecv takes P2POp objects, got "
                                  f"{type(op).__name__}")
    order = sorted(range(len(ops)), key=lambda i: not ops[i].op.__name__.startswith("irecv_"))
    works: List[Optional[Work]] = [None] * len(ops)
    for i in order:
        works[i] = ops[i].start()
    return [w for w in works if w is not None]
