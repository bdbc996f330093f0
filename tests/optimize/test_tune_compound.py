"""Compound tune candidates: a trained smaller model (distilled student, pruned model), then quantized.

On the tiny random encoder (2 layers, hidden 32, the MiniLM tokenizer) with a few STS-B pairs: a
1-layer student distilled for a handful of steps, then ONNX Runtime dynamic int8. The gate here
only asks for a sane embedding (mean cosine with the original above :data:`LOOSE`): what is
checked is the search's handling of the candidate (built after the cheap ones, its lineage, the
cache, the budget rule), not the student's quality, which benchmarks/compound_bench.py measures
on MiniLM and the SST-2 classifier.
"""

from __future__ import annotations

import io
import json

import pytest

from modelpress.errors import ConfigError
from modelpress.optimize.gate import GateConfig
from modelpress.optimize.search import compound
from modelpress.optimize.search.front import STOP_BUDGET, STOP_NEEDS_BUDGET, Point
from modelpress.optimize.search.tune import tune
from modelpress.optimize.step import Pipeline

ROWS = 120  # STS-B dev pairs scored in full
# A random 1-layer student trained for a few steps follows its teacher loosely; anything above this is a
# working embedding model (a broken export or a mismatched pooling gives cosines near 0).
LOOSE = 0.3
GATE = GateConfig(thresholds=[{"metric": "mean_cosine", "min_value": LOOSE}])
FAST = {"task": "embedding", "data": "stsb-dev", "limit": ROWS, "threads": 1, "batch_size": 4, "seq_len": 16, "bench_seconds": 0.1}
TINY_TRAINING = {"max_steps": 4, "max_seconds": 30, "samples": 64, "validation_samples": 0, "batch_size": 8, "eval_every": None}
DISTILL = {"technique": "distill", "layers": 1, "training": TINY_TRAINING}
QUANT = {"technique": "dynamic-int8", "runtime": "onnxruntime"}
COMPOUND = {"steps": [DISTILL, QUANT]}


def count_applies(monkeypatch) -> list[str]:
    """The technique of every step the pipeline applies, in order."""
    calls: list[str] = []
    real = Pipeline.apply

    def apply(self, source, cfg, target, *, overwrite=False):
        calls.append(cfg.technique)
        return real(self, source, cfg, target, overwrite=overwrite)

    monkeypatch.setattr(Pipeline, "apply", apply)
    return calls


def test_compound_candidates_parse_plan_and_budget_rule():
    cand = compound.parse_compound(COMPOUND)
    assert cand.label == "distill(layers=1, training={...}) -> dynamic-int8@onnxruntime" or cand.label.endswith("dynamic-int8@onnxruntime")
    assert (
        cand.runtime == "onnxruntime" and cand.family == "distill" and [s["technique"] for s in cand.steps()] == ["distill", "dynamic-int8"]
    )
    assert cand.train_s == 30 and cand.needs_s == 60 * 4  # 30 s of training + 180 s to quantize, time and score: 4 minutes
    # the budget rule: too short a --budget says what it needs; a long one with too little left says budget spent
    stop, reason = compound.why_not(cand, budget_s=120, left_s=120)
    assert stop == STOP_NEEDS_BUDGET and "needs --budget >= 4m" in reason
    assert compound.why_not(cand, budget_s=1800, left_s=100)[0] == STOP_BUDGET
    assert compound.why_not(cand, budget_s=1800, left_s=1700) is None
    for bad in ({"steps": [DISTILL]}, {"steps": [QUANT, QUANT]}, {"steps": [DISTILL, QUANT], "x": 1}):
        with pytest.raises(ConfigError):
            compound.parse_compound(bad)
    # the default plan: students of 3, 4 and 5 layers for a 6-layer teacher; quantized with the run's fastest quantizations
    assert compound.student_layers(6) == [3, 4, 5] and compound.student_layers(2) == [1]
    pts = [
        Point("a", "onnxruntime", QUANT, None, "timed", first_speedup=1.9),
        Point("b", "openvino", {"technique": "static-int8", "runtime": "openvino"}, None, "timed", first_speedup=1.2),
        Point("c", "torch", {"technique": "precision", "runtime": "torch", "dtype": "bf16"}, None, "timed", first_speedup=3.0),
        Point("d", "openvino", {"technique": "weight-only", "runtime": "openvino", "bits": 8}, None, "failed", first_speedup=5.0),
    ]
    assert [q.technique for q in compound.quant_picks(pts, "embedding")] == ["dynamic-int8", "static-int8"]  # not bf16, not a failure


@pytest.mark.needs_data
def test_a_compound_candidate_is_built_after_the_cheap_ones_cached_and_registered_with_both_steps(
    tiny_encoder, tmp_path, monkeypatch, data_dir
):
    from modelpress.api import as_artifact
    from modelpress.artifacts import Artifact
    from modelpress.registry.api import Registry

    monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path / "home"))  # caches of its own
    applied = count_applies(monkeypatch)
    cands = ["torch", QUANT, COMPOUND]
    with Registry(home=tmp_path / "reg") as reg:
        res = tune(
            str(tiny_encoder), candidates=cands, gate=GATE, budget_s=1800, exhaustive=True, output=tmp_path / "out", registry=reg,
            register=True, **FAST,
        )  # fmt: skip
        by = {p.label: p for p in res.points}
        comp = next(p for p in res.points if p.steps)
        # built last (after the cheap quantization), in two steps: the student, then its quantization
        assert applied == ["dynamic-int8", "distill", "dynamic-int8"] and res.points[-1] is comp
        assert comp.stage == "scored" and comp.passed and comp.first_speedup and comp.quality["mean_cosine"] > LOOSE
        assert comp.training and comp.training["steps"] <= TINY_TRAINING["max_steps"] and comp.training["student_layers"] == 1
        # the lineage: the variant's parent is the student, whose parent is the original
        variant, student = Artifact.open(comp.artifact), Artifact.open(comp.intermediate)
        assert variant.manifest.parent == student.content_hash() and variant.manifest.step["technique"] == "dynamic-int8"
        assert student.manifest.step["technique"] == "distill"
        assert student.manifest.parent == as_artifact(str(tiny_encoder), "embedding").content_hash()
        # ... and so in the registry: original -> student -> quantized
        assert comp.registered
        chain = [reg.get(comp.registered)]
        while chain[-1].parent:
            chain.append(reg.get(chain[-1].parent))
        assert [v.manifest.get("step", {}).get("technique") if v.manifest.get("step") else None for v in chain] == [
            "dynamic-int8",
            "distill",
            None,
        ]
        assert chain[-1].ref == res.registered_original and by["dynamic-int8@onnxruntime"].registered != comp.registered
    # tune.json and the report show both steps
    saved = {p["label"]: p for p in json.loads((tmp_path / "out/tune.json").read_text())["points"]}
    assert [s["technique"] for s in saved[comp.label]["steps"]] == ["distill", "dynamic-int8"]
    page = (tmp_path / "out/report.html").read_text()
    assert "id='compound'" in page and "distill" in page and "student layers" in page

    # again: the compound candidate comes from the cache, nothing is trained or quantized again
    applied.clear()
    again = tune(str(tiny_encoder), candidates=cands, gate=GATE, budget_s=1800, exhaustive=True, report=False, **FAST)
    comp2 = next(p for p in again.points if p.steps)
    assert applied == [] and comp2.cached and comp2.stage == "scored" and comp2.intermediate == comp.intermediate


@pytest.mark.needs_data
def test_a_short_budget_does_not_build_compound_candidates_and_says_what_they_need(tiny_encoder, tmp_path, monkeypatch, data_dir):
    from rich.console import Console

    from modelpress.cli.optimize import tune_table

    monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path / "home"))
    applied = count_applies(monkeypatch)
    res = tune(str(tiny_encoder), candidates=["torch", COMPOUND], gate=GATE, budget_s=60, output=tmp_path / "o", **FAST)
    (comp,) = [p for p in res.points if p.steps]
    assert applied == [] and (comp.stage, comp.stop, comp.status) == ("planned", STOP_NEEDS_BUDGET, "skipped")
    assert "needs --budget >= 4m" in comp.reason and any("compound" in n for n in res.notes)
    buf = io.StringIO()
    Console(file=buf, width=400).print(tune_table(res))
    assert "needs --budget >= 4m" in buf.getvalue()
    assert "needs --budget &gt;= 4m" in (tmp_path / "o/report.html").read_text()


def test_the_cli_passes_the_compound_options(monkeypatch):
    from typer.testing import CliRunner

    from modelpress.cli.main import app
    from modelpress.optimize import api

    seen: dict = {}

    class Stop(Exception):
        pass

    def fake(model, **kw):
        seen.update(kw, model=model)
        raise Stop

    monkeypatch.setattr(api, "tune", fake)
    runner = CliRunner()
    runner.invoke(app, ["tune", "minilm", "--budget", "30m", "--no-compound"])
    assert seen["budget_s"] == 1800 and seen["compound_candidates"] is False and seen["compound_train_s"] is None
    seen.clear()
    runner.invoke(app, ["tune", "minilm", "--compound", "--train-time", "2m"])
    assert seen["compound_candidates"] is True and seen["compound_train_s"] == 120
    seen.clear()
    runner.invoke(app, ["tune", "minilm"])
    assert seen["compound_candidates"] is None  # the default: when the budget allows
    seen.clear()
    bad = runner.invoke(app, ["tune", "minilm", "--train-time", "soon"])
    assert bad.exit_code != 0 and not seen
