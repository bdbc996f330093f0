"""The measured points of a tune and their Pareto front of quality against speed.

A :class:`Point` is one measured candidate; :class:`TuneResult` all of them, the front and the
choice. The front's quality axis is the task's agreement with the original (``Task.agreement_metric``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modelpress.tasks import TASKS

# How far a candidate got in the tuner's search (each stage includes the ones before it).
STAGES = ("planned", "built", "timed", "screened", "scored")

# Why a candidate went no further (Point.stop); None: it was scored in full and passed the gate.
STOP_SLOWER = "slower than a passing candidate"
STOP_SCREEN = "failed screening"
STOP_GATE = "failed the gate"
STOP_BUDGET = "budget spent"
STOP_ERROR = "error"
# A compound candidate (:mod:`.compound`) is not built under a budget shorter than its training needs.
STOP_NEEDS_BUDGET = "needs a longer budget"
FACT_STOPS = (STOP_SCREEN, STOP_GATE, STOP_ERROR)  # facts about the candidate itself, kept in the cache


@dataclass
class Point:
    """A candidate and what the search found out about it.

    ``status``: ``measured`` (fully scored and timed), ``timed`` (built and timed, its quality not
    fully scored: see ``stop``), ``failed`` (an error), ``skipped`` (not tried).
    ``stage``: how far it got (:data:`STAGES`); ``stop``: why it went no further (one of the
    ``STOP_*`` texts of :mod:`modelpress.optimize.search.tune`; None when it passed the gate),
    ``reason``: the details. A compound candidate (two steps chained, :mod:`.compound`) has
    ``steps`` (both configs, in order), ``intermediate`` (the first step's artifact, the parent of
    ``artifact`` in the lineage) and ``training`` (what its first step's training did). A mixed-precision
    candidate (:mod:`.mixed`) has ``float_layers``: the layers it keeps in float.
    """

    label: str
    runtime: str
    step: dict[str, Any] | None
    peer: str | None
    status: str  # measured, timed, failed, skipped
    quality: dict[str, float] = field(default_factory=dict)
    recovery: float | None = None
    throughput: float | None = None  # items/s at the tuner's batch
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    size_bytes: int | None = None
    gate: dict[str, Any] | None = None
    passed: bool = False
    speedup: float | None = None
    on_front: bool = False
    artifact: str | None = None
    error: str | None = None
    cached: bool = False
    seconds: float = 0.0
    registered: str | None = None
    stage: str = "planned"
    stop: str | None = None
    reason: str | None = None
    screen: dict[str, Any] | None = None  # the screening verdict on the subsample: {rows, margin, passed, gate, quality}
    first_speedup: float | None = None  # the speed-up of its own timing (stage 2), before the final re-timing
    first_throughput: float | None = None
    retimed: bool = False  # its figures come from the final interleaved re-timing
    steps: list[dict[str, Any]] | None = None  # a compound candidate's steps (first, then quantization)
    intermediate: str | None = None  # a compound candidate's first-step artifact (student / pruned model)
    training: dict[str, Any] | None = None  # a compound candidate's training: seconds, steps, why it stopped, layers
    float_layers: list[str] | None = None  # a mixed-precision candidate's layers kept in float, most sensitive first (:mod:`.mixed`)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TuneResult:
    model: str
    task: str
    dataset: str
    primary_metric: str
    original: dict[str, Any]
    points: list[Point]
    chosen: Point | None
    gate: dict[str, Any]
    machine: dict[str, Any]
    settings: dict[str, Any]
    output: str | None = None
    report: str | None = None
    registered_original: str | None = None
    notes: list[str] = field(default_factory=list)  # what the search wants the reader to know (the budget, the re-timing)
    search: dict[str, Any] = field(default_factory=dict)  # mode, stage seconds, screening rows and margin, re-timed points

    @property
    def front(self) -> list[Point]:
        return [p for p in self.points if p.on_front]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "task": self.task,
            "dataset": self.dataset,
            "primary_metric": self.primary_metric,
            "original": self.original,
            "chosen": self.chosen.to_json() if self.chosen else None,
            "front": [p.label for p in self.front],
            "points": [p.to_json() for p in self.points],
            "gate": self.gate,
            "machine": self.machine,
            "settings": self.settings,
            "output": self.output,
            "report": self.report,
            "registered_original": self.registered_original,
            "notes": self.notes,
            "search": self.search,
        }


# The fidelity measure of each task: how closely a variant's outputs follow the original's on the
# same inputs. It is the front's quality axis: the primary metric on a dev split moves by about
# 1e-3 from sampling alone (an int8 model can "beat" fp32 on Spearman), while agreement with the
# original measures exactly what an optimization changed. Each task names its own (Task.agreement_metric).
FIDELITY = {name: task.agreement_metric for name, task in TASKS.items()}


def fidelity(p: Point, task: str) -> float | None:
    """The point's agreement with the original (the task's FIDELITY metric), else its recovery."""
    value = p.quality.get(FIDELITY.get(task, ""))
    return float(value) if value is not None else p.recovery


def pareto_front(points: list[Point], task: str = "") -> list[Point]:
    """Measured points that no other point beats on quality (fidelity), throughput and latency at once.

    A point is dominated when another is at least as good on all three (higher fidelity, higher
    throughput, lower p50 latency) and strictly better on one.
    """
    pts = [p for p in points if p.status == "measured" and fidelity(p, task) is not None and p.throughput is not None]

    def key(p: Point) -> tuple[float, float, float]:  # only points with a fidelity and a throughput get here
        return (fidelity(p, task) or 0.0, p.throughput or 0.0, -(p.latency_p50_ms if p.latency_p50_ms is not None else float("inf")))

    front = []
    for p in pts:
        kp = key(p)
        dominated = any(q is not p and all(a >= b for a, b in zip(key(q), kp, strict=True)) and key(q) != kp for q in pts)
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p.throughput or 0.0)
