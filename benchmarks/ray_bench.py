"""The model server on Ray Serve: throughput with 1 and 2 replicas, and Ray's overhead against our own server.

Workload: real sentences (STS-B dev, else the built-in list), one per request, OpenAI
``/v1/embeddings``, MiniLM on PyTorch fp32, max batch 32, 5 ms batch wait: the same model and
batch settings everywhere. The CPU cores are shared the same way in each setup:

* ``modelpress serve`` (local backend): one process, one runner with ``THREADS`` threads;
* Ray, 1 replica: the same server as the ingress, one replica with ``THREADS`` threads;
* Ray, 2 replicas: two replicas with ``THREADS / 2`` threads each (the same cores, two batchers).

Each setup is started, warmed up, measured in ``--rounds`` rounds of ``--requests`` requests at
``--concurrency`` (the median round is reported), then stopped. Ray runs in this process's own
network and PID namespaces (``unshare -rnp``, loopback only) when they are permitted: Ray binds
some services to the host's interface, and every process it starts ends with the namespace.

    python benchmarks/ray_bench.py                                  # a few minutes
    python benchmarks/ray_bench.py --requests 100 --rounds 1        # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from _loadgen import free_port, run_load
from _procs import Procs, load_section, main_guard, wait_ready

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
MAX_BATCH = 32
DELAY_MS = 5.0
INSIDE_ENV = "MODELPRESS_RAY_BENCH_NAMESPACE"  # set when this script runs inside the namespace it made


def sentences(n: int) -> list[str]:
    from modelpress.locations import find_data_dir
    from modelpress.tasks.text import real_sentences

    return real_sentences(n, find_data_dir())


def bodies(n: int) -> list[bytes]:
    return [json.dumps({"model": "minilm", "input": s}).encode() for s in sentences(n)]


def measure(port: int, args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, then the median of ``args.rounds`` rounds (by requests per second)."""
    run_load(port, "/v1/embeddings", bodies(min(64, args.requests)), args.concurrency)
    rounds = [run_load(port, "/v1/embeddings", bodies(args.requests), args.concurrency) for _ in range(args.rounds)]
    rounds.sort(key=lambda r: r["rps"])
    mid = rounds[len(rounds) // 2]
    return {**mid, "rounds_rps": [round(r["rps"], 1) for r in rounds]}


def local_server(args: argparse.Namespace, procs: Procs, tmp: Path) -> dict[str, Any]:
    port = free_port()
    log = tmp / "local.log"
    cmd = [str(Path(sys.executable).with_name("modelpress")), "serve", "minilm", "--port", str(port), "--threads", str(THREADS)]
    cmd += ["--max-batch-size", str(MAX_BATCH), "--max-queue-delay-ms", str(DELAY_MS), "--log-level", "warning"]
    with log.open("w") as out:
        proc = procs.popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc, log=log)
        with load_section("modelpress serve (local)"):
            return measure(port, args)
    finally:
        procs.stop(proc)


def ray_service(replicas: int, port: int, args: argparse.Namespace) -> dict[str, Any]:
    from modelpress.scaleout.ray_serve import RayOptions, deploy
    from modelpress.serving.config import ServerConfig

    config = ServerConfig.from_models(["minilm"], max_batch_size=MAX_BATCH, max_queue_delay_ms=DELAY_MS)
    config = config.model_copy(update={"port": port, "log_level": "warning", "access_log": False})
    options = RayOptions(
        min_replicas=replicas,
        max_replicas=replicas,
        replica_cpus=max(1, THREADS // replicas),  # the same cores in every setup: threads per replica
        ingress_cpus=0,  # logical: the ingress shares the cores, as the local server's event loop does
        proxy_location="HeadOnly",
    )
    with deploy(config, options), load_section(f"Ray Serve, {replicas} replica(s)"):
        return measure(port, args)


def inside(args: argparse.Namespace) -> int:
    import tempfile

    import ray

    results: dict[str, dict[str, Any]] = {}
    with Procs() as procs, tempfile.TemporaryDirectory(prefix="mprayb") as tmp:
        results["modelpress serve (local)"] = local_server(args, procs, Path(tmp))
        ray.init(address="local", num_cpus=THREADS, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            port = free_port()  # Serve's proxies keep the port of the first deployment on a cluster
            for n in (1, 2):
                results[f"Ray Serve, {n} replica{'s' * (n > 1)}"] = ray_service(n, port, args)
        finally:
            ray.shutdown()
    base = results["modelpress serve (local)"]
    print(f"\n{'setup':<28} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs local':>9}  statuses")
    for name, r in results.items():
        ratio = r["rps"] / base["rps"] if base["rps"] else float("nan")
        print(f"{name:<28} {r['rps']:>8.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {ratio:>8.2f}x  {r['statuses']}")
    one, two = results["Ray Serve, 1 replica"], results["Ray Serve, 2 replicas"]
    print(
        f"\n2 replicas / 1 replica: {two['rps'] / one['rps']:.2f}x throughput; Ray at 1 replica against the local server: "
        f"{one['rps'] / base['rps']:.2f}x throughput, p50 {one['p50_ms'] - base['p50_ms']:+.1f} ms "
        f"(concurrency {args.concurrency}, {args.requests} requests x {args.rounds} rounds, median round)"
    )
    bad = {name: r["statuses"] for name, r in results.items() if set(r["statuses"]) != {200}}
    if bad:
        print(f"requests that did not answer 200: {bad}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    if os.environ.get(INSIDE_ENV):
        return inside(args)
    from modelpress.bench.measure import machine_info

    info = machine_info()
    print(f"1-min load average {os.getloadavg()[0]:.2f}; CPU: {info.get('cpu')}; flags: {' '.join(info['flags']) or 'none listed'}")
    print(f"{info['cores']} cores, {THREADS} threads per setup; MiniLM fp32 on torch, max batch {MAX_BATCH}, {DELAY_MS:g} ms wait")
    try:
        import ray  # noqa: F401
    except ImportError:
        print("ray is not installed: pip install 'modelpress[ray]' (skipped)")
        return 0
    env = {**os.environ, INSIDE_ENV: "1"}
    if shutil.which("unshare") and shutil.which("ip"):
        probe = subprocess.run(["unshare", "-rnp", "--fork", "--mount-proc", "true"], capture_output=True)
        if probe.returncode == 0:
            script = f'ip link set lo up && exec "{sys.executable}" "{Path(__file__).resolve()}" "$@"'
            ns = ["unshare", "-rnp", "--fork", "--mount-proc", "sh", "-c", script, "ray_bench", *sys.argv[1:]]
            return subprocess.run(ns, env=env).returncode
    print("network namespaces are not permitted here: Ray runs on the host's network (it may bind to its interface address)")
    return subprocess.run([sys.executable, __file__, *sys.argv[1:]], env=env).returncode


if __name__ == "__main__":
    sys.exit(main_guard(main))
