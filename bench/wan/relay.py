#!/usr/bin/python3
"""User-space one-way delay for bench/wan, and the link sampler; run inside a network namespace.

    relay.py relay --map 127.0.0.1:7001=10.77.0.2:7100 [--map ...] --delay-ms 50 \\
        [--iface veth0 --samples FILE] [--ready FILE]

Each --map LISTEN=TARGET accepts TCP connections on LISTEN and opens one to TARGET for each. Every
chunk read from either side is written to the other side `delay` seconds after it was read, in
order: a delay line in both directions, so a round trip through the relay takes 2 x delay plus
what the link behind it adds. What waits in one direction is capped (--buffer-bytes); beyond
that the relay stops reading, so a sender feels backpressure as it would on a full queue.

The relay runs in the upstream stage's namespace, in front of the shaped veth: the daemons'
bytes cross the tbf-shaped veth (rate) after the delay line (latency). TCP on the veth hop sees
the veth's RTT, not the delay; the daemons' own protocol (HTTP/2 flow control, acks, requests
that wait for answers) sees the full 2 x delay round trip.

With --iface, a thread samples the interface's tx and rx byte counters every --sample-ms and
appends ``monotonic_seconds tx_bytes rx_bytes fwd_bytes bwd_bytes`` lines to --samples, where
fwd/bwd are the bytes the relay has delivered in each direction over all its maps (fwd: from
the accepting side to the target). CLOCK_MONOTONIC is system-wide, so the benchmark compares
these times with its own.

    relay.py echo --listen 10.77.0.2:7200          # answers every byte it gets (for rtt)
    relay.py rtt --connect 127.0.0.1:7201 [--count 20]   # median round trip of 64-byte pings
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional, Tuple

COUNTS = {"fwd": 0, "bwd": 0}


def _addr(text: str) -> Tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _delay_line(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float,
                      limit: int, direction: str) -> None:
    loop = asyncio.get_running_loop()
    queue: "asyncio.Queue[Tuple[float, Optional[bytes]]]" = asyncio.Queue()
    room = asyncio.Event()
    room.set()
    held = 0

    async def read() -> None:
        nonlocal held
        try:
            while True:
                await room.wait()
                data = await src.read(1 << 16)
                queue.put_nowait((loop.time() + delay, data or None))
                if not data:
                    return
                held += len(data)
                if held >= limit:
                    room.clear()
        except (ConnectionError, OSError):
            queue.put_nowait((loop.time(), None))

    async def write() -> None:
        nonlocal held
        try:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:
                    if dst.can_write_eof():
                        dst.write_eof()
                    return
                dst.write(data)
                await dst.drain()
                COUNTS[direction] += len(data)
                held -= len(data)
                if held < limit:
                    room.set()
        except (ConnectionError, OSError):
            pass

    reader = asyncio.ensure_future(read())
    try:
        await write()
    finally:
        reader.cancel()


async def _serve_map(listen: str, target: str, delay: float, limit: int) -> asyncio.AbstractServer:
    t_host, t_port = _addr(target)

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            tr, tw = await asyncio.open_connection(t_host, t_port)
        except OSError:
            w.close()
            return
        _nodelay(w)
        _nodelay(tw)
        try:
            await asyncio.gather(_delay_line(r, tw, delay, limit, "fwd"),
                                 _delay_line(tr, w, delay, limit, "bwd"))
        finally:
            for x in (w, tw):
                x.close()

    host, port = _addr(listen)
    return await asyncio.start_server(handle, host, port, reuse_address=True)


def _sampler(iface: str, path: Path, every: float, stop: threading.Event) -> None:
    base = f"/sys/class/net/{iface}/statistics/"
    fds = [os.open(base + "tx_bytes", os.O_RDONLY), os.open(base + "rx_bytes", os.O_RDONLY)]
    with open(path, "w", buffering=1 << 16) as out:
        next_t = time.monotonic()
        while not stop.is_set():
            t = time.monotonic()
            tx, rx = (int(os.pread(fd, 32, 0)) for fd in fds)
            out.write(f"{t:.6f} {tx} {rx} {COUNTS['fwd']} {COUNTS['bwd']}\n")
            next_t += every
            pause = next_t - time.monotonic()
            if pause > 0:
                stop.wait(pause)
            else:
                next_t = time.monotonic()
        t = time.monotonic()
        tx, rx = (int(os.pread(fd, 32, 0)) for fd in fds)
        out.write(f"{t:.6f} {tx} {rx} {COUNTS['fwd']} {COUNTS['bwd']}\n")
    for fd in fds:
        os.close(fd)


async def _relay(args: argparse.Namespace) -> None:
    servers = [await _serve_map(*m.split("=", 1), args.delay_ms / 1000, args.buffer_bytes)
               for m in args.map]
    stop = threading.Event()
    thread = None
    if args.iface:
        thread = threading.Thread(target=_sampler, daemon=True,
                                  args=(args.iface, Path(args.samples), args.sample_ms / 1000,
                                        stop))
        thread.start()
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    if args.ready:
        Path(args.ready).write_text(json.dumps({"pid": os.getpid()}))
    await done.wait()
    stop.set()
    if thread is not None:
        thread.join(timeout=2)
    for s in servers:
        s.close()


async def _echo(args: argparse.Namespace) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        _nodelay(w)
        while True:
            data = await r.read(1 << 16)
            if not data:
                break
            w.write(data)
            await w.drain()
        w.close()

    host, port = _addr(args.listen)
    server = await asyncio.start_server(handle, host, port, reuse_address=True)
    if args.ready:
        Path(args.ready).write_text(json.dumps({"pid": os.getpid()}))
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    server.close()


async def _rtt(args: argparse.Namespace) -> None:
    host, port = _addr(args.connect)
    for _ in range(100):  # the relay may still be starting
        try:
            r, w = await asyncio.open_connection(host, port)
            break
        except OSError:
            await asyncio.sleep(0.05)
    else:
        raise SystemExit(f"rtt: cannot connect to {args.connect}")
    _nodelay(w)
    times: List[float] = []
    for i in range(args.count):
        t = time.monotonic()
        w.write(b"x" * 64)
        await w.drain()
        await r.readexactly(64)
        times.append(time.monotonic() - t)
    w.close()
    print(json.dumps({"median_s": statistics.median(times), "min_s": min(times),
                      "max_s": max(times), "count": len(times)}))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("relay")
    r.add_argument("--map", action="append", required=True, help="LISTEN=TARGET (host:port)")
    r.add_argument("--delay-ms", type=float, required=True, help="one-way delay")
    r.add_argument("--buffer-bytes", type=int, default=4 << 20,
                   help="the most a direction holds before the relay stops reading")
    r.add_argument("--iface", default="", help="sample this interface's byte counters")
    r.add_argument("--samples", default="", help="where the samples go")
    r.add_argument("--sample-ms", type=float, default=10.0)
    r.add_argument("--ready", default="", help="written once every map listens")
    e = sub.add_parser("echo")
    e.add_argument("--listen", required=True)
    e.add_argument("--ready", default="")
    p = sub.add_parser("rtt")
    p.add_argument("--connect", required=True)
    p.add_argument("--count", type=int, default=20)
    args = ap.parse_args(argv)
    if args.mode == "relay" and args.iface and not args.samples:
        ap.error("--iface needs --samples")
    asyncio.run({"relay": _relay, "echo": _echo, "rtt": _rtt}[args.mode](args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
