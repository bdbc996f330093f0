"""The serving benchmark's load generator: a lean keep-alive HTTP/1.1 client on asyncio (uvloop where installed).

``run_load(port, path, bodies, concurrency)`` sends every body once over ``concurrency``
keep-alive connections (each connection sends its next request when the previous one is
answered: a closed loop) and returns the request rate, the p50/p99 of the per-request times
(first byte written to last byte read), the status counts, and the CPU seconds the client itself
used (``cpu_s``, this thread's CPU time while it ran), so that its share can be subtracted.

Why this one: it must steal as little as it can of the 2 cores it shares with the servers it
measures. Each connection is an ``asyncio.Protocol`` that parses the status line and
``Content-Length`` (or a chunked body) straight from the bytes it receives, with every request
built before the clock starts: no stream readers, no futures per request. Measured against the
same server (the floor, MiniLM) in 3 interleaved rounds on this project's 2-core machine (beside
other work: load average 8-10), median CPU ms per request at concurrency 1 / 64: this client 0.14
/ 0.058, the asyncio-streams client it replaced 0.30 / 0.075, and wrk 4.1 (one thread, a Lua script
cycling the bodies) 0.32 / 0.082. wrk also does not give per-request latencies: it corrects its
latency histogram for coordinated omission (``stats_correct`` adds synthetic samples when a
response takes over twice the mean interval), so the p99 of a closed-loop run is not the p99 of the
requests sent; and it runs for a duration, not a number of requests.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np


def percentiles(lat_s: list[float]) -> dict[str, float]:
    ms = np.asarray(lat_s) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


class _Connection(asyncio.Protocol):
    """One keep-alive connection: sends the next request when the previous response is complete."""

    def __init__(self, todo: Iterator[bytes], lat: list[float], statuses: Counter, done: asyncio.Future) -> None:
        self.todo, self.lat, self.statuses, self.done = todo, lat, statuses, done
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.head_end = -1  # where the response's body starts, once its head is in
        self.length = -1  # its Content-Length; -2: chunked
        self.status = 0
        self.request = b""
        self.t0 = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send_next()

    def send_next(self) -> None:
        request = self.request or next(self.todo, None)  # a request resent after a dropped connection keeps its place
        if request is None:
            if not self.done.done():
                self.done.set_result(None)
            return
        self.request, self.buf, self.head_end = request, b"", -1
        self.t0 = time.perf_counter()
        self.transport.write(request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.head_end < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head_end = end + 4
            head = self.buf[:end].lower()
            self.status = int(head[9:12])
            i = head.find(b"\r\ncontent-length:")
            if i < 0:
                self.length = -2
            else:
                j = head.find(b"\r\n", i + 17)
                self.length = int(head[i + 17 : j if j > 0 else None])
        if self.length >= 0:
            complete = len(self.buf) - self.head_end >= self.length
        else:  # chunked (JSON bodies carry no raw CRLF, so the last chunk's marker cannot occur inside one)
            complete = self.buf.endswith(b"\r\n0\r\n\r\n") or self.buf[self.head_end :] == b"0\r\n\r\n"
        if complete:
            self.lat.append(time.perf_counter() - self.t0)
            self.statuses[self.status] += 1
            self.request = b""
            self.send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result("lost")  # the server closed a keep-alive connection: reconnect and resend


async def load(port: int, path: str, bodies: list[bytes], concurrency: int) -> dict[str, Any]:
    """Send every body once, ``concurrency`` connections in parallel; latency and status counts."""
    loop = asyncio.get_running_loop()
    head = b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: " % path.encode()
    requests = [head + b"%d\r\n\r\n" % len(b) + b for b in bodies]  # built before the clock starts
    todo = iter(requests)
    lat: list[float] = []
    statuses: Counter = Counter()

    async def connection() -> None:
        pending = b""
        for _attempt in range(len(requests) + 3):  # a server may close a keep-alive connection now and then
            done = loop.create_future()
            conn = _Connection(todo, lat, statuses, done)
            conn.request = pending
            transport, _ = await loop.create_connection(lambda c=conn: c, "127.0.0.1", port)
            try:
                if await done is None:
                    return
            finally:
                transport.close()
            pending = conn.request
        statuses[599] += 1

    t0, cpu0 = time.perf_counter(), time.thread_time()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
    n = len(lat)
    return {"requests": n, "sent": n, "rps": n / wall, **percentiles(lat), "statuses": dict(statuses), "cpu_s": cpu}


def run_load(port: int, path: str, bodies: list[bytes], concurrency: int) -> dict[str, Any]:
    # A plain loop, not asyncio.run / uvloop.run: their Runner turns Ctrl-C into a cancellation of the main task and
    # raises KeyboardInterrupt only if that task ends cancelled; a SIGINT landing as a run finished was dropped and the
    # benchmark went on to its end (seen in tests/test_processes.py under load). Here Python's own handler raises it.
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(load(port, path, bodies, concurrency))
    finally:
        loop.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
