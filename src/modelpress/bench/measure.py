"""Speed, memory and size of runners: the one timing every verb that prints a speed-up uses.

:func:`time_interleaved` times a baseline and its variants in one process, in interleaved
rounds (ABBA order), so a busy machine slows a round of every model alike; each figure is the
median over rounds, with its spread. On top of it:

* :func:`bench_runner` / :func:`bench_runners` (``modelpress bench``): the full report of one
  runner, or of several side by side, with :func:`ratios` to a baseline;
* :func:`compare_speed` (``prune``, ``distill``, ``prune-structured``, recipe steps, ``tune``):
  a variant against its original, the speed record stored in the manifest (``metrics.speed``).

Figures:

* latency: batch 1 on real short inputs (a different real sentence or image each call),
  p50/p90/p99 in milliseconds over every call; preprocessing (tokenization) is not timed;
* throughput: items per second at each batch size (and, for text, each sequence length);
* memory: peak resident set size while the runner loads and warms up, and its rise over the
  size before it was loaded;
* size: bytes on disk of the artifact the runner loaded.

Warm-up calls are excluded. Each figure is measured for ``seconds`` in all (spread over the
rounds) and at least ``min_iters`` calls per round.
"""

from __future__ import annotations

import functools
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.errors import ConfigError

LATENCY_WARMUP_INPUTS = 16  # distinct real inputs run once before latency is timed
SPEED_ROUNDS = 5  # interleaved rounds of a variant against its original (prune, distill, recipes, tune)


@dataclass
class BenchConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    seq_lens: list[int] = field(default_factory=lambda: [16, 128])  # text tasks only
    latency_calls: int = 100  # at most; bounded by ``seconds`` too
    seconds: float = 2.0  # time per figure
    min_iters: int = 3  # per figure per round
    warmup: int = 2
    rounds: int = 3  # interleaved rounds: ``seconds`` per figure is spread over them

    def __post_init__(self) -> None:
        for name in ("batch_sizes", "seq_lens"):
            values = getattr(self, name)
            if not values or any((not isinstance(v, int)) or v < 1 for v in values):
                raise ConfigError(f"{name} must be positive integers, got {values!r}.", hint=f"Example: {name}=[1, 8, 32]")
        if self.seconds <= 0:
            raise ConfigError(f"seconds must be positive, got {self.seconds}.", hint="Example: seconds=2.0")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {self.rounds}.", hint="Example: rounds=5")


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


def _timed(fn: Callable[[], Any], seconds: float, min_iters: int, max_calls: int | None = None) -> list[float]:
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_iters or time.perf_counter() < deadline:
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


def _median(xs: list[float]) -> float:
    return float(np.median(xs))


def _spread(xs: list[float]) -> list[float]:
    return [float(min(xs)), float(max(xs))]


@dataclass
class _Entry:
    """One runner being timed: its calls per round, per figure."""

    runner: Any
    singles: list[dict[str, np.ndarray]]
    batches: dict[tuple[int, int | None], dict[str, np.ndarray]]
    load_s: float = 0.0
    memory: dict[str, float] = field(default_factory=dict)
    latency: list[list[float]] = field(default_factory=list)  # per round: batch-1 call times
    throughput: dict[tuple[int, int | None], list[float]] = field(default_factory=dict)  # per figure: items/s per round
    calls: dict[tuple[int, int | None], int] = field(default_factory=dict)


def _inputs(
    task: Any, cfg: BenchConfig, data_dir: Path | None, latency: bool
) -> tuple[list[dict[str, np.ndarray]], dict[tuple[int, int | None], dict[str, np.ndarray]]]:
    """Batch-1 inputs for latency (real samples) and one batch per throughput figure."""
    singles = [task.preprocess([x]) for x in task.sample_raw(min(cfg.latency_calls, 64), data_dir)] if latency else []
    seqs: list[int | None] = list(cfg.seq_lens) if task.uses_tokenizer() else [None]
    batches = {(bs, seq): task.sample_inputs(bs, seq_len=seq, data_dir=data_dir) for seq in seqs for bs in cfg.batch_sizes}
    return singles, batches


def _one_round(entry: _Entry, seconds: float, min_iters: int, lat_calls: int) -> None:
    """One round of one runner: its latency calls, then each throughput figure."""
    run, singles = entry.runner.run, entry.singles
    if singles:
        i = 0

        def one() -> None:
            nonlocal i
            run(singles[i % len(singles)])
            i += 1

        entry.latency.append(_timed(one, seconds, min_iters, lat_calls))
    for (bs, seq), b in entry.batches.items():
        times = _timed(functools.partial(run, b), seconds, min_iters)
        entry.throughput.setdefault((bs, seq), []).append(bs / _median(times))
        entry.calls[(bs, seq)] = entry.calls.get((bs, seq), 0) + len(times)


def time_interleaved(
    runners: Sequence[Any],
    task: Any,
    cfg: BenchConfig | None = None,
    *,
    data_dir: Path | None = None,
    latency: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Time ``runners`` (a baseline and its variants) in one process, in interleaved rounds.

    Every runner is loaded and warmed up first (its load time and memory rise measured then).
    Then, in each of ``cfg.rounds`` rounds, every runner runs every figure in turn (forward order
    in even rounds, reversed in odd ones: ABBA), ``cfg.seconds / cfg.rounds`` per figure. A busy
    machine thus slows one round of every runner, not one runner's whole figure. Each figure is
    the median over rounds, with its per-round values (``rounds``) and their ``spread``, from
    which :func:`ratios` and :func:`speed_record` take the per-round ratios.

    ``task``: the task of every runner, or a list with one per runner (a baseline with its own
    tokenizer gets inputs from it; runners of one task share the same inputs).

    Latency: batch 1 on real short inputs (a different one each call), percentiles over every
    call; throughput: items/s at each batch size (text: at each sequence length), the round's
    median call. Preprocessing is not timed.
    """
    cfg = cfg or BenchConfig()
    say = progress or (lambda _msg: None)
    tasks = list(task) if isinstance(task, list | tuple) else [task] * len(runners)
    inputs: dict[int, tuple[list[dict[str, np.ndarray]], dict[tuple[int, int | None], dict[str, np.ndarray]]]] = {}
    entries = []
    for runner, tsk in zip(runners, tasks, strict=True):
        if id(tsk) not in inputs:  # the same inputs for every runner of one task (models with their own tokenizer get their own)
            inputs[id(tsk)] = _inputs(tsk, cfg, data_dir, latency)
        singles, batches = inputs[id(tsk)]
        entry = _Entry(runner, singles, batches)
        with RSSSampler() as rss:
            t0 = time.perf_counter()
            runner.load()
            entry.load_s = time.perf_counter() - t0
            # Warm up on several different inputs, not only two: a compiled runner (torch.compile) may
            # build a graph per new input shape at first, and that belongs to warm-up, not latency.
            for x in singles[: max(cfg.warmup, min(len(singles), LATENCY_WARMUP_INPUTS))]:
                runner.run(x)
            for b in batches.values():
                for _ in range(cfg.warmup):
                    runner.run(b)
        entry.memory = {"peak_rss": rss.peak / 2**20, "rise": (rss.peak - rss.start_rss) / 2**20}
        entries.append(entry)
    per = cfg.seconds / cfg.rounds
    lat_calls = max(1, -(-cfg.latency_calls // cfg.rounds))
    for k in range(cfg.rounds):
        say(f"round {k + 1} of {cfg.rounds}")
        for entry in entries if k % 2 == 0 else entries[::-1]:
            _one_round(entry, per, cfg.min_iters, lat_calls)
    out = []
    for entry in entries:
        res: dict[str, Any] = {"load_s": entry.load_s, "memory_mb": entry.memory, "rounds": cfg.rounds}
        if entry.latency:
            pooled = [x for rnd in entry.latency for x in rnd]
            p50s = [_median(rnd) * 1000.0 for rnd in entry.latency]
            res["latency_ms"] = {**percentiles(pooled), "p50_rounds": p50s, "p50_spread": _spread(p50s)}
        res["throughput"] = [
            {
                "batch": bs,
                "seq_len": seq,
                "items_per_s": _median(vals),
                "calls": entry.calls[(bs, seq)],
                "rounds": vals,
                "spread": _spread(vals),
            }
            for (bs, seq), vals in entry.throughput.items()
        ]
        out.append(res)
    return out


def bench_runner(
    runner: Any, task: Any, cfg: BenchConfig | None = None, *, data_dir: Path | None = None, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Measure one runner; returns latency, throughput, memory and size as a dict (see :func:`time_interleaved`)."""
    cfg = cfg or BenchConfig()
    (timing,) = time_interleaved([runner], task, cfg, data_dir=data_dir, progress=progress)
    return _result(runner, timing, cfg)


def _result(runner: Any, timing: dict[str, Any], cfg: BenchConfig) -> dict[str, Any]:
    loaded = getattr(runner, "loaded_artifact", None) or runner.artifact
    return {
        "model": runner.artifact.name,
        **runner.describe(),
        **timing,
        "size_bytes": loaded.size_bytes(),
        "config": asdict(cfg),
    }


def bench_runners(
    runners: Sequence[Any],
    task: Any,
    cfg: BenchConfig | None = None,
    *,
    data_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure several runners side by side (interleaved rounds); each result as :func:`bench_runner` gives it."""
    cfg = cfg or BenchConfig()
    timings = time_interleaved(runners, task, cfg, data_dir=data_dir, progress=progress)
    return [_result(r, t, cfg) for r, t in zip(runners, timings, strict=True)]


def _paired(base: list[float] | None, other: list[float] | None, invert: bool = False) -> tuple[float, list[float]] | None:
    """The median and spread of per-round ratios ``other / base`` (``base / other`` when ``invert``)."""
    if not base or not other or len(base) != len(other):
        return None
    rs = [(b / o if invert else o / b) for b, o in zip(base, other, strict=True) if b > 0 and o > 0]
    return (_median(rs), _spread(rs)) if rs else None


def ratios(result: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Every figure of ``result`` against ``baseline`` as a speed-up (higher is faster) or a fraction.

    Results timed together (:func:`time_interleaved`) carry per-round figures: their speed-ups
    are the median of the per-round ratios, with the spread of those ratios (``*_range``).
    """
    lat = {k: baseline["latency_ms"][k] / result["latency_ms"][k] for k in ("p50", "p90", "p99", "mean") if result["latency_ms"][k] > 0}
    out: dict[str, Any] = {"latency_speedup": lat}
    paired = _paired(baseline["latency_ms"].get("p50_rounds"), result["latency_ms"].get("p50_rounds"), invert=True)
    if paired is not None:
        lat["p50"], out["latency_p50_speedup_range"] = paired
    base_thr = {(t["batch"], t["seq_len"]): t for t in baseline["throughput"]}
    thr = []
    for t in result["throughput"]:
        b = base_thr.get((t["batch"], t["seq_len"]))
        if b is None:
            continue
        row = {"batch": t["batch"], "seq_len": t["seq_len"], "speedup": t["items_per_s"] / b["items_per_s"]}
        paired = _paired(b.get("rounds"), t.get("rounds"))
        if paired is not None:
            row["speedup"], row["range"] = paired
        thr.append(row)
    out["throughput_speedup"] = thr
    out["memory_fraction"] = result["memory_mb"]["rise"] / baseline["memory_mb"]["rise"] if baseline["memory_mb"]["rise"] > 0 else None
    out["size_fraction"] = result["size_bytes"] / baseline["size_bytes"] if baseline["size_bytes"] else None
    return out


def compare_speed(
    original: Any,
    variant: Any,
    runtime: str = "torch",
    *,
    baseline_runtime: str | None = None,
    threads: int | None = None,
    config: BenchConfig | None = None,
    data_dir: Path | None = None,
    latency: bool = True,
    once_if_same: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """A variant's speed against its original, timed side by side (:func:`time_interleaved`).

    ``original`` and ``variant`` are artifacts; the variant runs on ``runtime``, the original on
    ``baseline_runtime`` (default: the same runtime). The result is the one speed record every
    verb prints and every manifest stores (``metrics.speed``): both models' figures, the
    speed-ups (medians of the per-round ratios) and their ranges, for the first figure at the
    top level (``throughput_ratio``, ``latency_ratio``) and for every figure in ``throughput``.
    The original against itself on the same runtime is a control (two runners: how far the
    machine's noise moves a ratio), or, with ``once_if_same``, timed once (speed-up exactly 1).
    """
    from modelpress.runtimes import create_runner
    from modelpress.tasks import task_for

    cfg = config or BenchConfig(batch_sizes=[8], seq_lens=[128], rounds=SPEED_ROUNDS)
    base_rt = baseline_runtime or runtime
    task = task_for(original)
    same = once_if_same and variant is original and base_rt == runtime
    runners: list[Any] = []
    try:  # every runner made is closed, whatever fails (making the second, loading, timing)
        runners.append(create_runner(original, base_rt, threads=threads))
        if not same:
            runners.append(create_runner(variant, runtime, threads=threads))
        timings = time_interleaved(runners, task, cfg, data_dir=data_dir, latency=latency, progress=progress)
        sizes = [(getattr(r, "loaded_artifact", None) or r.artifact).size_bytes() for r in runners]
    finally:
        for r in runners:
            r.close()
    if same:
        timings, sizes = timings * 2, sizes * 2
    rec = speed_record(timings[0], timings[1], runtime=runtime, threads=threads, rounds=cfg.rounds)
    rec.update({"baseline_runtime": base_rt, "original_size_bytes": sizes[0], "variant_size_bytes": sizes[1]})
    return rec


def speed_record(base: dict[str, Any], var: dict[str, Any], *, runtime: str, threads: int | None, rounds: int) -> dict[str, Any]:
    """The speed record of two timings from one :func:`time_interleaved` run (see :func:`compare_speed`)."""
    rows = []
    base_thr = {(t["batch"], t["seq_len"]): t for t in base["throughput"]}
    for t in var["throughput"]:
        b = base_thr[(t["batch"], t["seq_len"])]
        ratio, spread = _paired(b["rounds"], t["rounds"]) or (t["items_per_s"] / b["items_per_s"], [0.0, 0.0])
        rows.append(
            {
                "batch": t["batch"],
                "seq_len": t["seq_len"],
                "original_items_per_s": b["items_per_s"],
                "variant_items_per_s": t["items_per_s"],
                "speedup": ratio,
                "speedup_range": spread,
            }
        )
    first = rows[0]
    record: dict[str, Any] = {
        "runtime": runtime,
        "threads": threads,
        "rounds": rounds,
        "batch_size": first["batch"],
        "seq_len": first["seq_len"],
        "original_items_per_s": first["original_items_per_s"],
        "variant_items_per_s": first["variant_items_per_s"],
        "throughput_ratio": first["speedup"],
        "throughput_ratio_range": first["speedup_range"],
        "throughput": rows,
        "machine": machine_info(),
    }
    if "latency_ms" in base and "latency_ms" in var:
        lat = _paired(base["latency_ms"]["p50_rounds"], var["latency_ms"]["p50_rounds"], invert=True)
        record.update(
            {
                "original_p50_ms": base["latency_ms"]["p50"],
                "variant_p50_ms": var["latency_ms"]["p50"],
                "original_p99_ms": base["latency_ms"]["p99"],
                "variant_p99_ms": var["latency_ms"]["p99"],
                "latency_ratio": lat[0] if lat else None,
                "latency_ratio_range": lat[1] if lat else None,
            }
        )
    return record
