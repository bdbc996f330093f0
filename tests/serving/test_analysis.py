"""A/B statistics on synthetic data with known answers, agreement per task, and what Observations keep."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from modelpress.errors import ConfigError, RolloutNotFoundError
from modelpress.rollout.analysis import (
    Observations,
    agreement,
    agreement_rows,
    bootstrap_ci,
    compare,
    error_rate_test,
    outcome_test,
    proportion_ci,
)

SEED = 7


def test_bootstrap_ci_covers_known_percentiles_and_means():
    rng = np.random.default_rng(SEED)
    x = rng.exponential(1.0, 4000)
    est, low, high = bootstrap_ci(x, "p99", seed=1)
    true_p99 = math.log(100)  # exponential(1): P(X > q) = exp(-q)
    assert low < true_p99 < high and low < est < high
    assert high - low < 1.5  # about +-0.5 for n=4000 at the 99th percentile: wide, but not vacuous
    est, low, high = bootstrap_ci(x, "median", seed=1)
    assert low < math.log(2) < high and high - low < 0.1
    # the mean of a normal sample: the bootstrap CI matches the textbook 1.96 sigma / sqrt(n)
    y = rng.normal(10.0, 2.0, 2000)
    est, low, high = bootstrap_ci(y, "mean", seed=1)
    textbook = 2 * 1.96 * 2.0 / math.sqrt(2000)
    assert low < 10.0 < high and abs((high - low) - textbook) / textbook < 0.15
    assert bootstrap_ci(y, "mean", seed=1) == (est, low, high)  # seeded: reproducible
    assert bootstrap_ci([3.0], "p99") == (3.0, 3.0, 3.0)
    assert all(math.isnan(v) for v in bootstrap_ci([], "p99"))
    with pytest.raises(ConfigError, match="not a statistic"):
        bootstrap_ci(y, "p-one")


def test_error_rate_test_known_answers():
    # 10/1000 against 30/1000: pooled 0.02, z = 0.02 / sqrt(0.02 * 0.98 * 2 / 1000) = 3.194, p = 0.0014
    r = error_rate_test(10, 1000, 30, 1000)
    assert r.method == "two-proportion z" and r.significant
    assert r.p_value == pytest.approx(0.0014014, rel=1e-3)
    assert r.difference == pytest.approx(0.02) and r.ci[0] < 0.02 < r.ci[1]
    # small counts use Fisher's exact test: the lady tasting tea, [[3, 1], [1, 3]] -> p = 0.4857
    r = error_rate_test(1, 4, 3, 4)
    assert r.method == "fisher exact" and r.p_value == pytest.approx(0.485714, rel=1e-5) and not r.significant
    assert not error_rate_test(20, 1000, 21, 1000).significant
    assert error_rate_test(0, 0, 1, 10).method.startswith("none")
    with pytest.raises(ConfigError, match="errors must be between"):
        error_rate_test(5, 3, 0, 10)


def test_outcome_tests_find_a_real_shift_and_not_a_fake_one():
    rng = np.random.default_rng(SEED)
    a, b = rng.normal(0.0, 1.0, 300), rng.normal(0.4, 1.0, 300)
    for method in ("welch", "mann-whitney"):
        assert outcome_test(a, b, method=method).significant
        assert not outcome_test(a, rng.normal(0.0, 1.0, 300), method=method).significant
    # Welch's t by hand on fixed samples: t = (mean_b - mean_a) / sqrt(var_a/n_a + var_b/n_b)
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.0, 6.0, 8.0, 10.0])
    r = outcome_test(x, y)
    from scipy.stats import t as student_t

    va, vb = x.var(ddof=1) / 4, y.var(ddof=1) / 5
    t = (y.mean() - x.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 4)
    assert r.p_value == pytest.approx(2 * student_t.sf(abs(t), df), rel=1e-9) and r.difference == pytest.approx(3.5)
    assert outcome_test([1.0], [2.0, 3.0]).method.endswith("(too few values)")
    with pytest.raises(ConfigError, match="not a test"):
        outcome_test(x, y, method="chi2")


def test_proportion_ci_is_wilson():
    low, high = proportion_ci(0, 50)
    assert low == 0.0 and high == pytest.approx(0.0713, abs=1e-3)  # Wilson 95 % upper bound for 0/50
    assert proportion_ci(0, 0) == (0.0, 1.0)


def test_agreement_per_task():
    e = [np.array([1.0, 0.0]), np.array([0.0, 2.0])]
    f = [np.array([1.0, 0.0]), np.array([2.0, 0.0])]
    assert agreement_rows("embedding", e, f).tolist() == pytest.approx([1.0, 0.0])
    assert agreement("embedding", e, e) == pytest.approx(1.0)
    labels_a = [{"label": "pos", "label_id": 1}, {"label": "neg", "label_id": 0}, {"label": "pos", "label_id": 1}]
    labels_b = [{"label": "pos", "label_id": 1}, {"label": "pos", "label_id": 1}, {"label": "pos", "label_id": 1}]
    assert agreement("text-classification", labels_a, labels_b) == pytest.approx(2 / 3)
    tokens_a = [{"next_token_id": 5}, {"next_token_id": 9}]
    assert agreement("causal-lm", tokens_a, [{"next_token_id": 5}, {"next_token_id": 8}]) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="different shapes"):
        agreement("embedding", [np.zeros(3)], [np.zeros(4)])
    with pytest.raises(ConfigError, match="answered 2 rows"):
        agreement("embedding", e, e[:1])


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def test_observations_windows_feedback_and_series():
    clock = FakeClock()
    obs = Observations(clock=clock)
    for i in range(10):
        obs.answered("m", "1", 0.010, ok=True, request_id=f"a{i}")
    obs.answered("m", "2", 0.030, ok=True, request_id="b0")
    obs.answered("m", "2", 0.500, ok=False)
    obs.answered("m", "2", 0.700, ok=False, request_id="b1")  # a failed request's id is not kept for feedback
    w = obs.window("m", "2")
    assert (w.n, w.errors) == (3, 2) and w.p50 == pytest.approx(0.030)  # latency of answered requests only
    assert obs.window("m", "1").p99 == pytest.approx(0.010) and obs.window("m", "1").error_rate == 0
    clock.now += 5.0
    later = clock()
    obs.answered("m", "1", 0.020, ok=True)
    assert obs.window("m", "1", since=later).n == 1 and obs.window("m", "1", since=later - 1).n == 1
    assert obs.window("m", "1", since=later - 6).n == 11 and obs.window("m", "1", until=later).n == 10
    assert obs.feedback("a3", 1.0, "clicked") == ("m", "1")
    obs.feedback("b0", 0.0, "clicked")
    assert obs.outcome_values("m", "1", "clicked").tolist() == [1.0] and obs.metrics_of("m") == ["clicked"]
    with pytest.raises(RolloutNotFoundError, match="No answered request has the id 'zzz'"):
        obs.feedback("zzz", 1.0)
    with pytest.raises(RolloutNotFoundError, match="'b1'"):
        obs.feedback("b1", 1.0)
    with pytest.raises(ConfigError, match="not a finite number"):
        obs.feedback("a1", float("inf"))
    obs.shadow("m", "2", 0.02, ok=True, agreement=0.5)
    obs.shadow("m", "2", 0.02, ok=False)
    s = obs.shadow_window("m", "2")
    assert (s.n, s.errors, s.agreement, s.n_agreement) == (2, 1, 0.5, 1)
    series = obs.timeseries("m", "1", span_s=60, bucket_s=1)
    assert sum(p["requests"] for p in series) == 11 and all(p["error_rate"] == 0 for p in series)
    assert [p["requests"] for p in series] == [10, 1] and series[1]["t"] - series[0]["t"] == pytest.approx(5.0)  # 5 s apart
    assert abs(series[-1]["t"] - time.time()) < 5  # wall-clock bucket starts
    small = Observations(max_records=5, max_request_ids=3)
    for i in range(8):
        small.answered("m", "1", 0.01, ok=True, request_id=str(i))
    assert small.window("m", "1").n == 5
    with pytest.raises(RolloutNotFoundError):
        small.feedback("0", 1.0)  # forgotten: only the last 3 ids are kept


def test_compare_reports_a_significant_error_rate_and_outcome_difference():
    rng = np.random.default_rng(SEED)
    obs = Observations()
    answered: dict[str, list[str]] = {"1": [], "2": []}
    for i in range(2000):
        for version, error_rate in (("1", 0.01), ("2", 0.05)):
            ok = bool(rng.random() > error_rate)
            obs.answered("m", version, float(rng.gamma(4, 0.002)), ok=ok, request_id=f"{version}-{i}")
            if ok:
                answered[version].append(f"{version}-{i}")
    for version, mean in (("1", 1.0), ("2", 1.5)):  # clients report a revenue per request: the candidate's is higher
        for rid in answered[version][:400]:
            obs.feedback(rid, float(rng.normal(mean, 1.0)), "revenue")
    rep = compare(obs, "m", "1", "2")
    assert rep["significant"]
    tests = {(t["metric"], t["method"]): t for t in rep["tests"]}
    assert tests[("error_rate", "two-proportion z")]["significant"]
    assert tests[("revenue", "welch t")]["significant"] and tests[("revenue", "welch t")]["difference"] > 0.3
    assert not tests[("latency_ms", "mann-whitney u")]["significant"]  # the same latency distribution
    v = rep["versions"]["2"]
    assert v["requests"] == 2000 and v["error_rate_ci"][0] < v["error_rate"] < v["error_rate_ci"][1]
    assert v["p99_ms_ci"][0] <= v["p99_ms"] <= v["p99_ms_ci"][1]
    assert v["outcomes"]["revenue"]["n"] == 400
