"""What a rollout is asked to do: the :class:`RolloutSpec`, its strategy as phases, each phase's traffic policy.

Each strategy is a list of phases; each phase holds a traffic policy for analysis windows:

* ``canary``: a sticky split giving the candidate each share in ``steps`` (5 -> 25 -> 50 -> 100);
* ``shadow-then-canary``: first ``shadow_windows`` windows of mirrored traffic (the candidate
  answers no client), then the canary steps;
* ``blue-green``: shadow windows, then one atomic switch of all traffic, watched for one window
  with the old version still loaded (a breach switches back at once);
* ``ab``: a fixed split (``steps[0]`` percent to the candidate) until promoted or stopped;
  every window is still checked against the thresholds.
"""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from modelpress.rollout.routing import DEFAULT_STICKY_HEADER, ShadowPolicy, SinglePolicy, SplitPolicy, TrafficPolicy

STRATEGIES = ("canary", "shadow-then-canary", "blue-green", "ab")
SPEC_EXAMPLE = '{"candidate": "2", "strategy": "canary", "steps": [5, 25, 50, 100], "window_s": 60}'  # what parse_spec's errors show
ACTIVE = ("loading", "running", "paused")  # a rollout in one of these states is not over (a restarted server resumes it)
# The other states: succeeded (promoted), rolled_back (a window breached), aborted (by hand, or
# traffic changed outside the rollout) and failed (the candidate could not be loaded).


def now_iso() -> str:
    """The wall-clock time of a decision, as the registry and the API show it."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


class RolloutSpec(BaseModel):
    """What to roll out and the thresholds each analysis window is held to (unknown keys rejected)."""

    model_config = ConfigDict(extra="forbid")
    candidate: str  # version label of the candidate (the registry version number when served from the registry)
    baseline: str | None = None  # default: the version most traffic goes to now
    strategy: Literal["canary", "shadow-then-canary", "blue-green", "ab"] = "canary"
    steps: list[float] | None = None  # candidate percent per canary step (default 5, 25, 50, 100; ab: 50)
    window_s: float = Field(60.0, gt=0, le=86_400)
    max_error_rate: float = Field(0.01, ge=0, le=1)
    max_p99_ratio: float | None = Field(1.2, gt=0)
    min_agreement: float | None = Field(0.99, ge=-1, le=1)
    min_requests: int = Field(20, ge=1)  # candidate requests a window needs before it counts
    shadow_fraction: float = Field(1.0, gt=0, le=1)
    shadow_windows: int = Field(1, ge=1)
    sticky_header: str = DEFAULT_STICKY_HEADER
    source: str | None = None  # where to load the candidate when it is not loaded (default: REGISTRY_NAME:CANDIDATE)
    runtime: str | None = None  # the runtime to load the candidate on (default: the one its manifest records, else torch)
    promote: bool = True  # promote the candidate to production in the registry at the end
    keep_standby: bool = True  # keep the old version loaded after promotion, so `rollback` is instant

    @model_validator(mode="after")
    def _check_steps(self) -> RolloutSpec:
        if self.steps is None:
            self.steps = [50.0] if self.strategy == "ab" else [5.0, 25.0, 50.0, 100.0]
        if not self.steps or any(not (0 < s <= 100) or not math.isfinite(s) for s in self.steps):
            raise ValueError(f"steps must be candidate percentages in (0, 100], e.g. 5,25,50,100; got {self.steps}")
        if any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError(f"steps must increase, e.g. 5,25,50,100; got {self.steps}")
        if self.strategy in ("canary", "shadow-then-canary") and self.steps[-1] != 100:
            self.steps = [*self.steps, 100.0]
        if self.strategy == "ab" and (len(self.steps) != 1 or self.steps[0] >= 100):
            raise ValueError(f"an ab rollout holds one split: give one candidate share below 100, e.g. steps=[50]; got {self.steps}")
        return self


def parse_spec(data: dict[str, Any]) -> RolloutSpec:
    from modelpress.serving.config import validated

    return validated(RolloutSpec, data, "the rollout", what="rollout spec", example=SPEC_EXAMPLE)


def phases_of(spec: RolloutSpec) -> list[dict[str, Any]]:
    """The strategy as phases: {"phase": "shadow"|"canary"|"switch"|"ab", "weight": candidate percent}."""
    steps = spec.steps or []
    shadow = [{"phase": "shadow", "weight": 0.0, "window": i} for i in range(spec.shadow_windows)]
    if spec.strategy == "canary":
        return [{"phase": "canary", "weight": w} for w in steps]
    if spec.strategy == "shadow-then-canary":
        return [*shadow, *({"phase": "canary", "weight": w} for w in steps)]
    if spec.strategy == "blue-green":
        return [*shadow, {"phase": "switch", "weight": 100.0}]
    return [{"phase": "ab", "weight": steps[0]}]


def phase_policy(spec: RolloutSpec, step: int, model: str, baseline: str, candidate: str) -> TrafficPolicy:
    """The traffic policy of phase ``step``: a shadow, a sticky split salted by ``model``, or all to the candidate."""
    phases = phases_of(spec)
    ph = phases[min(step, len(phases) - 1)]
    if ph["phase"] == "shadow":
        return ShadowPolicy(baseline, candidate, spec.shadow_fraction)
    if ph["weight"] >= 100:
        return SinglePolicy(candidate)
    w = float(ph["weight"])
    return SplitPolicy({candidate: w, baseline: 100.0 - w}, sticky=True, sticky_header=spec.sticky_header, salt=model)


__all__ = ["ACTIVE", "STRATEGIES", "RolloutSpec", "now_iso", "parse_spec", "phase_policy", "phases_of"]
