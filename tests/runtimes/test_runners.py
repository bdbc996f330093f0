import numpy as np
import pytest

import modelpress as mp
from modelpress.errors import ConfigError, InvalidInputError, UnknownRuntimeError, UnsupportedModelError

# fp32 backends agree with eager PyTorch to about 1e-6 relative on these tiny models; the
# export parity tolerance (1e-3 of the output scale) is the contract we test against.
from modelpress.export.parity import PARITY_RTOL
from modelpress.runtimes import RUNTIMES

# Runtimes that load any model the export cache converts for them. Left out, each with its own tests:
# aoti, torchscript, executorch compile or trace per model (minutes over these three models; checked on
# MiniLM in tests/export/test_more_formats.py); openvino-decoder runs only KV-cache decoders of causal
# LMs (tests/optimize/test_llm_quantize.py).
OWN_TESTS = {"aoti", "torchscript", "executorch", "openvino-decoder"}
GENERAL = sorted(set(RUNTIMES) - OWN_TESTS)


def test_every_runtime_is_tested_here_or_in_its_own_file():
    assert set(GENERAL) >= {"torch", "onnxruntime", "openvino"} and set(RUNTIMES) >= OWN_TESTS


@pytest.mark.parametrize("runtime", GENERAL)
def test_every_runtime_matches_torch_on_the_encoder(runtime, tiny_encoder):
    art = mp.load(tiny_encoder)
    task = mp.task_for(art)
    batch = task.preprocess(["a sentence", "another, longer sentence here"])
    ref = mp.create_runner(art, "torch", threads=1).run(batch)["last_hidden_state"]
    runner = mp.create_runner(art, runtime, threads=1)
    got = runner.run(batch)["last_hidden_state"]
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= PARITY_RTOL * max(1.0, np.abs(ref).max())
    assert runner.describe()["threads"] == 1 and runner.describe()["runtime"] == runtime


@pytest.mark.parametrize("runtime", GENERAL)
def test_every_runtime_runs_the_classifier_and_llm(runtime, tiny_classifier, tiny_llama):
    for folder, out in ((tiny_classifier, "logits"), (tiny_llama, "logits")):
        art = mp.load(folder)
        task = mp.task_for(art)
        batch = task.preprocess(["one text", "two texts here"])
        ref = mp.create_runner(art, "torch").run(batch)[out]
        got = mp.create_runner(art, runtime, threads=1).run(batch)[out]
        np.testing.assert_allclose(got, ref, atol=PARITY_RTOL * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("runtime", GENERAL)
def test_every_runtime_runs_a_torch_module(runtime, tiny_cnn):
    art = mp.load(tiny_cnn, task="image-classification")
    x = {"pixel_values": np.random.default_rng(0).normal(size=(3, 1, 28, 28)).astype(np.float32)}
    ref = mp.create_runner(art, "torch").run(x)["logits"]
    got = mp.create_runner(art, runtime).run(x)["logits"]
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_onnx_export_is_cached_once(tiny_encoder):
    from modelpress.locations import cache_dir

    art = mp.load(tiny_encoder)
    mp.create_runner(art, "onnxruntime").load()
    before = sorted(p.name for p in cache_dir("exports").iterdir())
    mp.create_runner(mp.load(tiny_encoder), "onnxruntime").load()
    assert sorted(p.name for p in cache_dir("exports").iterdir()) == before


def test_bad_batches_are_refused(tiny_encoder):
    runner = mp.create_runner(mp.load(tiny_encoder), "torch")
    with pytest.raises(InvalidInputError, match="no input 'input_ids'"):
        runner.run({"attention_mask": np.ones((1, 3), np.int64)})
    with pytest.raises(InvalidInputError, match="has 1 dimensions; the model takes 2"):
        runner.run({"input_ids": np.ones(3, np.int64), "attention_mask": np.ones(3, np.int64)})
    with pytest.raises(InvalidInputError, match="different batch sizes"):
        runner.run({"input_ids": np.ones((2, 3), np.int64), "attention_mask": np.ones((1, 3), np.int64)})
    # token_type_ids may be left out (zeros), int32 is converted
    out = runner.run({"input_ids": np.ones((1, 3), np.int32), "attention_mask": np.ones((1, 3), np.int64)})
    assert out["last_hidden_state"].shape == (1, 3, 32)


def test_unknown_runtime_threads_and_format(tiny_encoder, tmp_path):
    art = mp.load(tiny_encoder)
    known = "Known runtimes: aoti, executorch, onnxruntime, openvino, openvino-decoder, torch, torchscript"
    with pytest.raises(UnknownRuntimeError, match=known):
        mp.create_runner(art, "tensorrt")
    with pytest.raises(ConfigError, match="threads"):
        mp.create_runner(art, "torch", threads=0)
    onnx_art = mp.export(art, "onnx", tmp_path / "o")
    with pytest.raises(UnsupportedModelError, match="cannot load a 'onnx'"):
        mp.create_runner(onnx_art, "torch").load()
    with pytest.raises(ConfigError, match="precision"):
        mp.create_runner(art, "openvino", precision="int3").load()


def test_openvino_bf16_option_runs(tiny_encoder):
    art = mp.load(tiny_encoder)
    batch = mp.task_for(art).preprocess(["x y z"])
    ref = mp.create_runner(art, "torch").run(batch)["last_hidden_state"]
    got = mp.create_runner(art, "openvino", precision="bf16").run(batch)["last_hidden_state"]
    # bf16 keeps about 3 significant digits: a looser, stated bound for this precision.
    assert np.abs(got - ref).max() < 0.1


def test_torch_compile_option(tiny_cnn):
    art = mp.load(tiny_cnn, task="image-classification")
    r = mp.create_runner(art, "torch", compile=True)
    assert r.describe()["compile"] is True


def test_the_default_runtime_is_the_one_the_manifest_records(tiny_cnn, tmp_path):
    from modelpress.artifacts import Artifact
    from modelpress.runtimes import runtime_of

    art = mp.load(tiny_cnn, task="image-classification")
    assert runtime_of(art) == "torch" and mp.create_runner(art).name == "torch"
    mp.export(art, "onnx", tmp_path / "o")
    onnx_art = mp.load(tmp_path / "o")
    assert mp.create_runner(onnx_art).name == "onnxruntime"  # an ONNX file runs on ONNX Runtime, without being told
    assert mp.create_runner(onnx_art, "openvino").name == "openvino"  # a runtime given explicitly wins
    # a variant records the runtime its step was made for
    step = {"technique": "dynamic-int8", "runtime": "openvino"}
    variant = Artifact(onnx_art.manifest.model_copy(update={"step": step}), onnx_art.path)
    assert runtime_of(variant) == "openvino" and mp.create_runner(variant).name == "openvino"
    unknown = Artifact(onnx_art.manifest.model_copy(update={"step": {"technique": "x", "runtime": "tensorrt"}}), onnx_art.path)
    assert runtime_of(unknown) == "onnxruntime"  # a runtime this install does not know: the format decides
    # the verbs use it too
    images = np.random.default_rng(0).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(4) % 10)
    res = mp.evaluate(variant, data=str(tmp_path / "d.npz"), reference=art)
    assert res["runtime"] == "openvino" and res["reference"]["runtime"] == "torch"
    assert res["agreement"]["label_agreement"] == 1.0
    cfg = mp.BenchConfig(batch_sizes=[1], seconds=0.05, latency_calls=3, min_iters=1, warmup=1, rounds=1)
    assert [r["runtime"] for r in mp.bench(variant, config=cfg)["results"]] == ["openvino"]
