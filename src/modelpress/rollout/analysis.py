"""What each served version did, and whether two versions differ: the numbers rollouts decide on.

:class:`Observations` (one per server, on its event loop) keeps, per model and version, the
recent requests it answered (when, how long, ok or not), what its shadow copies did (latency,
error, agreement with the primary), and numeric outcomes clients report back by request id
(``POST /feedback``). Everything is bounded (:data:`MAX_RECORDS` per version).

The statistics are plain functions over arrays (scipy underneath):

* :func:`proportion_ci` (Wilson), :func:`bootstrap_ci` (percentile bootstrap of any statistic,
  e.g. p99 latency), :func:`error_rate_test` (two-proportion z test, Fisher's exact test when a
  cell is small), :func:`outcome_test` (Welch's t and Mann-Whitney U);
* :func:`agreement`: how closely a candidate's outputs follow the primary's, per task
  (embedding cosine, label agreement, top-1 token agreement);
* :func:`compare`: the A/B report of a candidate against its baseline that
  ``modelpress rollout report`` prints.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelpress.errors import ConfigError, ModelNotReadyError, RolloutNotFoundError, UserInputError

MAX_RECORDS = 100_000  # per model version and kind: about 11 MB; older records fall off
MAX_REQUEST_IDS = 100_000  # request id -> version, for feedback (about 15 MB); older ids are forgotten
MAX_BOOTSTRAP_SAMPLES = 5_000  # a longer sample is subsampled (seeded) before bootstrapping: the CI width barely changes, the cost does
BOOTSTRAP_RESAMPLES = 2_000
ALPHA = 0.05  # significance level of the tests in reports
SMALL_CELL = 5  # an expected count below this in the 2x2 table: Fisher's exact test instead of the z test
EMBED_EPS = 1e-12  # guards the cosine of an all-zero vector
EARLY_BREACH_CONFIDENCE = 0.95  # mid-window: breach only when the error rate's lower bound at this confidence is past the limit


# -- agreement --------------------------------------------------------------------------
def _cosines(a: Sequence[Any], b: Sequence[Any]) -> np.ndarray:
    x = np.asarray(np.stack([np.asarray(r, dtype=np.float64).ravel() for r in a]))
    y = np.asarray(np.stack([np.asarray(r, dtype=np.float64).ravel() for r in b]))
    if x.shape != y.shape:
        raise ConfigError(
            f"Embeddings of different shapes cannot be compared: {x.shape} and {y.shape}.",
            hint="Shadow a candidate with the same output width.",
        )
    num = (x * y).sum(1)
    den = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return num / np.maximum(den, EMBED_EPS)


def agreement_rows(task: str, primary: Sequence[Any], candidate: Sequence[Any]) -> np.ndarray:
    """Per-row agreement in [0, 1] (cosine may go below 0): embedding cosine, same label, same top-1 token."""
    if len(primary) != len(candidate):
        raise ConfigError(f"The primary answered {len(primary)} rows and the candidate {len(candidate)}.")
    if not len(primary):
        return np.zeros(0)
    first = primary[0]
    if isinstance(first, dict):
        key = next((k for k in ("label_id", "next_token_id", "label") if k in first), None)
        if key is None:
            raise ConfigError(
                f"No comparable field in the {task} outputs (keys {sorted(first)}).", hint="Outputs need label_id, label or next_token_id."
            )
        return np.asarray([float(p[key] == c[key]) for p, c in zip(primary, candidate, strict=True)])
    return _cosines(primary, candidate)


def agreement(task: str, primary: Sequence[Any], candidate: Sequence[Any]) -> float:
    """Mean per-row agreement of one request's outputs (see :func:`agreement_rows`)."""
    rows = agreement_rows(task, primary, candidate)
    return float(rows.mean()) if rows.size else float("nan")


# -- statistics ---------------------------------------------------------------------------
def proportion_ci(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n ((0, 1) when n is 0)."""
    if n <= 0:
        return 0.0, 1.0
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def _statistic(stat: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(stat):
        return stat
    if stat == "mean":
        return lambda x, axis=-1: np.mean(x, axis=axis)
    if stat == "median" or stat == "p50":
        return lambda x, axis=-1: np.percentile(x, 50, axis=axis)
    if stat.startswith("p") and stat[1:].replace(".", "", 1).isdigit():
        q = float(stat[1:])
        return lambda x, axis=-1: np.percentile(x, q, axis=axis)
    raise ConfigError(f"'{stat}' is not a statistic.", hint="Use mean, median, p50, p90, p99 or a function of (x, axis).")


def bootstrap_ci(
    samples: Sequence[float] | np.ndarray,
    stat: str | Callable[..., Any] = "p99",
    *,
    confidence: float = 0.95,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(estimate, low, high): the statistic and its percentile-bootstrap confidence interval.

    Percentile bootstrap (not BCa): tail percentiles of latencies have many ties, where BCa's
    acceleration estimate degenerates. Samples longer than :data:`MAX_BOOTSTRAP_SAMPLES` are
    subsampled with ``seed``.
    """
    x = np.asarray(samples, dtype=np.float64)
    x = x[np.isfinite(x)]
    fn = _statistic(stat)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    estimate = float(fn(x, axis=-1))
    if x.size < 2:
        return estimate, estimate, estimate
    rng = np.random.default_rng(seed)
    if x.size > MAX_BOOTSTRAP_SAMPLES:
        x = rng.choice(x, MAX_BOOTSTRAP_SAMPLES, replace=False)
    from scipy.stats import bootstrap

    res = bootstrap((x,), fn, n_resamples=n_resamples, confidence_level=confidence, method="percentile", vectorized=True, rng=rng)
    return estimate, float(res.confidence_interval.low), float(res.confidence_interval.high)


@dataclass
class TestResult:
    """One significance test: what was compared, the effect, the p-value, and the verdict at ``alpha``."""

    __test__ = False  # not a pytest class
    metric: str
    method: str
    baseline: float
    candidate: float
    difference: float
    p_value: float
    significant: bool
    n_baseline: int
    n_candidate: int
    ci: tuple[float, float] | None = None  # of the difference (candidate - baseline), when the method gives one

    def to_json(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["ci"] = list(self.ci) if self.ci is not None else None
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def error_rate_test(errors_a: int, n_a: int, errors_b: int, n_b: int, *, alpha: float = ALPHA) -> TestResult:
    """Do two error rates differ (a: baseline, b: candidate)? Two-proportion z test, Fisher's exact for small counts."""
    for k, n, what in ((errors_a, n_a, "baseline"), (errors_b, n_b, "candidate")):
        if n < 0 or k < 0 or k > n:
            raise ConfigError(f"The {what} has {k} errors in {n} requests; errors must be between 0 and the requests.")
    pa = errors_a / n_a if n_a else float("nan")
    pb = errors_b / n_b if n_b else float("nan")
    if n_a == 0 or n_b == 0:
        return TestResult("error_rate", "none (no requests)", pa, pb, float("nan"), float("nan"), False, n_a, n_b)
    from scipy.stats import fisher_exact, norm

    pooled = (errors_a + errors_b) / (n_a + n_b)
    expected = [pooled * n_a, (1 - pooled) * n_a, pooled * n_b, (1 - pooled) * n_b]
    se_diff = math.sqrt(pa * (1 - pa) / n_a + pb * (1 - pb) / n_b)
    z_crit = float(norm.ppf(1 - alpha / 2))
    ci = (pb - pa - z_crit * se_diff, pb - pa + z_crit * se_diff)
    if min(expected) < SMALL_CELL:
        _, p = fisher_exact([[errors_b, n_b - errors_b], [errors_a, n_a - errors_a]])
        method = "fisher exact"
    else:
        se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
        z = (pb - pa) / se if se > 0 else 0.0
        p = float(2 * norm.sf(abs(z)))
        method = "two-proportion z"
    p = float(p)
    return TestResult("error_rate", method, pa, pb, pb - pa, p, p < alpha, n_a, n_b, ci)


def outcome_test(
    baseline: Sequence[float], candidate: Sequence[float], *, metric: str = "outcome", method: str = "welch", alpha: float = ALPHA
) -> TestResult:
    """Do two numeric outcomes differ? ``method``: ``welch`` (t test, unequal variances) or ``mann-whitney``."""
    a = np.asarray(baseline, dtype=np.float64)
    b = np.asarray(candidate, dtype=np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    ma = float(a.mean()) if a.size else float("nan")
    mb = float(b.mean()) if b.size else float("nan")
    if a.size < 2 or b.size < 2:
        return TestResult(metric, f"{method} (too few values)", ma, mb, mb - ma, float("nan"), False, int(a.size), int(b.size))
    import warnings

    from scipy import stats

    if method == "welch":
        if np.ptp(a) == 0 and np.ptp(b) == 0:  # two constant samples: equal means differ not at all, different ones entirely
            p = 1.0 if ma == mb else 0.0
            return TestResult(metric, "welch t (constant samples)", ma, mb, mb - ma, p, p < alpha, int(a.size), int(b.size))
        with warnings.catch_warnings():  # scipy warns about precision on near-constant samples; the answer is still the test's
            warnings.simplefilter("ignore", RuntimeWarning)
            res = stats.ttest_ind(b, a, equal_var=False)
        p = float(res.pvalue)
        try:
            ci_obj = res.confidence_interval(1 - alpha)
            ci: tuple[float, float] | None = (float(ci_obj.low), float(ci_obj.high))
        except (AttributeError, ValueError):  # pragma: no cover - old scipy
            ci = None
        return TestResult(metric, "welch t", ma, mb, mb - ma, p, p < alpha, int(a.size), int(b.size), ci)
    if method in ("mann-whitney", "mannwhitney", "mwu"):
        p = float(stats.mannwhitneyu(b, a, alternative="two-sided").pvalue)
        return TestResult(
            metric,
            "mann-whitney u",
            float(np.median(a)),
            float(np.median(b)),
            float(np.median(b) - np.median(a)),
            p,
            p < alpha,
            int(a.size),
            int(b.size),
        )
    raise ConfigError(f"'{method}' is not a test for outcomes.", hint="Use method='welch' or method='mann-whitney'.")


# -- observations -------------------------------------------------------------------------
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

    def __init__(self, max_records: int = MAX_RECORDS, max_request_ids: int = MAX_REQUEST_IDS) -> None:
        self.max_records = max_records
        self.max_request_ids = max_request_ids
        self.live: dict[tuple[str, str], deque[tuple[float, float, int]]] = {}
        self.shadows: dict[tuple[str, str], deque[tuple[float, float, int, float | None]]] = {}
        self.outcomes: dict[tuple[str, str, str], deque[tuple[float, float]]] = {}
        self.dropped: dict[tuple[str, str], int] = {}
        self._requests: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._keys: dict[tuple[str, str], tuple[str, str]] = {}
        self.wall_offset = time.time() - time.monotonic()  # wall clock = monotonic + this

    # recording ------------------------------------------------------------------------------
    def _deque(self, table: dict, key: tuple) -> deque:
        d = table.get(key)
        if d is None:
            d = table[key] = deque(maxlen=self.max_records)
        return d

    def answered(self, model: str, version: str, seconds: float, ok: bool, request_id: str | None = None) -> None:
        key = (model, version)
        self._deque(self.live, key).append((time.monotonic(), seconds, int(ok)))
        if ok and request_id:
            self._requests[request_id] = self._keys.setdefault(key, key)  # one tuple per version, not one per request
            if len(self._requests) > self.max_request_ids:
                self._requests.popitem(last=False)

    @contextmanager
    def timing(self, model: str, version: str, request_id: str | None = None) -> Iterator[None]:
        """Record the block as one request of ``model:version``: its time, and whether it failed.

        Errors the client caused (bad input) and "not ready" (a version being swapped out; the
        request is routed again) are not the version's fault and are not recorded.
        """
        started = time.perf_counter()
        try:
            yield
        except (UserInputError, ModelNotReadyError):
            raise
        except BaseException:
            self.answered(model, version, time.perf_counter() - started, False)
            raise
        self.answered(model, version, time.perf_counter() - started, True, request_id)

    def shadow(
        self, model: str, version: str, seconds: float, *, ok: bool, agreement: float | None = None, error: str | None = None
    ) -> None:
        self._deque(self.shadows, (model, version)).append((time.monotonic(), seconds, int(ok), agreement))

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
        self._deque(self.outcomes, (*where, metric)).append((time.monotonic(), float(value)))
        return where

    def copy_for(self, model: str) -> Observations:
        """A copy of ``model``'s records (to analyse in another thread while this one keeps recording)."""
        out = Observations(self.max_records, self.max_request_ids)
        out.wall_offset = self.wall_offset
        for src, dst in ((self.live, out.live), (self.shadows, out.shadows), (self.outcomes, out.outcomes)):
            for key, d in src.items():
                if key[0] == model:
                    dst[key] = deque(d, maxlen=d.maxlen)
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
        now = time.monotonic()
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
            reasons.append("no shadow copy answered, so agreement cannot be measured")
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
        est, low, high = bootstrap_ci(w.latencies, q, seed=seed) if w.latencies.size else (float("nan"),) * 3
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
