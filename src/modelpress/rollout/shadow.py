"""What shadow copies did: the server's mirror observer that records them for rollouts and the dashboard.

The server's :class:`~modelpress.serving.routing.Mirror` runs the copies a shadow policy asks
for; :class:`ShadowRecorder` is told each outcome and records it in the
:class:`~modelpress.rollout.observations.Observations` (latency, error, agreement with what the
primary answered) and as Prometheus series (``modelpress_shadow_requests_total``,
``modelpress_shadow_agreement``).
"""

from __future__ import annotations

import logging
from typing import Any

from modelpress.rollout.analysis import agreement
from modelpress.rollout.observations import Observations

log = logging.getLogger("modelpress.rollout")


class ShadowRecorder:
    """A :class:`~modelpress.serving.routing.MirrorObserver` writing into ``observations`` and ``metrics``."""

    def __init__(self, observations: Observations, metrics: Any = None) -> None:
        self.observations = observations
        self.metrics = metrics  # a serving.metrics.Metrics, or None

    def dropped(self, model: str, version: str) -> None:
        self.observations.shadow_dropped(model, version)
        if self.metrics is not None:
            self.metrics.observe_shadow(model, version, "dropped")

    def failed(self, candidate: Any, seconds: float, error: BaseException) -> None:
        self.observations.shadow(candidate.name, candidate.version, seconds, ok=False, error=type(error).__name__)
        if self.metrics is not None:
            self.metrics.observe_shadow(candidate.name, candidate.version, "error")

    def answered(self, primary: Any, primary_results: list[Any], candidate: Any, results: list[Any], seconds: float) -> None:
        try:
            agree = agreement(primary.task, primary_results, results)
        except Exception as exc:  # noqa: BLE001  (outputs that cannot be compared, e.g. other shapes, are a disagreement)
            log.warning(
                "shadow outputs of %s:%s cannot be compared with %s:%s (%r)",
                candidate.name,
                candidate.version,
                primary.name,
                primary.version,
                exc,
            )
            agree = 0.0
        self.observations.shadow(candidate.name, candidate.version, seconds, ok=True, agreement=agree)
        if self.metrics is not None:
            self.metrics.observe_shadow(candidate.name, candidate.version, "ok", agree)


__all__ = ["ShadowRecorder"]
