"""The gate: every threshold rule, both metric directions, every failure collected."""

from __future__ import annotations

import pytest

from modelpress.errors import ConfigError
from modelpress.optimize.gate import GateConfig, Threshold, check, flat_metrics, parse_gate


def test_recovery_rule_passes_and_fails_with_the_shortfall():
    gate = GateConfig(thresholds=[Threshold(metric="spearman", min_recovery=0.99)])
    ok = check({"spearman": 0.80}, {"spearman": 0.795}, gate)
    assert ok.passed and ok.rows[0].recovery == pytest.approx(0.99375)
    bad = check({"spearman": 0.80}, {"spearman": 0.78}, gate)
    assert not bad.passed
    assert "recovery 0.9750 < 0.99" in bad.rows[0].reason and "short by 0.0150" in bad.rows[0].reason


def test_every_failure_is_collected_not_only_the_first():
    gate = parse_gate({"spearman": {"min_recovery": 0.99}, "top10_agreement": {"min_value": 0.95}, "mean_cosine": {"min_value": 0.99}})
    res = check({"spearman": 0.8}, {"spearman": 0.7, "top10_agreement": 0.9, "mean_cosine": 0.999}, gate)
    assert [r.metric for r in res.failures] == ["spearman", "top10_agreement"]
    # agreement metrics are shown against the original's perfect agreement with itself
    assert res.rows[1].original == 1.0
    assert "spearman" in res.summary() and "top10_agreement" in res.summary()


def test_lower_is_better_metrics_invert_recovery_and_drop():
    gate = parse_gate([{"metric": "perplexity", "min_recovery": 0.95}, {"metric": "perplexity", "max_drop": 0.2}])
    res = check({"perplexity": 3.55}, {"perplexity": 3.60}, gate)
    assert res.passed and res.rows[0].recovery == pytest.approx(3.55 / 3.60)
    res = check({"perplexity": 3.55}, {"perplexity": 4.2}, gate)
    assert [r.passed for r in res.rows] == [False, False]


def test_absolute_drop_for_accuracy():
    gate = parse_gate({"accuracy": {"max_drop": 0.005}})
    assert check({"accuracy": 0.90}, {"accuracy": 0.896}, gate).passed
    assert not check({"accuracy": 0.90}, {"accuracy": 0.89}, gate).passed


def test_a_metric_that_was_not_measured_fails_and_says_what_was():
    res = check({"spearman": 0.8}, {"spearman": 0.8}, parse_gate({"accuracy": {"min_recovery": 0.99}}))
    assert not res.passed and "was not measured (measured: spearman)" in res.rows[0].reason


def test_default_gate_per_task():
    g = GateConfig.for_task("embedding", max_drop=0.01, min_agreement=0.95)
    # the agreement rule is the task's agreement_metric (embedding: mean cosine, see tasks/embedding.py)
    assert [(t.metric, t.min_recovery, t.min_value) for t in g.thresholds] == [("spearman", 0.99, None), ("mean_cosine", None, 0.95)]
    assert GateConfig.for_task("causal-lm").thresholds[0].metric == "perplexity"


def test_the_default_gate_can_name_which_agreement_it_gates():
    g = GateConfig.for_task("embedding", max_drop=0.01, min_agreement=0.95, agreement_metric="top10_agreement")
    assert [(t.metric, t.min_recovery, t.min_value) for t in g.thresholds] == [("spearman", 0.99, None), ("top10_agreement", None, 0.95)]
    # it gates what it names: 0.933 top-10 fails even with a near-perfect mean cosine
    res = check({"spearman": 0.82}, {"spearman": 0.82, "mean_cosine": 0.995, "top10_agreement": 0.933}, g)
    assert [r.metric for r in res.failures] == ["top10_agreement"]
    assert GateConfig.for_task("text-classification", min_agreement=0.99, agreement_metric="label_agreement").thresholds[1].metric == (
        "label_agreement"
    )
    # a name the task does not report: the error lists the ones it does
    with pytest.raises(ConfigError, match="'top5_agreement' is not an agreement metric of the embedding task") as err:
        GateConfig.for_task("embedding", min_agreement=0.95, agreement_metric="top5_agreement")
    assert "mean_cosine, min_cosine, top10_agreement" in err.value.message and "--agreement-metric" in err.value.hint
    with pytest.raises(ConfigError, match="without the value"):
        GateConfig.for_task("embedding", agreement_metric="top10_agreement")


def test_bad_gates_fail_loudly():
    with pytest.raises(ConfigError, match="sets no rule"):
        Threshold(metric="spearman")
    with pytest.raises(ConfigError, match=r"unknown key 'thresholds\.0\.min_recovry'|min_recovry"):
        parse_gate({"thresholds": [{"metric": "spearman", "min_recovry": 0.99}]})
    with pytest.raises(ConfigError):
        parse_gate({"spearman": 0.99})


def test_flat_metrics_merges_quality_and_agreement():
    ev = {"metrics": {"spearman": 0.8, "pairs": 10, "flag": True}, "agreement": {"mean_cosine": 0.99}}
    assert flat_metrics(ev) == {"spearman": 0.8, "pairs": 10.0, "mean_cosine": 0.99}
