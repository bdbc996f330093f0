"""The model server against the same runner in process, and against LitServe and Ray Serve.

Workload: real STS-B dev sentences (the built-in list without the data folder), one sentence per
request, MiniLM on PyTorch fp32 eager, 2 threads, max batch 32, 5 ms batch wait. Loopback only,
bounded request counts. Measured here, not quoted:

1. in process: ``runner.run`` on batches of real sentences padded to each batch's longest
   (tokenization not timed), throughput at batch 1/8/32/64 and p50 latency at batch 1;
2. served (``modelpress serve`` in its own process, OpenAI ``/v1/embeddings``, a lean
   keep-alive HTTP/1.1 load generator in this one): p50/p99 and throughput at concurrency 1
   and 64, with length bucketing and with every batch padded to 128 tokens;
3. ``--load-requests N``: N requests at concurrency 256 against a model whose queue holds 128
   rows: status counts (429 expected, no 5xx) and the server's resident memory after warm-up
   and at the end;
4. ``--peers litserve,ray``: LitServe and Ray Serve, installed into the benchmark's own
   environment (``$MODELPRESS_BENCH_CACHE`` or ``~/.cache/modelpress-bench/peers``, never the
   project's), running the same runner with the same batch settings, at concurrency 64.

    python benchmarks/serving_bench.py                       # 1-2 (about 2 minutes)
    python benchmarks/serving_bench.py --peers litserve,ray  # + peers (first run installs them)
    python benchmarks/serving_bench.py --load-requests 100000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
MAX_BATCH = 32
DELAY_MS = 5.0
PEER_VERSIONS = {"litserve": "litserve==0.2.19", "ray": "ray[serve]==2.60.0"}


# -- workload ------------------------------------------------------------------------------
def sentences(n: int) -> list[str]:
    from modelpress.locations import find_data_dir
    from modelpress.tasks.text import real_sentences

    return real_sentences(n, find_data_dir())


def percentiles(lat_s: list[float]) -> dict[str, float]:
    ms = np.asarray(lat_s) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def in_process(texts: list[str], runtime: str) -> dict[str, Any]:
    import modelpress as mp

    art = mp.load("minilm")
    task = mp.task_for(art)
    runner = mp.create_runner(art, runtime, threads=THREADS).load()
    singles = [task.preprocess([t]) for t in texts[:100]]
    for b in singles[:5]:
        runner.run(b)
    lat = []
    for b in singles:
        t0 = time.perf_counter()
        runner.run(b)
        lat.append(time.perf_counter() - t0)
    out: dict[str, Any] = {"latency_batch1": percentiles(lat), "throughput": {}}
    for bs in (1, 8, 32, 64):
        batches = [task.preprocess(texts[i : i + bs]) for i in range(0, min(len(texts), max(64, 4 * bs)), bs)]
        runner.run(batches[0])
        t0 = time.perf_counter()
        n = 0
        for b in batches:
            runner.run(b)
            n += b["input_ids"].shape[0]
        out["throughput"][bs] = n / (time.perf_counter() - t0)
    out["best_throughput"] = max(out["throughput"].values())
    return out


# -- a lean keep-alive HTTP/1.1 load generator -----------------------------------------------------
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
                req = b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body)
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


# -- servers ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, path: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server on port {port} was not ready within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def rss_mb(pid: int) -> float:
    import psutil

    p = psutil.Process(pid)
    return sum(c.memory_info().rss for c in [p, *p.children(recursive=True)]) / 2**20


def start_ours(runtime: str, tmp: Path) -> tuple[subprocess.Popen, int]:
    batching = {"max_batch_size": MAX_BATCH, "max_queue_delay_ms": DELAY_MS}
    models = [
        {"source": "minilm", "name": "minilm", "runtime": runtime, "threads": THREADS, "batching": batching},
        {"source": "minilm", "name": "minilm-pad128", "runtime": runtime, "threads": THREADS, "batching": {**batching, "bucketing": False, "pad_to_length": 128}},
        {"source": "minilm", "name": "minilm-q128", "runtime": runtime, "threads": THREADS, "batching": {**batching, "max_queue_size": 128}},
    ]
    port = free_port()
    cfg = tmp / "serve.json"
    cfg.write_text(json.dumps({"models": models, "access_log": False, "log_level": "warning"}))
    serve = "from modelpress.cli import main; main()"  # the `modelpress` command of this environment
    proc = subprocess.Popen([sys.executable, "-c", serve, "serve", "--config", str(cfg), "--port", str(port), "--log-level", "warning"])
    wait_ready(port, "/v2/health/ready", proc)
    return proc, port


def our_bodies(texts: list[str], model: str) -> list[bytes]:
    return [json.dumps({"model": model, "input": t, "encoding_format": "float"}).encode() for t in texts]


# -- peers -----------------------------------------------------------------------------------------
PEER_DIR = Path(os.environ.get("MODELPRESS_BENCH_CACHE", Path.home() / ".cache/modelpress-bench")) / "peers"

LITSERVE_APP = """
import sys, litserve as ls, numpy as np, modelpress as mp
class API(ls.LitAPI):
    def setup(self, device):
        art = mp.load("minilm"); self.task = mp.task_for(art)
        self.runner = mp.create_runner(art, "{runtime}", threads={threads}).load()
    def decode_request(self, request):
        return request["input"]
    def predict(self, texts):
        batch = self.task.preprocess(list(texts))
        return list(self.task.postprocess(self.runner.run(batch), batch))
    def encode_response(self, emb):
        return {{"embedding": emb.tolist()}}
if __name__ == "__main__":
    ls.LitServer(API(max_batch_size={max_batch}, batch_timeout={delay_s}), accelerator="cpu", workers_per_device=1, timeout=60).run(host="127.0.0.1", port=int(sys.argv[1]), generate_client_file=False)
"""

RAY_APP = """
import sys, time, modelpress as mp, ray
from ray import serve
from starlette.requests import Request
@serve.deployment(max_ongoing_requests=256)
class Embed:
    def __init__(self):
        art = mp.load("minilm"); self.task = mp.task_for(art)
        self.runner = mp.create_runner(art, "{runtime}", threads={threads}).load()
    @serve.batch(max_batch_size={max_batch}, batch_wait_timeout_s={delay_s})
    async def embed(self, texts):
        batch = self.task.preprocess(list(texts))
        return [e.tolist() for e in self.task.postprocess(self.runner.run(batch), batch)]
    async def __call__(self, request: Request):
        return {{"embedding": await self.embed((await request.json())["input"])}}
if __name__ == "__main__":
    ray.init(num_cpus={threads}, include_dashboard=False, _node_ip_address="127.0.0.1")
    serve.start(http_options={{"host": "127.0.0.1", "port": int(sys.argv[1])}})
    serve.run(Embed.bind(), route_prefix="/predict")
    print("ready", flush=True)
    while True:
        time.sleep(3600)
"""


def peer_python(peers: list[str]) -> Path:
    """The peers' own virtual environment: LitServe / Ray Serve there; torch and modelpress read from this one."""
    venv = PEER_DIR / "venv"
    py = venv / "bin/python"
    if not py.exists():
        subprocess.check_call([sys.executable, "-m", "venv", str(venv)])
    site = next((venv / "lib").glob("python3*/site-packages"))
    # torch, transformers and modelpress come from the project's environment (read only, listed after the venv's own packages)
    here_site = [p for p in sys.path if p.endswith("site-packages")]
    (site / "modelpress_project.pth").write_text("\n".join([str(ROOT / "src"), *here_site]) + "\n")
    wanted = [PEER_VERSIONS[p] for p in peers]
    missing = [w for w, p in zip(wanted, peers, strict=True) if subprocess.call([str(py), "-c", f"import {p}"], stderr=subprocess.DEVNULL) != 0]
    if missing:
        print(f"installing {', '.join(missing)} into {venv} (first run only)", flush=True)
        subprocess.check_call([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *missing])
    return py


def start_peer(peer: str, py: Path, runtime: str, tmp: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    template = LITSERVE_APP if peer == "litserve" else RAY_APP
    script = tmp / f"{peer}_app.py"
    script.write_text(template.format(runtime=runtime, threads=THREADS, max_batch=MAX_BATCH, delay_s=DELAY_MS / 1000))
    proc = subprocess.Popen([str(py), str(script), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    body = json.dumps({"input": "warm up"}).encode()
    deadline = time.time() + 600
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{peer} exited with {proc.returncode} before it was ready")
        try:
            if run_load(port, "/predict", [body], 1)["statuses"].get(200):
                return proc, port
        except OSError:
            pass
        if time.time() > deadline:
            stop(proc)
            raise RuntimeError(f"{peer} was not ready within 600 s")
        time.sleep(1)


# -- the run ---------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=int(os.environ.get("BENCH_REQUESTS", "1000")), help="requests per concurrency-64 figure")
    ap.add_argument("--latency-requests", type=int, default=200, help="requests for the concurrency-1 figure")
    ap.add_argument("--load-requests", type=int, default=0, help="requests at concurrency 256 for the overload / memory test (0: skip)")
    ap.add_argument("--peers", default=os.environ.get("BENCH_PEERS", ""), help="comma-separated: litserve, ray (installed into the benchmark's own venv)")
    ap.add_argument("--runtime", default="torch")
    args = ap.parse_args()
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEER_VERSIONS]
    if unknown:
        sys.exit(f"unknown peer(s) {unknown}; known: {', '.join(PEER_VERSIONS)}")

    texts = sentences(max(args.requests, args.latency_requests, 512))
    report: dict[str, Any] = {"settings": {"threads": THREADS, "max_batch_size": MAX_BATCH, "max_queue_delay_ms": DELAY_MS, "runtime": args.runtime, "requests": args.requests}}
    print("in process ...", flush=True)
    first = in_process(texts, args.runtime)

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        print("modelpress serve ...", flush=True)
        proc, port = start_ours(args.runtime, tmp)
        try:
            ours: dict[str, Any] = {}
            run_load(port, "/v1/embeddings", our_bodies(texts[:64], "minilm"), 8)  # warm the connections and the model
            ours["c1"] = run_load(port, "/v1/embeddings", our_bodies(texts[: args.latency_requests], "minilm"), 1)
            ours["c64"] = run_load(port, "/v1/embeddings", our_bodies(texts[: args.requests], "minilm"), 64)
            run_load(port, "/v1/embeddings", our_bodies(texts[:64], "minilm-pad128"), 8)
            ours["c64_pad128"] = run_load(port, "/v1/embeddings", our_bodies(texts[: args.requests], "minilm-pad128"), 64)
            if args.load_requests:
                run_load(port, "/v1/embeddings", our_bodies(texts[:256], "minilm-q128"), 64)
                before = rss_mb(proc.pid)
                many = [texts[i % len(texts)] for i in range(args.load_requests)]
                ours["load_c256"] = run_load(port, "/v1/embeddings", our_bodies(many, "minilm-q128"), 256)
                ours["load_c256"].update(rss_after_warmup_mb=before, rss_end_mb=rss_mb(proc.pid))
            report["modelpress"] = ours
        finally:
            stop(proc)
        if peers:
            py = peer_python(peers)
            for peer in peers:
                print(f"{peer} ...", flush=True)
                pproc, pport = start_peer(peer, py, args.runtime, tmp)
                try:
                    bodies = [json.dumps({"input": t}).encode() for t in texts[: args.requests]]
                    run_load(pport, "/predict", bodies[:64], 8)
                    report[peer] = {"c64": run_load(pport, "/predict", bodies, 64)}
                finally:
                    stop(pproc)

    # measured before and after the servers, the better of the two: the machine may be shared,
    # and the baseline gets the benefit of the doubt
    print("in process again ...", flush=True)
    second = in_process(texts, args.runtime)
    report["in_process"] = {
        "latency_batch1": min(first["latency_batch1"], second["latency_batch1"], key=lambda r: r["p50_ms"]),
        "throughput": {bs: max(first["throughput"][bs], second["throughput"][bs]) for bs in first["throughput"]},
        "runs": [first, second],
    }
    report["in_process"]["best_throughput"] = max(report["in_process"]["throughput"].values())
    summarize(report)
    out = Path(os.environ.get("BENCH_OUT", "out/bench"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(report, indent=2, default=str))
    return 0


def summarize(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    ip, ours = report["in_process"], report["modelpress"]
    table = Table(title=f"modelpress serve vs in process (MiniLM, {report['settings']['runtime']}, {THREADS} threads, STS-B sentences)", title_justify="left")
    for col in ("what", "req/s", "p50 ms", "p99 ms", "statuses", "target"):
        table.add_column(col)
    best_bs = max(ip["throughput"], key=ip["throughput"].get)
    table.add_row(f"in process, batch {best_bs} (best)", f"{ip['best_throughput']:.0f}", "", "", "", "")
    table.add_row("in process, batch 1 latency", "", f"{ip['latency_batch1']['p50_ms']:.2f}", f"{ip['latency_batch1']['p99_ms']:.2f}", "", "")

    def row(name: str, r: dict[str, Any], target: str) -> None:
        table.add_row(name, f"{r['rps']:.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", json.dumps(r["statuses"]), target)

    row("served, concurrency 1", ours["c1"], f"p50 <= {ip['latency_batch1']['p50_ms'] + 1:.2f} ms: {'ok' if ours['c1']['p50_ms'] <= ip['latency_batch1']['p50_ms'] + 1 else 'MISSED'}")
    ratio = ours["c64"]["rps"] / ip["best_throughput"]
    row("served, concurrency 64", ours["c64"], f"{ratio:.2f}x in process (>= 0.9): {'ok' if ratio >= 0.9 else 'MISSED'}")
    bucket = ours["c64"]["rps"] / ours["c64_pad128"]["rps"]
    row("served, c64, pad to 128", ours["c64_pad128"], f"bucketing {bucket:.2f}x (>= 3): {'ok' if bucket >= 3 else 'MISSED'}")
    if "load_c256" in ours:
        lt = ours["load_c256"]
        grow = lt["rss_end_mb"] / lt["rss_after_warmup_mb"] - 1
        bad = sum(v for k, v in lt["statuses"].items() if int(k) >= 500)
        row(f"load, c256, {lt['requests']} req, queue 128", lt, f"5xx {bad}, RSS {lt['rss_after_warmup_mb']:.0f} -> {lt['rss_end_mb']:.0f} MB ({grow:+.1%})")
    for peer, need in (("litserve", 1.5), ("ray", 2.5)):
        if peer in report:
            r = report[peer]["c64"]
            x = ours["c64"]["rps"] / r["rps"]
            p99 = "ok" if ours["c64"]["p99_ms"] <= r["p99_ms"] else "higher p99"
            row(f"{peer}, concurrency 64", r, f"ours {x:.2f}x (>= {need}): {'ok' if x >= need else 'MISSED'}; {p99}")
    Console(width=200).print(table)


if __name__ == "__main__":
    sys.exit(main())
