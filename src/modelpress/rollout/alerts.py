"""Prometheus alert rules for the models a modelpress server serves.

    modelpress alerts --config serve.yaml -o rules.yaml       # or: modelpress alerts minilm tiny-enc
    promtool check rules rules.yaml                           # where Prometheus' tools are installed

One rule group per model, four alerts each, over the series :mod:`modelpress.serving.metrics`
exports (names checked against a live server's ``/metrics`` by the tests):

* ``ModelpressHighErrorRate``: share of a version's requests that failed (5xx and 429);
* ``ModelpressHighP99Latency``: ``histogram_quantile(0.99, ...)`` over ``request_duration_seconds``;
* ``ModelpressQueueSaturated``: ``queue_depth`` against the model's ``max_queue_size`` (beyond it: 429);
* ``ModelpressShadowDisagreement``: mean agreement of shadow copies with the primary.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelpress.errors import ConfigError

# The series the rules read, exactly as serving/metrics.py names them (counters gain _total,
# histograms _bucket/_sum/_count on /metrics).
REQUESTS = "modelpress_requests_total"
LATENCY_BUCKET = "modelpress_request_duration_seconds_bucket"
QUEUE_DEPTH = "modelpress_queue_depth"
SHADOW_REQUESTS = "modelpress_shadow_requests_total"
SHADOW_AGREEMENT_SUM = "modelpress_shadow_agreement_sum"
SHADOW_AGREEMENT_COUNT = "modelpress_shadow_agreement_count"
FAILED_STATUS = "5..|429"  # what the rollout controller counts as the version's failure (not 4xx client input)
DEFAULT_MAX_QUEUE_SIZE = 1024  # BatchConfig's default, for models named without a config


@dataclass
class AlertThresholds:
    """When each alert fires; ``for_`` is how long the condition must hold (Prometheus duration)."""

    max_error_rate: float = 0.01
    max_p99_s: float = 0.5
    max_queue_fill: float = 0.8  # queue depth / max_queue_size
    min_agreement: float = 0.99
    rate_window: str = "5m"
    for_: str = "5m"
    severity: str = "page"

    def __post_init__(self) -> None:
        for key in ("max_error_rate", "max_queue_fill", "min_agreement"):
            v = getattr(self, key)
            if not isinstance(v, int | float) or not 0 <= v <= 1:
                raise ConfigError(f"Alert threshold {key}={v!r} must be a fraction in [0, 1].", hint=f"Example: {key}=0.01 (1%)")
        if not isinstance(self.max_p99_s, int | float) or self.max_p99_s <= 0:
            raise ConfigError(f"Alert threshold max_p99_s={self.max_p99_s!r} must be seconds above 0.", hint="Example: max_p99_s=0.25")
        for key in ("rate_window", "for_"):
            if not re.fullmatch(r"[0-9]+(ms|s|m|h|d)", str(getattr(self, key))):
                raise ConfigError(f"Alert setting {key}={getattr(self, key)!r} is not a Prometheus duration.", hint="Examples: 30s, 5m, 1h")


def _models_of(models: Any) -> dict[str, int]:
    """{served name: max_queue_size} from a ServerConfig, a list of names, or {name: max_queue_size}."""
    from modelpress.serving.config import ServerConfig

    if isinstance(models, ServerConfig):
        out: dict[str, int] = {}
        for m in models.models:
            name = m.name or m.source.split("@")[0].split(":")[0].rstrip("/").split("/")[-1]
            out[name] = m.batching.max_queue_size
        return out
    if isinstance(models, dict):
        return {str(k): int(v) for k, v in models.items()}
    if isinstance(models, str):
        models = [models]
    return {str(m): DEFAULT_MAX_QUEUE_SIZE for m in models}


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def alert_rules(models: Any, thresholds: AlertThresholds | dict[str, Any] | None = None) -> dict[str, Any]:
    """A Prometheus rules document (``{"groups": [...]}``) with the four alerts for every model.

    ``models``: a :class:`ServerConfig` (names and queue sizes from it), served names, or
    ``{name: max_queue_size}``. ``thresholds``: an :class:`AlertThresholds` or its fields as a dict.
    """
    th = thresholds if isinstance(thresholds, AlertThresholds) else AlertThresholds(**(thresholds or {}))
    served = _models_of(models)
    if not served:
        raise ConfigError(
            "No model to write alert rules for.", hint="Example: modelpress alerts minilm -o rules.yaml (or --config serve.yaml)"
        )
    w = th.rate_window
    groups = []
    for name, max_queue in served.items():
        sel = f'model="{_label(name)}"'
        by = "sum by (model, version)"
        rules = [
            {
                "alert": "ModelpressHighErrorRate",
                "expr": f'{by} (rate({REQUESTS}{{{sel},status=~"{FAILED_STATUS}"}}[{w}]))'
                f" / {by} (rate({REQUESTS}{{{sel}}}[{w}])) > {th.max_error_rate:g}",
                "summary": "{{ $labels.model }}:{{ $labels.version }} fails {{ $value | humanizePercentage }} of its requests",
                "description": f"More than {100 * th.max_error_rate:g}% of requests answered 5xx or 429 over {w}. "
                f"During a rollout: modelpress rollout status {name}; to go back: modelpress rollback {name}.",
            },
            {
                "alert": "ModelpressHighP99Latency",
                "expr": f"histogram_quantile(0.99, sum by (le, model, version) (rate({LATENCY_BUCKET}{{{sel}}}[{w}]))) > {th.max_p99_s:g}",
                "summary": "{{ $labels.model }}:{{ $labels.version }} p99 latency is {{ $value | humanizeDuration }}",
                "description": f"The 99th percentile of request time is above {th.max_p99_s:g} s over {w}.",
            },
            {
                "alert": "ModelpressQueueSaturated",
                "expr": f"max by (model, version) ({QUEUE_DEPTH}{{{sel}}}) / {max_queue} > {th.max_queue_fill:g}",
                "summary": "{{ $labels.model }}:{{ $labels.version }} queue is {{ $value | humanizePercentage }} full",
                "description": f"More than {100 * th.max_queue_fill:g}% of max_queue_size ({max_queue} rows) is waiting; "
                "beyond it requests answer 429. Add instances or lower the load.",
            },
            {
                "alert": "ModelpressShadowDisagreement",
                "expr": f"{by} (rate({SHADOW_AGREEMENT_SUM}{{{sel}}}[{w}]))"
                f" / {by} (rate({SHADOW_AGREEMENT_COUNT}{{{sel}}}[{w}])) < {th.min_agreement:g}",
                "summary": "shadow {{ $labels.model }}:{{ $labels.version }} agrees {{ $value }} with the primary",
                "description": "Mean agreement of shadow copies (embedding cosine, label or top-1 token agreement) "
                f'is below {th.min_agreement:g} over {w}; failed copies: {SHADOW_REQUESTS}{{status="error"}}.',
            },
        ]
        groups.append(
            {
                "name": f"modelpress-{name}",
                "rules": [
                    {
                        "alert": r["alert"],
                        "expr": r["expr"],
                        "for": th.for_,
                        "labels": {"severity": th.severity, "model": name},
                        "annotations": {"summary": r["summary"], "description": r["description"]},
                    }
                    for r in rules
                ],
            }
        )
    return {"groups": groups}


def write_rules(rules: dict[str, Any], path: str | os.PathLike) -> Path:
    import yaml

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(rules, sort_keys=False, width=1000))
    return p


__all__ = ["AlertThresholds", "alert_rules", "write_rules"]
