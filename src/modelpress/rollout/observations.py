"""What each served version did: the records rollouts, reports and the dashboard read.

:class:`Observations` (one per server, on its event loop) keeps, per model and version, the
recent requests it answered (when, how long, ok or not), what its shadow copies did (latency,
error, agreement with the primary), and numeric outcomes clients report back by request id
(``POST /feedback``). Times come from ``clock`` (default :func:`time.monotonic`), so tests can
drive windows with a fake clock.

Every map is bounded: :data:`MAX_RECORDS` records per version and kind; at most
:data:`MAX_VERSIONS` versions with records (the least recently active go first), of which at
most :data:`MAX_UNLOADED_KEPT` no longer loaded (``is_loaded`` tells; the server's extension
sets it), so a rollout that just ended can still be reported on; at most
:data:`MAX_METRICS_PER_MODEL` outcome names per model, each matching :data:`METRIC_RE`; the last
:data:`MAX_REQUEST_IDS` request ids. A request id that answered more than one request (ids are
the client's when it sends ``x-request-id``) takes no feedback: its outcome could belong to
someone else's request. Time series have at most :data:`MAX_SERIES_BUCKETS` buckets.
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelpress.errors import ConfigError, InvalidInputError, RolloutConflictError, RolloutNotFoundError

MAX_RECORDS = 100_000  # per model version and kind: about 11 MB; older records fall off
MAX_REQUEST_IDS = 100_000  # request id -> version, for feedback (about 15 MB); older ids are forgotten
MAX_VERSIONS = 32  # model versions with records (loaded or not): at most about 32 x 3 x 11 MB
MAX_UNLOADED_KEPT = 4  # of those, versions no longer loaded (a finished rollout's report still has its candidate)
MAX_METRICS_PER_MODEL = 16  # distinct outcome names per model: each is a test in the A/B report
METRIC_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,63}")
MAX_SERIES_BUCKETS = 3600  # time buckets per series: an hour at one-second buckets
_AMBIGUOUS = ("", "")  # a request id that answered more than one request

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


def check_series(span_s: float, bucket_s: float) -> None:
    """Raise :class:`InvalidInputError` (400) unless ``span_s / bucket_s`` is at most :data:`MAX_SERIES_BUCKETS` buckets."""
    if not (math.isfinite(span_s) and math.isfinite(bucket_s) and span_s > 0 and bucket_s > 0):
        raise InvalidInputError(f"span {span_s!r} and bucket {bucket_s!r} must be positive seconds.", hint="Example: span=300, bucket=1")
    if span_s / bucket_s > MAX_SERIES_BUCKETS:
        raise InvalidInputError(
            f"A span of {span_s:g} s in buckets of {bucket_s:g} s is {math.ceil(span_s / bucket_s):,} buckets; "
            f"at most {MAX_SERIES_BUCKETS:,}.",
            hint=f"Widen the bucket to at least {span_s / MAX_SERIES_BUCKETS:g} s, or shorten the span.",
        )


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
        self._keys: OrderedDict[tuple[str, str], tuple[str, str]] = OrderedDict()  # versions with records, least recent first
        self.max_versions = MAX_VERSIONS
        self.is_loaded: Callable[[str, str], bool] | None = None  # whether model:version is still loaded (set by the server)
        self.wall_offset = time.time() - clock()  # wall clock = this clock + this

    # recording ------------------------------------------------------------------------------
    def _deque(self, table: dict, key: tuple) -> deque:
        d = table.get(key)
        if d is None:
            d = table[key] = deque(maxlen=self.max_records)
        return d

    def _version(self, model: str, version: str) -> tuple[str, str]:
        """The one key tuple of ``model:version``, marked as the most recently active; a new one may evict others."""
        key = (model, version)
        known = self._keys.get(key)
        if known is not None:
            self._keys.move_to_end(key)
            return known
        self._keys[key] = key
        self.prune(keep=key)
        return key

    def prune(self, keep: tuple[str, str] | None = None) -> list[tuple[str, str]]:
        """Drop the records of versions past the bounds (unloaded ones first); returns what was dropped."""
        dropped: list[tuple[str, str]] = []
        if self.is_loaded is not None:
            unloaded = [k for k in self._keys if k != keep and not self.is_loaded(*k)]
            dropped += unloaded[: max(0, len(unloaded) - MAX_UNLOADED_KEPT)]
        overflow = len(self._keys) - len(dropped) - self.max_versions
        if overflow > 0:
            dropped += [k for k in self._keys if k != keep and k not in dropped][:overflow]
        for model, version in dropped:
            self.forget(model, version)
        return dropped

    def forget(self, model: str, version: str) -> None:
        """Drop every record of ``model:version`` (its request ids then take no feedback)."""
        key = (model, version)
        self._keys.pop(key, None)
        self.live.pop(key, None)
        self.shadows.pop(key, None)
        self.dropped.pop(key, None)
        for k in [k for k in self.outcomes if k[:2] == key]:
            del self.outcomes[k]

    def answered(self, model: str, version: str, seconds: float, ok: bool, request_id: str | None = None) -> None:
        """Record one request ``model:version`` answered (``ok``) or failed, in ``seconds`` (the server calls this)."""
        key = self._version(model, version)  # one tuple per version, not one per request
        self._deque(self.live, key).append((self.clock(), seconds, int(ok)))
        if ok and request_id:
            # An id seen twice (a client's own ids collide, or someone reuses another's) is nobody's to give feedback on.
            self._requests[request_id] = _AMBIGUOUS if request_id in self._requests else key
            if len(self._requests) > self.max_request_ids:
                self._requests.popitem(last=False)

    def shadow(
        self, model: str, version: str, seconds: float, *, ok: bool, agreement: float | None = None, error: str | None = None
    ) -> None:
        self._deque(self.shadows, self._version(model, version)).append((self.clock(), seconds, int(ok), agreement))

    def shadow_dropped(self, model: str, version: str) -> None:
        key = self._version(model, version)
        self.dropped[key] = self.dropped.get(key, 0) + 1

    def feedback(self, request_id: str, value: float, metric: str = "outcome", model: str | None = None) -> tuple[str, str]:
        """Record a numeric outcome for an answered request; returns its (model, version).

        ``model``: when given, the request must have been answered by that model.
        """
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(
                f"The outcome {value!r} is not a finite number.",
                hint='Example: {"request_id": "9f2c...", "value": 1.0, "metric": "clicked"}',
            )
        if not isinstance(metric, str) or not METRIC_RE.fullmatch(metric):
            raise ConfigError(
                f"The metric name {str(metric)[:80]!r} must be 1 to 64 letters, digits or _.:- starting with a letter.",
                hint='Example: "metric": "clicked"',
            )
        shown = str(request_id)[:80]
        where = self._requests.get(request_id)
        if where == _AMBIGUOUS:
            raise RolloutConflictError(
                f"The request id '{shown}' answered more than one request, so an outcome for it cannot be attributed.",
                hint="Leave x-request-id out (the server then issues a unique id) or send ids unique to each request.",
            )
        if where is None or where not in self._keys or (model is not None and where[0] != model):
            raise RolloutNotFoundError(
                f"No answered request{f' of {model}' if model else ''} has the id '{shown}' "
                f"(or it is older than the last {self.max_request_ids:,} requests).",
                hint="Send the x-request-id the server answered the request with.",
            )
        known = {m for (name, _v, m) in self.outcomes if name == where[0]}
        if metric not in known and len(known) >= MAX_METRICS_PER_MODEL:
            raise ConfigError(
                f"'{where[0]}' already has {len(known)} outcome metrics ({', '.join(sorted(known))}); at most {MAX_METRICS_PER_MODEL}.",
                hint="Report outcomes under one of those names.",
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
        """Per time bucket (wall-clock start ``t``): requests per second, error rate, p50 and p99 in ms (and agreement).

        At most :data:`MAX_SERIES_BUCKETS` buckets (``span_s / bucket_s``): more is an error.
        """
        check_series(span_s, bucket_s)
        now = self.clock()
        start = now - span_s
        records = self._since((self.shadows if shadow else self.live).get((model, version)), start)
        if not records:
            return []
        t = np.asarray([r[0] for r in records])
        lat = np.asarray([r[1] for r in records])
        ok = np.asarray([r[2] for r in records]) > 0
        idx = np.floor((t - start) / bucket_s).astype(np.int64)
        if idx.size > 1 and np.any(idx[1:] < idx[:-1]):  # a clock that stepped back: order the records by bucket first
            order = np.argsort(idx, kind="stable")
            idx, lat, ok, records = idx[order], lat[order], ok[order], [records[i] for i in order.tolist()]
        # Records are in time order, so each bucket is one slice: one pass, whatever the number of buckets.
        firsts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
        ends = np.r_[firsts[1:], idx.size]
        out = []
        for lo, hi in zip(firsts.tolist(), ends.tolist(), strict=True):
            b = idx[lo]
            sel = slice(lo, hi)
            n = hi - lo
            good = lat[sel][ok[sel]]
            row: dict[str, Any] = {
                "t": round(start + float(b) * bucket_s + self.wall_offset, 3),
                "rate": round(n / bucket_s, 3),
                "requests": n,
                "error_rate": round(float((~ok[sel]).sum()) / n, 6),
                "p50_ms": round(float(np.percentile(good, 50)) * 1000, 3) if good.size else None,
                "p99_ms": round(float(np.percentile(good, 99)) * 1000, 3) if good.size else None,
            }
            if shadow:
                agree = np.asarray([r[3] for r in records[lo:hi] if r[3] is not None], dtype=np.float64)
                row["agreement"] = round(float(agree.mean()), 6) if agree.size else None
            out.append(row)
        return out


__all__ = [
    "MAX_METRICS_PER_MODEL",
    "MAX_RECORDS",
    "MAX_SERIES_BUCKETS",
    "MAX_VERSIONS",
    "Clock",
    "Observations",
    "WindowStats",
    "check_series",
]
