"""Compound candidates: two steps the project already has, chained, as one tuner candidate.

A single recipe can at best equal the best peer recipe; a smaller model that is *then* quantized
goes past it. The tuner (:mod:`.tune`) adds, for a model it can train:

* **a distilled student, then quantized**: students of a few layer counts (half, two thirds and
  five sixths of the teacher's layers, distinct, fewer than the teacher's: 3, 4 and 5 for a
  6-layer MiniLM), each trained within :data:`TRAIN_S` seconds (:mod:`modelpress.optimize.distill`);
  the search's evaluation picks the layer count (the fastest one that passes the gate);
* **structured FFN pruning with recovery fine-tuning, then quantized** (half the FFN neurons of
  every layer, :mod:`modelpress.optimize.prune.structured`; a CNN: half its channels);
* **for causal LMs, structured pruning, then weight-only quantization** on the decoder the
  generation engine runs (a quarter of the FFN neurons, int8 weights);
* **quantization-aware training** (:mod:`modelpress.optimize.quantize.qat`), for a task with
  training data: one ``qat`` step (fine-tuning with the quantization simulated, then converted by
  the post-training step) whose conversion is :func:`qat_target`: the run's fastest timed static
  int8 candidate on a runtime QAT converts to, else ONNX Runtime static int8 per channel (a causal
  LM: its fastest weight-only candidate on such a runtime, torch under the nvidia preset, else no
  QAT candidate). Its steps in the table and report: ``qat``, then the post-training step it converts with.

The quantization step is decided by the cheap stages: the :data:`QUANT_PICKS` fastest
quantization candidates of this very run, by their own timing (for a causal LM, its weight-only
candidates), so the compound candidates use the quantization this machine runs fastest.

Cost and budget: the first step trains for minutes, so a compound candidate is built only when the
budget allows it. It *needs* a budget of at least its training seconds plus
:data:`COMPOUND_OVERHEAD_S` (quantizing, timing and scoring it), rounded up to whole minutes
(``needs --budget >= 8m``: the table says so under a shorter budget); and it is built only once
every cheap candidate is built and timed, and only while the budget left still covers its training
(else ``budget spent``). Built, it is timed, screened and scored like any candidate.

Caching: the first step's artifact is kept in the tune cache by (source, first step, data folder),
so the compound candidates that share a student train it once (the distillation and
structured-pruning caches keep the trained weights too); each compound candidate is cached like
any candidate, and one found in the cache is used whatever the budget (it costs nothing to build).

Lineage: the variant's manifest names the student (or pruned model) as its parent, whose manifest
names the original; with registration on, a passing compound candidate is registered as
original -> student/pruned -> quantized. A QAT candidate is one step: its artifact (cached by
source, step and data folder like a first step) names the original as its parent and records the
training and the conversion in ``metrics.technique``; registered as original -> QAT variant.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from modelpress.artifacts import Artifact
from modelpress.errors import ArtifactError, ConfigError
from modelpress.optimize.configs import DynamicInt8, StaticInt8, TechniqueConfig, WeightOnly, parse_step
from modelpress.optimize.configs.distill import Distill, DistillTraining
from modelpress.optimize.configs.prune import RecoveryTraining, StructuredPrune
from modelpress.optimize.configs.quantize import QAT
from modelpress.optimize.search.candidates import COMPOUND_OVERHEAD_S, Compound, parse_compound  # noqa: F401  (named here too)
from modelpress.optimize.search.front import STOP_BUDGET, STOP_NEEDS_BUDGET, Point

# Training seconds of each compound candidate's first step (a student, a recovery fine-tuning). On the
# 2-core machine at one training thread a MiniLM distillation step takes about 0.85 s, so 300 s is
# about 350 steps: docs/tune.md has what that buys.
TRAIN_S = 300.0
# Students as fractions of the teacher's layers (distinct counts, fewer than the teacher's, at least one).
STUDENT_FRACTIONS = (1 / 2, 2 / 3, 5 / 6)
PRUNE_RATIO = 0.5  # structured pruning of encoders and CNNs: half the FFN neurons / channels
LLM_PRUNE_RATIO = 0.25  # causal LMs: a quarter of the FFN neurons (perplexity degrades faster than an encoder's agreement)
# How many of the run's quantization candidates (its fastest, by their own timing) each first step is combined with:
# two, so that one lucky first timing does not decide alone (issue 16: one printed 2.49x and re-timed at 1.55x).
QUANT_PICKS = 2
QUANT_TYPES = (DynamicInt8, StaticInt8, WeightOnly)
QAT_RUNTIMES = ("torch", "onnxruntime", "openvino")  # what the qat step converts to (its handlers)
# QAT's conversion when the run timed no static int8 / weight-only candidate QAT can convert to: the
# static int8 the QAT benchmark measured (docs/qat.md) and that runs everywhere.
QAT_FALLBACK = StaticInt8(runtime="onnxruntime", per_channel=True)


def _layers(original: Artifact) -> int | None:
    cfg = original.path / "config.json" if original.path is not None else None
    if cfg is None or not cfg.is_file():
        return None
    n = json.loads(cfg.read_text()).get("num_hidden_layers")
    return int(n) if isinstance(n, int) else None


def student_layers(n: int) -> list[int]:
    """The layer counts of the students tried for an ``n``-layer teacher (:data:`STUDENT_FRACTIONS`)."""
    return sorted({max(1, round(f * n)) for f in STUDENT_FRACTIONS} - {n})


def first_steps(original: Artifact, train_s: float = TRAIN_S) -> list[tuple[str, TechniqueConfig]]:
    """The first steps worth chaining for ``original`` (family, config); none for a model that cannot be trained here."""
    task = original.task
    if task == "causal-lm":
        if original.format != "hf":
            return []
        ft = RecoveryTraining(max_seconds=train_s, max_steps=1000)
        return [("llm-prune", StructuredPrune(ratio=LLM_PRUNE_RATIO, targets=["ffn"], finetune=ft))]
    if task == "image-classification":
        return [("prune", StructuredPrune(ratio=PRUNE_RATIO, finetune=RecoveryTraining(max_seconds=train_s, max_steps=1000)))]
    if task not in ("embedding", "text-classification") or original.format != "hf":
        return []
    out: list[tuple[str, TechniqueConfig]] = []
    n = _layers(original)
    for k in student_layers(n) if n else []:
        out.append(("distill", Distill(layers=k, training=DistillTraining(max_seconds=train_s))))
    ft = RecoveryTraining(max_seconds=train_s, max_steps=1000)
    out.append(("prune", StructuredPrune(ratio=PRUNE_RATIO, targets=["ffn"], finetune=ft)))
    return out


def quant_picks(points: list[Point], task: str, n: int = QUANT_PICKS) -> list[TechniqueConfig]:
    """The ``n`` fastest quantization configs of this run's timed candidates (weight-only for a causal LM)."""
    kinds: tuple[type, ...] = (WeightOnly,) if task == "causal-lm" else QUANT_TYPES
    timed = [p for p in points if p.step and not p.steps and p.first_speedup is not None and p.status != "failed"]
    out: list[TechniqueConfig] = []
    for p in sorted(timed, key=lambda p: -(p.first_speedup or 0.0)):
        cfg = parse_step(p.step)
        if isinstance(cfg, kinds) and all(cfg.to_step() != c.to_step() for c in out):
            out.append(cfg)
    return out[:n]


def default_compounds(original: Artifact, points: list[Point], train_s: float = TRAIN_S, data_dir: Path | None = None) -> list[Compound]:
    """Every first step of :func:`first_steps` with each of the run's :func:`quant_picks`, smallest model
    first; then the QAT candidate (:func:`qat_compound`) where the task has training data."""
    quants = quant_picks(points, original.task)
    out = [Compound(q.runtime, q, first=f, family=fam) for fam, f in first_steps(original, train_s) for q in quants]
    qat = qat_compound(original, points, train_s, data_dir)
    return [*out, qat] if qat is not None else out


def qat_target(points: list[Point], task: str) -> StaticInt8 | WeightOnly | None:
    """What the QAT candidate converts with: the fastest timed static int8 (causal LM: weight-only) candidate
    of this run on a runtime QAT converts to, else :data:`QAT_FALLBACK` (None for a causal LM: its
    candidates run on generation engines QAT does not convert to)."""
    kinds: tuple[type, ...] = (WeightOnly,) if task == "causal-lm" else (StaticInt8,)
    timed = [p for p in points if p.step and not p.steps and p.first_speedup is not None and p.status != "failed"]
    for p in sorted(timed, key=lambda p: -(p.first_speedup or 0.0)):
        cfg = parse_step(p.step)
        if not isinstance(cfg, kinds) or cfg.runtime not in QAT_RUNTIMES:
            continue
        if task == "image-classification" and isinstance(cfg, StaticInt8) and cfg.runtime == "torch":
            continue  # static int8 QAT converted on torch fails in inductor's quantized-conv lowering (docs/qat.md)
        return cfg  # type: ignore[return-value]
    return None if task == "causal-lm" else QAT_FALLBACK


def qat_compound(original: Artifact, points: list[Point], train_s: float = TRAIN_S, data_dir: Path | None = None) -> Compound | None:
    """The QAT candidate of ``original`` (trained for at most ``train_s`` seconds), or None: no training
    objective or data for its task, not a trainable PyTorch model, or nothing to convert to."""
    from modelpress.optimize.quantize.qat import qat_candidate

    target = qat_target(points, original.task)
    if original.format not in ("hf", "torch") or target is None:
        return None
    quantize = {k: v for k, v in target.to_step().items() if k not in ("runtime", "auto_exclude")}  # QAT retrains instead
    cfg = qat_candidate(original.task, target.runtime, quantize=quantize, max_seconds=train_s, data_dir=data_dir)
    return Compound(cfg.runtime, cfg, family="qat") if cfg is not None else None


def why_not(cand: Compound, budget_s: float, left_s: float) -> tuple[str, str] | None:
    """(stop, reason) when ``cand`` is not to be built under ``budget_s`` with ``left_s`` seconds of it left; None: build it."""
    if budget_s < cand.needs_s:
        return STOP_NEEDS_BUDGET, (
            f"needs --budget >= {cand.needs_s / 60:.0f}m (training {cand.train_s:.0f} s, then quantizing, timing and scoring); "
            f"the budget is {budget_s:.0f} s"
        )
    if left_s < cand.train_s + COMPOUND_OVERHEAD_S:
        left = max(left_s, 0.0)
        return STOP_BUDGET, f"{left:.0f} s of the budget were left, less than its training and scoring need ({cand.needs_s:.0f} s)"
    return None


def first_key(original: Artifact, first: TechniqueConfig, data_dir: Path | None) -> str:
    data = {"source": original.content_hash(), "step": first.to_step(), "data_dir": str(data_dir) if data_dir else None}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:24]


def build(pipe: Any, original: Artifact, cand: Compound, target: Path, cache_root: Path) -> tuple[Artifact, Artifact]:
    """Make ``cand``'s variant in ``target``: its first step (from the tune cache when another compound
    candidate already made it), then its quantization; returns (variant, first-step artifact).

    A QAT candidate (one step): the QAT artifact, from the tune cache when an earlier run trained it
    (whatever its gate or timing settings), copied to ``target``; returns (variant, variant)."""
    if cand.first is None and isinstance(cand.config, QAT):
        made = _first(pipe, original, cand.config, cache_root)
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(made.path, target)  # type: ignore[arg-type]
        variant = Artifact.open(target)
        variant.module = made.module  # a torch module built in this process (None when loaded from disk)
        return variant, variant
    if cand.first is None or cand.config is None:  # pragma: no cover - parse_compound and default_compounds set both
        raise ConfigError("A compound candidate needs two steps.", hint="Example: {steps: [{technique: distill, layers: 4}, {...}]}")
    first = _first(pipe, original, cand.first, cache_root)
    return pipe.apply(first, cand.config, target, overwrite=True), first


def _first(pipe: Any, original: Artifact, step: TechniqueConfig, cache_root: Path) -> Artifact:
    """``step`` applied to ``original``, from the tune cache (by source, step and data folder) when it is there."""
    import torch

    folder = cache_root / f"first-{first_key(original, step, pipe.data_dir)}"
    first = None
    if folder.is_dir():
        try:
            first = Artifact.open(folder)
            if first.verify():
                first = None
        except (ArtifactError, OSError):
            first = None
    if first is None:
        if folder.exists():
            shutil.rmtree(folder)  # left by an interrupted run
        threads = torch.get_num_threads()
        try:
            first = pipe.apply(original, step, folder, overwrite=True)  # trains on its own threads (training_threads)
        finally:
            torch.set_num_threads(threads)  # the runners that time candidates set theirs; keep the process as it was
    return first


def training_summary(first: Artifact) -> dict[str, Any]:
    """What the first step's training did, from its manifest: seconds, steps, why it stopped, layers / parameters."""
    m = first.manifest.metrics or {}
    tech = m.get("technique") or {}
    # distill's, structured-prune's recovery, or QAT's (its report sits under "qat", beside the conversion's)
    tr = tech.get("training") or (tech.get("finetune") or {}).get("training") or (tech.get("qat") or {}).get("training") or {}
    out = {k: tr.get(k) for k in ("steps", "seconds", "stopped", "best_metric", "first_metric") if tr.get(k) is not None}
    for k in ("student_layers", "teacher_layers", "student_parameters", "teacher_parameters", "parameters_before", "parameters_after"):
        if tech.get(k) is not None:
            out[k] = tech[k]
    out["cached"] = bool(tech.get("cached"))
    return out


def register(pipe: Any, point: Point, original_ref: str | None, rows: dict[str, Any]) -> str | None:
    """Register a passing compound candidate as original -> first step -> variant; returns the variant's ref."""
    if point.intermediate is None or point.artifact is None:
        return None
    if point.intermediate == point.artifact:  # QAT: one step, original -> variant
        return pipe.register(Artifact.open(point.artifact), original_ref, rows)
    first_ref = pipe.register(Artifact.open(point.intermediate), original_ref, {})
    return pipe.register(Artifact.open(point.artifact), first_ref, rows)


def budget_notes(cands: list[Compound], points: list[Point], budget_s: float) -> list[str]:
    """The note under the table when compound candidates were not built for want of budget."""
    short = {p.label for p in points if p.stop == STOP_NEEDS_BUDGET}
    needs = [c.needs_s for c in cands if c.label in short]
    if not needs:
        return []
    return [
        f"{len(needs)} compound candidates (a distilled or pruned model then quantized, or QAT) were not built: they train for "
        f"minutes and need --budget >= {max(needs) / 60:.0f}m (the budget was {budget_s:.0f} s)."
    ]
