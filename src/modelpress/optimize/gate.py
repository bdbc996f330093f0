"""The accuracy gate: a variant's quality against the original's, per metric, every failure collected.

A threshold is one of:

* ``min_recovery``: variant / original >= value (for lower-is-better metrics such as perplexity,
  original / variant), e.g. ``{metric: spearman, min_recovery: 0.99}``;
* ``max_drop``: original - variant <= value, in the metric's own units (for lower-is-better
  metrics, variant - original), e.g. ``{metric: accuracy, max_drop: 0.005}``;
* ``min_value`` / ``max_value``: an absolute floor or ceiling on the variant alone, e.g.
  ``{metric: top10_agreement, min_value: 0.95}`` (agreement metrics have no "original": the
  original agrees with itself exactly, so they are shown against 1.0).

:func:`check` compares every threshold and returns a :class:`GateResult` whose rows print as
``metric | original | variant | recovery | threshold | pass`` (the layout llm-compressor's
lm-eval tests use), so a person sees every failure at once, not only the first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field, model_validator

from modelpress.errors import ConfigError
from modelpress.optimize.configs import StrictModel
from modelpress.tasks import TASKS

# Metrics that are better when lower; everything else is higher-is-better.
LOWER_IS_BETTER = frozenset({"perplexity", "loss", "bits_per_byte"})
# Agreement metrics (every task's ``agreement_metrics``) compare a variant with the original directly; the original's own value is 1.
AGREEMENT_METRICS = frozenset(m for task in TASKS.values() for m in task.agreement_metrics)


class Threshold(StrictModel):
    """One rule of the gate, on one metric."""

    metric: str
    min_recovery: float | None = Field(None, gt=0.0, le=2.0)
    max_drop: float | None = Field(None, ge=0.0)
    min_value: float | None = None
    max_value: float | None = None

    @model_validator(mode="after")
    def _one_rule(self) -> Threshold:
        rules = [k for k in ("min_recovery", "max_drop", "min_value", "max_value") if getattr(self, k) is not None]
        if not rules:
            raise ValueError(
                f"threshold on '{self.metric}' sets no rule: give one of min_recovery, max_drop, min_value, max_value "
                "(e.g. min_recovery: 0.99)"
            )
        return self

    def describe(self) -> str:
        parts = []
        if self.min_recovery is not None:
            parts.append(f"recovery >= {self.min_recovery:.4g}")
        if self.max_drop is not None:
            parts.append(f"drop <= {self.max_drop:.4g}")
        if self.min_value is not None:
            parts.append(f">= {self.min_value:.4g}")
        if self.max_value is not None:
            parts.append(f"<= {self.max_value:.4g}")
        return ", ".join(parts)


class GateConfig(StrictModel):
    """The thresholds a variant must meet to ship."""

    thresholds: list[Threshold] = Field(default_factory=list)

    @classmethod
    def for_task(
        cls, task: str, *, max_drop: float = 0.01, min_agreement: float | None = None, agreement_metric: str | None = None
    ) -> GateConfig:
        """The default gate: the task's primary metric keeps ``1 - max_drop`` of its value.

        ``min_agreement``: also require this much agreement with the original, on
        ``agreement_metric`` (one of the task's ``agreement_metrics``, e.g. ``top10_agreement``
        for embeddings); default the task's ``agreement_metric`` (mean cosine for embeddings,
        label agreement for classifiers, top-1 token agreement for language models).
        """
        from modelpress.tasks import get_task_class

        cls_ = get_task_class(task)
        if agreement_metric is not None and agreement_metric not in cls_.agreement_metrics:
            raise ConfigError(
                f"'{agreement_metric}' is not an agreement metric of the {task} task; "
                f"it reports {', '.join(cls_.agreement_metrics)} (default: {cls_.agreement_metric}).",
                hint=f"Example: --min-agreement 0.95 --agreement-metric {cls_.agreement_metrics[-1]}",
            )
        if agreement_metric is not None and min_agreement is None:
            raise ConfigError(
                f"An agreement metric ('{agreement_metric}') was named without the value to require of it.",
                hint=f"Example: --min-agreement 0.95 --agreement-metric {agreement_metric}",
            )
        rules = [Threshold(metric=cls_.primary_metric, min_recovery=round(1.0 - max_drop, 10))]
        if min_agreement is not None:
            rules.append(Threshold(metric=agreement_metric or cls_.agreement_metric, min_value=min_agreement))
        return cls(thresholds=rules)


@dataclass
class GateRow:
    metric: str
    original: float | None
    variant: float | None
    recovery: float | None
    threshold: str
    passed: bool
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class GateResult:
    rows: list[GateRow] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    @property
    def failures(self) -> list[GateRow]:
        return [r for r in self.rows if not r.passed]

    def summary(self) -> str:
        if self.passed:
            return "passed"
        return "; ".join(f"{r.metric} {r.reason}" for r in self.failures)

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "rows": [r.to_json() for r in self.rows], "summary": self.summary()}


def recovery(metric: str, original: float, variant: float) -> float | None:
    if metric in LOWER_IS_BETTER:
        return original / variant if variant else None
    return variant / original if original else None


def check(original: dict[str, Any], variant: dict[str, Any], gate: GateConfig) -> GateResult:
    """Compare flat metric dicts (see :func:`flat_metrics`) against every threshold of ``gate``."""
    result = GateResult()
    for th in gate.thresholds:
        name = th.metric
        var = variant.get(name)
        orig = 1.0 if name in AGREEMENT_METRICS and name not in original else original.get(name)
        if var is None or (isinstance(var, float) and math.isnan(var)):
            known = ", ".join(sorted(variant)) or "none"
            result.rows.append(GateRow(name, orig, None, None, th.describe(), False, f"was not measured (measured: {known})"))
            continue
        var = float(var)
        rec = recovery(name, float(orig), var) if orig is not None else None
        reasons = []
        if th.min_recovery is not None:
            if rec is None:
                reasons.append("has no original value to compare with")
            elif rec < th.min_recovery:
                reasons.append(f"recovery {rec:.4f} < {th.min_recovery:.4g} (short by {th.min_recovery - rec:.4f})")
        if th.max_drop is not None and orig is not None:
            drop = (var - float(orig)) if name in LOWER_IS_BETTER else (float(orig) - var)
            if drop > th.max_drop:
                reasons.append(f"dropped {drop:.4g} > {th.max_drop:.4g}")
        if th.min_value is not None and var < th.min_value:
            reasons.append(f"{var:.4f} < {th.min_value:.4g}")
        if th.max_value is not None and var > th.max_value:
            reasons.append(f"{var:.4f} > {th.max_value:.4g}")
        result.rows.append(GateRow(name, None if orig is None else float(orig), var, rec, th.describe(), not reasons, "; ".join(reasons)))
    return result


def flat_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """An ``api.evaluate`` result as one flat ``{metric: value}`` (metrics and agreement)."""
    out: dict[str, float] = {}
    for section in ("metrics", "agreement"):
        for k, v in (evaluation.get(section) or {}).items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[k] = float(v)
    return out


def parse_gate(data: Any) -> GateConfig:
    """A gate from YAML/JSON data: ``{thresholds: [...]}``, a list of thresholds, or ``{metric: {rule: v}}``."""
    if data is None:
        return GateConfig()
    if isinstance(data, GateConfig):
        return data
    if isinstance(data, list):
        data = {"thresholds": data}
    if isinstance(data, dict) and "thresholds" not in data:
        try:
            data = {"thresholds": [{"metric": k, **v} for k, v in data.items()]}
        except TypeError:
            raise ConfigError(
                f"gate must map metric names to rules, got {data!r}.",
                hint="Example: gate: {spearman: {min_recovery: 0.99}, top10_agreement: {min_value: 0.95}}",
            ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"gate must be a mapping, got {type(data).__name__}.", hint="Example: gate: {spearman: {min_recovery: 0.99}}")
    return GateConfig(**data)
