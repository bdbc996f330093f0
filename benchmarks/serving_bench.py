"""The model server against the same runner in process, a plain FastAPI batcher, LitServe and Ray Serve.

Workload: real STS-B dev sentences (the built-in list without the data folder), one sentence per
request, MiniLM on PyTorch fp32 eager, 2 threads (our server: its default layout on the same cores, one model
instance per core with one thread each; ``BENCH_OUR_THREADS``), max batch 32, 5 ms batch wait. Loopback only,
bounded request counts. Measured here, not quoted:

1. in process (``_inprocess.py``, in a process and session of its own, as the servers are):
   ``runner.run`` on batches of real sentences padded to each batch's longest (tokenization not
   timed), rows/s and CPU ms per row at batch 1/8/32/64, p50 at batch 1;
2. served, at concurrency 1, 8, 32 and 64 (``--concurrency``), OpenAI ``/v1/embeddings``:
   ``modelpress serve`` with length bucketing, the same with batches padded to their longest row
   in arrival order (``bucketing: false``), and at the top concurrency with every batch padded to
   128 tokens; the floor (``_floor_server.py``: plain FastAPI, a small asyncio batcher, the same
   runner and tokenization); ``--peers litserve,ray``: LitServe and Ray Serve running the same
   runner with the same batch settings, installed into the benchmark's own environment
   (``$MODELPRESS_BENCH_CACHE`` or ``~/.cache/modelpress-bench/peers``, never the project's);
3. for every served figure: req/s, p50/p99 and the CPU milliseconds per request of the server's
   whole process tree (every Ray process included), read from /proc before and after the window
   (``_cpu.py``), and the load generator's own CPU ms per request, to subtract;
4. ``--instances 1,2``: our server with 1 and 2 model instances (``threads`` each, default 1:
   one core per instance), at the top concurrency: how throughput grows with cores;
5. ``--load-requests N``: N requests at concurrency 256 against a model whose queue holds 128
   rows: status counts (429 expected, no 5xx) and the server's resident memory.

The load generator is ``_loadgen.py``'s asyncio client (why that one: its docstring), in this
process; its CPU is this thread's CPU time while it runs. Every server is started first; then
every (server, concurrency) is measured once per round, in ``--rounds`` interleaved rounds, and
each figure is the median of its rounds, because on a shared machine the load changes over
minutes. While one server (or the in-process reference) is measured, every other server's process
tree is held stopped (SIGSTOP; ``--no-pause`` leaves them running): idle peers are not idle. The CPU
flags and the load average are printed first; the table is printed as markdown (for docs/serving.md) and written with the JSON results
under ``$BENCH_OUT`` (default ``out/bench``).

    python benchmarks/serving_bench.py --quick                  # one short round: an A/B check in a minute or two
    python benchmarks/serving_bench.py --quick --servers ours,floor --concurrency 1,64
    python benchmarks/serving_bench.py --peers litserve,ray     # + peers (the first run installs them)
    python benchmarks/serving_bench.py --instances 1,2          # + scaling with model instances
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _cpu import Pauser, ProcessTree, seconds_between
from _inprocess import InProcessClient
from _loadgen import free_port, percentiles, run_load
from _peers import PEER_VERSIONS, SERVER_ENV, peer_python, start_peer
from _procs import LOAD_LOG, Procs, load1, load_section, main_guard, wait_ready
from _serving_report import summarize, write_results

THREADS = int(os.environ.get("BENCH_THREADS", "2"))  # the floor's, the peers' and the in-process runner's threads
# our server's threads per model instance; 0: its default layout (one instance per core, one thread each: on 2 cores
# 2 x 1, the same 2 cores as the others' one worker x 2 threads); --instances 1,2 measures other layouts beside it
OUR_THREADS = int(os.environ.get("BENCH_OUR_THREADS", "0"))
MAX_BATCH = 32
DELAY_MS = 5.0
CONCURRENCIES = (1, 8, 32, 64)
IN_PROCESS_BATCHES = (1, 8, 32, 64)
QUICK = {"requests": 192, "latency_requests": 24, "rounds": 1}  # --quick: a short A/B check (figures within ~10%, not for docs)
ROOT = Path(__file__).resolve().parent.parent
# --servers: ours (bucketing), ours padded to each batch's longest / to 128 tokens, the floor; pad128 only when asked
# (no peer pads to 128, and it is the slowest figure)
SERVERS = ("ours", "longest", "pad128", "floor")
DEFAULT_SERVERS = ("ours", "longest", "floor")


# -- workload ------------------------------------------------------------------------------
def sentences(n: int) -> list[str]:
    from modelpress.locations import find_data_dir
    from modelpress.tasks.text import real_sentences

    return real_sentences(n, find_data_dir())


def in_process_items(bs: int, requests: int) -> int:
    """Items per in-process throughput figure: 128 below batch 32, 256 from it (fewer only for runs of fewer requests)."""
    return min(128 if bs < 32 else 256, max(bs, requests))


# -- servers ---------------------------------------------------------------------------------------
@dataclass
class Target:
    """One thing to measure: a server (its process tree), the route and bodies it takes, at which concurrencies."""

    name: str
    port: int
    path: str
    bodies: list[bytes]
    tree: ProcessTree
    concurrencies: tuple[int, ...]
    metrics_model: str | None = None  # our server: the model whose /metrics batch histograms to read
    info: dict[str, Any] = field(default_factory=dict)


def rss_mb(pid: int) -> float:
    import psutil

    p = psutil.Process(pid)
    return sum(c.memory_info().rss for c in [p, *p.children(recursive=True)]) / 2**20


def our_model(name: str, runtime: str, threads: int, **batching: Any) -> dict[str, Any]:
    """One model of our server's config; ``threads`` 0: the server's default (its cores divided among the instances)."""
    model: dict[str, Any] = {"source": "minilm", "name": name, "runtime": runtime}
    model["batching"] = {"max_batch_size": MAX_BATCH, "max_queue_delay_ms": DELAY_MS, **batching}
    if threads:
        model["threads"] = threads
    return model


def start_ours(models: list[dict[str, Any]], tmp: Path, procs: Procs, mark: str) -> tuple[subprocess.Popen, int]:
    """``modelpress serve`` with ``models``, in its own process (marked ``SERVER_ENV=mark``)."""
    port = free_port()
    cfg = tmp / f"serve-{mark}.json"
    cfg.write_text(json.dumps({"models": models, "access_log": False, "log_level": "warning"}))
    serve = "from modelpress.cli import main; main()"  # the `modelpress` command of this environment
    cmd = [sys.executable, "-c", serve, "serve", "--config", str(cfg), "--port", str(port), "--log-level", "warning"]
    proc = procs.popen(cmd, env={SERVER_ENV: mark})
    wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc)
    return proc, port


def start_floor(runtime: str, tmp: Path, procs: Procs, extra_env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    log = tmp / "floor.log"
    cmd = [sys.executable, str(Path(__file__).with_name("_floor_server.py")), str(port), "--runtime", runtime]
    cmd += ["--threads", str(THREADS), "--max-batch", str(MAX_BATCH), "--delay-ms", str(DELAY_MS)]
    with open(log, "wb") as out:
        proc = procs.popen(cmd, env={**extra_env, SERVER_ENV: "floor"}, stdout=out, stderr=subprocess.STDOUT)
    wait_ready(f"http://127.0.0.1:{port}/health", proc, log=log)
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


def measure(t: Target, bodies: list[bytes], concurrency: int) -> dict[str, Any]:
    """One load run: req/s, p50/p99, statuses, the server tree's and the load generator's CPU ms per request,
    and for our server what its metrics say about the batches (mean size, the model's rows/s, how busy it was)."""
    before = t.tree.settle()  # the server is quiet (what a previous run set off is done)
    stats0 = batch_stats(t.port, t.metrics_model) if t.metrics_model else None
    result = run_load(t.port, t.path, bodies, concurrency)
    after = t.tree.settle()
    sent = max(result["sent"], 1)
    result["server_cpu_ms"] = 1000 * seconds_between(before, after) / sent
    result["loadgen_cpu_ms"] = 1000 * result.pop("cpu_s") / sent
    result["server_processes"] = len(after)
    if stats0 is not None and t.metrics_model:
        stats1 = batch_stats(t.port, t.metrics_model)
        d = {k: stats1[k] - stats0[k] for k in stats1}
        if d["batches"] and d["seconds"]:
            # rows per second while a batch ran: the model's own speed under the same machine load,
            # and the fraction of the wall time the model was busy (1.0: nothing but the model limits)
            result.update(
                avg_batch=d["rows"] / d["batches"],
                model_rows_per_s=d["rows"] / d["seconds"],
                model_busy=min(1.0, d["seconds"] * result["rps"] / d["rows"]),
            )
    return result


def cell_requests(concurrency: int, args: argparse.Namespace) -> int:
    if concurrency == 1:
        return max(10, args.latency_requests // args.rounds)
    return max(2 * concurrency, args.requests // args.rounds)


def lscpu() -> dict[str, Any]:
    """The CPU and the flags that matter for inference, from lscpu (``/proc/cpuinfo`` where lscpu is missing)."""
    from modelpress.bench.measure import machine_info

    info = machine_info()
    if shutil.which("lscpu"):
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        fields = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines()) if v}
        simd = ("avx", "fma", "f16c", "amx", "vnni", "bf16", "fp16", "sse4")
        info["flags"] = [f for f in fields.get("Flags", "").split() if f.startswith(simd) or any(s in f for s in ("vnni", "bf16", "amx"))]
        info["cpu"] = fields.get("Model name", info.get("cpu"))
    return info


# -- the run ---------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=None, help="requests per figure at concurrency > 1, over all rounds (default 1000)")
    ap.add_argument(
        "--latency-requests", type=int, default=None, help="requests per figure at concurrency 1, over all rounds (default 200)"
    )
    ap.add_argument("--rounds", type=int, default=None, help="interleaved measurement rounds; each figure is the median (default 3)")
    ap.add_argument("--quick", action="store_true", help=f"a short development run: {QUICK} unless given")
    ap.add_argument("--concurrency", default=",".join(map(str, CONCURRENCIES)), help="comma-separated client concurrencies")
    ap.add_argument("--servers", default=",".join(DEFAULT_SERVERS), help=f"comma-separated, of: {', '.join(SERVERS)} (peers: --peers)")
    ap.add_argument("--peers", default=os.environ.get("BENCH_PEERS", ""), help="comma-separated: litserve, ray (their own venv)")
    ap.add_argument(
        "--instances", default="", help="comma-separated model instance counts for our server, e.g. 1,2 (at the top concurrency)"
    )
    ap.add_argument(
        "--instance-threads",
        type=int,
        default=1,
        help="torch threads per instance in the --instances runs (default 1: N instances use N cores; 0: the server's default)",
    )
    ap.add_argument(
        "--others-env",
        action="append",
        default=[],
        metavar="VAR=VALUE",
        help="environment for the floor, the peers and the in-process reference, e.g. OMP_WAIT_POLICY=PASSIVE as our server "
        "sets for itself (default: each as its users run it)",
    )
    ap.add_argument("--load-requests", type=int, default=0, help="requests at concurrency 256 for the overload / memory test (0: skip)")
    ap.add_argument("--runtime", default="torch")
    ap.add_argument(
        "--no-pause",
        dest="pause",
        action="store_false",
        help="leave every server running while another is measured (default: the others are held stopped with SIGSTOP)",
    )
    args = ap.parse_args()
    defaults = QUICK if args.quick else {"requests": int(os.environ.get("BENCH_REQUESTS", "1000")), "latency_requests": 200, "rounds": 3}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    args.instances = sorted({int(n) for n in args.instances.split(",") if n.strip()})
    if bad := [e for e in args.others_env if "=" not in e]:
        sys.exit(f"--others-env takes VAR=VALUE, not {bad}; example: --others-env OMP_WAIT_POLICY=PASSIVE")
    args.others_env = dict(e.split("=", 1) for e in args.others_env)
    for what, got, known in (("server", args.servers, SERVERS), ("peer", args.peers, tuple(PEER_VERSIONS))):
        if unknown := [x for x in got if x not in known]:
            sys.exit(f"unknown {what}(s) {unknown}; known: {', '.join(known)}. Example: --servers ours,floor --peers litserve")
    if not args.concurrency or min(args.concurrency) < 1 or (args.instances and min(args.instances) < 1):
        sys.exit("--concurrency and --instances take positive integers, e.g. --concurrency 1,8,32,64 --instances 1,2")
    return args


def main() -> int:
    args = parse_args()
    machine = lscpu()
    print(f"CPU: {machine.get('cpu')}, {machine.get('cores')} cores; flags: {' '.join(machine.get('flags', []))}")
    print(f"load average before the run: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    top = max(args.concurrency)
    texts = sentences(max(args.requests, args.latency_requests, 512))
    report: dict[str, Any] = {
        "settings": {
            "threads": THREADS,
            "our_threads_per_instance": OUR_THREADS or "the server's default (one instance per core, one thread each)",
            "max_batch_size": MAX_BATCH,
            "max_queue_delay_ms": DELAY_MS,
            "runtime": args.runtime,
            "requests": args.requests,
            "latency_requests": args.latency_requests,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "quick": args.quick,
            "others_env": args.others_env,
            "pause_others": args.pause,
            "command": " ".join(["python", "benchmarks/serving_bench.py", *sys.argv[1:]]),
        },
        "machine": machine,
        "load_average_before": os.getloadavg(),
    }
    settings = {"runtime": args.runtime, "threads": THREADS, "max_batch": MAX_BATCH, "delay_ms": DELAY_MS}
    # every server runs in a session of its own and is ended as a group however this run ends
    with tempfile.TemporaryDirectory() as tmpdir, Procs() as procs:
        tmp = Path(tmpdir)
        # everything is started first, then measured in interleaved rounds: on a shared
        # machine the load changes over minutes, and each figure is the median of its rounds
        print("in process ...", flush=True)
        env = {**args.others_env, SERVER_ENV: "in-process"}
        local = InProcessClient(procs, args.runtime, THREADS, cell_requests(1, args), len(texts), env)
        local.ready()
        targets = start_all(args, settings, texts, tmp, procs)
        print("warming every server with the requests of a round ...", flush=True)
        for t in targets:  # a new batch shape runs several times slower the first time: every server sees a round's first
            for c in sorted({1, max(t.concurrencies)}):
                run_load(t.port, t.path, [t.bodies[i % len(t.bodies)] for i in range(cell_requests(c, args))], c)
        rounds: list[dict[str, Any]] = []
        # every server but the one measured is held stopped (SIGSTOP of its whole tree), the servers too while the
        # in-process reference runs: an idle server is not idle (Ray Serve's daemons took the reference from 288 to
        # 210 rows/s on 2 cores, docs/serving.md run 4); --no-pause measures with everything running
        pauser = Pauser([t.tree for t in targets], enabled=args.pause)
        with load_section(f"{args.rounds} measurement rounds"), pauser.holding():
            for r in range(args.rounds):
                print(f"round {r + 1}/{args.rounds} (1-min load average {load1():.2f})", flush=True)
                pauser.only(None)
                one: dict[str, Any] = {"in_process": {"latency_ms": percentiles(local.latency(cell_requests(1, args)))}}
                one["in_process"]["throughput"] = {
                    bs: local.throughput(bs, in_process_items(bs, args.requests)) for bs in IN_PROCESS_BATCHES
                }
                for t in targets:
                    pauser.only(t.tree)
                    for c in t.concurrencies:
                        n = cell_requests(c, args)
                        one[f"{t.name}@{c}"] = measure(t, [t.bodies[i % len(t.bodies)] for i in range(n)], c)
                rounds.append(one)
        report["rounds"] = rounds
        report["targets"] = {t.name: {"concurrency": list(t.concurrencies), **t.info} for t in targets}
        if args.load_requests:
            ours = next(t for t in targets if t.name == "ours")
            with load_section(f"load test ({args.load_requests} requests at concurrency 256)"):
                run_load(ours.port, "/v1/embeddings", our_bodies(texts[:256], "minilm-q128"), 64)
                pid = ours.tree.root
                before = rss_mb(pid)
                many = [texts[i % len(texts)] for i in range(args.load_requests)]
                report["load_c256"] = run_load(ours.port, "/v1/embeddings", our_bodies(many, "minilm-q128"), 256)
                report["load_c256"].update(rss_after_warmup_mb=before, rss_end_mb=rss_mb(pid))
    report["load_average"] = LOAD_LOG
    markdown = summarize(report, top)
    out = Path(os.environ.get("BENCH_OUT", "out/bench"))
    write_results(out, report, markdown)
    print(f"results: {out / 'serving.json'}, {out / 'serving.md'}")
    return 0


def our_bodies(texts: list[str], model: str) -> list[bytes]:
    return [json.dumps({"model": model, "input": t, "encoding_format": "float"}).encode() for t in texts]


def start_all(args: argparse.Namespace, settings: dict[str, Any], texts: list[str], tmp: Path, procs: Procs) -> list[Target]:
    """Start every server to measure; one Target per (server, model)."""
    top = max(args.concurrency)
    conc = tuple(args.concurrency)
    targets: list[Target] = []
    ours_wanted = [s for s in args.servers if s != "floor"] or (["ours"] if args.load_requests or args.instances else [])
    if ours_wanted or args.load_requests:
        print("modelpress serve ...", flush=True)
        models = [our_model("minilm", args.runtime, OUR_THREADS)]
        if "longest" in ours_wanted:
            models.append(our_model("minilm-longest", args.runtime, OUR_THREADS, bucketing=False))
        if "pad128" in ours_wanted:
            models.append(our_model("minilm-pad128", args.runtime, OUR_THREADS, bucketing=False, pad_to_length=128))
        if args.load_requests:  # the overload test's model: a queue of 128 rows
            models.append(our_model("minilm-q128", args.runtime, OUR_THREADS, max_queue_size=128))
        proc, port = start_ours(models, tmp, procs, "ours")
        tree = ProcessTree(proc.pid, (SERVER_ENV, "ours"))
        for name, model, cs in (("ours", "minilm", conc), ("longest", "minilm-longest", conc), ("pad128", "minilm-pad128", (top,))):
            if name in ours_wanted or name == "ours":  # ours: the figure every other one is compared with
                targets.append(Target(name, port, "/v1/embeddings", our_bodies(texts, model), tree, cs, metrics_model=model))
    if "floor" in args.servers:
        print("floor (plain FastAPI batcher) ...", flush=True)
        proc, port = start_floor(args.runtime, tmp, procs, args.others_env)
        bodies = our_bodies(texts, "minilm")
        targets.append(Target("floor", port, "/v1/embeddings", bodies, ProcessTree(proc.pid, (SERVER_ENV, "floor")), conc))
    if args.peers:
        py = peer_python(args.peers)
        peer_bodies = [json.dumps({"input": t}).encode() for t in texts]
        for peer in args.peers:
            print(f"{peer} ...", flush=True)
            proc, port = start_peer(peer, py, settings, tmp, procs, args.others_env)
            targets.append(Target(peer, port, "/predict", peer_bodies, ProcessTree(proc.pid, (SERVER_ENV, peer)), conc))
    for n in args.instances:
        # each count in a server of its own: torch's thread settings are per process
        print(f"modelpress serve, {n} instance(s) x {args.instance_threads} thread(s) ...", flush=True)
        model = our_model("minilm", args.runtime, args.instance_threads, **instances_setting(n))
        proc, port = start_ours([model], tmp, procs, f"instances-{n}")
        name = f"instances-{n}"
        tree = ProcessTree(proc.pid, (SERVER_ENV, name))
        info = {"instances": n, "threads_per_instance": args.instance_threads}
        targets.append(Target(name, port, "/v1/embeddings", our_bodies(texts, "minilm"), tree, (top,), metrics_model="minilm", info=info))
    return targets


def instances_setting(n: int) -> dict[str, Any]:
    """The batching key that sets how many model instances run batches at once (``BatchConfig.instances``)."""
    from modelpress.serving.config import BatchConfig

    if "instances" not in BatchConfig.model_fields:
        sys.exit("--instances needs server support: modelpress.serving.config.BatchConfig has no 'instances' setting in this version")
    return {"instances": n}


if __name__ == "__main__":
    sys.exit(main_guard(main))
