"""Make a variant with one technique, then measure what it kept and what it bought.

:func:`compress` is what ``modelpress distill`` and ``modelpress prune-structured`` call: it
applies the technique (with a progress bar for training), evaluates the original and the
variant on the same data (the gate: the task's primary metric keeps ``1 - max_drop``), and
measures both models' throughput side by side in one run on the same runtime
(:func:`measure_speed`, rounds interleaved so a busy machine slows both alike).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import Artifact
from .configs import TechniqueConfig, parse_step
from .gate import GateConfig, GateResult, check, flat_metrics

ProgressFactory = Callable[[str, int | None], Callable[[int], None]]
SPEED_ROUNDS = 2  # each model is measured this many times, alternating; the best round counts


def _quiet(_d: str, _t: int | None) -> Callable[[int], None]:
    return lambda _n: None


@dataclass
class CompressResult:
    """The variant, both evaluations, the gate and the measured speed."""

    artifact: Artifact
    original: dict[str, Any]
    variant: dict[str, Any]
    gate: GateResult
    speed: dict[str, Any] | None = None
    technique: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.gate.passed

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.artifact.path),
            "step": self.artifact.manifest.step,
            "original": self.original,
            "variant": self.variant,
            "gate": self.gate.to_json(),
            "speed": self.speed,
            "technique": self.technique,
        }


def measure_speed(
    original: Artifact, variant: Artifact, runtime: str = "torch", *, threads: int | None = None, batch_sizes: tuple[int, ...] = (32,),
    seq_len: int = 128, seconds: float = 2.0, rounds: int = SPEED_ROUNDS, data_dir: Path | None = None, progress: ProgressFactory = _quiet,
) -> dict[str, Any]:  # fmt: skip
    """Throughput of both models on ``runtime`` at each batch size (text: ``seq_len`` tokens), alternating rounds."""
    from ..bench.measure import BenchConfig, bench_runner, machine_info
    from ..runtimes import create_runner
    from ..tasks import task_for

    cfg = BenchConfig(batch_sizes=list(batch_sizes), seq_lens=[seq_len], seconds=seconds, latency_calls=20)
    best: dict[str, dict[tuple[int, Any], float]] = {"original": {}, "variant": {}}
    latency: dict[str, float] = {}
    advance = progress(f"measuring speed on {runtime} (original and variant, {rounds} rounds)", 2 * rounds)
    for _ in range(rounds):
        for key, art in (("original", original), ("variant", variant)):
            runner = create_runner(art, runtime, threads=threads)
            res = bench_runner(runner, task_for(art), cfg, data_dir=data_dir)
            runner.close()
            for t in res["throughput"]:
                k = (t["batch"], t["seq_len"])
                best[key][k] = max(best[key].get(k, 0.0), t["items_per_s"])
            latency[key] = min(latency.get(key, float("inf")), res["latency_ms"]["p50"])
            advance(1)
    rows = []
    for k, base in sorted(best["original"].items(), key=lambda kv: kv[0][0]):
        var = best["variant"].get(k)
        rows.append({"batch": k[0], "seq_len": k[1], "original_items_per_s": base, "variant_items_per_s": var, "speedup": var / base if var and base else None})
    return {
        "runtime": runtime,
        "threads": threads,
        "rounds": rounds,
        "throughput": rows,
        "latency_p50_ms": latency,
        "latency_speedup": latency["original"] / latency["variant"] if latency.get("variant") else None,
        "machine": machine_info(),
    }


def compress(
    model: Any,
    config: TechniqueConfig | dict[str, Any],
    output: str | os.PathLike,
    *,
    task: str | None = None,
    data: str | None = None,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    threads: int | None = None,
    max_drop: float = 0.01,
    gate: GateConfig | None = None,
    runtime: str = "torch",
    bench: bool = True,
    bench_seconds: float = 2.0,
    batch_sizes: tuple[int, ...] = (32,),
    seq_len: int = 128,
    overwrite: bool = False,
    progress: ProgressFactory = _quiet,
) -> CompressResult:
    """Apply ``config`` to ``model`` (written to ``output``), gate it against the original, and time both."""
    from ..api import as_artifact
    from ..locations import find_data_dir
    from . import techniques  # noqa: F401  (registers the handlers)
    from .evaluation import Evaluator
    from .handlers import handler_for
    from .training import TrainingContext

    original = as_artifact(model, task)
    cfg = parse_step(config)
    ddir = find_data_dir(data_dir)
    ctx = TrainingContext(Path(output), ddir, overwrite, threads, progress=progress)
    art = handler_for(cfg)(original, cfg, ctx)
    evaluator = Evaluator(original, data=data, data_dir=ddir, limit=limit, threads=threads)
    advance = progress(f"evaluating the original and the variant on {evaluator.dataset_name}", 2)
    base = evaluator.original_result()
    advance(1)
    var = evaluator.evaluate(art, runtime)
    advance(1)
    verdict = check(flat_metrics(base), flat_metrics(var), gate or GateConfig.for_task(original.task, max_drop=max_drop))
    speed = None
    if bench:
        speed = measure_speed(original, art, runtime, threads=threads, batch_sizes=batch_sizes, seq_len=seq_len, seconds=bench_seconds, data_dir=ddir, progress=progress)
    return CompressResult(art, base, var, verdict, speed, art.manifest.metrics.get("technique", {}))
