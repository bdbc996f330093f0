"""The Python verbs of optimization; the CLI commands call exactly these.

>>> import modelpress as mp
>>> mp.optimize("minilm", "recipe.yaml", "out/minilm-opt", data="stsb-dev")        # doctest: +SKIP
>>> mp.tune("minilm", max_drop=0.01, budget_s=300, output="out/minilm-tuned")        # doctest: +SKIP
>>> mp.run("minilm", budget_s=240, output="out/run")                                 # doctest: +SKIP
>>> mp.apply_technique("minilm", {"technique": "dynamic-int8", "per_channel": True}, "out/int8")  # doctest: +SKIP

``modelpress optimize`` -> :func:`optimize`, ``tune`` -> :func:`tune`, ``run`` -> :func:`run`,
``prune`` -> :func:`prune_model`, ``distill`` and ``prune-structured`` -> :func:`compress`. Every
one of them makes its variants through :class:`modelpress.optimize.step.Pipeline`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelpress.artifacts import Artifact
from modelpress.errors import OptimizationError
from modelpress.optimize.configs import TechniqueConfig, parse_step, prune_config
from modelpress.optimize.gate import GateConfig, GateResult
from modelpress.optimize.recipe import Recipe, RecipeResult, run_recipe, run_step
from modelpress.optimize.search.tune import Point, TuneResult
from modelpress.optimize.search.tune import tune as _tune
from modelpress.optimize.step import Speed
from modelpress.optimize.techniques import apply_technique
from modelpress.progress import ProgressFactory, no_progress


def optimize(model: Any, recipe: Recipe | dict[str, Any] | str | os.PathLike, output: str | os.PathLike, **options: Any) -> RecipeResult:
    """Run ``recipe`` on ``model``, writing every step's artifact under ``output``.

    Options: ``task``, ``data``, ``data_dir``, ``limit``, ``threads``, ``max_drop`` (default gate),
    ``register`` (record the original and shipped variants in the registry), ``registry``,
    ``name``, ``overwrite``, ``progress``. See :func:`modelpress.optimize.recipe.run_recipe`.
    """
    return run_recipe(model, recipe, output, **options)


def tune(model: Any, **options: Any) -> TuneResult:
    """The fastest variant that keeps quality; see :func:`modelpress.optimize.search.tune.tune`."""
    return _tune(model, **options)


# -- one-step recipes: distill, prune-structured, prune --------------------------------------
SPEED_ROUNDS = 6  # distill / prune-structured: interleaved timing rounds of original and variant


@dataclass
class CompressResult:
    """The variant, both evaluations, the gate and the measured speed (``distill``, ``prune-structured``)."""

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
    seconds: float = 2.0,
    overwrite: bool = False,
    progress: ProgressFactory = no_progress,
) -> CompressResult:
    """Apply ``config`` to ``model`` (written to ``output``), gate it against the original, and time both.

    A one-step recipe (:func:`modelpress.optimize.recipe.run_step`): the variant is evaluated and
    timed on ``runtime``, the original timed there too, side by side in ``rounds`` interleaved
    rounds at each of ``batch_sizes`` (text: ``seq_len`` tokens).
    """
    from modelpress.bench.measure import BenchConfig

    speed = None
    if bench:
        speed = Speed(BenchConfig(batch_sizes=list(batch_sizes), seq_lens=[seq_len], rounds=rounds, seconds=seconds))
    res = run_step(
        model,
        config,
        output,
        task=task,
        data=data,
        data_dir=data_dir,
        limit=limit,
        threads=threads,
        max_drop=max_drop,
        gate=gate,
        runtime=runtime,
        speed=speed,
        overwrite=overwrite,
        progress=progress,
    )
    (step,) = res.steps
    if step.artifact is None or step.gate is None or step.evaluation is None:  # pragma: no cover - run_step raises instead
        raise OptimizationError(f"The step made no variant: {step.error}")
    return CompressResult(step.artifact, res.original, step.evaluation, step.gate, step.speed, step.technique)


def prune_model(
    model: Any,
    output: str | Path,
    config: Any,
    *,
    task: str | None = None,
    data: str | None = None,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    max_drop: float = 0.05,
    threads: int | None = None,
    task_options: dict[str, Any] | None = None,
    measure_speed: bool = True,
    seconds: float = 2.0,
    overwrite: bool = False,
    progress: ProgressFactory | None = None,
) -> dict[str, Any]:
    """Prune ``model`` with ``config`` into ``output``; evaluate, gate and measure it against the original.

    A one-step recipe (:func:`modelpress.optimize.recipe.run_step`); ``config`` is a pruning
    config (see :func:`modelpress.optimize.configs.prune_config`). The manifest records
    ``metrics.evaluation``, ``gate``, ``shippable`` and ``speed`` (sizes stored sparse are in
    ``metrics.technique``). A variant that fails the gate is written but marked ``shippable: false``.
    """
    from modelpress.bench.measure import SPEED_ROUNDS as ROUNDS
    from modelpress.bench.measure import BenchConfig

    cfg = parse_step(config)
    speed = Speed(BenchConfig(batch_sizes=[8], seq_lens=[128], seconds=seconds, rounds=ROUNDS)) if measure_speed else None
    res = run_step(
        model,
        cfg,
        output,
        task=task,
        data=data,
        data_dir=data_dir,
        limit=limit,
        threads=threads,
        max_drop=max_drop,
        task_options=task_options,
        speed=speed,
        overwrite=overwrite,
        progress=progress or no_progress,
    )
    (step,) = res.steps
    technique = step.technique
    return {
        "model": res.model,
        "output": step.path,
        "config": cfg.to_step(),
        "label": cfg.label(),
        "dataset": res.dataset,
        "original": res.original,
        "variant": step.evaluation,
        "gate": step.gate.to_json() if step.gate else None,
        "shippable": step.shipped,
        "sparsity": technique.get("sparsity"),
        "model_sparsity": technique.get("model_sparsity"),
        "size": technique.get("size"),
        "speed": step.speed,
        "technique": technique,
    }


# -- modelpress run ------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What :func:`run` did: the tune (with a data folder) or only the benchmark (without)."""

    model: str
    tune: TuneResult | None = None
    bench: dict[str, Any] | None = None
    lineage: dict[str, Any] | None = None  # the registry's lineage tree of the original

    @property
    def chosen(self) -> Point | None:
        return self.tune.chosen if self.tune is not None else None

    def to_json(self) -> dict[str, Any]:
        """The tune's JSON (or, without a data folder, the benchmark report), as ``modelpress run --json`` prints it."""
        if self.tune is not None:
            return self.tune.to_json()
        return self.bench or {}


def run(
    model: Any = "minilm",
    *,
    budget_s: float = 240.0,
    max_drop: float = 0.01,
    output: str | os.PathLike = "out/run",
    register: bool = True,
    registry: Any = None,
    bench_seconds: float = 1.0,
    threads: int | None = None,
    data_dir: str | os.PathLike | None = None,
    progress: ProgressFactory = no_progress,
    on_point: Any = None,
    **tune_options: Any,
) -> RunResult:
    """The main job (``modelpress run``): tune ``model`` against PyTorch eager, register it and its variants.

    Every candidate is evaluated, optimized, gated and timed side by side with PyTorch fp32
    eager (:func:`tune`); with ``register``, the original and every passing variant are recorded
    with their lineage, returned in :attr:`RunResult.lineage`. Without a data folder quality
    cannot be measured, so only the benchmark runs (torch, ONNX Runtime, OpenVINO against torch).
    ``tune_options``: more settings of :func:`tune` (``data``, ``limit``, ``candidates``, ``name``, ...).
    """
    from modelpress.locations import find_data_dir

    if find_data_dir(data_dir) is None:
        from modelpress.api import bench
        from modelpress.bench.measure import BenchConfig

        report = bench(
            model,
            runtimes=["torch", "onnxruntime", "openvino"],
            baseline="torch",
            threads=threads,
            config=BenchConfig(seconds=bench_seconds),
            progress=progress,
        )
        return RunResult(str(model), bench=report)
    reg = None
    if register:
        from modelpress.optimize.registering import open_registry

        reg = registry or open_registry()
    try:
        res = _tune(
            model,
            max_drop=max_drop,
            budget_s=budget_s,
            output=output,
            threads=threads,
            data_dir=data_dir,
            bench_seconds=bench_seconds,
            register=register,
            registry=reg,
            progress=progress,
            on_point=on_point,
            **tune_options,
        )
        lineage = reg.lineage(res.registered_original) if reg is not None and res.registered_original else None
    finally:
        if reg is not None and registry is None and hasattr(reg, "close"):
            reg.close()
    return RunResult(res.model, tune=res, lineage=lineage)


__all__ = [
    "CompressResult",
    "Recipe",
    "RecipeResult",
    "RunResult",
    "TuneResult",
    "apply_technique",
    "compress",
    "optimize",
    "prune_config",
    "prune_model",
    "run",
    "tune",
]
