"""What a tune leaves behind: the passing variants in the registry, and the output folder.

* :func:`register_passing`: every passing candidate registered with its quality and speed rows, as
  a child of the original (a compound candidate: original -> first step -> quantized,
  :func:`modelpress.optimize.search.compound.register`);
* :func:`write_outputs`: ``chosen/`` (the picked artifact), ``tune.json`` and the HTML report;
* :func:`search_summary`: the search's own record in ``tune.json`` (mode, stage counts, seconds).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from modelpress.artifacts import Artifact
from modelpress.optimize.search.front import Point, TuneResult
from modelpress.optimize.search.tune_cache import _write_json


def register_passing(pipe: Any, passing: list[Point], original_ref: str | None, dataset: str) -> None:
    """Register every passing candidate (cached ones too: registering the same files again returns their version)."""
    from modelpress.optimize.registering import metric_rows
    from modelpress.optimize.search import compound

    for p in passing:
        if not p.artifact:
            continue
        speed = {"throughput_items_per_s": p.throughput, "latency_p50_ms": p.latency_p50_ms, "latency_p99_ms": p.latency_p99_ms}
        rows = metric_rows(p.quality, {**speed, "speedup": p.speedup}, dataset=dataset, runtime=p.runtime)
        if p.steps:  # a compound candidate: original -> student / pruned model -> quantized
            p.registered = compound.register(pipe, p, original_ref, rows)
        else:
            p.registered = pipe.register(Artifact.open(p.artifact), original_ref, rows)


def write_outputs(result: TuneResult, output: str | os.PathLike, *, report: bool = True) -> None:
    """``chosen/``, ``tune.json`` and (``report``) ``report.html`` with its plots, in ``output``."""
    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    result.output = str(out)
    chosen = result.chosen
    if chosen is not None and chosen.artifact:
        target = out / "chosen"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(chosen.artifact, target)
    if report:
        from modelpress.optimize.search.report import tune_report

        result.report = str(tune_report(result, out))
    _write_json(out / "tune.json", result.to_json())


def search_summary(points: list[Point], *, exhaustive: bool, screen_rows: int, margin: float, **more: Any) -> dict[str, Any]:
    """``TuneResult.search``: the mode, screening rows and margin, how many candidates reached each stage, the
    re-timed ones, and ``more`` (seconds per stage, confirmations, mixed-precision candidates)."""
    from modelpress.optimize.search.front import STAGES

    return {
        "mode": "exhaustive" if exhaustive else "multi-fidelity",
        "screen_rows": screen_rows,
        "screen_margin": margin,
        "stages": {s: sum(1 for p in points if STAGES.index(p.stage) >= STAGES.index(s)) for s in STAGES[1:]},
        "retimed": [p.label for p in points if p.retimed],
        "mixed_precision": [p.label for p in points if p.float_layers is not None],
        **more,
    }
