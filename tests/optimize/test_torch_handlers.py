"""The torch technique handlers: each makes an artifact that loads, runs close to its source, keeps
excluded layers in float, and holds no pickle; unsupported combinations fail with the fix."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

import modelpress as mp
from modelpress.errors import ConfigError, OptimizationError, UnsupportedModelError
from modelpress.optimize.configs import DynamicInt8, Precision, StaticInt8, WeightOnly
from modelpress.runtimes.torch_transforms import sqnr_db

# The (config class, runtime) pairs this file tests (read by the handler-completeness test).
COVERED = {("DynamicInt8", "torch"), ("StaticInt8", "torch"), ("WeightOnly", "torch"), ("Precision", "torch")}

# Output error against the float source as SQNR (dB; torchao's compute_error), per technique, on
# these tiny random models. Measured: int8 dynamic about 32-34, int8 weight-only about 40-45,
# int4 (group 32) about 18-21, PT2E static int8 about 20-28, bf16 about 35-45. Each threshold is
# 5-10 dB below what was measured and far above what a broken transform gives (below 5).
SQNR_DB = {"dynamic-int8": 25.0, "weight-only-8": 32.0, "weight-only-4": 12.0, "static-int8": 14.0, "bf16": 28.0}
# MNIST accuracy static int8 may lose against the float CNN (points of 1.0); int8 of a small CNN
# usually keeps it within a few tenths of a point.
MNIST_ACCURACY_DROP = 0.01
# STS-B Spearman recovery of torchao int8 dynamic on MiniLM (the bar: within 1% of fp32).
STSB_RECOVERY = 0.99


def _batch(art, n: int = 4):
    task = mp.task_for(art)
    texts = [f"sentence number {i} is about {'rain ' * (i + 1)}in the city" for i in range(n)]
    return task.preprocess(texts)


def _assert_no_pickle(folder: Path) -> None:
    """No file in the artifact is a pickle, or a zip (torch.save, .npz) holding one or an object array."""
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        head = path.read_bytes()[:2]
        assert head[:1] != b"\x80", f"{path.name} starts like a pickle"
        assert path.suffix not in (".pt", ".pth", ".bin", ".pkl", ".ckpt"), path.name
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                assert not [n for n in zf.namelist() if n.endswith(".pkl")], path.name
            with np.load(path, allow_pickle=False) as data:  # raises on object arrays
                for key in data.files:
                    assert data[key].dtype != object


def _variant(source, config, out: Path):
    art = mp.apply_technique(source, config, out)
    assert art.manifest.step == config.to_step()
    assert art.manifest.parent == source.content_hash()
    assert art.manifest.signature is not None
    _assert_no_pickle(out)
    return art


def _close(source, variant_path: Path, batch, output: str, **options) -> float:
    ref = mp.create_runner(source, "torch", threads=1).run(batch)[output]
    got = mp.create_runner(mp.load(variant_path), "torch", threads=1, **options).run(batch)[output]
    assert got.shape == ref.shape
    return sqnr_db(ref, got)


def test_dynamic_int8_on_an_encoder(tiny_encoder, tmp_path):
    src = mp.load(tiny_encoder)
    cfg = DynamicInt8(runtime="torch", compile=False)
    art = _variant(src, cfg, tmp_path / "v")
    opts = art.manifest.task_config["runtime_options"]["torch"]
    assert opts == {"transform": {"kind": "dynamic-int8", "reduce_range": False, "exclude": []}, "compile": False}
    m = art.manifest.metrics["technique"]
    assert m["quantized_layers"] == 13 and m["float_layers"] == []  # 2 x 6 in the layers + the pooler
    assert m["weight_bytes"] < m["float_weight_bytes"]
    # the weights on disk are the float source's own (hard-linked): the transform is applied at load
    assert (tmp_path / "v/model.safetensors").read_bytes() == (tiny_encoder / "model.safetensors").read_bytes()
    assert _close(src, tmp_path / "v", _batch(src), "last_hidden_state") > SQNR_DB["dynamic-int8"]


def test_exclude_keeps_the_named_layers_float(tiny_classifier, tmp_path):
    from torchao.utils import TorchAOBaseTensor

    src = mp.load(tiny_classifier)
    exact = "model.bert.encoder.layer.1.output.dense"
    cfg = DynamicInt8(runtime="torch", compile=False, exclude=[exact, r"classifier$"])
    art = _variant(src, cfg, tmp_path / "v")
    assert sorted(art.manifest.metrics["technique"]["float_layers"]) == sorted([exact, "model.classifier"])
    module = mp.create_runner(mp.load(tmp_path / "v"), "torch").load().module
    for name, mod in module.named_modules():
        if type(mod).__name__ == "Linear":
            assert isinstance(mod.weight, TorchAOBaseTensor) == (name not in (exact, "model.classifier")), name
    assert _close(src, tmp_path / "v", _batch(src), "logits") > SQNR_DB["dynamic-int8"]


@pytest.mark.parametrize(("bits", "symmetric"), [(8, True), (4, False), (4, True)])
def test_weight_only_on_a_decoder(tiny_llama, tmp_path, bits, symmetric):
    src = mp.load(tiny_llama)
    cfg = WeightOnly(runtime="torch", bits=bits, group_size=32 if bits == 4 else None, symmetric=symmetric, compile=False)
    art = _variant(src, cfg, tmp_path / "v")
    m = art.manifest.metrics["technique"]
    if (bits, symmetric) == (4, False):  # the packed int4 kernel needs outputs in multiples of 16 (vocab 30522 is not)
        assert m["quantized_layers"] == 14 and m["float_layers"] == ["model.lm_head"]
    else:
        assert m["quantized_layers"] == 15 and m["float_layers"] == []  # 2 x 7 projections + lm_head
    assert _close(src, tmp_path / "v", _batch(src), "logits") > SQNR_DB[f"weight-only-{bits}"]


def test_precision_bf16_with_an_excluded_block(tiny_encoder, tmp_path):
    import torch

    src = mp.load(tiny_encoder)
    cfg = Precision(runtime="torch", dtype="bf16", compile=False, exclude=[r"encoder\.layer\.0\.attention$"])
    art = _variant(src, cfg, tmp_path / "v")
    assert art.manifest.metrics["technique"]["weight_bytes"] < art.manifest.metrics["technique"]["float_weight_bytes"]
    module = mp.create_runner(art, "torch").load().module
    assert module.get_submodule("model.encoder.layer.0.attention.self.query").weight.dtype == torch.float32
    assert module.get_submodule("model.encoder.layer.1.attention.self.query").weight.dtype == torch.bfloat16
    assert _close(src, tmp_path / "v", _batch(src), "last_hidden_state") > SQNR_DB["bf16"]


def test_static_int8_stores_its_calibration_and_compiles(tiny_encoder, tmp_path):
    """PT2E static int8: the calibration batches travel in the artifact; one compiled run."""
    import torch

    src = mp.load(tiny_encoder)
    cfg = StaticInt8(runtime="torch", calibration={"samples": 12, "batch_size": 4}, exclude=["model.encoder.layer.1.output.dense"])
    art = _variant(src, cfg, tmp_path / "v")
    m = art.manifest.metrics["technique"]
    assert m["calibration"]["samples"] == 12 and m["float_layers"] == ["model.encoder.layer.1.output.dense"]
    assert m["quantized_layers"] == 11  # 12 encoder linears but the excluded one (the pooler is unused and dropped)
    opts = art.manifest.task_config["runtime_options"]["torch"]
    assert opts["calibration"] == "calibration.npz" and opts["compile"] is True and opts["freezing"] is True
    compiled = _close(src, tmp_path / "v", _batch(src), "last_hidden_state")  # as stored: compile + freezing
    assert compiled > SQNR_DB["static-int8"]
    torch._dynamo.reset()


@pytest.mark.needs_data
def test_static_int8_of_an_in_memory_cnn_keeps_mnist_accuracy(trained_mnist_cnn, tiny_cnn, data_dir, tmp_path):
    """An in-memory module's variant stores its weights as safetensors, never its code."""
    src = mp.load(trained_mnist_cnn, task="image-classification")
    cfg = StaticInt8(runtime="torch", compile=False, calibration={"samples": 256, "batch_size": 64})
    art = _variant(src, cfg, tmp_path / "v")
    assert art.format == "torch" and art.manifest.metrics["technique"]["quantized_layers"] == 3  # 2 convs + the linear
    base = mp.evaluate(src, data="mnist-test", limit=2000)["metrics"]["accuracy"]
    quant = mp.evaluate(art, data="mnist-test", limit=2000)["metrics"]["accuracy"]
    assert quant >= base - MNIST_ACCURACY_DROP, f"base {base:.4f} | static int8 {quant:.4f} | allowed drop {MNIST_ACCURACY_DROP}"

    reopened = mp.load(tmp_path / "v")
    with pytest.raises(UnsupportedModelError, match=r"(?s)no module in memory.*art\.module = MyNet"):
        mp.create_runner(reopened, "torch").load()
    import torch

    reopened.module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    with pytest.raises(UnsupportedModelError, match="does not fit the weights"):
        mp.create_runner(reopened, "torch").load()
    reopened.module = tiny_cnn  # untrained: the runner reads the trained weights from the folder
    x = mp.task_for(art).sample_inputs(16, data_dir=data_dir)
    np.testing.assert_allclose(
        mp.create_runner(reopened, "torch").run(x)["logits"], mp.create_runner(art, "torch").run(x)["logits"], rtol=1e-5, atol=1e-5
    )


def test_precision_then_weight_only_chain(tiny_llama, tmp_path):
    src = mp.load(tiny_llama)
    bf16 = _variant(src, Precision(runtime="torch", dtype="bf16", compile=False), tmp_path / "a")
    both = _variant(bf16, WeightOnly(runtime="torch", bits=8, compile=False), tmp_path / "b")
    chain = both.manifest.task_config["runtime_options"]["torch"]["transform"]
    assert [t["kind"] for t in chain] == ["cast", "weight-only"]
    # compared with its parent (the bf16 model), int8 weights add little error
    assert both.manifest.metrics["technique"]["sqnr_db"] > SQNR_DB["weight-only-8"] - 10
    assert _close(src, tmp_path / "b", _batch(src), "logits") > SQNR_DB["bf16"] - 10


def test_unsupported_combinations_fail_clearly(tiny_encoder, tmp_path):
    src = mp.load(tiny_encoder)
    onnx_art = mp.Artifact(mp.Manifest(name="m", task="embedding", format="onnx", model_file="model.onnx"), tmp_path)
    with pytest.raises(OptimizationError, match=r"(?s)needs a PyTorch model.*runtime: onnxruntime"):
        mp.apply_technique(onnx_art, DynamicInt8(runtime="torch"), tmp_path / "x")
    with pytest.raises(
        ConfigError, match=r"(?s)'attention.query' matches no layer.*e\.g\. model\.encoder\.layer\.0\.attention\.self\.query"
    ):
        mp.apply_technique(src, DynamicInt8(runtime="torch", exclude=["attention.query"]), tmp_path / "y")
    assert not (tmp_path / "y").exists()  # nothing half-written
    static = _variant(src, StaticInt8(runtime="torch", compile=False, calibration={"samples": 4, "batch_size": 4}), tmp_path / "s")
    with pytest.raises(ConfigError, match="at most one cast and one quantization"):
        mp.apply_technique(static, DynamicInt8(runtime="torch"), tmp_path / "z")
    with pytest.raises(ConfigError, match="static-int8 on torch runs"):
        mp.apply_technique(static, Precision(runtime="torch", dtype="bf16"), tmp_path / "z")
    with pytest.raises(ConfigError, match="group sizes"):
        mp.apply_technique(src, WeightOnly(runtime="torch", bits=4, symmetric=False, group_size=16), tmp_path / "z")


@pytest.mark.needs_data
@pytest.mark.slow
def test_dynamic_int8_keeps_minilm_stsb_spearman(minilm_reference, tmp_path):
    art = mp.apply_technique(minilm_reference.art, DynamicInt8(runtime="torch", compile=False), tmp_path / "v")
    base = minilm_reference.spearman(minilm_reference.emb)  # the original's, computed once per session
    quant = minilm_reference.spearman(minilm_reference.embed(art, "torch"))
    rec = quant / base
    assert rec >= STSB_RECOVERY, f"base {base:.4f} | int8 {quant:.4f} | recovery {rec:.4f} | threshold {STSB_RECOVERY}"
