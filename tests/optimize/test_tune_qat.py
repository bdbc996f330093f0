"""QAT as a tune candidate: a trained candidate like the compound ones (built last, under the budget rule,
cached, registered with its lineage), converted with the run's fastest static int8.

The tune run uses the zoo's mnist-cnn on 200 test images with a QAT of a handful of steps: what is
checked is the search's handling of the candidate, not what QAT wins back (benchmarks/qat_bench.py,
docs/qat.md). The gate only asks for a working classifier (:data:`LOOSE`).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from modelpress.optimize.configs import StaticInt8
from modelpress.optimize.configs.quantize import QAT
from modelpress.optimize.gate import GateConfig
from modelpress.optimize.search import compound
from modelpress.optimize.search.candidates import Compound, parse_candidates
from modelpress.optimize.search.front import STOP_BUDGET, STOP_NEEDS_BUDGET, Point
from modelpress.optimize.search.tune import tune
from modelpress.optimize.step import Pipeline

IMAGES = 200  # mnist-test images scored
# A CNN at 98.5% that a few QAT steps leave at 97-99%; a broken conversion (scales, layouts) scores near chance (10%).
LOOSE = 0.9
GATE = GateConfig(thresholds=[{"metric": "accuracy", "min_value": LOOSE}])
FAST = {"data": "mnist-test", "limit": IMAGES, "threads": 1, "batch_size": 16, "bench_seconds": 0.1}
PTQ = {"technique": "static-int8", "runtime": "onnxruntime", "per_channel": True, "calibration": {"samples": 64}}
TINY = {"max_steps": 4, "lr": 5e-4, "samples": 256, "validation_samples": 0, "batch_size": 16}


def test_a_qat_step_is_a_trained_candidate_with_the_budget_rule_and_two_steps_in_the_table():
    (cand,) = parse_candidates([{"technique": "qat", "runtime": "onnxruntime", "training": {"max_seconds": 60}}])
    assert isinstance(cand, Compound) and cand.family == "qat" and cand.first is None
    assert cand.label.startswith("qat") and "->" not in cand.label
    assert [(s["technique"], s["runtime"]) for s in cand.steps()] == [("qat", "onnxruntime"), ("static-int8", "onnxruntime")]
    assert cand.train_s == 60 and cand.needs_s == 60 * 4  # 60 s of training + 180 s to convert, time and score
    assert compound.why_not(cand, budget_s=120, left_s=120)[0] == STOP_NEEDS_BUDGET
    assert compound.why_not(cand, budget_s=1800, left_s=100)[0] == STOP_BUDGET
    assert compound.why_not(cand, budget_s=1800, left_s=1700) is None
    # the training summary reads QAT's report (metrics.technique.qat.training), not distill's place for it
    tech = {"qat": {"training": {"steps": 4, "seconds": 2.5, "stopped": "max_steps"}}, "conversion": {}}
    first = SimpleNamespace(manifest=SimpleNamespace(metrics={"technique": tech}))
    assert compound.training_summary(first) == {"steps": 4, "seconds": 2.5, "stopped": "max_steps", "cached": False}


def test_qat_converts_with_the_runs_fastest_static_int8_on_a_runtime_it_converts_to(tmp_path):
    pts = [
        Point("dyn", "onnxruntime", {"technique": "dynamic-int8", "runtime": "onnxruntime"}, None, "timed", first_speedup=3.0),
        Point(
            "ov",
            "openvino",
            {"technique": "static-int8", "runtime": "openvino", "precision_hint": "bf16"},
            None,
            "timed",
            first_speedup=2.0,
        ),
        Point("ort", "onnxruntime", {"technique": "static-int8", "runtime": "onnxruntime"}, None, "timed", first_speedup=1.5),
        Point("bad", "openvino", {"technique": "static-int8", "runtime": "openvino"}, None, "failed", first_speedup=9.0),
        Point("pt", "torch", {"technique": "static-int8", "runtime": "torch"}, None, "timed", first_speedup=2.5),
    ]
    # not dynamic int8 (QAT simulates static int8), not a failure: the fastest timed static int8
    got = compound.qat_target(pts, "text-classification")
    assert isinstance(got, StaticInt8) and (got.runtime, got.precision_hint) == ("torch", None)
    # on a CNN, static int8 QAT converted on torch is a known failure: the next one (OpenVINO, with its hint)
    got = compound.qat_target(pts, "image-classification")
    assert (got.runtime, got.precision_hint) == ("openvino", "bf16")
    # nothing to convert to: ONNX Runtime static int8 per channel; a causal LM with no weight-only candidate: none
    assert compound.qat_target(pts[:1], "embedding") == compound.QAT_FALLBACK and compound.QAT_FALLBACK.per_channel
    assert compound.qat_target(pts, "causal-lm") is None
    # the candidate: the target's settings as QAT's conversion, the task's training, bounded by the training time
    art = SimpleNamespace(task="image-classification", format="torch")
    cand = compound.qat_compound(art, pts, train_s=120, data_dir=tmp_path)
    assert cand is not None and cand.family == "qat" and isinstance(cand.config, QAT)
    target = cand.config.target()
    assert (target.runtime, target.precision_hint) == ("openvino", "bf16") and cand.runtime == "openvino"
    assert cand.config.training.max_seconds == 120 and cand.config.training.lr == 5e-4  # the CNN's QAT learning rate
    assert cand.train_s == 120
    assert compound.qat_compound(SimpleNamespace(task="object-detection", format="torch"), pts, data_dir=tmp_path) is None
    assert compound.qat_compound(SimpleNamespace(task="embedding", format="onnx"), pts, data_dir=tmp_path) is None


@pytest.mark.needs_data
def test_the_qat_candidate_is_built_last_converted_like_the_runs_static_int8_cached_and_registered(
    mnist_build, tmp_path, monkeypatch, data_dir
):
    from modelpress.artifacts import Artifact
    from modelpress.optimize.quantize import qat
    from modelpress.registry.api import Registry

    art = mnist_build[0]
    monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path / "home"))  # caches of its own
    monkeypatch.setattr(compound, "first_steps", lambda *a, **k: [])  # no pruned CNN: QAT is the only trained candidate
    monkeypatch.setitem(qat.TUNE_TRAINING, "image-classification", TINY)
    applied: list[str] = []
    real = Pipeline.apply

    def apply(self, source, cfg, target, *, overwrite=False):
        applied.append(cfg.technique)
        return real(self, source, cfg, target, overwrite=overwrite)

    monkeypatch.setattr(Pipeline, "apply", apply)
    kw = {"candidates": ["torch", PTQ], "compound_candidates": True, "compound_train_s": 60, "gate": GATE, "budget_s": 1800}
    with Registry(home=tmp_path / "reg") as reg:
        res = tune(art, exhaustive=True, output=tmp_path / "out", registry=reg, register=True, **kw, **FAST)
        q = next(p for p in res.points if p.steps)
        # built last, after the post-training static int8 it converts like
        assert applied == ["static-int8", "qat"] and res.points[-1] is q
        assert [s["technique"] for s in q.steps] == ["qat", "static-int8"]
        assert {k: q.steps[1][k] for k in ("runtime", "per_channel")} == {"runtime": "onnxruntime", "per_channel": True}
        assert q.steps[1]["calibration"]["samples"] == 64
        assert q.stage == "scored" and q.passed and q.first_speedup and q.quality["accuracy"] >= LOOSE
        assert q.training and q.training["steps"] == TINY["max_steps"]
        # lineage: one step, the original its parent; the training and the conversion in its manifest
        variant = Artifact.open(q.artifact)
        assert q.intermediate == q.artifact and variant.format == "onnx"
        assert variant.manifest.parent == art.content_hash() and variant.manifest.step["technique"] == "qat"
        assert variant.manifest.metrics["technique"]["qat"]["training"]["steps"] == TINY["max_steps"]
        chain = [reg.get(q.registered)]
        while chain[-1].parent:
            chain.append(reg.get(chain[-1].parent))
        assert [(v.manifest.get("step") or {}).get("technique") for v in chain] == ["qat", None]
        assert chain[-1].ref == res.registered_original
    saved = {p["label"]: p for p in json.loads((tmp_path / "out/tune.json").read_text())["points"]}
    assert [s["technique"] for s in saved[q.label]["steps"]] == ["qat", "static-int8"]
    page = (tmp_path / "out/report.html").read_text()
    assert "id='compound'" in page and "<td>qat</td>" in page

    # again, with another gate: the point is new, the trained QAT artifact comes from the tune cache
    applied.clear()
    loose = GateConfig(thresholds=[{"metric": "accuracy", "min_value": LOOSE - 0.1}])
    again = tune(art, exhaustive=True, report=False, **{**kw, "gate": loose}, **FAST)
    q2 = next(p for p in again.points if p.steps)
    assert "qat" not in applied and q2.stage == "scored" and q2.training["steps"] == TINY["max_steps"]
    # and with the same settings: the whole point from the cache, nothing applied
    applied.clear()
    third = tune(art, exhaustive=True, report=False, **{**kw, "gate": loose}, **FAST)
    q3 = next(p for p in third.points if p.steps)
    assert applied == [] and q3.cached and q3.stage == "scored"


@pytest.mark.needs_data
def test_a_short_budget_does_not_train_the_qat_candidate_and_the_table_says_what_it_needs(mnist_build, tmp_path, monkeypatch, data_dir):
    import io

    from rich.console import Console

    from modelpress.cli.optimize import tune_table

    monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path / "home"))
    step = {"technique": "qat", "runtime": "onnxruntime", "training": {**TINY, "max_seconds": 600}}  # 10 + 3 minutes
    res = tune(mnist_build[0], candidates=["torch", step], gate=GATE, budget_s=120, output=tmp_path / "o", **FAST)
    (q,) = [p for p in res.points if p.steps]
    assert (q.stage, q.stop, q.status, q.artifact) == ("planned", STOP_NEEDS_BUDGET, "skipped", None)
    assert "needs --budget >= 13m" in q.reason and any("QAT" in n for n in res.notes)
    buf = io.StringIO()
    Console(file=buf, width=400).print(tune_table(res))
    assert "qat" in buf.getvalue() and "needs --budget >= 13m" in buf.getvalue()
