"""What each served version did: the records rollouts, reports and the dashboard read.

:class:`Observations` (one per server, on its event loop) keeps, per model and version, the
recent requests it answered (when, how long, ok or not), what its shadow copies did (latency,
error, agreement with the primary), and numeric outcomes clients report back by request id
(``POST /feedback``). Everything is bounded (:data:`MAX_RECORDS` per version). Times come from
``clock`` (default :func:`time.monotonic`), so tests can drive windows with a fake clock.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelpress.errors import ConfigError, RolloutNotFoundError

MAX_RECORDS = 100_000  # per model version and kind: about 11 MB; older records fall off
MAX_REQUEST_IDS = 100_000  # request id -> version, for feedback (about 15 MB); older ids are forgotten

Clock = Callable[[], float]


@dataclass
class WindowStats:
    """What one version did in a time window: requests, errors, latency percentiles (seconds), agreement."""

    n: int = 0
    errors: int = 0
    p50: float = float("nan")
    p99: float = float("nan")
    agreement: float = float("nan")
    n_agreement: int = 0
    latencies: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @property
    def error_rate(self) -> float:
        return self.errors / self.n if self.n else float("nan")

    def to_json(self) -> dict[str, Any]:
        def num(v: float, digits: int = 6) -> float | None:
            return round(float(v), digits) if math.isfinite(v) else None

        return {
            "requests": self.n,
            "errors": self.errors,
            "error_rate": num(self.error_rate),
            "p50_ms": num(self.p50 * 1000, 3),
            "p99_ms": num(self.p99 * 1000, 3),
            "agreement": num(self.agreement),
            "agreement_n": self.n_agreement,
        }


def _stats(records: list[tuple], agreement_at: int | None = None) -> WindowStats:
    if not records:
        return WindowStats()
    arr = np.asarray([(r[1], r[2]) for r in records], dtype=np.float64)
    ok = arr[:, 1] > 0
    lat = arr[ok, 0] if ok.any() else arr[:, 0]
    out = WindowStats(n=len(records), errors=int((~ok).sum()), latencies=lat)
    if lat.size:
        out.p50, out.p99 = (float(v) for v in np.percentile(lat, [50, 99]))
    if agreement_at is not None:
        agree = np.asarray([r[agreement_at] for r in records if r[agreement_at] is not None], dtype=np.float64)
        agree = agree[np.isfinite(agree)]
        out.n_agreement = int(agree.size)
        out.agreement = float(agree.mean()) if agree.size else float("nan")
    return out


class Observations:
    """Per model version: answered requests, shadow copies, reported outcomes (bounded, in memory)."""

    def __init__(self, max_records: int = MAX_RECORDS, max_request_ids: int = MAX_REQUEST_IDS, *, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.max_records = max_records
        self.max_request_ids = max_request_ids
        self.live: dict[tuple[str, str], deque[tuple[float, float, int]]] = {}
        self.shadows: dict[tuple[str, str], deque[tuple[float, float, int, float | None]]] = {}
        self.outcomes: dict[tuple[str, str, str], deque[tuple[float, float]]] = {}
        self.dropped: dict[tuple[str, str], int] = {}
        self._requests: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._keys: dict[tuple[str, str], tuple[str, str]] = {}
        self.wall_offset = time.time() - clock()  # wall clock = this clock + this

    # recording ------------------------------------------------------------------------------
    def _deque(self, table: dict, key: tuple) -> deque:
        d = table.get(key)
        if d is None:
            d = table[key] = deque(maxlen=self.max_records)
        return d

    def answered(self, model: str, version: str, seconds: float, ok: bool, request_id: str | None = None) -> None:
        """Record one request ``model:version`` answered (``ok``) or failed, in ``seconds`` (the server calls this)."""
        key = (model, version)
        self._deque(self.live, key).append((self.clock(), seconds, int(ok)))
        if ok and request_id:
            self._requests[request_id] = self._keys.setdefault(key, key)  # one tuple per version, not one per request
            if len(self._requests) > self.max_request_ids:
                self._requests.popitem(last=False)

    def shadow(
        self, model: str, version: str, seconds: float, *, ok: bool, agreement: float | None = None, error: str | None = None
    ) -> None:
        self._deque(self.shadows, (model, version)).append((self.clock(), seconds, int(ok), agreement))

    def shadow_dropped(self, model: str, version: str) -> None:
        self.dropped[(model, version)] = self.dropped.get((model, version), 0) + 1

    def feedback(self, request_id: str, value: float, metric: str = "outcome") -> tuple[str, str]:
        """Record a numeric outcome for an answered request; returns its (model, version)."""
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(
                f"The outcome {value!r} is not a finite number.",
                hint='Example: {"request_id": "9f2c...", "value": 1.0, "metric": "clicked"}',
            )
        if not isinstance(metric, str) or not metric.strip() or len(metric) > 64:
            raise ConfigError(f"The metric name {metric!r} must be 1 to 64 characters.", hint='Example: "metric": "clicked"')
        where = self._requests.get(request_id)
        if where is None:
            raise RolloutNotFoundError(
                f"No answered request has the id '{request_id}' (or it is older than the last {self.max_request_ids:,} requests).",
                hint="Send the x-request-id the server answered the request with.",
            )
        self._deque(self.outcomes, (*where, metric)).append((self.clock(), float(value)))
        return where

    def copy_for(self, model: str) -> Observations:
        """A copy of ``model``'s records (to analyse in another thread while this one keeps recording)."""
        out = Observations(self.max_records, self.max_request_ids, clock=self.clock)
        out.wall_offset = self.wall_offset
        out.live = {k: deque(d, maxlen=d.maxlen) for k, d in self.live.items() if k[0] == model}
        out.shadows = {k: deque(d, maxlen=d.maxlen) for k, d in self.shadows.items() if k[0] == model}
        out.outcomes = {k: deque(d, maxlen=d.maxlen) for k, d in self.outcomes.items() if k[0] == model}
        return out

    # reading ----------------------------------------------------------------------------------
    @staticmethod
    def _since(d: deque | None, since: float | None, until: float | None = None) -> list[tuple]:
        if not d:
            return []
        out = []
        for r in reversed(d):
            if since is not None and r[0] < since:
                break
            if until is None or r[0] < until:
                out.append(r)
        out.reverse()
        return out

    def window(self, model: str, version: str, since: float | None = None, until: float | None = None) -> WindowStats:
        """Requests ``model:version`` answered since ``since`` (monotonic seconds; None: all kept)."""
        return _stats(self._since(self.live.get((model, version)), since, until))

    def shadow_window(self, model: str, version: str, since: float | None = None, until: float | None = None) -> WindowStats:
        """Shadow copies ``model:version`` ran since ``since``, with their mean agreement."""
        return _stats(self._since(self.shadows.get((model, version)), since, until), agreement_at=3)

    def outcome_values(self, model: str, version: str, metric: str, since: float | None = None) -> np.ndarray:
        return np.asarray([v for _, v in self._since(self.outcomes.get((model, version, metric)), since)], dtype=np.float64)

    def metrics_of(self, model: str) -> list[str]:
        return sorted({m for (name, _v, m) in self.outcomes if name == model})

    def versions_of(self, model: str) -> list[str]:
        return sorted({v for (name, v) in [*self.live, *self.shadows] if name == model})

    def timeseries(
        self, model: str, version: str, *, span_s: float = 300.0, bucket_s: float = 1.0, shadow: bool = False
    ) -> list[dict[str, Any]]:
        """Per time bucket (wall-clock start ``t``): requests per second, error rate, p50 and p99 in ms (and agreement)."""
        now = self.clock()
        start = now - span_s
        records = self._since((self.shadows if shadow else self.live).get((model, version)), start)
        if not records:
            return []
        t = np.asarray([r[0] for r in records])
        lat = np.asarray([r[1] for r in records])
        ok = np.asarray([r[2] for r in records]) > 0
        idx = np.floor((t - start) / bucket_s).astype(np.int64)
        out = []
        for b in np.unique(idx):
            sel = idx == b
            n = int(sel.sum())
            good = lat[sel & ok]
            row: dict[str, Any] = {
                "t": round(start + float(b) * bucket_s + self.wall_offset, 3),
                "rate": round(n / bucket_s, 3),
                "requests": n,
                "error_rate": round(float((~ok[sel]).sum()) / n, 6),
                "p50_ms": round(float(np.percentile(good, 50)) * 1000, 3) if good.size else None,
                "p99_ms": round(float(np.percentile(good, 99)) * 1000, 3) if good.size else None,
            }
            if shadow:
                agree = np.asarray([records[i][3] for i in np.flatnonzero(sel) if records[i][3] is not None], dtype=np.float64)
                row["agreement"] = round(float(agree.mean()), 6) if agree.size else None
            out.append(row)
        return out


__all__ = ["MAX_RECORDS", "Clock", "Observations", "WindowStats"]
