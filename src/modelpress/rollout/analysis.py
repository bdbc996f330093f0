"""Whether a candidate differs from its baseline: agreement, window verdicts, the A/B report.

* :func:`agreement`: how closely a candidate's outputs follow the primary's, per task
  (embedding cosine, label agreement, top-1 token agreement);
* :func:`evaluate`: one analysis window of a candidate held to a rollout's thresholds (what the
  rollout controller decides on);
* :func:`compare`: the A/B report of a candidate against its baseline that
  ``modelpress rollout report`` prints.

The records are :class:`~modelpress.rollout.observations.Observations`; the tests and
intervals are in :mod:`modelpress.rollout.statistics` (both re-exported here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelpress.rollout.observations import Observations, WindowStats
from modelpress.rollout.statistics import ALPHA, TestResult, bootstrap_ci, error_rate_test, outcome_test, proportion_ci

EARLY_BREACH_CONFIDENCE = 0.95  # mid-window: breach only when the error rate's lower bound at this confidence is past the limit


# -- agreement --------------------------------------------------------------------------
def agreement_rows(task: str, primary: Sequence[Any], candidate: Sequence[Any]) -> np.ndarray:
    """Per-row agreement, the task's own measure (``Task.agreement_rows``): embedding cosine, same label, same top-1 token."""
    from modelpress.tasks import get_task_class

    return get_task_class(task).agreement_rows(primary, candidate)


def agreement(task: str, primary: Sequence[Any], candidate: Sequence[Any]) -> float:
    """Mean per-row agreement of one request's outputs (see :func:`agreement_rows`)."""
    rows = agreement_rows(task, primary, candidate)
    return float(rows.mean()) if rows.size else float("nan")


# -- window verdicts (what the rollout controller decides on) ---------------------------------
@dataclass
class Verdict:
    """``pass``, ``breach`` or ``wait`` (too little data), with the reasons and the numbers."""

    action: str
    reasons: list[str] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)


def evaluate(
    spec: Any,
    candidate: WindowStats,
    baseline: WindowStats,
    *,
    reference_p99: float | None = None,
    shadow: bool = False,
    early: bool = False,
) -> Verdict:
    """Hold one window of the candidate (live or shadow) against its baseline and the thresholds of ``spec``.

    ``spec``: a :class:`~modelpress.rollout.controller.RolloutSpec` (min_requests, max_error_rate,
    max_p99_ratio, min_agreement). ``early``: mid-window, only a clear error-rate breach counts.
    """
    base_p99 = (
        baseline.p99 if baseline.latencies.size >= spec.min_requests else (reference_p99 if reference_p99 is not None else float("nan"))
    )
    ratio = candidate.p99 / base_p99 if math.isfinite(candidate.p99) and math.isfinite(base_p99) and base_p99 > 0 else float("nan")
    numbers: dict[str, Any] = {
        "candidate": candidate.to_json(),
        "baseline": baseline.to_json(),
        "baseline_p99_ms": round(base_p99 * 1000, 3) if math.isfinite(base_p99) else None,
        "p99_ratio": round(ratio, 4) if math.isfinite(ratio) else None,
        "thresholds": {
            "max_error_rate": spec.max_error_rate,
            "max_p99_ratio": spec.max_p99_ratio,
            "min_agreement": spec.min_agreement if shadow else None,
        },
    }
    if candidate.n < spec.min_requests:
        return Verdict("wait", [f"{candidate.n} candidate requests in the window; {spec.min_requests} needed"], numbers)
    reasons = []
    rate = candidate.error_rate
    if early:
        low, _ = proportion_ci(candidate.errors, candidate.n, EARLY_BREACH_CONFIDENCE)
        numbers["error_rate_low"] = round(low, 6)
        if low > spec.max_error_rate:
            reasons.append(f"error rate {rate:.2%} (at least {low:.2%}) > {spec.max_error_rate:.2%}")
        return Verdict("breach" if reasons else "wait", reasons, numbers)
    if rate > spec.max_error_rate:
        reasons.append(f"error rate {rate:.2%} > {spec.max_error_rate:.2%}")
    if spec.max_p99_ratio is not None and math.isfinite(ratio) and ratio > spec.max_p99_ratio:
        reasons.append(
            f"p99 {candidate.p99 * 1000:.1f} ms is {ratio:.2f}x the baseline's {base_p99 * 1000:.1f} ms > {spec.max_p99_ratio:g}x"
        )
    if shadow and spec.min_agreement is not None:
        if candidate.n_agreement == 0 and candidate.n:
            reasons.append(
                "no shadow copy answered with a comparable result, so agreement cannot be measured "
                "(an LLM's copies are scored on greedy requests only: send some with temperature 0)"
            )
        elif math.isfinite(candidate.agreement) and candidate.agreement < spec.min_agreement:
            reasons.append(f"agreement {candidate.agreement:.4f} < {spec.min_agreement:g}")
    if reasons:
        return Verdict("breach", reasons, numbers)
    return Verdict("pass", ["within every threshold"], numbers)


# -- the A/B report -----------------------------------------------------------------------
def _version_summary(w: WindowStats, seed: int) -> dict[str, Any]:
    out = w.to_json()
    lo, hi = proportion_ci(w.errors, w.n)
    out["error_rate_ci"] = [round(lo, 6), round(hi, 6)] if w.n else None
    for name, q in (("p50", "p50"), ("p99", "p99")):
        _estimate, low, high = bootstrap_ci(w.latencies, q, seed=seed) if w.latencies.size else (float("nan"),) * 3
        out[f"{name}_ms_ci"] = [round(low * 1000, 3), round(high * 1000, 3)] if math.isfinite(low) else None
    return out


def compare(
    obs: Observations, model: str, baseline: str, candidate: str, *, since: float | None = None, alpha: float = ALPHA, seed: int = 0
) -> dict[str, Any]:
    """The A/B report: per-version counts, error rates and latency percentiles with CIs, and the tests.

    Tests: error rate (z / Fisher), latency (Mann-Whitney U on the per-request times), and
    each outcome metric clients reported (Welch's t and Mann-Whitney U). ``significant`` is
    True when any test rejects "no difference" at ``alpha``.
    """
    wa, wb = obs.window(model, baseline, since), obs.window(model, candidate, since)
    tests = [error_rate_test(wa.errors, wa.n, wb.errors, wb.n, alpha=alpha)]
    if wa.latencies.size >= 2 and wb.latencies.size >= 2:
        lat = outcome_test(wa.latencies * 1000, wb.latencies * 1000, metric="latency_ms", method="mann-whitney", alpha=alpha)
        tests.append(lat)
    for metric in obs.metrics_of(model):
        a, b = obs.outcome_values(model, baseline, metric, since), obs.outcome_values(model, candidate, metric, since)
        tests.append(outcome_test(a, b, metric=metric, method="welch", alpha=alpha))
        tests.append(outcome_test(a, b, metric=metric, method="mann-whitney", alpha=alpha))
    sa, sb = _version_summary(wa, seed), _version_summary(wb, seed)
    for metric in obs.metrics_of(model):
        for summary, version in ((sa, baseline), (sb, candidate)):
            vals = obs.outcome_values(model, version, metric, since)
            summary.setdefault("outcomes", {})[metric] = {"n": int(vals.size), "mean": round(float(vals.mean()), 6) if vals.size else None}
    shadow = obs.shadow_window(model, candidate, since)
    if shadow.n:
        sb["shadow"] = shadow.to_json()
    return {
        "model": model,
        "baseline": baseline,
        "candidate": candidate,
        "alpha": alpha,
        "versions": {baseline: sa, candidate: sb},
        "tests": [t.to_json() for t in tests],
        "significant": any(t.significant for t in tests),
    }


__all__ = [
    "ALPHA",
    "Observations",
    "TestResult",
    "Verdict",
    "WindowStats",
    "agreement",
    "agreement_rows",
    "bootstrap_ci",
    "compare",
    "error_rate_test",
    "evaluate",
    "outcome_test",
    "proportion_ci",
]
