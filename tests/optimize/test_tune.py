"""The tuner: measures every candidate, keeps the Pareto front, picks the fastest that passes,
caches results so nothing is measured twice, respects its budget, and writes its report.

Candidates here are the unoptimized runtimes and the test-only weight-noise technique (see
test_recipe.py), on the real MiniLM and STS-B pairs: their verdicts are known in advance.
"""

from __future__ import annotations

import json
import time

import pytest

from modelpress.errors import ConfigError, GateFailedError
from modelpress.optimize.search.tune import Point, pareto_front, tune

from .test_recipe import EVAL_PAIRS, WeightNoise  # noqa: F401  (registers the test technique)

FAST = {"limit": EVAL_PAIRS, "threads": 2, "batch_size": 8, "seq_len": 32, "bench_seconds": 0.2}


def _pt(label, cos, thr, lat=10.0):
    return Point(
        label=label,
        runtime="torch",
        step=None,
        peer=None,
        status="measured",
        recovery=1.0,
        throughput=thr,
        latency_p50_ms=lat,
        quality={"mean_cosine": cos},
    )


def test_pareto_front_keeps_only_undominated_points():
    pts = [_pt("a", 1.0, 10), _pt("b", 0.99, 30), _pt("c", 0.98, 20), _pt("d", 0.95, 40), _pt("e", 1.0, 5), _pt("f", 0.9, 15, lat=2.0)]
    # c is beaten by b on every axis; e by a; f is slow and unfaithful but has the lowest latency
    assert [p.label for p in pareto_front(pts, "embedding")] == ["a", "f", "b", "d"]


def test_bad_settings_fail_clearly():
    with pytest.raises(ConfigError, match="max_drop"):
        tune("minilm", max_drop=1.5)
    with pytest.raises(ConfigError, match="budget"):
        tune("minilm", budget_s=0)


@pytest.mark.needs_data
@pytest.mark.slow
def test_tune_picks_the_passing_candidate_caches_and_reports(tmp_path, data_dir):
    cands = ["torch", {"technique": "test-weight-noise", "sigma": 0.0}, {"technique": "test-weight-noise", "sigma": 2.0}]
    # exhaustive: every candidate scored in full (the staged search's own choices: test_tune_search.py)
    res = tune("minilm", data="stsb-dev", candidates=cands, max_drop=0.01, budget_s=600, exhaustive=True, output=tmp_path / "t1", **FAST)
    by = {p.label: p for p in res.points}
    noisy = by["test-weight-noise@torch(sigma=2.0)"]
    clean = by["test-weight-noise@torch"]
    assert noisy.status == "measured" and not noisy.passed and noisy.recovery < 0.9
    assert clean.passed and clean.recovery == pytest.approx(1.0, abs=1e-6)
    assert res.chosen is not None and res.chosen.passed
    # the pick is the fastest passing one by speed-up (the median of per-round ratios to the baseline), which can
    # rank two near-equal candidates differently from their median throughputs
    assert res.chosen.speedup == max(p.speedup or 0.0 for p in res.points if p.passed)
    assert all(p.throughput > 0 and p.latency_p99_ms >= p.latency_p50_ms for p in res.points)
    assert by["fp32@torch"].speedup == pytest.approx(1.0)
    # outputs: the chosen artifact, the JSON, a self-contained HTML report with its plots
    out = tmp_path / "t1"
    data = json.loads((out / "tune.json").read_text())
    assert data["chosen"]["label"] == res.chosen.label and len(data["points"]) == 3
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and res.chosen.label in page
    assert (out / "pareto.png").stat().st_size > 1000 and (out / "latency.png").stat().st_size > 1000
    if res.chosen.artifact:
        assert (out / "chosen/modelpress.json").is_file()

    # the same tune again: every point comes from the cache, nothing is rebuilt or re-measured
    t0 = time.perf_counter()
    again = tune("minilm", data="stsb-dev", candidates=cands, max_drop=0.01, budget_s=600, exhaustive=True, **FAST)
    assert all(p.cached for p in again.points)
    # the same verdicts and first timings (the final re-timing of the passing ones is done again)
    first = [(p.label, p.recovery, p.first_throughput) for p in res.points]
    assert [(p.label, p.recovery, p.first_throughput) for p in again.points] == first
    assert time.perf_counter() - t0 < sum(p.seconds for p in res.points)


@pytest.mark.needs_data
@pytest.mark.slow
def test_no_candidate_passing_raises(data_dir):
    # (a spent budget: test_tune_search.py, on the tiny encoder)
    # a gate nothing can meet (agreement above 1): not even the baseline, the original itself, passes, and tune says so
    with pytest.raises(GateFailedError, match="No candidate kept the quality gate"):
        tune(
            "minilm",
            data="stsb-dev",
            candidates=["torch", {"technique": "test-weight-noise", "sigma": 3.0}],
            max_drop=0.0,
            min_agreement=1.01,
            budget_s=600,
            **FAST,
        )


@pytest.mark.needs_data
@pytest.mark.slow
def test_run_is_tune_with_registration_and_the_lineage(tmp_path, data_dir):
    import modelpress as mp
    from modelpress.registry.api import Registry

    cands = ["torch", {"technique": "test-weight-noise", "sigma": 0.0}]
    with Registry(home=tmp_path / "home") as reg:
        job = mp.run(
            "minilm", data="stsb-dev", candidates=cands, budget_s=600, exhaustive=True, output=tmp_path / "run", registry=reg, **FAST
        )
        assert job.tune is not None and job.bench is None and job.chosen is job.tune.chosen
        assert job.to_json() == job.tune.to_json()
        assert job.lineage == reg.lineage(job.tune.registered_original)
    registered = {p.registered for p in job.tune.points if p.registered}
    assert registered and {c["ref"] for c in job.lineage["root"]["children"]} == registered
    assert (tmp_path / "run/tune.json").is_file()


def test_run_without_a_data_folder_only_benchmarks(tiny_cnn, monkeypatch):
    import modelpress as mp
    import modelpress.locations

    monkeypatch.setattr(modelpress.locations, "find_data_dir", lambda _explicit=None: None)
    art = mp.load(tiny_cnn, task="image-classification")
    job = mp.run(art, bench_seconds=0.05, threads=1)
    assert job.tune is None and job.lineage is None and job.chosen is None
    report = job.to_json()
    assert [r["runtime"] for r in report["results"]] == ["torch", "onnxruntime", "openvino"] and set(report["ratios"]) == {"1", "2"}
