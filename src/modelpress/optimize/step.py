"""One step, the one way: apply a technique -> evaluate against the original -> gate -> measure speed
-> write the artifact's record -> register with lineage.

Every verb that makes a variant goes through :class:`Pipeline`: ``optimize`` (recipes, step by
step), ``prune``, ``distill`` and ``prune-structured`` (one-step recipes), ``tune`` (each
candidate), ``ship`` and ``run`` (through recipes and the tuner). A pipeline holds what the
steps of one run share: the original, its evaluation (measured once), the gate, the speed
settings and the registry.

What a step writes into its artifact's manifest (``metrics``), the one shape for every verb::

    technique:  what the handler found (sparsity, calibration, training, ...), written by the handler
    evaluation: {dataset, runtime, <metric>: value, ...}   the variant's quality and agreement
    gate:       {passed, rows: [...], summary}              the gate table
    shippable:  true | false                                the gate's verdict
    speed:      the speed record of bench.measure.compare_speed (None when not measured)

Manifests written before this shape (no ``speed`` key, or prune's older speed record without
``throughput`` rows) read the same through :func:`read_record`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from modelpress._fs import atomic_write_text, replace_folder
from modelpress.artifacts import MANIFEST_NAME, Artifact
from modelpress.errors import ModelpressError, OptimizationError
from modelpress.optimize.configs import TechniqueConfig
from modelpress.optimize.gate import GateConfig, GateResult, check, flat_metrics
from modelpress.progress import ProgressFactory, no_progress

RECORD_KEYS = ("evaluation", "gate", "shippable", "speed")
# (pipeline, source, config, target, variant, its evaluation, its verdict, runtime) -> (variant, evaluation, verdict, layers kept in float)
Retry = Callable[..., tuple[Artifact, dict[str, Any], GateResult, list[str]]]


@dataclass
class StepResult:
    """What one step made and what it was found to be worth."""

    index: int
    label: str
    config: dict[str, Any]
    runtime: str
    shipped: bool
    path: str | None = None
    evaluation: dict[str, Any] | None = None
    gate: GateResult | None = None
    excluded: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    registered: str | None = None
    speed: dict[str, Any] | None = None
    technique: dict[str, Any] = field(default_factory=dict)
    artifact: Artifact | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k not in ("gate", "artifact")}
        data["gate"] = self.gate.to_json() if self.gate is not None else None
        return data


@dataclass
class Speed:
    """How a step's speed is measured: side by side with the original (:func:`modelpress.bench.measure.compare_speed`).

    ``runtime``: where the variant is timed (None: where it is evaluated); ``baseline_runtime``:
    where the original is timed (None: the variant's runtime, so the figure is what the step
    bought on that runtime; the tuner uses ``torch``, so every candidate is against PyTorch eager).
    """

    config: Any = None  # a BenchConfig; None: batch 8 x 128 tokens, 5 rounds, 2 s per figure
    runtime: str | None = None
    baseline_runtime: str | None = None
    latency: bool = True


def record(art: Artifact, evaluation: dict[str, Any] | None, gate: GateResult | None, speed: dict[str, Any] | None) -> Artifact:
    """Write the step's record (evaluation, gate, shippable, speed) into the artifact's manifest.

    The manifest is not part of the content hash, so the artifact keeps its identity.
    """
    metrics = art.manifest.metrics
    if evaluation is not None:
        metrics["evaluation"] = {"dataset": evaluation["dataset"], "runtime": evaluation["runtime"], **flat_metrics(evaluation)}
    if gate is not None:
        metrics["gate"] = gate.to_json()
        metrics["shippable"] = gate.passed
    metrics["speed"] = speed
    if art.path is not None:
        atomic_write_text(art.path / MANIFEST_NAME, art.manifest.model_dump_json(indent=2))
    return art


def read_record(art: Artifact) -> dict[str, Any]:
    """The step record of an artifact's manifest, in today's shape, whichever version wrote it.

    Keys: ``technique``, ``evaluation``, ``gate``, ``shippable``, ``speed`` (None when absent).
    An older prune speed record (one figure, no ``throughput`` rows) gains its ``throughput`` row.
    """
    m = art.manifest.metrics
    out: dict[str, Any] = {"technique": m.get("technique") or {}, **{k: m.get(k) for k in RECORD_KEYS}}
    if out["shippable"] is None and isinstance(out["gate"], dict):
        out["shippable"] = bool(out["gate"].get("passed"))
    speed = out["speed"]
    if isinstance(speed, dict) and "throughput" not in speed and "throughput_ratio" in speed:
        out["speed"] = {
            **speed,
            "throughput": [
                {
                    "batch": speed.get("batch_size"),
                    "seq_len": speed.get("seq_len"),
                    "original_items_per_s": speed.get("original_items_per_s"),
                    "variant_items_per_s": speed.get("variant_items_per_s"),
                    "speedup": speed["throughput_ratio"],
                    "speedup_range": speed.get("throughput_ratio_range"),
                }
            ],
        }
    return out


def _reject(art: Artifact, rejected_dir: Path) -> Artifact:
    """Move a variant that broke the gate out of the shippable folders (its record says why)."""
    if art.path is None:  # pragma: no cover - a handler always writes a folder
        raise OptimizationError(f"The variant of {art.name} has no folder to move.")
    rejected_dir.mkdir(parents=True, exist_ok=True)
    target = replace_folder(art.path, rejected_dir / art.path.name)
    return Artifact(art.manifest, target, art.module)


class Pipeline:
    """The steps of one run against one original: its evaluation once, one gate, one registry.

    ``gate``: the thresholds every step must meet; ``speed``: measure each step side by side
    with the original (None: do not); ``registry`` and ``name``: record the original and each
    shipped variant with its lineage; ``task_options``: task settings for evaluation only
    (e.g. ``max_eval_tokens``).
    """

    def __init__(
        self,
        original: Artifact,
        gate: GateConfig,
        *,
        data: str | None = None,
        data_dir: Path | None = None,
        limit: int | None = None,
        threads: int | None = None,
        task_options: dict[str, Any] | None = None,
        speed: Speed | None = None,
        registry: Any = None,
        name: str | None = None,
        progress: ProgressFactory = no_progress,
    ) -> None:
        from modelpress.optimize.evaluation import Evaluator

        self.original = original
        self.gate = gate
        self.data_dir = data_dir
        self.threads = threads
        self.task_options = task_options
        self.speed = speed
        self.registry = registry
        self.name = name or original.name
        self.progress = progress
        self.evaluator = Evaluator(original.with_task_options(task_options), data=data, data_dir=data_dir, limit=limit, threads=threads)
        self._base: dict[str, Any] | None = None
        self.original_ref: str | None = None

    @property
    def dataset_name(self) -> str:
        return self.evaluator.dataset_name

    @property
    def task(self) -> Any:
        return self.evaluator.task

    def baseline(self) -> dict[str, Any]:
        """The original's evaluation (measured once), registering the original when there is a registry."""
        if self._base is None:
            advance = self.progress(f"evaluating the original {self.original.name} on {self.dataset_name}", None)
            self._base = self.evaluator.original_result()
            advance(1)
            if self.registry is not None:
                from modelpress.optimize.registering import register_original

                self.original_ref = register_original(self.registry, self.original, self.name, self._base)
        return self._base

    # -- the stages ----------------------------------------------------------------------
    def apply(self, source: Artifact, cfg: TechniqueConfig, target: Path, *, overwrite: bool = False) -> Artifact:
        from modelpress.optimize.handlers import StepContext
        from modelpress.optimize.techniques import handler_for

        ctx = StepContext(Path(target), self.data_dir, overwrite, self.threads, progress=self.progress, data=self.dataset_name)
        return handler_for(cfg)(source, cfg, ctx)

    def judge(self, art: Artifact, runtime: str) -> tuple[dict[str, Any], GateResult]:
        """Evaluate ``art`` on ``runtime`` against the original and gate it."""
        evaluation = self.evaluator.evaluate(art.with_task_options(self.task_options), runtime)
        return evaluation, check(flat_metrics(self.baseline()), flat_metrics(evaluation), self.gate)

    def measure(self, art: Artifact, runtime: str) -> dict[str, Any] | None:
        """The variant's speed record against the original (None without speed settings)."""
        if self.speed is None:
            return None
        from modelpress.bench.measure import compare_speed

        rt = self.speed.runtime or runtime
        base_rt = self.speed.baseline_runtime or rt
        advance = self.progress(f"timing {art.name} on {rt} side by side with the original on {base_rt}", None)
        speed = compare_speed(
            self.original,
            art,
            rt,
            baseline_runtime=base_rt,
            threads=self.threads,
            config=self.speed.config,
            data_dir=self.data_dir,
            latency=self.speed.latency,
            once_if_same=True,
        )
        advance(1)
        return speed

    def register(self, art: Artifact, parent_ref: str | None, metrics: dict[str, Any]) -> str | None:
        """Record a shipped variant as the next version of the model, child of ``parent_ref``, with ``metrics`` rows."""
        if self.registry is None:
            return None
        from modelpress.optimize.registering import register_variant

        return register_variant(self.registry, art, self.name, parent_ref, metrics=metrics)

    # -- one step --------------------------------------------------------------------------
    def step(
        self,
        cfg: TechniqueConfig,
        target: Path,
        *,
        source: Artifact | None = None,
        source_ref: str | None = None,
        index: int = 1,
        runtime: str | None = None,
        overwrite: bool = False,
        rejected_dir: Path | None = None,
        register: bool = True,
        errors: Literal["record", "raise"] = "record",
        retry: Retry | None = None,
    ) -> StepResult:
        """Apply ``cfg`` to ``source`` (default: the original) into ``target``, then evaluate (on
        ``runtime``, default the config's), gate, time, record and register it.

        A variant that breaks the gate is marked ``shippable: false`` and moved to
        ``rejected_dir`` when one is given (else left where it is); it is never registered.
        ``errors``: a technique or evaluation error is recorded in the result, or raised.
        ``retry``: called when the gate fails and the config asks for it (``auto_exclude``), to
        make and judge better variants (recipes pass
        :func:`modelpress.optimize.search.sensitivity.auto_exclude`).
        """
        source = source or self.original
        runtime = runtime or cfg.runtime
        t0 = time.perf_counter()
        res = StepResult(index=index, label=cfg.label(), config=cfg.to_step(), runtime=runtime, shipped=False)
        try:
            self.baseline()
            advance = self.progress(f"step {index}: {res.label}", None)
            art = self.apply(source, cfg, target, overwrite=overwrite)
            advance(1)
            evaluation, verdict = self.judge(art, runtime)
            if not verdict.passed and cfg.auto_exclude > 0 and retry is not None:
                art, evaluation, verdict, res.excluded = retry(self, source, cfg, target, art, evaluation, verdict, runtime)
            speed = self.measure(art, runtime)
        except ModelpressError as exc:
            if errors == "raise":
                raise
            res.error, res.seconds = exc.message, time.perf_counter() - t0
            return res
        record(art, evaluation, verdict, speed)
        res.evaluation, res.gate, res.speed, res.artifact = evaluation, verdict, speed, art
        res.technique = art.manifest.metrics.get("technique") or {}
        if verdict.passed:
            res.shipped = True
            if register:
                res.registered = self.register(art, source_ref or self.original_ref, step_metrics(evaluation, speed))
        elif rejected_dir is not None:
            art = res.artifact = _reject(art, rejected_dir)
        res.path = str(art.path)
        res.seconds = time.perf_counter() - t0
        return res


def step_metrics(evaluation: dict[str, Any] | None, speed: dict[str, Any] | None) -> dict[str, Any]:
    """The registry's metric rows of a step: its quality (and agreement) and its speed figures."""
    from modelpress.optimize.registering import metric_rows

    ev = evaluation or {}
    return metric_rows(flat_metrics(ev) if ev else {}, speed_figures(speed), dataset=ev.get("dataset"), runtime=ev.get("runtime"))


def speed_figures(speed: dict[str, Any] | None) -> dict[str, float]:
    """The variant's throughput, p50 and p99 latency and speed-up of a speed record."""
    if not speed:
        return {}
    out = {
        "throughput_items_per_s": speed.get("variant_items_per_s"),
        "latency_p50_ms": speed.get("variant_p50_ms"),
        "latency_p99_ms": speed.get("variant_p99_ms"),
        "speedup": speed.get("throughput_ratio"),
    }
    return {k: float(v) for k, v in out.items() if v is not None}
