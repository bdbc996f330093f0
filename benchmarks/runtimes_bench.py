"""The bundled MiniLM on every runtime, side by side in one run, against PyTorch fp32 eager.

Settings of ../shared/PEERS.md: 2 threads, batch 32 padded to 128 tokens (plus batch 1 latency
on real STS-B sentences), tokenization not timed. Prints ratios to the baseline.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from _procs import LOAD_LOG, load_section
from rich.console import Console

import modelpress as mp
from modelpress.bench.measure import BenchConfig, bench_runner, machine_info, ratios
from modelpress.bench.report import bench_table
from modelpress.locations import find_data_dir

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))

CONFIGS = [
    ("torch", {}),  # the baseline: PyTorch fp32 eager
    ("torch", {"compile": True}),
    ("onnxruntime", {}),
    ("openvino", {"precision": "f32"}),
    ("openvino", {"precision": "bf16"}),
]


def main() -> int:
    art = mp.load("minilm")
    task = mp.task_for(art)
    cfg = BenchConfig(batch_sizes=[1, 32], seq_lens=[128], seconds=SECONDS)
    results = []
    for runtime, options in CONFIGS:
        label = runtime + "".join(f" {k}={v}" for k, v in options.items())
        runner = mp.create_runner(art, runtime, threads=THREADS, **options)
        with load_section(label):
            res = bench_runner(runner, task, cfg, data_dir=find_data_dir())
        res["runtime"] = label
        results.append(res)
    report = {
        "machine": machine_info(),
        "results": results,
        "baseline_index": 0,
        "load_average": LOAD_LOG,
        "ratios": {str(i): ratios(r, results[0]) for i, r in enumerate(results) if i},
    }
    Console(width=200).print(bench_table(report))
    out = Path(os.environ.get("BENCH_OUT", "out/bench"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtimes.json").write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
