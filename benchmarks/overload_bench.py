"""Overload: 100,000 requests at concurrency 256 against `modelpress serve` with a small queue (issue 12, item 7).

The server runs MiniLM (``--model``) in its own process with a queue of ``--queue`` rows and a
server-wide limit of ``--max-concurrent`` requests, below the load's concurrency, so that both
overload answers happen: 429 (the model's queue is full) and 503 (the server answers as many
requests as it takes at once). What must hold, and is printed with ok / MISSED:

* no 5xx other than the 503 of the concurrency limit, and no connection error;
* every 429 and 503 carries ``Retry-After``;
* the server's resident memory after the run is within 5% of the memory after warm-up;
* the server is still ready afterwards.

The p50 / p99 latency of the accepted (200) requests and of the refused ones are reported.

    python benchmarks/overload_bench.py                     # the full run (make bench)
    python benchmarks/overload_bench.py --requests 2000     # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from _loadgen import free_port, percentiles
from _procs import Procs, load_section, main_guard, wait_ready

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
MEMORY_TOLERANCE = 0.05  # the bound: resident memory after the run within 5% of after warm-up
SETTLE_S = 2.0  # after the run, before memory is read: in-flight work finishes, the allocator returns what it frees
WARMUP_REQUESTS = 2048  # sent at the run's concurrency first: buffers and queues reach their working size before memory is read


def texts(n: int) -> list[str]:
    """Deterministic sentences of 3 to 40 words (the length spread of STS-B), no data files needed."""
    words = "a man is playing the guitar while a dog runs across the field under the bright summer sky".split()  # noqa: SIM905
    return [" ".join(words[(i * 7 + k) % len(words)] for k in range(3 + (i * 13) % 38)) for i in range(n)]


async def _read(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, whether Retry-After was sent) of one response; the body is read and dropped."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length, retry_after = 0, False
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        k = k.strip().lower()
        if k == b"content-length":
            length = int(v)
        elif k == b"retry-after":
            retry_after = v.strip().isdigit()
    if length:
        await reader.readexactly(length)
    return status, retry_after


async def overload(port: int, bodies: list[bytes], concurrency: int) -> dict[str, Any]:
    todo = iter(bodies)
    statuses: Counter = Counter()
    lat: dict[str, list[float]] = {"accepted": [], "refused": []}
    missing_retry_after = 0
    errors = 0

    async def worker() -> None:
        nonlocal missing_retry_after, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for body in todo:
                req = (
                    b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                t0 = time.perf_counter()
                try:
                    writer.write(req)
                    status, retry_after = await _read(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    errors += 1  # a dropped connection is a failure too: reconnect and go on
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                seconds = time.perf_counter() - t0
                statuses[status] += 1
                lat["accepted" if status == 200 else "refused"].append(seconds)
                if status in (429, 503) and not retry_after:
                    missing_retry_after += 1
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {
        "requests": sum(statuses.values()) + errors,
        "seconds": wall,
        "statuses": dict(sorted(statuses.items())),
        "connection_errors": errors,
        "missing_retry_after": missing_retry_after,
        "accepted": percentiles(lat["accepted"]) if lat["accepted"] else {},
        "refused": percentiles(lat["refused"]) if lat["refused"] else {},
    }


def run(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def rss_mb(pid: int) -> float:
    import psutil

    p = psutil.Process(pid)
    return sum(c.memory_info().rss for c in [p, *p.children(recursive=True)]) / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=int(os.environ.get("BENCH_OVERLOAD_REQUESTS", "100000")))
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--queue", type=int, default=64, help="the model's max_queue_size (rows)")
    ap.add_argument("--max-concurrent", type=int, default=192, help="the server's max_concurrent_requests")
    ap.add_argument("--model", default="minilm", help="what to serve (a short name, folder or registry ref)")
    ap.add_argument("--runtime", default="torch")
    args = ap.parse_args()

    bodies = [json.dumps({"model": "m", "input": t}).encode() for t in texts(min(args.requests, 4096))]
    bodies = [bodies[i % len(bodies)] for i in range(args.requests)]
    cfg = {
        "models": [
            {
                "source": args.model,
                "name": "m",
                "runtime": args.runtime,
                "threads": THREADS,
                "batching": {"max_batch_size": 32, "max_queue_delay_ms": 5, "max_queue_size": args.queue},
            }
        ],
        "max_concurrent_requests": args.max_concurrent,
        "access_log": False,
        "log_level": "warning",
    }
    with tempfile.TemporaryDirectory() as tmpdir, Procs() as procs:
        path = Path(tmpdir) / "serve.json"
        path.write_text(json.dumps(cfg))
        port = free_port()
        serve = "from modelpress.cli import main; main()"
        env = {"MODELPRESS_HOME": os.environ.get("MODELPRESS_HOME", str(Path(tmpdir) / "home"))}
        print(f"modelpress serve {args.model} (queue {args.queue}, max_concurrent_requests {args.max_concurrent}) ...", flush=True)
        proc = procs.popen([sys.executable, "-c", serve, "serve", "--config", str(path), "--port", str(port)], env=env)
        wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc)
        run(overload(port, [bodies[i % len(bodies)] for i in range(WARMUP_REQUESTS)], args.concurrency))
        time.sleep(SETTLE_S)
        warm_mb = rss_mb(proc.pid)
        with load_section(f"{args.requests:,} requests at concurrency {args.concurrency}"):
            result = run(overload(port, bodies, args.concurrency))
        time.sleep(SETTLE_S)
        after_mb = rss_mb(proc.pid)
        import httpx

        ready = httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=10).status_code == 200
        procs.stop(proc)

    st = result["statuses"]
    bad_5xx = sum(n for s, n in st.items() if s >= 500 and s != 503)
    growth = (after_mb - warm_mb) / warm_mb
    checks = {
        "no 5xx but the limit's 503, no dropped connection": bad_5xx == 0 and result["connection_errors"] == 0,
        "every 429 / 503 has Retry-After": result["missing_retry_after"] == 0,
        f"memory after within {MEMORY_TOLERANCE:.0%} of after warm-up": abs(growth) <= MEMORY_TOLERANCE,
        "ready afterwards": ready,
    }
    acc, ref = result["accepted"], result["refused"]
    print(
        f"\noverload: {result['requests']:,} requests at concurrency {args.concurrency} in {result['seconds']:.1f} s "
        f"({result['requests'] / result['seconds']:,.0f}/s); model {args.model}, {args.runtime}, {THREADS} threads"
    )
    print(f"  statuses: {st}   connection errors: {result['connection_errors']}   5xx other than 503: {bad_5xx}")
    print(f"  429 / 503 without Retry-After: {result['missing_retry_after']}")
    if acc:
        print(f"  accepted (200): {st.get(200, 0):,}   p50 {acc['p50_ms']:.1f} ms   p99 {acc['p99_ms']:.1f} ms")
    if ref:
        print(f"  refused (429/503): {st.get(429, 0) + st.get(503, 0):,}   p50 {ref['p50_ms']:.1f} ms   p99 {ref['p99_ms']:.1f} ms")
    print(f"  resident memory: {warm_mb:.0f} MiB after warm-up, {after_mb:.0f} MiB after the run ({growth:+.1%})")
    for what, ok in checks.items():
        print(f"  {'ok    ' if ok else 'MISSED'} {what}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main_guard(main))
