"""Speed, memory and size of one runner, measured the same way for every backend.

* latency: batch 1 on real short inputs (a different real sentence or image each call),
  p50/p90/p99 in milliseconds; preprocessing (tokenization) is not timed;
* throughput: items per second at each batch size (and, for text, each sequence length);
* memory: peak resident set size sampled during the run, and its rise over the size before
  the model was loaded;
* size: bytes on disk of the artifact the runner loaded.

Warm-up calls are excluded. Each figure is measured for at least ``seconds`` and
``min_iters`` calls.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.errors import ConfigError


LATENCY_WARMUP_INPUTS = 16  # distinct real inputs run once before latency is timed


@dataclass
class BenchConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    seq_lens: list[int] = field(default_factory=lambda: [16, 128])  # text tasks only
    latency_calls: int = 100  # at most; bounded by ``seconds`` too
    seconds: float = 2.0  # time per figure
    min_iters: int = 3
    warmup: int = 2

    def __post_init__(self) -> None:
        for name in ("batch_sizes", "seq_lens"):
            values = getattr(self, name)
            if not values or any((not isinstance(v, int)) or v < 1 for v in values):
                raise ConfigError(f"{name} must be positive integers, got {values!r}.", hint=f"Example: {name}=[1, 8, 32]")
        if self.seconds <= 0:
            raise ConfigError(f"seconds must be positive, got {self.seconds}.", hint="Example: seconds=2.0")


def machine_info() -> dict[str, Any]:
    """CPU model, the instruction-set flags that matter for inference, cores, memory."""
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        flags_line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
        flags = set(flags_line.split(":", 1)[1].split()) if flags_line else set()
        wanted = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "avx_vnni"]
        info["flags"] = [f for f in wanted if f in flags]
    except OSError:
        info["cpu"] = platform.processor()
        info["flags"] = []
    info["cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover
        pass
    return info


class RSSSampler:
    """Samples this process's resident memory in a thread; ``peak`` after ``stop()``."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.start_rss = self._proc.memory_info().rss
        self.peak = self.start_rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RSSSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _timed(fn: Callable[[], Any], cfg: BenchConfig, max_calls: int | None = None, warmup: int | None = None) -> list[float]:
    for _ in range(cfg.warmup if warmup is None else warmup):
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + cfg.seconds
    while len(times) < cfg.min_iters or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if max_calls is not None and len(times) >= max_calls:
            break
    return times


def percentiles(times_s: list[float]) -> dict[str, float]:
    ms = np.asarray(times_s) * 1000.0
    return {
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
        "calls": len(ms),
    }


def bench_runner(
    runner: Any, task: Any, cfg: BenchConfig | None = None, *, data_dir: Path | None = None, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Measure one runner; returns latency, throughput, memory and size as a dict."""
    cfg = cfg or BenchConfig()
    say = progress or (lambda _msg: None)
    with RSSSampler() as rss:
        t0 = time.perf_counter()
        runner.load()
        load_s = time.perf_counter() - t0
        say("latency")
        singles = [task.preprocess([x]) for x in task.sample_raw(min(cfg.latency_calls, 64), data_dir)]
        i = 0

        def one() -> None:
            nonlocal i
            runner.run(singles[i % len(singles)])
            i += 1

        # Warm up on several different inputs, not only two: a compiled runner (torch.compile) may
        # build a graph per new input shape at first, and that belongs to warm-up, not latency.
        latency = percentiles(_timed(one, cfg, cfg.latency_calls, warmup=max(cfg.warmup, min(len(singles), LATENCY_WARMUP_INPUTS))))
        throughput = []
        seq_lens: list[int | None] = list(cfg.seq_lens) if task.uses_tokenizer() else [None]
        for seq in seq_lens:
            for bs in cfg.batch_sizes:
                say(f"throughput batch {bs}" + (f" x {seq} tokens" if seq else ""))
                batch = task.sample_inputs(bs, seq_len=seq, data_dir=data_dir)
                times = _timed(lambda b=batch: runner.run(b), cfg)
                throughput.append({"batch": bs, "seq_len": seq, "items_per_s": bs / float(np.median(times)), "calls": len(times)})
    loaded = getattr(runner, "loaded_artifact", None) or runner.artifact
    return {
        "model": runner.artifact.name,
        **runner.describe(),
        "load_s": load_s,
        "latency_ms": latency,
        "throughput": throughput,
        "memory_mb": {"peak_rss": rss.peak / 2**20, "rise": (rss.peak - rss.start_rss) / 2**20},
        "size_bytes": loaded.size_bytes(),
        "config": asdict(cfg),
    }


def ratios(result: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Every figure of ``result`` against ``baseline`` as a speed-up (higher is faster) or a fraction."""
    lat = {k: baseline["latency_ms"][k] / result["latency_ms"][k] for k in ("p50", "p90", "p99", "mean") if result["latency_ms"][k] > 0}
    base_thr = {(t["batch"], t["seq_len"]): t["items_per_s"] for t in baseline["throughput"]}
    thr = [
        {"batch": t["batch"], "seq_len": t["seq_len"], "speedup": t["items_per_s"] / base_thr[(t["batch"], t["seq_len"])]}
        for t in result["throughput"]
        if (t["batch"], t["seq_len"]) in base_thr
    ]
    return {
        "latency_speedup": lat,
        "throughput_speedup": thr,
        "memory_fraction": result["memory_mb"]["rise"] / baseline["memory_mb"]["rise"] if baseline["memory_mb"]["rise"] > 0 else None,
        "size_fraction": result["size_bytes"] / baseline["size_bytes"] if baseline["size_bytes"] else None,
    }
