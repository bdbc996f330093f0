"""The tuner's cache: each candidate's result, stage by stage, under ``MODELPRESS_HOME/cache/tune``.

An entry is keyed by (artifact hash, config, runtime, machine, dataset, gate, measurement
settings) and holds ``point.json`` (written last, atomically) and the variant's artifact folder.
It keeps what is a fact about a candidate (figures, screening and gate verdicts, an error), not
why the last run stopped it (slower, budget), which depends on the other candidates and the budget.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modelpress._fs import atomic_write_text, crash_point
from modelpress.artifacts import Artifact
from modelpress.errors import ArtifactError
from modelpress.optimize.search.candidates import Candidate
from modelpress.optimize.search.front import FACT_STOPS, STOP_SCREEN, Point

# bump when what a cached result means changes (2: speed-ups timed side by side with the baseline;
# 3: an entry holds a candidate's stage, its own timing and its screening verdict, written stage by stage)
CACHE_VERSION = 3


def _machine_key(machine: dict[str, Any]) -> dict[str, Any]:
    return {k: machine.get(k) for k in ("cpu", "flags", "machine")}


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def _cached_point(entry: Path) -> dict[str, Any] | None:
    """A cache entry's result, when complete: ``point.json`` (written last, atomically) and, for a
    variant, its artifact folder intact. Anything less (a run killed midway) is measured again."""
    try:
        data = json.loads((entry / "point.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    if data.get("artifact"):
        try:
            if Artifact.open(data["artifact"]).verify():
                return None
        except (ArtifactError, OSError):
            return None
    if data.get("intermediate"):  # a compound candidate: its first step's artifact too (its lineage)
        try:
            if Artifact.open(data["intermediate"]).verify():
                return None
        except (ArtifactError, OSError):
            return None
    return data


def _save(entry: Path, point: Point) -> None:
    """Cache what is known of ``point`` now (its stage, figures and verdicts; not this run's decisions' bookkeeping)."""
    skip = ("cached", "on_front", "registered", "retimed")
    _write_json(entry / "point.json", {k: v for k, v in point.to_json().items() if k not in skip})
    crash_point("tune-point")


def _resume(data: dict[str, Any], cand: Candidate, screen_rows: int, margin: float) -> Point:
    """A cached point, keeping its facts (figures, verdicts, errors), not the last run's reasons to stop
    (slower, budget), which depend on the other candidates and the budget."""
    known = set(Point.__dataclass_fields__)
    point = Point(**{k: v for k, v in data.items() if k in known})
    point.peer, point.cached, point.on_front, point.retimed = cand.peer, True, False, False
    if point.first_speedup is not None:  # the figures of its own timing (the last run's re-timing is not kept)
        point.speedup, point.throughput = point.first_speedup, point.first_throughput
    screen = point.screen or {}
    if screen and (screen.get("rows") != screen_rows or screen.get("margin") != margin):  # screened another way: screen again
        point.screen = None
        if point.stage == "screened":
            point.stage = "timed"
        if point.stop == STOP_SCREEN:
            point.stop = point.reason = None
    if point.stop not in FACT_STOPS:
        point.stop = point.reason = None
    return point
