"""Make a variant with one technique, then measure what it kept and what it bought.

:func:`compress` is what ``modelpress distill`` and ``modelpress prune-structured`` call: it
applies the technique (with a progress bar for training), evaluates the original and the
variant on the same data (the gate: the task's primary metric keeps ``1 - max_drop``), and
measures both models' throughput side by side in one run on the same runtime
(:func:`interleaved_throughput`: rounds interleaved, so a busy machine slows both alike).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelpress.artifacts import Artifact
from modelpress.optimize.configs import TechniqueConfig, parse_step
from modelpress.optimize.gate import GateConfig, GateResult, check, flat_metrics

ProgressFactory = Callable[[str, int | None], Callable[[int], None]]
SPEED_ROUNDS = 6  # interleaved timing rounds; each model's best round counts
CALLS_PER_ROUND = 3  # batches per model per round (their median is the round's figure)
WARMUP_CALLS = 2


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


def interleaved_throughput(
    entries: list[tuple[str, Artifact, str, dict[str, Any]]],
    *,
    threads: int | None = None,
    batch_sizes: tuple[int, ...] = (32,),
    seq_len: int | None = 128,
    rounds: int = SPEED_ROUNDS,
    calls: int = CALLS_PER_ROUND,
    data_dir: Path | None = None,
    progress: ProgressFactory = _quiet,
) -> dict[str, dict[int, float]]:
    """Items per second of every ``(label, artifact, runtime, options)`` on the same inputs, interleaved.

    Every runner is loaded and warmed up first; then, round after round, each one runs ``calls``
    batches of each size in turn. A model's figure is its best round's median call, so a burst of
    load from other processes slows one round of every model instead of one model's whole figure.
    """
    import time

    import numpy as np

    from modelpress.runtimes import create_runner
    from modelpress.tasks import task_for

    task = task_for(entries[0][1])
    text = task.uses_tokenizer()
    batches = {bs: task.sample_inputs(bs, seq_len=seq_len if text else None, data_dir=data_dir) for bs in batch_sizes}
    runners = []
    for label, art, runtime, options in entries:
        runner = create_runner(art, runtime, threads=threads, **options).load()
        for b in batches.values():
            for _ in range(WARMUP_CALLS):
                runner.run(b)
        runners.append((label, runner))
    best: dict[str, dict[int, float]] = {label: {} for label, _ in runners}
    advance = progress(f"timing {len(runners)} models side by side ({rounds} interleaved rounds)", rounds)
    try:
        for _ in range(rounds):
            for label, runner in runners:
                for bs, b in batches.items():
                    times = []
                    for _ in range(calls):
                        t0 = time.perf_counter()
                        runner.run(b)
                        times.append(time.perf_counter() - t0)
                    best[label][bs] = max(best[label].get(bs, 0.0), bs / float(np.median(times)))
            advance(1)
    finally:
        for _, runner in runners:
            runner.close()
    return best


def measure_speed(
    original: Artifact,
    variant: Artifact,
    runtime: str = "torch",
    *,
    threads: int | None = None,
    batch_sizes: tuple[int, ...] = (32,),
    seq_len: int = 128,
    rounds: int = SPEED_ROUNDS,
    data_dir: Path | None = None,
    progress: ProgressFactory = _quiet,
) -> dict[str, Any]:
    """Throughput of both models on ``runtime`` at each batch size (text: ``seq_len`` tokens), interleaved rounds."""
    from modelpress.bench.measure import machine_info
    from modelpress.tasks import task_for

    entries = [("original", original, runtime, {}), ("variant", variant, runtime, {})]
    best = interleaved_throughput(
        entries, threads=threads, batch_sizes=batch_sizes, seq_len=seq_len, rounds=rounds, data_dir=data_dir, progress=progress
    )
    text = task_for(original).uses_tokenizer()
    rows = [
        {
            "batch": bs,
            "seq_len": seq_len if text else None,
            "original_items_per_s": best["original"][bs],
            "variant_items_per_s": best["variant"][bs],
            "speedup": best["variant"][bs] / best["original"][bs],
        }
        for bs in batch_sizes
    ]
    return {"runtime": runtime, "threads": threads, "rounds": rounds, "throughput": rows, "machine": machine_info()}


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
    rounds: int = SPEED_ROUNDS,
    batch_sizes: tuple[int, ...] = (32,),
    seq_len: int = 128,
    overwrite: bool = False,
    progress: ProgressFactory = _quiet,
) -> CompressResult:
    """Apply ``config`` to ``model`` (written to ``output``), gate it against the original, and time both."""
    from modelpress.api import as_artifact
    from modelpress.locations import find_data_dir
    from modelpress.optimize import techniques  # noqa: F401  (registers the handlers)
    from modelpress.optimize.evaluation import Evaluator
    from modelpress.optimize.handlers import handler_for
    from modelpress.optimize.train.loop import TrainingContext

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
        speed = measure_speed(
            original,
            art,
            runtime,
            threads=threads,
            batch_sizes=batch_sizes,
            seq_len=seq_len,
            rounds=rounds,
            data_dir=ddir,
            progress=progress,
        )
    return CompressResult(art, base, var, verdict, speed, art.manifest.metrics.get("technique", {}))
