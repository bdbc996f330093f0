"""The optimization machinery on the project's own models (issue 3, item 6), gated on real data.

* mnist-cnn (the zoo's CNN trained on the 5k MNIST subset): static int8 with calibration keeps
  >= 99% of its accuracy on the 10k MNIST test set, on every runtime that has static int8;
* a MiniLM text classifier fine-tuned on SST-2 (the short session run, see tests/conftest.py;
  the full zoo model is `minilm-sst2`): the quantized variants keep >= 99% of its SST-2 dev
  accuracy.
"""

from __future__ import annotations

import pytest

from modelpress.optimize.recipe import run_recipe

MIN_RECOVERY = 0.99  # the bar: quantized variants keep >= 99% of the float model's accuracy


def _gate():
    return {"accuracy": {"min_recovery": MIN_RECOVERY}}


@pytest.mark.needs_data
@pytest.mark.slow
def test_mnist_cnn_static_int8_keeps_99_percent(data_dir, tmp_path, mnist_build):
    recipe = {
        "mode": "branch",
        "on_failure": "skip",
        "gate": _gate(),
        "steps": [
            {"technique": "static-int8", "runtime": "onnxruntime", "calibration": {"samples": 256}},
            {"technique": "static-int8", "runtime": "openvino", "calibration": {"samples": 256}},
        ],
    }
    res = run_recipe(mnist_build[0], recipe, tmp_path / "out", data="mnist-test", threads=2)
    assert res.original["metrics"]["accuracy"] >= 0.95
    for step in res.steps:
        assert step.error is None, step.error
        assert step.shipped, step.gate.summary()
        assert step.evaluation["metrics"]["accuracy"] >= MIN_RECOVERY * res.original["metrics"]["accuracy"]
        assert step.evaluation["agreement"]["label_agreement"] > 0.98


@pytest.mark.needs_data
@pytest.mark.slow
def test_sst2_classifier_quantized_keeps_99_percent(data_dir, tmp_path, sst2_short):
    recipe = {
        "mode": "branch",
        "on_failure": "skip",
        "gate": _gate(),
        "steps": [
            {"technique": "dynamic-int8", "runtime": "onnxruntime", "per_channel": True},
            {"technique": "static-int8", "runtime": "openvino", "calibration": {"samples": 64}},
        ],
    }
    res = run_recipe(sst2_short, recipe, tmp_path / "out", data="sst2-dev", threads=2)
    base = res.original["metrics"]["accuracy"]
    assert base >= 0.75
    for step in res.steps:
        assert step.error is None, step.error
        assert step.shipped, step.gate.summary()
        assert step.evaluation["metrics"]["accuracy"] >= MIN_RECOVERY * base
