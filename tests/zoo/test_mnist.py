"""mnist-cnn: trained by the zoo with its default recipe, then loaded, run and exported as any artifact."""

from __future__ import annotations

import numpy as np
import pytest

import modelpress as mp
from modelpress import zoo

pytestmark = [pytest.mark.slow, pytest.mark.needs_data]

# The default recipe reaches about 0.985 on the 10,000 test images; 0.95 leaves room for another
# machine's float rounding while still failing on any broken training, scoring or loading.
MIN_TEST_ACCURACY = 0.95


def test_trains_once_with_progress_and_reaches_the_accuracy(mnist_build):
    art, log, messages = mnist_build
    assert art.path == zoo.zoo_path("mnist-cnn")
    assert art.manifest.metrics["accuracy"]["value"] >= MIN_TEST_ACCURACY
    assert art.manifest.metrics["eval_examples"] == 10_000
    assert any("training it once" in m for m in messages)
    train_stage = next(s for s in log.stages if s.startswith("training mnist-cnn"))
    assert log.stages[train_stage][0] == log.stages[train_stage][1] == art.manifest.step["steps"]
    assert art.manifest.step["recipe"] == zoo.default_recipe("mnist-cnn")


def test_folder_holds_no_pickle(mnist_build):
    art, _, _ = mnist_build
    assert sorted(p.name for p in art.path.iterdir()) == ["model.safetensors", "modelpress.json"]
    assert art.verify() == []


def test_short_name_and_path_load_the_same_model_without_training_again(mnist_build, monkeypatch):
    art, _, _ = mnist_build
    import modelpress.zoo.mnist

    def must_not_train(*_a, **_k):
        raise AssertionError("mnist-cnn was trained again although it is cached")

    monkeypatch.setattr(modelpress.zoo.mnist, "build_mnist", must_not_train)
    by_name, by_path = mp.load("mnist-cnn"), mp.load(str(art.path))
    assert by_name.path == by_path.path == art.path and by_name.name == "mnist-cnn"
    x = mp.task_for(by_name).sample_inputs(16)
    a = mp.create_runner(by_name, "torch").run(x)["logits"]
    b = mp.create_runner(by_path, "torch").run(x)["logits"]
    np.testing.assert_array_equal(a, b)
    assert a.shape == (16, 10)


def test_evaluate_reproduces_the_stored_accuracy(mnist_build, data_dir):
    art, _, _ = mnist_build
    result = mp.evaluate("mnist-cnn", data="mnist-test", data_dir=data_dir, threads=1)
    assert result["metrics"]["accuracy"] == art.manifest.metrics["accuracy"]["value"]


def test_exports_to_onnx_with_parity_and_the_same_predictions(mnist_build, data_dir, tmp_path):
    art, _, _ = mnist_build
    onnx_art = mp.export("mnist-cnn", "onnx", tmp_path / "onnx")
    parity = onnx_art.manifest.metrics["parity_max_abs_diff"]
    assert parity["logits"] <= parity["logits_tolerance"]
    assert onnx_art.manifest.parent == art.content_hash()
    result = mp.evaluate(onnx_art, data="mnist-test", runtime="onnxruntime", data_dir=data_dir, limit=2000, threads=1)
    torch_result = mp.evaluate(art, data="mnist-test", runtime="torch", data_dir=data_dir, limit=2000, threads=1)
    assert abs(result["metrics"]["accuracy"] - torch_result["metrics"]["accuracy"]) <= 1 / 2000  # at most one image flips
