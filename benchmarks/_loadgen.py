"""A lean keep-alive HTTP/1.1 load generator (asyncio, uvloop where installed), for the serving benchmark.

``run_load(port, path, bodies, concurrency)`` sends every body once over ``concurrency``
keep-alive connections and returns the request rate, p50/p99 latency and the status counts.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from typing import Any

import numpy as np


def percentiles(lat_s: list[float]) -> dict[str, float]:
    ms = np.asarray(lat_s) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length, chunked = None, False
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        k = k.strip().lower()
        if k == b"content-length":
            length = int(v)
        elif k == b"transfer-encoding" and b"chunked" in v.lower():
            chunked = True
    if length is not None:
        return status, await reader.readexactly(length)
    if chunked:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                return status, b"".join(parts)
            parts.append(data[:-2])
    return status, b""


async def load(port: int, path: str, bodies: list[bytes], concurrency: int) -> dict[str, Any]:
    """Send every body once, ``concurrency`` connections in parallel; latency and status counts."""
    todo = iter(bodies)
    lat: list[float] = []
    statuses: Counter = Counter()

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for body in todo:
                req = b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
                    path.encode(),
                    len(body),
                    body,
                )
                t0 = time.perf_counter()
                for _attempt in range(2):
                    try:
                        writer.write(req)
                        status, _ = await _read_response(reader)
                        break
                    except (asyncio.IncompleteReadError, ConnectionError):  # the server closed a keep-alive connection
                        writer.close()
                        reader, writer = await asyncio.open_connection("127.0.0.1", port)
                else:
                    status = 599
                lat.append(time.perf_counter() - t0)
                statuses[status] += 1
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"requests": len(lat), "rps": len(lat) / wall, **percentiles(lat), "statuses": dict(statuses)}


def run_load(port: int, path: str, bodies: list[bytes], concurrency: int) -> dict[str, Any]:
    try:
        import uvloop

        return uvloop.run(load(port, path, bodies, concurrency))
    except ImportError:
        return asyncio.run(load(port, path, bodies, concurrency))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
