"""The tuner's cheap stages: the screening subsample and its looser gate, and the final re-timing.

* :func:`screen_size` / :func:`subsample`: the fixed rows every candidate is screened on (the
  same rows for all, spread evenly over the split so a split ordered by genre or source is
  represented);
* :func:`screen_margin` / :func:`screening_gate`: the gate loosened by a margin that covers the
  sampling noise of a few hundred rows, so only clear failures are dropped before the full
  evaluation;
* :func:`retime`: the baseline and several variants timed together in one process, in
  interleaved rounds (:func:`modelpress.bench.measure.time_interleaved`), so the figures the
  pick is made from do not depend on when each candidate was first timed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from modelpress.datasets import ImageDataset, LabeledTextDataset, PairDataset, TextCorpus
from modelpress.optimize.gate import GateConfig, Threshold

SCREEN_FRACTION = 0.10  # the screening subsample: a tenth of the split ...
SCREEN_MIN_ROWS = 200  # ... but at least this many rows (below, agreement and rank metrics are too coarse to screen on)
# Screening is skipped when the subsample would be more than this fraction of the split: screening
# and then fully scoring a passing candidate would cost more than scoring it once.
SCREEN_MAX_FRACTION = 0.5
# The margin below the gate that makes a screened failure "clear": 0.5 / sqrt(rows). Every gated
# quantity here is a fraction (a recovery ratio of the primary metric, an agreement rate or mean
# cosine); 0.5 / sqrt(n) bounds the standard error of the mean of n values in [0, 1] (their
# standard deviation is at most 0.5). For a candidate near a 0.99 gate the per-row spread is about
# sqrt(0.99 * 0.01) ~ 0.1, so the margin is about five of its standard errors: a candidate that
# would pass the full evaluation is very unlikely to be screened out, while a broken one (recovery
# 0.9 or less) is. At 200 rows the margin is 0.035, at 300 rows 0.029, at 1,000 rows 0.016.
SCREEN_MARGIN_SCALE = 0.5
SCREEN_MARGIN_FLOOR = 0.01  # never screen tighter than 1 point, whatever the rows


def check_settings(max_drop: float, budget_s: float, screen_rows: int | None, compound_train_s: float | None, auto_exclude: int) -> None:
    """The tuner's settings, each checked with an example of a good value."""
    from modelpress.errors import ConfigError

    if not 0.0 <= max_drop < 1.0:
        raise ConfigError(f"max_drop must be a fraction in [0, 1), got {max_drop}.", hint="Example: --max-drop 1% (or 0.01)")
    if budget_s <= 0:
        raise ConfigError(f"The budget must be positive, got {budget_s} s.", hint="Example: --budget 5m")
    if screen_rows is not None and screen_rows < 0:
        raise ConfigError(f"screen_rows must be 0 (no screening) or more, got {screen_rows}.", hint="Example: --screen-rows 300")
    if compound_train_s is not None and compound_train_s <= 0:
        raise ConfigError(
            f"The compound candidates' training time must be positive, got {compound_train_s} s.", hint="Example: --train-time 5m"
        )
    if auto_exclude < 0:
        raise ConfigError(
            f"auto_exclude (layers a mixed-precision candidate may keep in float) must be 0 (none) or more, got {auto_exclude}.",
            hint="Example: --auto-exclude 8",
        )


def score_baseline(evaluator: Any, base: dict[str, Any], gate: GateConfig, point: Any) -> None:
    """The baseline candidate's full score: the original's evaluation (the reference itself), with its agreement
    with the original computed from the reference's remembered outputs, gated like any candidate."""
    from modelpress.optimize.gate import check, flat_metrics
    from modelpress.optimize.search.front import STOP_GATE

    agreement = evaluator.task.agreement(evaluator.reference, evaluator.reference, evaluator.dataset, **evaluator.kwargs)
    evaluation = {**base, "agreement": agreement}
    base_flat = flat_metrics(base)
    verdict = check(base_flat, flat_metrics(evaluation), gate)
    point.quality, point.recovery = flat_metrics(evaluation), 1.0 if evaluator.task.primary_metric in base_flat else None
    point.gate, point.passed, point.stage, point.status = verdict.to_json(), verdict.passed, "scored", "measured"
    if not verdict.passed:
        point.stop, point.reason = STOP_GATE, verdict.summary()


def screen_size(total: int, rows: int | None = None) -> int:
    """How many rows to screen on (0: no screening): ``rows`` when given, else a tenth of the split
    and at least :data:`SCREEN_MIN_ROWS`; 0 when that would be more than half the split."""
    if rows is not None:
        return 0 if rows <= 0 or rows >= total else int(rows)
    n = max(SCREEN_MIN_ROWS, math.ceil(SCREEN_FRACTION * total))
    return 0 if n > SCREEN_MAX_FRACTION * total else n


def screen_margin(rows: int) -> float:
    """The margin below each threshold that a screened value must fall to fail screening."""
    return max(SCREEN_MARGIN_FLOOR, SCREEN_MARGIN_SCALE / math.sqrt(max(rows, 1)))


def subsample(dataset: Any, n: int) -> Any:
    """``n`` rows of ``dataset`` spread evenly over it (the same rows every time), of the same kind."""
    total = len(dataset)
    idx = np.unique(np.linspace(0, total - 1, num=min(n, total)).round().astype(int)).tolist()
    if isinstance(dataset, PairDataset):
        return PairDataset(
            dataset.name, [dataset.sentences1[i] for i in idx], [dataset.sentences2[i] for i in idx], [dataset.scores[i] for i in idx]
        )
    if isinstance(dataset, LabeledTextDataset):
        return LabeledTextDataset(dataset.name, [dataset.texts[i] for i in idx], [dataset.labels[i] for i in idx], dataset.label_names)
    if isinstance(dataset, ImageDataset):
        return ImageDataset(dataset.name, dataset.images[idx], dataset.labels[idx], dataset.label_names)
    if isinstance(dataset, TextCorpus):
        return TextCorpus(dataset.name, [dataset.documents[i] for i in idx], dataset.mode)
    return dataset.head(n)  # pragma: no cover - every dataset kind is above


def screening_gate(gate: GateConfig, original: dict[str, float], margin: float) -> GateConfig:
    """``gate`` loosened by ``margin`` (a fraction): recoveries and floors lower by it, drops and
    ceilings larger by that fraction of the original's value."""
    rules = []
    for th in gate.thresholds:
        base = abs(original.get(th.metric, 1.0) or 1.0)
        rules.append(
            Threshold(
                metric=th.metric,
                min_recovery=None if th.min_recovery is None else max(1e-9, th.min_recovery - margin),
                max_drop=None if th.max_drop is None else th.max_drop + margin * base,
                min_value=None if th.min_value is None else th.min_value - margin,
                max_value=None if th.max_value is None else th.max_value + margin * abs(th.max_value),
            )
        )
    return GateConfig(thresholds=rules)


def retime(
    original: Any, variants: list[tuple[Any, str]], *, config: Any, threads: int | None, data_dir: Any, progress: Any = None
) -> list[dict[str, Any]]:
    """Time the original on PyTorch eager and every ``(artifact, runtime)`` together, in interleaved
    rounds; returns one speed record per variant (:func:`modelpress.bench.measure.speed_record`)."""
    from modelpress.bench.measure import speed_record, time_interleaved
    from modelpress.runtimes import create_runner
    from modelpress.tasks import task_for

    runners: list[Any] = []
    try:
        runners.append(create_runner(original, "torch", threads=threads))
        for art, runtime in variants:
            runners.append(create_runner(art, runtime, threads=threads))
        timings = time_interleaved(runners, task_for(original), config, data_dir=data_dir, progress=progress)
        sizes = [(getattr(r, "loaded_artifact", None) or r.artifact).size_bytes() for r in runners]
    finally:
        for r in runners:
            r.close()
    out = []
    for (_, runtime), timing, size in zip(variants, timings[1:], sizes[1:], strict=True):
        rec = speed_record(timings[0], timing, runtime=runtime, threads=threads, rounds=config.rounds)
        rec.update({"baseline_runtime": "torch", "original_size_bytes": sizes[0], "variant_size_bytes": size})
        out.append(rec)
    return out


def _set_speed(point: Any, speed: dict[str, Any] | None) -> None:
    """A point's throughput, latency, speed-up and size from a speed record."""
    from modelpress.optimize.step import speed_figures

    figures = speed_figures(speed)
    point.throughput = figures.get("throughput_items_per_s")
    point.latency_p50_ms = figures.get("latency_p50_ms")
    point.latency_p99_ms = figures.get("latency_p99_ms")
    point.speedup = figures.get("speedup")
    point.size_bytes = (speed or {}).get("variant_size_bytes")


def retime_points(
    retime_fn: Any, original: Any, again: list[Any], baseline: Any, points: list[Any], *, config: Any, threads: int | None,
    data_dir: Any, progress: Any,
) -> str | None:  # fmt: skip
    """Stage 5: re-time ``again`` with the baseline in one interleaved run (``retime_fn``: :func:`retime`, or
    decode tokens/s for causal LMs), update their figures and the front; returns the error message when it failed."""
    from modelpress.artifacts import Artifact
    from modelpress.errors import ModelpressError
    from modelpress.optimize.search.front import pareto_front

    try:
        advance = progress(f"re-timing {len(again)} candidates and the original together, in interleaved rounds", None)
        recs = retime_fn(
            original,
            [(Artifact.open(p.artifact) if p.artifact else original, p.runtime) for p in again],
            config=config,
            threads=threads,
            data_dir=data_dir,
        )
        advance(1)
    except ModelpressError as exc:
        return exc.message
    for p, rec in zip(again, recs, strict=True):
        _set_speed(p, rec)
        p.retimed = True
    if baseline is not None and baseline.status == "measured":
        first = recs[0]
        baseline.throughput, baseline.speedup = first.get("original_items_per_s"), 1.0
        baseline.latency_p50_ms, baseline.latency_p99_ms = first.get("original_p50_ms"), first.get("original_p99_ms")
        baseline.retimed = True
    for p in points:
        p.on_front = False
    for p in pareto_front(points, original.task):
        p.on_front = True
    return None


def _x(v: float) -> str:
    """A speed-up as people read it: 1.87x, 58x, 1800x."""
    return f"{v:.3g}x" if v < 100 else f"{v:.0f}x"
