"""What shadow copies did: the server's mirror observer that records them for rollouts and the dashboard.

The server's :class:`~modelpress.serving.routing.Mirror` runs the copies a shadow policy asks
for; :class:`ShadowRecorder` is told each outcome and records it in the
:class:`~modelpress.rollout.observations.Observations` (latency, error, agreement with what the
primary answered) and as Prometheus series (``modelpress_shadow_requests_total``,
``modelpress_shadow_agreement``).

Causal LMs (:mod:`modelpress.serving.llm_shadow`): a copy's results are what the candidate
generated for each prompt; its agreement is the share of greedy prompts whose first token is the
primary's (:func:`~modelpress.serving.llm_shadow.first_token_agreement`; None, not scored, when
the client sampled), and its latency is the candidate's time to first token, the latency the
primary reported for the same request.
"""

from __future__ import annotations

import logging
from typing import Any

from modelpress.rollout.analysis import agreement
from modelpress.rollout.observations import Observations
from modelpress.serving.llm_shadow import GenerationAnswer, first_token_agreement

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
        if results and all(isinstance(r, GenerationAnswer) for r in results):
            self._generated(primary_results, candidate, results, seconds)
            return
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

    def _generated(self, primary_results: list[Any], candidate: Any, results: list[GenerationAnswer], seconds: float) -> None:
        """An LLM's copy: first-token agreement on the greedy prompts, the candidate's time to first token."""
        agree = first_token_agreement(primary_results, results)
        ttfts = [r.ttft_s for r in results if r.ttft_s is not None]
        self.observations.shadow(candidate.name, candidate.version, max(ttfts) if ttfts else seconds, ok=True, agreement=agree)
        if self.metrics is not None:
            self.metrics.observe_shadow(candidate.name, candidate.version, "ok", agree)


__all__ = ["ShadowRecorder"]
