"""Prometheus metrics of one server (its own registry: no process-wide state).

Series (all prefixed ``modelpress_``):

* ``requests_total{model,version,protocol,status}`` and
  ``request_duration_seconds{model,version,protocol,status}`` (histogram), for every HTTP request;
  requests that name no loaded model have empty model and version labels (a client cannot
  create label values);
* ``queue_time_seconds{model,version}``: from a row's arrival to its batch's start;
* ``batch_size{model,version}`` and ``batch_duration_seconds{model,version}``;
* ``inflight_requests{model,version}`` and ``queue_depth{model,version}`` gauges (read at scrape time);
* ``model_load_seconds{model,version}``: load plus warm-up time of each loaded version;
* ``shadow_requests_total{model,version,status}`` (status ok, error, dropped) and
  ``shadow_agreement{model,version}`` (histogram of per-copy agreement with the primary) for
  mirrored copies (the alert rules of :mod:`modelpress.rollout.alerts` read them).

Bounded: the series of a version stay after it is unloaded (a scrape after a hot swap still sees
what it answered) for the last :data:`MAX_RETIRED_VERSIONS` unloaded versions; older ones are
removed, so loading ever new version labels cannot grow the registry without end.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
AGREEMENT_BUCKETS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
MAX_RETIRED_VERSIONS = 64  # unloaded versions whose series are kept; the oldest beyond are removed


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        req = ["model", "version", "protocol", "status"]
        ver = ["model", "version"]
        self.requests = Counter("modelpress_requests", "HTTP requests answered.", req, registry=r)
        self.latency = Histogram(
            "modelpress_request_duration_seconds", "Time to answer a request.", req, buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_time = Histogram(
            "modelpress_queue_time_seconds", "Time rows waited before their batch ran.", ver, buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram("modelpress_batch_size", "Rows per batch run.", ver, buckets=BATCH_BUCKETS, registry=r)
        self.batch_duration = Histogram(
            "modelpress_batch_duration_seconds", "Time to run one batch.", ver, buckets=LATENCY_BUCKETS, registry=r
        )
        self.inflight = Gauge("modelpress_inflight_requests", "Requests being answered by a model version.", ver, registry=r)
        self.queue_depth = Gauge("modelpress_queue_depth", "Rows waiting in a model version's queue.", ver, registry=r)
        self.load_seconds = Gauge("modelpress_model_load_seconds", "Seconds to load and warm up a model version.", ver, registry=r)
        self.shadow_requests = Counter(
            "modelpress_shadow_requests",
            "Mirrored (shadow) copies by outcome: ok, error, dropped.",
            ["model", "version", "status"],
            registry=r,
        )
        self.shadow_agreement = Histogram(
            "modelpress_shadow_agreement",
            "Agreement of a shadow copy's outputs with the primary's.",
            ver,
            buckets=AGREEMENT_BUCKETS,
            registry=r,
        )
        self._children: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}
        self._retired: deque[tuple[str, str]] = deque()  # unloaded (model, version), oldest first

    def observe_request(self, model: str, version: str, protocol: str, status: int, seconds: float) -> None:
        key = (model, version, protocol, str(status))
        pair = self._children.get(key)
        if pair is None:
            pair = self._children[key] = (self.requests.labels(*key), self.latency.labels(*key))
        pair[0].inc()
        pair[1].observe(seconds)

    def observe_shadow(self, model: str, version: str, status: str, agreement: float | None = None) -> None:
        self.shadow_requests.labels(model, version, status).inc()
        if agreement is not None:
            self.shadow_agreement.labels(model, version).observe(agreement)

    def batch_observer(self, model: str, version: str) -> Callable[[int, list[float], float], None]:
        """A callback for the batcher of one version: batch size, queue times, run time."""
        size = self.batch_size.labels(model, version)
        queue = self.queue_time.labels(model, version)
        duration = self.batch_duration.labels(model, version)

        def observe(n: int, queue_seconds: list[float], seconds: float) -> None:
            size.observe(n)
            duration.observe(seconds)
            for q in queue_seconds:
                queue.observe(q)

        return observe

    def track_version(
        self, model: str, version: str, *, inflight: Callable[[], float], depth: Callable[[], float], load_seconds: float
    ) -> None:
        self.track_version_again(model, version)
        self.inflight.labels(model, version).set_function(inflight)
        self.queue_depth.labels(model, version).set_function(depth)
        self.load_seconds.labels(model, version).set(load_seconds)

    def forget_version(self, model: str, version: str) -> None:
        """Drop the gauges of an unloaded version; its counters and histograms stay (as Prometheus expects) while it is
        one of the last MAX_RETIRED_VERSIONS unloaded, then go too."""
        for gauge in (self.inflight, self.queue_depth, self.load_seconds):
            with contextlib.suppress(KeyError):  # never set for this version
                gauge.remove(model, version)
        key = (model, version)
        if key in self._retired:
            self._retired.remove(key)
        self._retired.append(key)
        while len(self._retired) > MAX_RETIRED_VERSIONS:
            self._drop_series(*self._retired.popleft())

    def _drop_series(self, model: str, version: str) -> None:
        for labels in [k for k in self._children if k[0] == model and k[1] == version]:
            del self._children[labels]
            for metric in (self.requests, self.latency):
                with contextlib.suppress(KeyError):
                    metric.remove(*labels)
        for metric in (self.queue_time, self.batch_size, self.batch_duration, self.shadow_agreement):
            with contextlib.suppress(KeyError):
                metric.remove(model, version)
        for status in ("ok", "error", "dropped"):
            with contextlib.suppress(KeyError):
                self.shadow_requests.remove(model, version, status)

    def track_version_again(self, model: str, version: str) -> None:
        """A version label loaded again is no longer retired."""
        with contextlib.suppress(ValueError):
            self._retired.remove((model, version))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
