"""The runner in process, for the serving benchmark: in a process of its own, on a worker thread, as the servers run it.

Every server the benchmark measures runs its model in a process (and session) of its own, on a
worker thread; so does this reference. Measured on this project's 2-core machine beside other
work (load average 10-13), the same 2-thread runner in one process ran batch 1 at 223 ms p50
(96 CPU ms per call) on the main thread and at 15 ms (15 CPU ms) on a worker thread, and it stayed
several times slower on the main thread of the benchmark's own process for minutes; the cause
(the intra-op threads of the main thread's team waiting at each operator's barrier) was not pinned
down further, but a reference slower than the servers it is compared with is no reference.

The benchmark talks to it over stdin / stdout, one JSON line each way:
``{"op": "latency", "n": 66}`` -> per-call seconds at batch 1;
``{"op": "throughput", "bs": 32, "n": 256}`` -> rows/s and CPU ms per row (every thread of the process).

    python benchmarks/_inprocess.py --runtime torch --threads 2 --singles 66 < requests.jsonl
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def _process_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class InProcess:
    """The runner: batch-1 latency, and rows/s and CPU per row at a batch size, on real sentences."""

    def __init__(self, texts: list[str], runtime: str, threads: int, singles: int) -> None:
        import modelpress as mp

        art = mp.load("minilm")
        self.task = mp.task_for(art)
        self.runner = mp.create_runner(art, runtime, threads=threads).load()
        self.texts = texts
        self.singles = [self.task.preprocess([t]) for t in texts[:singles]]
        # every shape measured is run once first: the first run at a new sequence length is several times
        # slower (the kernels' first-time setup), and the servers are warmed before their rounds too
        for b in self.singles:
            self.runner.run(b)
        self.warm: set[tuple[int, int]] = set()

    def latency(self, n: int) -> list[float]:
        lat = []
        for b in self.singles[:n]:
            t0 = time.perf_counter()
            self.runner.run(b)
            lat.append(time.perf_counter() - t0)
        return lat

    def throughput(self, bs: int, n: int) -> dict[str, float]:
        """Rows/s and CPU ms per row (every thread of this process: torch's intra-op threads too)."""
        batches = [self.task.preprocess(self.texts[i : i + bs]) for i in range(0, max(n, bs), bs)]  # padded to each batch's longest
        if (bs, n) not in self.warm:
            self.warm.add((bs, n))
            for b in batches:
                self.runner.run(b)
        rows = sum(b["input_ids"].shape[0] for b in batches)
        cpu0, t0 = _process_cpu(), time.perf_counter()
        for b in batches:
            self.runner.run(b)
        wall, cpu = time.perf_counter() - t0, _process_cpu() - cpu0
        return {"rows_per_s": rows / wall, "cpu_ms_per_row": 1000 * cpu / rows}


class InProcessClient:
    """The benchmark's side: starts ``_inprocess.py`` through ``procs`` and asks it for figures."""

    def __init__(self, procs: Any, runtime: str, threads: int, singles: int, texts_n: int, env: dict[str, str]) -> None:
        cmd = [sys.executable, str(Path(__file__)), "--runtime", runtime, "--threads", str(threads)]
        cmd += ["--singles", str(singles), "--texts", str(texts_n)]
        self.proc = procs.popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)

    def _ask(self, **req: Any) -> Any:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the in-process runner exited with {self.proc.wait()} (its error is above)")
        return json.loads(line)

    def ready(self) -> None:
        self._ask(op="ping")

    def latency(self, n: int) -> list[float]:
        return self._ask(op="latency", n=n)

    def throughput(self, bs: int, n: int) -> dict[str, float]:
        return self._ask(op="throughput", bs=bs, n=n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", default="torch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--singles", type=int, default=200, help="batch-1 inputs to measure latency on (warmed first)")
    ap.add_argument("--texts", type=int, default=512, help="real sentences to batch")
    args = ap.parse_args()
    from modelpress.locations import find_data_dir
    from modelpress.tasks.text import real_sentences

    # the runner is built and run on one worker thread, as the servers run their models
    pool = ThreadPoolExecutor(1, thread_name_prefix="in-process")
    texts = real_sentences(args.texts, find_data_dir())
    local = pool.submit(InProcess, texts, args.runtime, args.threads, args.singles).result()
    out = sys.stdout
    sys.stdout = sys.stderr  # only the answers on stdout
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "latency":
            answer: Any = pool.submit(local.latency, req["n"]).result()
        elif req["op"] == "throughput":
            answer = pool.submit(local.throughput, req["bs"], req["n"]).result()
        else:
            answer = "ok"
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
