"""The statistics rollouts and their reports use: plain functions over arrays (scipy underneath).

* :func:`proportion_ci` (Wilson), :func:`bootstrap_ci` (percentile bootstrap of any statistic,
  e.g. p99 latency);
* :func:`error_rate_test` (two-proportion z test, Fisher's exact test when a cell is small),
  :func:`outcome_test` (Welch's t and Mann-Whitney U), each a :class:`TestResult`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelpress.errors import ConfigError

MAX_BOOTSTRAP_SAMPLES = 5_000  # a longer sample is subsampled (seeded) before bootstrapping: the CI width barely changes, the cost does
BOOTSTRAP_RESAMPLES = 2_000
ALPHA = 0.05  # significance level of the tests in reports
SMALL_CELL = 5  # an expected count below this in the 2x2 table: Fisher's exact test instead of the z test


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
    baseline: Sequence[float] | np.ndarray,
    candidate: Sequence[float] | np.ndarray,
    *,
    metric: str = "outcome",
    method: str = "welch",
    alpha: float = ALPHA,
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


__all__ = ["ALPHA", "TestResult", "bootstrap_ci", "error_rate_test", "outcome_test", "proportion_ci"]
