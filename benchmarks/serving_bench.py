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

Every server is started first; then the figures are measured in ``--rounds`` interleaved
rounds and each is the median of its rounds, because on a shared machine the load changes
over minutes. For served runs the server's own metrics add the mean batch size, the rows per
second inside batches (the model's speed under the same load) and the fraction of the wall
time the model was busy (near 100%: nothing but the model limits the server).

    python benchmarks/serving_bench.py                       # 1-2 (a few minutes)
    python benchmarks/serving_bench.py --peers litserve,ray  # + peers (first run installs them)
    python benchmarks/serving_bench.py --load-requests 100000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from _loadgen import free_port, percentiles, run_load
from _peers import PEER_VERSIONS, peer_python, start_peer
from _procs import LOAD_LOG, Procs, busy_sections, load_section, main_guard, wait_ready

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
MAX_BATCH = 32
DELAY_MS = 5.0


# -- workload ------------------------------------------------------------------------------
def sentences(n: int) -> list[str]:
    from modelpress.locations import find_data_dir
    from modelpress.tasks.text import real_sentences

    return real_sentences(n, find_data_dir())


class InProcess:
    """The same runner in this process: batch-1 latency and throughput at batch 1/8/32/64."""

    def __init__(self, texts: list[str], runtime: str) -> None:
        import modelpress as mp

        art = mp.load("minilm")
        self.task = mp.task_for(art)
        self.runner = mp.create_runner(art, runtime, threads=THREADS).load()
        self.texts = texts
        self.singles = [self.task.preprocess([t]) for t in texts[:200]]
        for b in self.singles[:10]:
            self.runner.run(b)

    def latency(self, n: int) -> list[float]:
        lat = []
        for b in self.singles[:n]:
            t0 = time.perf_counter()
            self.runner.run(b)
            lat.append(time.perf_counter() - t0)
        return lat

    def throughput(self, bs: int, n: int) -> float:
        batches = [self.task.preprocess(self.texts[i : i + bs]) for i in range(0, max(n, bs), bs)]  # padded to each batch's longest
        self.runner.run(batches[0])
        t0 = time.perf_counter()
        for b in batches:
            self.runner.run(b)
        return sum(b["input_ids"].shape[0] for b in batches) / (time.perf_counter() - t0)


# -- servers ---------------------------------------------------------------------------------------
def rss_mb(pid: int) -> float:
    import psutil

    p = psutil.Process(pid)
    return sum(c.memory_info().rss for c in [p, *p.children(recursive=True)]) / 2**20


def start_ours(runtime: str, tmp: Path, procs: Procs, load_test: bool) -> tuple[subprocess.Popen, int]:
    batching = {"max_batch_size": MAX_BATCH, "max_queue_delay_ms": DELAY_MS}
    models = [
        {"source": "minilm", "name": "minilm", "runtime": runtime, "threads": THREADS, "batching": batching},
        {
            "source": "minilm",
            "name": "minilm-pad128",
            "runtime": runtime,
            "threads": THREADS,
            "batching": {**batching, "bucketing": False, "pad_to_length": 128},
        },
    ]
    if load_test:  # the overload test's model: a queue of 128 rows
        models.append(
            {
                "source": "minilm",
                "name": "minilm-q128",
                "runtime": runtime,
                "threads": THREADS,
                "batching": {**batching, "max_queue_size": 128},
            }
        )
    port = free_port()
    cfg = tmp / "serve.json"
    cfg.write_text(json.dumps({"models": models, "access_log": False, "log_level": "warning"}))
    serve = "from modelpress.cli import main; main()"  # the `modelpress` command of this environment
    proc = procs.popen([sys.executable, "-c", serve, "serve", "--config", str(cfg), "--port", str(port), "--log-level", "warning"])
    wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc)
    return proc, port


def batch_stats(port: int, model: str) -> dict[str, float]:
    """Sums of the server's batch histograms for one model (from /metrics)."""
    import re

    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out = {}
    for key, series in (
        ("batches", "modelpress_batch_size_count"),
        ("rows", "modelpress_batch_size_sum"),
        ("seconds", "modelpress_batch_duration_seconds_sum"),
    ):
        m = re.search(series + r'\{model="' + re.escape(model) + r'",version="[^"]*"\} ([0-9.e+-]+)', text)
        out[key] = float(m.group(1)) if m else 0.0
    return out


def served(port: int, model: str, bodies: list[bytes], concurrency: int) -> dict[str, Any]:
    """A load run plus what the server's metrics say about it: batch sizes, and how busy the model was."""
    before = batch_stats(port, model)
    result = run_load(port, "/v1/embeddings", bodies, concurrency)
    after = batch_stats(port, model)
    d = {k: after[k] - before[k] for k in after}
    if d["batches"] and d["seconds"]:
        # rows per second while a batch ran: the model's own speed under the same machine load,
        # and the fraction of the wall time the model was busy (1.0: nothing but the model limits)
        result.update(
            avg_batch=d["rows"] / d["batches"],
            model_rows_per_s=d["rows"] / d["seconds"],
            model_busy=d["seconds"] * result["rps"] / d["rows"],
        )
    return result


def in_process_items(bs: int, requests: int) -> int:
    """Items per in-process throughput figure: 128 below batch 32, 256 from it (fewer only for runs of fewer requests)."""
    return min(128 if bs < 32 else 256, max(bs, requests))


def our_bodies(texts: list[str], model: str) -> list[bytes]:
    return [json.dumps({"model": model, "input": t, "encoding_format": "float"}).encode() for t in texts]


# -- the run ---------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--requests", type=int, default=int(os.environ.get("BENCH_REQUESTS", "1000")), help="requests per concurrency-64 figure"
    )
    ap.add_argument("--latency-requests", type=int, default=200, help="requests for the concurrency-1 figure")
    ap.add_argument("--load-requests", type=int, default=0, help="requests at concurrency 256 for the overload / memory test (0: skip)")
    ap.add_argument(
        "--peers",
        default=os.environ.get("BENCH_PEERS", ""),
        help="comma-separated: litserve, ray (installed into the benchmark's own venv)",
    )
    ap.add_argument("--runtime", default="torch")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds (each figure: the median)")
    args = ap.parse_args()
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEER_VERSIONS]
    if unknown:
        sys.exit(f"unknown peer(s) {unknown}; known: {', '.join(PEER_VERSIONS)}")

    texts = sentences(max(args.requests, args.latency_requests, 512))
    report: dict[str, Any] = {
        "settings": {
            "threads": THREADS,
            "max_batch_size": MAX_BATCH,
            "max_queue_delay_ms": DELAY_MS,
            "runtime": args.runtime,
            "requests": args.requests,
            "rounds": args.rounds,
        }
    }
    per_round_c64 = max(64, args.requests // args.rounds)
    per_round_c1 = max(10, args.latency_requests // args.rounds)
    settings = {"runtime": args.runtime, "threads": THREADS, "max_batch": MAX_BATCH, "delay_ms": DELAY_MS}
    # every server runs in a session of its own and is ended as a group however this run ends
    with tempfile.TemporaryDirectory() as tmpdir, Procs() as procs:
        tmp = Path(tmpdir)
        # everything is started first, then measured in interleaved rounds: on a shared
        # machine the load changes over minutes, and each figure is the median of its rounds
        print("in process ...", flush=True)
        local = InProcess(texts, args.runtime)
        print("modelpress serve ...", flush=True)
        proc, port = start_ours(args.runtime, tmp, procs, load_test=bool(args.load_requests))
        peer_ports = {}
        if peers:
            py = peer_python(peers)
            for peer in peers:
                print(f"{peer} ...", flush=True)
                _, peer_ports[peer] = start_peer(peer, py, settings, tmp, procs)
        ours_bodies = {m: our_bodies(texts, m) for m in ("minilm", "minilm-pad128")}
        peer_bodies = [json.dumps({"input": t}).encode() for t in texts]
        run_load(port, "/v1/embeddings", ours_bodies["minilm"][:64], 8)  # warm the connections and the model
        run_load(port, "/v1/embeddings", ours_bodies["minilm-pad128"][:64], 8)
        for pport in peer_ports.values():
            run_load(pport, "/predict", peer_bodies[:64], 8)
        rounds: list[dict[str, Any]] = []
        with load_section(f"{args.rounds} measurement rounds"):
            for r in range(args.rounds):
                print(f"round {r + 1}/{args.rounds}", flush=True)
                one: dict[str, Any] = {"in_process": {"latency_ms": percentiles(local.latency(per_round_c1))}}
                one["in_process"]["throughput"] = {bs: local.throughput(bs, in_process_items(bs, args.requests)) for bs in (1, 8, 32, 64)}
                one["c1"] = served(port, "minilm", ours_bodies["minilm"][:per_round_c1], 1)
                one["c64"] = served(port, "minilm", ours_bodies["minilm"][:per_round_c64], 64)
                one["c64_pad128"] = served(port, "minilm-pad128", ours_bodies["minilm-pad128"][:per_round_c64], 64)
                for peer, pport in peer_ports.items():
                    one[peer] = run_load(pport, "/predict", peer_bodies[:per_round_c64], 64)
                rounds.append(one)
        report["rounds"] = rounds
        if args.load_requests:
            with load_section(f"load test ({args.load_requests} requests at concurrency 256)"):
                run_load(port, "/v1/embeddings", our_bodies(texts[:256], "minilm-q128"), 64)
                before = rss_mb(proc.pid)
                many = [texts[i % len(texts)] for i in range(args.load_requests)]
                report["load_c256"] = run_load(port, "/v1/embeddings", our_bodies(many, "minilm-q128"), 256)
                report["load_c256"].update(rss_after_warmup_mb=before, rss_end_mb=rss_mb(proc.pid))
    report["load_average"] = LOAD_LOG
    summarize(report)
    out = Path(os.environ.get("BENCH_OUT", "out/bench"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(report, indent=2, default=str))
    return 0


def _median(rounds: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """A figure's median over the rounds (rps, p50, p99), with the status counts summed."""
    runs = [r[key] for r in rounds]
    statuses: Counter = Counter()
    for run in runs:
        statuses.update(run["statuses"])
    keys = [k for k in ("rps", "p50_ms", "p99_ms", "avg_batch", "model_rows_per_s", "model_busy") if all(k in run for run in runs)]
    return {k: float(np.median([run[k] for run in runs])) for k in keys} | {
        "statuses": dict(statuses),
        "requests": sum(run["requests"] for run in runs),
    }


def summarize(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    rounds = report["rounds"]
    lat_p50 = float(np.median([r["in_process"]["latency_ms"]["p50_ms"] for r in rounds]))
    lat_p99 = float(np.median([r["in_process"]["latency_ms"]["p99_ms"] for r in rounds]))
    thr = {bs: float(np.median([r["in_process"]["throughput"][bs] for r in rounds])) for bs in rounds[0]["in_process"]["throughput"]}
    best_bs = max(thr, key=thr.get)
    ours = {k: _median(rounds, k) for k in ("c1", "c64", "c64_pad128")}
    report["summary"] = {
        "in_process": {"latency_p50_ms": lat_p50, "latency_p99_ms": lat_p99, "throughput": thr, "best_batch": best_bs},
        **ours,
    }
    s = report["settings"]
    busy = busy_sections()
    marked = f"; MEASURED BESIDE OTHER LOAD, 1-min load average above 1 before: {', '.join(busy)}" if busy else ""
    table = Table(
        title=f"modelpress serve vs in process (MiniLM, {s['runtime']}, {THREADS} threads, STS-B sentences, "
        f"median of {len(rounds)} rounds){marked}",
        title_justify="left",
    )
    for col in ("what", "req/s", "p50 ms", "p99 ms", "statuses", "batch / model busy", "target"):
        table.add_column(col)
    table.add_row(f"in process, batch {best_bs} (best of 1/8/32/64)", f"{thr[best_bs]:.0f}", "", "", "", "", "")
    table.add_row("in process, batch 1", f"{thr[1]:.0f}", f"{lat_p50:.2f}", f"{lat_p99:.2f}", "", "", "")

    def row(name: str, r: dict[str, Any], target: str) -> None:
        busy = (
            f"{r['avg_batch']:.1f} rows, {r['model_busy']:.0%} ({r['model_rows_per_s']:.0f} rows/s in batches)" if "avg_batch" in r else ""
        )
        table.add_row(name, f"{r['rps']:.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", json.dumps(r["statuses"]), busy, target)

    row("served, concurrency 1", ours["c1"], f"p50 <= {lat_p50 + 1:.2f} ms: {'ok' if ours['c1']['p50_ms'] <= lat_p50 + 1 else 'MISSED'}")
    ratio = ours["c64"]["rps"] / thr[best_bs]
    row("served, concurrency 64", ours["c64"], f"{ratio:.2f}x in process (>= 0.9): {'ok' if ratio >= 0.9 else 'MISSED'}")
    bucket = ours["c64"]["rps"] / ours["c64_pad128"]["rps"]
    row(
        "served, c64, every batch padded to 128", ours["c64_pad128"], f"bucketing {bucket:.2f}x (>= 3): {'ok' if bucket >= 3 else 'MISSED'}"
    )
    for peer, need in (("litserve", 1.5), ("ray", 2.5)):
        if peer in rounds[0]:
            r = report["summary"][peer] = _median(rounds, peer)
            x = ours["c64"]["rps"] / r["rps"]
            p99 = "p99 ok" if ours["c64"]["p99_ms"] <= r["p99_ms"] else "p99 HIGHER"
            row(f"{peer}, concurrency 64", r, f"ours {x:.2f}x (>= {need}): {'ok' if x >= need else 'MISSED'}; {p99}")
    if "load_c256" in report:
        lt = report["load_c256"]
        grow = lt["rss_end_mb"] / lt["rss_after_warmup_mb"] - 1
        bad = sum(v for k, v in lt["statuses"].items() if int(k) >= 500)
        row(
            f"load, c256, {lt['requests']} requests, queue 128",
            lt,
            f"5xx: {bad}; RSS {lt['rss_after_warmup_mb']:.0f} -> {lt['rss_end_mb']:.0f} MB "
            f"({grow:+.1%}, within 5%: {'ok' if abs(grow) <= 0.05 else 'MISSED'})",
        )
    Console(width=260).print(table)


if __name__ == "__main__":
    sys.exit(main_guard(main))
