"""Architectures as data and the on-disk torch format: build, describe, save, load, run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import modelpress as mp
from modelpress.errors import ArtifactError, ConfigError, UnsupportedModelError
from modelpress.sources import write_torch_artifact
from modelpress.zoo.architectures import MNIST_CNN_DEFAULTS, build_module, check_mnist_cnn_config, describe_module

SMALL = {"conv_channels": [4, 6], "hidden": [12]}


def _small(seed: int = 0):
    torch.manual_seed(seed)
    return build_module("mnist-cnn", SMALL).eval()


def _images(n: int = 5, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 28, 28)).astype(np.float32)


def test_mnist_cnn_shapes_follow_the_config():
    module = build_module("mnist-cnn", {"conv_channels": [8, 16, 24], "hidden": [32, 20], "num_classes": 7})
    convs = [m for m in module.features if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in module.classifier if isinstance(m, torch.nn.Linear)]
    assert [c.out_channels for c in convs] == [8, 16, 24]
    assert linears[0].in_features == 24 * 3 * 3  # 28 -> 14 -> 7 -> 3 after three 2x2 pools
    assert [lin.out_features for lin in linears] == [32, 20, 7]
    assert module(torch.zeros(2, 1, 28, 28)).shape == (2, 7)


def test_describe_gives_back_the_full_config():
    module = build_module("mnist-cnn", SMALL)
    assert describe_module(module) == {"architecture": "mnist-cnn", "config": check_mnist_cnn_config(SMALL)}
    assert describe_module(build_module("mnist-cnn", {}))["config"] == MNIST_CNN_DEFAULTS


def test_describe_reads_the_shapes_of_a_structurally_pruned_module():
    tp = pytest.importorskip("torch_pruning")
    module = _small()
    example = torch.zeros(1, 1, 28, 28)
    graph = tp.DependencyGraph().build_dependency(module, example_inputs=example)
    conv = module.features[0]
    graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[0, 2]).prune()
    fc = module.classifier[1]
    graph.get_pruning_group(fc, tp.prune_linear_out_channels, idxs=list(range(5))).prune()

    spec = describe_module(module)
    assert spec["config"]["conv_channels"] == [2, 6] and spec["config"]["hidden"] == [7]
    rebuilt = build_module(spec["architecture"], spec["config"]).eval()
    rebuilt.load_state_dict(module.state_dict(), strict=True)  # the described shapes are the real ones
    x = torch.from_numpy(_images())
    assert torch.equal(rebuilt(x), module(x))


def test_save_and_load_round_trip_exactly(tmp_path):
    module = _small()
    art = write_torch_artifact(module, tmp_path / "m", name="small", task="image-classification")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.safetensors", "modelpress.json"]
    manifest = json.loads((tmp_path / "m/modelpress.json").read_text())
    assert manifest["format"] == "torch" and manifest["task_config"]["architecture"]["config"]["conv_channels"] == [4, 6]

    x = _images()
    loaded = mp.load(tmp_path / "m")
    assert loaded.module is not None and loaded.module is not module
    # The runner sets torch's thread count (a process-wide setting that changes float summation
    # order): the reference is computed after it, with the same threads, so equality is exact.
    runner = mp.create_runner(loaded, "torch").load()
    with torch.inference_mode():
        expected = module(torch.from_numpy(x)).numpy()
    got = runner.run({"pixel_values": x})["logits"]
    np.testing.assert_array_equal(got, expected)
    assert art.content_hash() == loaded.content_hash()

    # A plain Artifact.open (the registry's way) has no module: the runner rebuilds it from the manifest.
    reopened = mp.Artifact.open(tmp_path / "m")
    assert reopened.module is None
    np.testing.assert_array_equal(mp.create_runner(reopened, "torch").run({"pixel_values": x})["logits"], expected)


def test_saved_weights_are_safetensors_not_pickle(tmp_path):
    write_torch_artifact(_small(), tmp_path / "m", name="small", task="image-classification")
    raw = (tmp_path / "m/model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert "features.0.weight" in header and header["features.0.weight"]["shape"] == [4, 1, 3, 3]
    assert not raw.startswith(b"\x80") and not raw.startswith(b"PK")  # neither a pickle nor torch.save's zip


def test_info_shows_architecture_and_parameters(tmp_path):
    module = _small()
    write_torch_artifact(module, tmp_path / "m", name="small", task="image-classification")
    data = mp.info(str(tmp_path / "m"))
    assert data["architecture"] == "mnist-cnn"
    assert data["parameters"] == sum(p.numel() for p in module.parameters())


def test_weights_that_do_not_fit_the_architecture_are_refused(tmp_path):
    write_torch_artifact(_small(), tmp_path / "m", name="small", task="image-classification")
    path = tmp_path / "m/modelpress.json"
    manifest = json.loads(path.read_text())
    manifest["task_config"]["architecture"]["config"]["conv_channels"] = [5, 6]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="do not fit the architecture"):
        mp.load(tmp_path / "m")


def test_unknown_architecture_and_bad_configs_are_refused():
    with pytest.raises(UnsupportedModelError, match=r"Known architectures: .*mnist-cnn"):
        build_module("resnet-9000", {})
    with pytest.raises(ConfigError, match="Unknown mnist-cnn config keys: chanels"):
        build_module("mnist-cnn", {"chanels": [8]})
    with pytest.raises(ConfigError, match="positive integers"):
        build_module("mnist-cnn", {"conv_channels": [8, 0]})
    with pytest.raises(ConfigError, match="cannot be halved"):
        build_module("mnist-cnn", {"conv_channels": [4, 4, 4, 4, 4, 4]})
    with pytest.raises(UnsupportedModelError, match="not a registered architecture"):
        describe_module(torch.nn.Sequential(torch.nn.Linear(2, 2)))
