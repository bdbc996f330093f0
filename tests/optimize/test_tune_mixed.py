"""The tuner's mixed-precision candidates (:mod:`modelpress.optimize.search.mixed`) and its named agreement gate.

A fast int8 candidate that fails the gate only on agreement is tried again with 1, 2, 3, 4, 6, ... of its
most sensitive layers kept in float, each a candidate of its own (own row, own cache entry). On the
tiny random encoder (2 layers, hidden 32) and STS-B pairs the real int8 damage is too small to gate
on (mean cosine 0.99998 with or without layers in float: a random model's output is mostly its
embeddings), so the integration test reports an agreement that rises with the layers kept in float
(0.90 + 0.02 per layer) over the real evaluation: the verdicts are known in advance, while the
sensitivity ranking, the variants, their timing, the search and the cache are real.
"""

from __future__ import annotations

import itertools
import json

import pytest

import modelpress as mp
from modelpress.errors import ConfigError
from modelpress.optimize.configs import DynamicInt8
from modelpress.optimize.gate import GateConfig, check, flat_metrics
from modelpress.optimize.search import sensitivity
from modelpress.optimize.search.front import STOP_GATE, STOP_SCREEN, Point
from modelpress.optimize.search.mixed import agreement_only, expandable, float_label, layer_counts
from modelpress.optimize.search.tune import tune
from modelpress.optimize.step import Pipeline

from .test_tune_search import count_full_scores, inject_first_speedups

INT8 = DynamicInt8(runtime="onnxruntime")
GATE = GateConfig(thresholds=[{"metric": "mean_cosine", "min_value": 0.95}])
AGREEMENT_NONE_FLOAT, AGREEMENT_PER_FLOAT_LAYER = 0.90, 0.02  # the reported agreement: 0.92 (1 layer), 0.94, 0.96 (3), 0.98 (4), 1.06 (8)
FAST = {"task": "embedding", "data": "stsb-dev", "limit": 200, "threads": 1, "batch_size": 4, "seq_len": 16, "bench_seconds": 0.1}


def _verdict(*failed: str, passed: tuple[str, ...] = ()) -> dict:
    rows = [{"metric": m, "passed": False} for m in failed] + [{"metric": m, "passed": True} for m in passed]
    return {"passed": not failed, "rows": rows}


def _point(stop: str | None, verdict: dict, step: dict | None = None, **kw) -> Point:
    p = Point("x", "onnxruntime", INT8.to_step() if step is None else step, None, "measured", stop=stop, **kw)
    if stop == STOP_SCREEN:
        p.screen = {"gate": verdict}
    else:
        p.gate = verdict
    return p


def test_labels_and_layer_counts():
    assert float_label("dynamic-int8@onnxruntime(per_channel=True, fuse=True)", 4) == (
        "dynamic-int8@onnxruntime(per_channel=True, fuse=True, 4 layers float)"
    )
    assert float_label("dynamic-int8@onnxruntime", 1) == "dynamic-int8@onnxruntime(1 layer float)"
    # the trials of auto_exclude: doubling, and the maximum itself last
    assert layer_counts(12) == [1, 2, 3, 4, 6, 9, 12] and layer_counts(8) == [1, 2, 3, 4, 6, 8]
    assert layer_counts(1) == [1] and layer_counts(0) == []


def test_only_a_quantization_failing_only_on_agreement_is_expanded():
    metrics = ("mean_cosine", "min_cosine", "top10_agreement")
    assert agreement_only(_point(STOP_GATE, _verdict("top10_agreement", passed=("spearman",))), metrics)
    assert agreement_only(_point(STOP_SCREEN, _verdict("top10_agreement", "mean_cosine")), metrics)
    # the primary metric failed too: broken more widely than a few layers' rounding
    assert not agreement_only(_point(STOP_GATE, _verdict("top10_agreement", "spearman")), metrics)
    assert not agreement_only(_point(None, _verdict(passed=("spearman",))), metrics)  # passed: nothing to repair
    assert expandable(_point(STOP_GATE, _verdict("top10_agreement"))) == INT8
    assert expandable(_point(STOP_GATE, _verdict("top10_agreement"), step={"technique": "precision", "dtype": "fp16"})) is None
    assert expandable(_point(STOP_GATE, _verdict("top10_agreement"), step={"technique": "dynamic-int8", "runtime": "torch"})) is None
    assert expandable(_point(STOP_GATE, _verdict("top10_agreement"), float_layers=["a"])) is None  # already mixed


def test_bad_settings_fail_before_any_work():
    with pytest.raises(ConfigError, match="auto_exclude"):
        tune("minilm", auto_exclude=-1)


@pytest.mark.needs_data
def agreement_by_float_layers(monkeypatch) -> None:
    """The real evaluation, its mean cosine replaced by one that rises with the layers kept in float, gated again."""
    real = Pipeline.judge

    def judge(self, art, runtime):
        evaluation, _ = real(self, art, runtime)
        k = len((art.manifest.step or {}).get("exclude") or [])
        evaluation["agreement"]["mean_cosine"] = AGREEMENT_NONE_FLOAT + AGREEMENT_PER_FLOAT_LAYER * k
        return evaluation, check(flat_metrics(self.baseline()), flat_metrics(evaluation), self.gate)

    monkeypatch.setattr(Pipeline, "judge", judge)


def test_a_failing_int8_candidate_gets_mixed_precision_candidates_that_pass_and_are_cached(tiny_encoder, tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path / "home"))  # a cache of its own
    inject_first_speedups(monkeypatch, {INT8.label(): 5.0})  # fast: worth repairing
    judged = count_full_scores(monkeypatch)
    agreement_by_float_layers(monkeypatch)
    n_layers = len(sensitivity.quantizable_layers(mp.load(str(tiny_encoder)), INT8))
    cands = ["torch", INT8.to_step()]
    run = {"candidates": cands, "gate": GATE, "budget_s": 600, "exhaustive": True, "auto_exclude": n_layers, **FAST}
    res = tune(str(tiny_encoder), output=tmp_path / "out", **run)
    by = {p.label: p for p in res.points}
    plain = by[INT8.label()]
    assert (plain.stop, plain.passed, plain.quality["mean_cosine"]) == (STOP_GATE, False, pytest.approx(AGREEMENT_NONE_FLOAT))
    ks = layer_counts(n_layers)
    labels = [float_label(INT8.label(), k) for k in ks]
    assert [p.label for p in res.points if p.float_layers is not None] == labels  # one row each
    for k, label in zip(ks, labels, strict=True):
        p = by[label]
        assert len(p.float_layers) == k and p.step["exclude"] and p.stage == "scored" and p.first_speedup is not None
    # each is gated on its own evaluation: 1 and 2 layers in float fail (0.92, 0.94), 3 and more pass; the pick passes
    assert [by[label].passed for label in labels] == [k >= 3 for k in ks] and ks == [1, 2, 3, 4, 6, 8]
    assert all(by[label].stop == STOP_GATE for label in labels[:2])
    assert res.chosen is not None and res.chosen.passed and res.chosen.label in ("fp32@torch", *labels[2:])
    # the layers are kept most sensitive first: each candidate's float layers start with the previous one's
    for a, b in itertools.pairwise(labels):
        assert by[b].float_layers[: len(by[a].float_layers)] == by[a].float_layers
    data = json.loads((tmp_path / "out/tune.json").read_text())
    assert data["search"]["mixed_precision"] == labels and data["settings"]["auto_exclude"] == n_layers
    page = (tmp_path / "out/report.html").read_text()
    assert "id='mixed'" in page and all(label in page for label in labels)
    assert len(judged) == 1 + len(ks)  # the plain int8 and each mixed one (the baseline's score is the original's)

    # again: every candidate, the mixed ones too, and the ranking come from the cache
    judged.clear()
    monkeypatch.setattr(sensitivity, "rank_layers", lambda *a, **k: pytest.fail("the ranking was computed again"))
    again = tune(str(tiny_encoder), report=False, **run)
    assert all(p.cached for p in again.points) and judged == []
    assert [p.label for p in again.points] == [p.label for p in res.points]

    # auto_exclude 0: no mixed-precision candidates
    none = tune(str(tiny_encoder), report=False, **{**run, "auto_exclude": 0})
    assert [p.label for p in none.points if p.float_layers is not None] == []


@pytest.mark.needs_data
def test_tune_gates_the_named_agreement_metric(tiny_encoder, monkeypatch, tmp_path, data_dir):
    monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path / "home"))
    res = tune(
        str(tiny_encoder),
        candidates=["torch"],
        min_agreement=0.95,
        agreement_metric="top10_agreement",
        budget_s=600,
        auto_exclude=0,
        **FAST,
    )
    assert [t["metric"] for t in res.gate["thresholds"]] == ["spearman", "top10_agreement"]
    assert res.settings["agreement_metric"] == "top10_agreement"
    assert [r["metric"] for r in res.chosen.gate["rows"]] == ["spearman", "top10_agreement"]
    with pytest.raises(ConfigError, match="mean_cosine, min_cosine, top10_agreement"):
        tune(str(tiny_encoder), candidates=["torch"], min_agreement=0.95, agreement_metric="top5", **FAST)


def test_the_cli_passes_the_agreement_metric_and_auto_exclude(monkeypatch):
    from typer.testing import CliRunner

    from modelpress.cli import app
    from modelpress.optimize import api

    seen = {}

    def fake_tune(model, **options):
        seen.update(options)
        raise ConfigError("stop here")

    monkeypatch.setattr(api, "tune", fake_tune)
    args = ["tune", "minilm", "--min-agreement", "0.95", "--agreement-metric", "top10_agreement", "--no-register"]
    res = CliRunner().invoke(app, [*args, "--auto-exclude", "4"])
    assert res.exit_code != 0 and "stop here" in res.output
    assert (seen["min_agreement"], seen["agreement_metric"], seen["auto_exclude"]) == (0.95, "top10_agreement", 4)
    seen.clear()
    CliRunner().invoke(app, args)
    assert "auto_exclude" not in seen  # the tuner's own default (mixed.MAX_LAYERS)


@pytest.mark.needs_data
def test_the_cli_refuses_an_unknown_agreement_metric_with_the_valid_names(tiny_encoder, tmp_path, monkeypatch, data_dir):
    from typer.testing import CliRunner

    from modelpress.cli import app

    monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path / "home"))
    args = ["tune", str(tiny_encoder), "--data", "stsb-dev", "--no-register", "--min-agreement", "0.9", "--agreement-metric", "top5"]
    bad = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "mean_cosine, min_cosine, top10_agreement" in bad.output and "Traceback" not in bad.output
