"""Prometheus metrics of the served causal LMs, in the server's own registry (:mod:`modelpress.serving.metrics`).

Series (all prefixed ``modelpress_llm_``, labels ``model`` and ``version``):

* ``time_to_first_token_seconds`` (histogram): from a sequence's arrival to its first token;
* ``inter_token_latency_seconds`` (histogram): between two tokens of one sequence;
* ``generated_tokens_total`` and ``prompt_tokens_total`` (counters, read from the engine at
  scrape time): ``rate(modelpress_llm_generated_tokens_total[1m])`` is the tokens/s served;
* ``running_sequences`` and ``waiting_sequences`` (gauges): the running batch and the queue;
* ``kv_cache_usage`` (gauge, 0 to 1) and ``kv_cache_used_tokens`` / ``kv_cache_capacity_tokens``;
* ``decode_steps_total`` (counter): decode steps the engine ran (tokens per step = batching);
* ``sequences_total{finish_reason}`` (counter): finished sequences by reason (stop, length,
  cancelled, error).

The engine reports the latencies through its observer callback (``ttft_s``, ``itl_s``); the
counters and gauges are read from :meth:`Engine.stats` when Prometheus scrapes, so they cost
nothing between scrapes.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
FINISH_REASONS = ("stop", "length", "cancelled", "error")


class _EngineCollector:
    """A Prometheus collector reading every tracked engine's stats at scrape time."""

    def __init__(self) -> None:
        self.engines: dict[tuple[str, str], Any] = {}
        self.lock = threading.Lock()

    def describe(self) -> list[Any]:
        return []  # unknown label values until engines are tracked: nothing to check up front

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = ["model", "version"]
        fams = {
            "generated": CounterMetricFamily("modelpress_llm_generated_tokens", "Tokens generated (completion tokens).", labels=labels),
            "prompt": CounterMetricFamily("modelpress_llm_prompt_tokens", "Prompt tokens read (prefilled).", labels=labels),
            "steps": CounterMetricFamily("modelpress_llm_decode_steps", "Decode steps the engine ran.", labels=labels),
            "running": GaugeMetricFamily("modelpress_llm_running_sequences", "Sequences in the running batch.", labels=labels),
            "waiting": GaugeMetricFamily("modelpress_llm_waiting_sequences", "Sequences waiting to join the batch.", labels=labels),
            "kv_used": GaugeMetricFamily("modelpress_llm_kv_cache_used_tokens", "Token slots of the KV cache in use.", labels=labels),
            "kv_cap": GaugeMetricFamily("modelpress_llm_kv_cache_capacity_tokens", "Token slots the KV cache holds.", labels=labels),
            "kv_usage": GaugeMetricFamily("modelpress_llm_kv_cache_usage", "Fraction of the KV cache in use (0 to 1).", labels=labels),
        }
        with self.lock:
            engines = list(self.engines.items())
        for (model, version), engine in engines:
            s = engine.stats()
            key = [model, version]
            fams["generated"].add_metric(key, s.generated_tokens)
            fams["prompt"].add_metric(key, s.prompt_tokens)
            fams["steps"].add_metric(key, s.steps)
            fams["running"].add_metric(key, s.running)
            fams["waiting"].add_metric(key, s.waiting)
            fams["kv_used"].add_metric(key, s.kv_cache_used_tokens)
            fams["kv_cap"].add_metric(key, s.kv_cache_capacity_tokens)
            fams["kv_usage"].add_metric(key, s.kv_cache_used_tokens / s.kv_cache_capacity_tokens if s.kv_cache_capacity_tokens else 0.0)
        yield from fams.values()


class LLMMetrics:
    """The LLM series of one server's registry: track an engine per served version, forget it on unload."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Histogram

        ver = ["model", "version"]
        self.ttft = Histogram(
            "modelpress_llm_time_to_first_token_seconds",
            "From a sequence's arrival to its first token.",
            ver,
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.itl = Histogram(
            "modelpress_llm_inter_token_latency_seconds",
            "Time between two tokens of one sequence.",
            ver,
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        self.finished = Counter(
            "modelpress_llm_sequences", "Finished sequences by finish reason.", [*ver, "finish_reason"], registry=registry
        )
        self._collector = _EngineCollector()
        registry.register(self._collector)

    def track(self, model: str, version: str, engine: Any) -> None:
        """Read ``engine``'s stats at scrape time and record its latencies (through its observer hook)."""
        with self._collector.lock:
            self._collector.engines[(model, version)] = engine
        engine.add_observer(self.observer(model, version))
        for reason in FINISH_REASONS:  # every reason shows from the start, at 0
            self.finished.labels(model, version, reason)

    def observer(self, model: str, version: str) -> Callable[[str, Any], None]:
        ttft = self.ttft.labels(model, version)
        itl = self.itl.labels(model, version)

        def observe(event: str, value: Any) -> None:
            if event == "ttft_s":
                ttft.observe(value)
            elif event == "itl_s":
                itl.observe(value)

        return observe

    def finish(self, model: str, version: str, reason: str) -> None:
        """Count one finished sequence (the server calls it when a sequence's last event arrives)."""
        if reason in FINISH_REASONS:
            self.finished.labels(model, version, reason).inc()

    def forget(self, model: str, version: str) -> None:
        """Stop reading an unloaded version's engine (its histograms and counters stay, as Prometheus expects)."""
        with self._collector.lock:
            self._collector.engines.pop((model, version), None)


_BY_REGISTRY: weakref.WeakKeyDictionary[Any, LLMMetrics] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def llm_metrics(metrics: Any) -> LLMMetrics:
    """The :class:`LLMMetrics` of a server's :class:`~modelpress.serving.metrics.Metrics` (created on first use)."""
    with _LOCK:
        found = _BY_REGISTRY.get(metrics)
        if found is None:
            found = _BY_REGISTRY[metrics] = LLMMetrics(metrics.registry)
        return found


__all__ = ["LLMMetrics", "llm_metrics"]
