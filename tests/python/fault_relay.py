"""A user-space TCP relay that injects network faults between two processes on loopback.

Tests put it between a client (the upstream mapld, which dials) and a server (the downstream's
peer port) and change what it does while traffic flows. Netem needs privileges this CI lacks, so
every fault is made here, in user space, with the standard library only::

    with FaultRelay(("127.0.0.1", down_port)) as relay:
        start the upstream with peer_address=f"127.0.0.1:{relay.listen_port}"
        relay.set_delay(0.02)                    # 20 ms a chunk, both directions
        relay.set_bandwidth(1e6, UP)             # 1 MB/s upstream -> downstream
        relay.stall(UP); ...; relay.resume(UP)   # stop reading: the sender's window fills
        relay.black_hole(); ...; relay.clear()   # read and discard, forward nothing, no reset
        relay.reset()                            # RST both sides of every connection now
        relay.reset(UP, after_bytes=700)         # RST after 700 more bytes: mid-message
        relay.corrupt(UP, chunks=3)              # flip one byte in each of the next 3 chunks
        relay.partition(); ...; relay.heal()     # drop every connection, refuse new ones
        print(relay.counters())

Directions: UP is client -> server (what the side that dialed writes), DOWN the other way; most
controls take one direction, a tuple of them, or BOTH (the default).

Each accepted connection gets its own connection to the target and two pumps, one a direction.
A pump is a reader thread (socket -> a bounded queue, stamped with the time read) and a writer
thread (queue -> the other socket, after the delay and within the bandwidth). The queue holds at
most `queue_bytes`, so a slow writer (a bandwidth cap, a stall, a peer that does not read) stops
the reader and the sender's TCP window fills, as on a real path. An end of stream is passed on as
shutdown(SHUT_WR); a reset or error on one side resets the other (SO_LINGER 0, then close: RST).
"""

from __future__ import annotations

import collections
import random
import socket
import struct
import threading
import time
from typing import Deque, Dict, Iterable, List, Optional, Tuple, Union

__all__ = ["FaultRelay", "UP", "DOWN", "BOTH"]

UP = "up"      # client -> server: what the dialing side writes
DOWN = "down"  # server -> client
BOTH = (UP, DOWN)

Directions = Union[str, Iterable[str]]

# How often blocked threads look at the relay's state (faults switched, connections closed).
_POLL = 0.05
_CHUNK = 16 << 10


def _dirs(direction: Directions) -> Tuple[str, ...]:
    ds = (direction,) if isinstance(direction, str) else tuple(direction)
    for d in ds:
        if d not in BOTH:
            raise ValueError(f"direction must be {UP!r} or {DOWN!r}, got {d!r}")
    return ds


def _rst_close(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER on, timeout 0) instead of a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class _DirState:
    """The faults of one direction."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.bandwidth: Optional[float] = None  # bytes/s
        self.stalled = False
        self.black_hole = False
        self.corrupt_chunks = 0          # chunks still to corrupt
        self.corrupt_bytes_per_chunk = 1
        self.reset_after: Optional[int] = None  # armed mid-stream reset: bytes still to forward


class _Pair:
    """One relayed connection: the accepted client socket and ours to the target."""

    def __init__(self, relay: "FaultRelay", pid: int, client: socket.socket,
                 server: socket.socket) -> None:
        self.relay = relay
        self.id = pid
        self.socks = {UP: (client, server), DOWN: (server, client)}  # (read from, write to)
        self.client, self.server = client, server
        self.closed = False
        self.lock = threading.Lock()
        self.cv = threading.Condition(self.lock)
        self.queues: Dict[str, Deque[Tuple[float, Optional[bytes]]]] = {
            UP: collections.deque(), DOWN: collections.deque()}
        self.queued = {UP: 0, DOWN: 0}
        self.eof_done = {UP: False, DOWN: False}
        self.threads: List[threading.Thread] = []
        for d in BOTH:
            for fn, role in ((self._reader, "r"), (self._writer, "w")):
                t = threading.Thread(target=fn, args=(d,), daemon=True,
                                     name=f"relay-{pid}-{d}-{role}")
                self.threads.append(t)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    # -- ending --

    def reset(self, why: str) -> bool:
        """RST both sides; False if already closed."""
        with self.lock:
            if self.closed:
                return False
            self.closed = True
            self.cv.notify_all()
        _rst_close(self.client)
        _rst_close(self.server)
        self.relay._count(f"closed_{why}")
        return True

    def _finish_if_done(self) -> None:
        with self.lock:
            if self.closed or not all(self.eof_done.values()):
                return
            self.closed = True
            self.cv.notify_all()
        for s in (self.client, self.server):
            try:
                s.close()
            except OSError:
                pass
        self.relay._count("closed_eof")

    # -- pumps --

    def _reader(self, d: str) -> None:
        src, _ = self.socks[d]
        relay = self.relay
        while True:
            with self.lock:
                # Stalled (or the queue full): read nothing, so the sender's window fills.
                while not self.closed and (relay._state[d].stalled or relay._partition_drop or
                                           self.queued[d] >= relay.queue_bytes):
                    self.cv.wait(_POLL)
                if self.closed:
                    return
            try:
                src.settimeout(_POLL)
                data = src.recv(_CHUNK)
            except (TimeoutError, socket.timeout, BlockingIOError):
                continue
            except OSError:
                # A reset (or our own close): pass the reset on.
                self.reset("error")
                return
            now = time.monotonic()
            if not data:
                with self.lock:
                    self.queues[d].append((now, None))
                    self.cv.notify_all()
                return
            with relay._lock:
                st = relay._state[d]
                if st.black_hole:
                    relay._counters[f"bytes_black_holed_{d}"] += len(data)
                    continue
                relay._counters[f"bytes_read_{d}"] += len(data)
            with self.lock:
                self.queues[d].append((now, data))
                self.queued[d] += len(data)
                self.cv.notify_all()

    def _writer(self, d: str) -> None:
        _, dst = self.socks[d]
        relay = self.relay
        sent_at = time.monotonic()  # bandwidth pacing: when the link is free again
        while True:
            with self.lock:
                while not self.closed and (not self.queues[d] or relay._state[d].stalled
                                           or relay._partition_drop):
                    self.cv.wait(_POLL)
                if self.closed:
                    return
                read_at, data = self.queues[d][0]
            if data is None:  # end of stream: pass it on
                with self.lock:
                    self.queues[d].popleft()
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                with self.lock:
                    self.eof_done[d] = True
                self._finish_if_done()
                return
            with relay._lock:
                st = relay._state[d]
                delay, bandwidth = st.delay, st.bandwidth
                black_hole = st.black_hole
            if black_hole:  # switched on after it was read: discard what waits too
                with self.lock:
                    self.queues[d].popleft()
                    self.queued[d] -= len(data)
                    self.cv.notify_all()
                with relay._lock:
                    relay._counters[f"bytes_black_holed_{d}"] += len(data)
                continue
            due = read_at + delay
            now = time.monotonic()
            if due > now:
                time.sleep(min(due - now, _POLL))
                continue  # look at the state again (a fault may have changed meanwhile)
            piece = data
            if bandwidth:
                piece = data[:max(1, int(bandwidth * _POLL))]
                now = time.monotonic()
                if sent_at > now:
                    time.sleep(min(sent_at - now, _POLL))
                    continue
                sent_at = max(sent_at, now) + len(piece) / bandwidth
            piece, reset_now = relay._mangle(d, piece)
            try:
                if piece:
                    self._send_all(dst, piece)
            except OSError:
                self.reset("error")
                return
            if reset_now:
                self.reset("reset_mid_stream")
                return
            with self.lock:
                _, head = self.queues[d][0]
                rest = head[len(piece):] if head is not None else None
                if rest:
                    self.queues[d][0] = (read_at, rest)
                else:
                    self.queues[d].popleft()
                self.queued[d] -= len(piece)
                self.cv.notify_all()
            with relay._lock:
                relay._counters[f"bytes_forwarded_{d}"] += len(piece)
                if delay > 0:
                    relay._counters[f"chunks_delayed_{d}"] += 1

    def _send_all(self, dst: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.closed:
                raise OSError("closed")
            try:
                dst.settimeout(_POLL)
                n = dst.send(view)
            except (TimeoutError, socket.timeout, BlockingIOError):
                continue  # the receiver does not read: keep waiting (its window is full)
            view = view[n:]


class FaultRelay:
    """A TCP relay from 127.0.0.1:`listen_port` to `target`, with faults switched at run time.

    A context manager: ``with FaultRelay(target) as relay:`` starts it, leaving closes every
    connection. ``target`` may be changed while running (new connections go there).
    """

    def __init__(self, target: Tuple[str, int], listen_port: int = 0,
                 host: str = "127.0.0.1", seed: Optional[int] = None,
                 queue_bytes: int = 256 << 10) -> None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the relay is for loopback only")
        self.target = target
        self.host = host
        self.queue_bytes = queue_bytes
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._state = {UP: _DirState(), DOWN: _DirState()}
        self._partition_refuse = False
        self._partition_drop = False
        self._counters: Dict[str, int] = collections.defaultdict(int)
        self._pairs: Dict[int, _Pair] = {}
        self._next_id = 0
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, listen_port))
        self._listener.listen(64)
        self._listener.settimeout(_POLL)
        self.listen_port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                          name="relay-accept")
        self._started = False

    # ---- life ----

    def start(self) -> "FaultRelay":
        if not self._started:
            self._started = True
            self._acceptor.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._started:
            self._acceptor.join(timeout=5)
        try:
            self._listener.close()
        except OSError:
            pass
        for p in self._pairs_now():
            p.reset("relay_closed")
        for p in list(self._pairs.values()):
            for t in p.threads:
                t.join(timeout=2)

    def __enter__(self) -> "FaultRelay":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- faults ----

    def set_delay(self, seconds: float, direction: Directions = BOTH) -> None:
        """Hold every chunk `seconds` after it was read before forwarding it (order is kept)."""
        self._set(direction, "delay", max(0.0, float(seconds)), "delay")

    def set_bandwidth(self, bytes_per_second: Optional[float],
                      direction: Directions = BOTH) -> None:
        """Forward at most this many bytes a second (None: no cap)."""
        self._set(direction, "bandwidth", bytes_per_second or None, "bandwidth")

    def stall(self, direction: Directions = BOTH) -> None:
        """Stop reading and forwarding: the sender's TCP window fills; nothing is closed."""
        self._set(direction, "stalled", True, "stall")

    def resume(self, direction: Directions = BOTH) -> None:
        """End a stall."""
        self._set(direction, "stalled", False, None)

    def black_hole(self, direction: Directions = BOTH) -> None:
        """Read and discard everything, forward nothing; connections stay open (no reset)."""
        self._set(direction, "black_hole", True, "black_hole")

    def corrupt(self, direction: Directions = UP, chunks: int = 1,
                bytes_per_chunk: int = 1) -> None:
        """Flip `bytes_per_chunk` random bytes (XOR with a random non-zero byte) in each of the
        next `chunks` chunks forwarded in `direction`."""
        with self._lock:
            for d in _dirs(direction):
                self._state[d].corrupt_chunks += chunks
                self._state[d].corrupt_bytes_per_chunk = max(1, bytes_per_chunk)
            self._counters["fault_corrupt"] += 1

    def reset(self, direction: Directions = UP, after_bytes: Optional[int] = None) -> int:
        """after_bytes None: reset (RST) both sides of every connection now; returns how many.
        Else arm a reset that fires once `after_bytes` more bytes have been forwarded in
        `direction`, cutting the chunk in flight: a reset in the middle of a message."""
        with self._lock:
            self._counters["fault_reset"] += 1
            if after_bytes is not None:
                for d in _dirs(direction):
                    self._state[d].reset_after = max(0, int(after_bytes))
                return 0
        n = sum(p.reset("reset") for p in self._pairs_now())
        return n

    def partition(self, mode: str = "refuse") -> None:
        """Cut the path until heal(). "refuse": reset every connection and reset new ones at
        once (the dialer sees its connections refused). "drop": like a path that loses every
        packet: nothing is read or forwarded on existing or new connections, nothing is closed
        (the peers' keepalives must find out)."""
        if mode not in ("refuse", "drop"):
            raise ValueError(f"mode is 'refuse' or 'drop', got {mode!r}")
        with self._lock:
            self._counters[f"fault_partition_{mode}"] += 1
            if mode == "refuse":
                self._partition_refuse = True
            else:
                self._partition_drop = True
        if mode == "refuse":
            for p in self._pairs_now():
                p.reset("partition")

    def heal(self) -> None:
        """End a partition: connections are accepted and forwarded again."""
        with self._lock:
            self._partition_refuse = False
            self._partition_drop = False
        self._wake()

    def clear(self) -> None:
        """Every fault off (delay, bandwidth, stall, black hole, corruption, armed reset,
        partition). Connections that survived carry on."""
        with self._lock:
            for d in BOTH:
                if self._state[d].reset_after is not None:
                    self._counters["reset_disarmed"] += 1
                self._state[d] = _DirState()
            self._partition_refuse = False
            self._partition_drop = False
        self._wake()

    # ---- observation ----

    def counters(self) -> Dict[str, int]:
        """What the relay did: fault_<name> per fault switched on, connections_accepted /
        _refused, closed_<why> per connection ended (eof, error, reset, reset_mid_stream,
        partition, relay_closed), bytes_read_<dir> / bytes_forwarded_<dir> /
        bytes_black_holed_<dir>, bytes_corrupted_<dir>, chunks_delayed_<dir>."""
        with self._lock:
            out = dict(self._counters)
        out["connections_open"] = len(self._pairs_now())
        return out

    def connections(self) -> int:
        return len(self._pairs_now())

    # ---- internals ----

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counters[name] += n

    def _set(self, direction: Directions, field: str, value, fault: Optional[str]) -> None:
        with self._lock:
            for d in _dirs(direction):
                setattr(self._state[d], field, value)
            if fault is not None:
                self._counters[f"fault_{fault}"] += 1
        self._wake()

    def _wake(self) -> None:
        for p in self._pairs_now():
            with p.lock:
                p.cv.notify_all()

    def _pairs_now(self) -> List[_Pair]:
        with self._lock:
            self._pairs = {k: p for k, p in self._pairs.items() if not p.closed}
            return list(self._pairs.values())

    def _mangle(self, d: str, piece: bytes) -> Tuple[bytes, bool]:
        """Corruption and an armed mid-stream reset applied to a piece about to be written:
        (what to write, whether to reset after writing it)."""
        with self._lock:
            st = self._state[d]
            reset_now = False
            if st.reset_after is not None:
                if len(piece) >= st.reset_after:
                    piece = piece[:st.reset_after]
                    st.reset_after = None
                    reset_now = True
                    self._counters["reset_mid_stream_fired"] += 1
                else:
                    st.reset_after -= len(piece)
            if st.corrupt_chunks > 0 and piece:
                st.corrupt_chunks -= 1
                buf = bytearray(piece)
                for _ in range(st.corrupt_bytes_per_chunk):
                    i = self._rng.randrange(len(buf))
                    buf[i] ^= self._rng.randrange(1, 256)
                    self._counters[f"bytes_corrupted_{d}"] += 1
                piece = bytes(buf)
            return piece, reset_now

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            with self._lock:
                refuse, drop = self._partition_refuse, self._partition_drop
            if refuse:
                self._count("connections_refused")
                _rst_close(client)
                continue
            if drop:
                # The kernel completed the handshake, but nothing gets through until heal().
                self._count("connections_held")
                threading.Thread(target=self._hold, args=(client,), daemon=True,
                                 name="relay-held").start()
                continue
            self._relay(client)

    def _hold(self, client: socket.socket) -> None:
        while not self._stop.is_set():
            with self._lock:
                if not self._partition_drop:
                    break
            time.sleep(_POLL)
        if self._stop.is_set():
            _rst_close(client)
            return
        self._relay(client)

    def _relay(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.target, timeout=2)
        except OSError:
            # The target is down (a restarting daemon): the client sees a reset, as it would
            # from the target itself.
            self._count("target_unreachable")
            _rst_close(client)
            return
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            if self._stop.is_set():
                _rst_close(client)
                _rst_close(server)
                return
            self._next_id += 1
            pair = _Pair(self, self._next_id, client, server)
            self._pairs[pair.id] = pair
            self._counters["connections_accepted"] += 1
        pair.start()
