"""Layer sensitivity: the scores, the one-layer splice, the ranking, and the retry it feeds."""

import numpy as np
import pytest

import modelpress as mp
from modelpress.errors import ConfigError, OptimizationError
from modelpress.optimize.configs import Calibration, DynamicInt8, Precision, StaticInt8, WeightOnly
from modelpress.optimize.handlers import calibration_batches
from modelpress.optimize.quantize import onnxruntime_backend as ob
from modelpress.optimize.search.sensitivity import SCANNERS, damage, layer_sensitivity, quantizable_layers, splice

# A spliced one-layer graph runs the same kernels on the same numbers as the graph quantized with
# every other layer excluded; only the order of float sums may differ (about 1e-7 relative).
SPLICE_ATOL = 1e-6
# int8 of one weight moves this tiny random model's output by 1e-4 or more; fp32 reordering by 1e-6.
QUANTIZED_MOVES = 2e-5


def _batches(art, n: int = 2):
    task = mp.task_for(art)
    texts = [f"example {i}: {'the quick brown fox jumps ' * (i + 1)}" for i in range(8)]
    return [task.preprocess(texts[i::n]) for i in range(n)]


def test_damage_scores():
    ref = [np.array([[1.0, 0.0], [0.0, 2.0]])]
    batch = [{}]
    assert damage(ref, ref, batch, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert damage(ref, [np.array([[0.0, 1.0], [0.0, 2.0]])], batch, "cosine") == pytest.approx(0.5)  # one sample orthogonal
    # SQNR: signal 5, noise 0.05 -> 20 dB.
    assert damage(ref, [ref[0] + np.array([[0.1, 0.0], [0.0, -0.2]])], batch, "sqnr") == pytest.approx(20.0, abs=1e-6)
    # Padded positions (attention_mask 0) do not count.
    hidden = np.ones((1, 3, 2))
    noisy = hidden.copy()
    noisy[0, 2] = -5.0
    assert damage([hidden], [noisy], [{"attention_mask": np.array([[1, 1, 0]])}], "cosine") == pytest.approx(0.0, abs=1e-12)


def test_splice_equals_quantizing_only_that_layer(tiny_encoder, tmp_path):
    import onnx

    from modelpress.optimize.quantize.onnxruntime import layers_for, prepare_graph

    art = mp.load(tiny_encoder)
    graph = prepare_graph(art, fuse=False)
    layers = list(layers_for(graph, DynamicInt8()))
    ob.dynamic_int8(graph.path, tmp_path / "all.onnx", per_channel=True, reduce_range=False, exclude=[], fused=False)
    float_model, quant_model = onnx.load(str(graph.path)), onnx.load(str(tmp_path / "all.onnx"))
    batch = _batches(art, 1)[0]
    names = ob.input_names(graph.path)
    feed = {n: batch[n] for n in names}
    checked = 0
    # Value, FFN-in and FFN-out of layer 0 (in this random model the attention is near uniform,
    # so quantizing a query or key projection alone barely moves the output).
    weighted = ob.onnx_layers(graph.path, ("MatMul",), weights_only=True)
    picked = [n for n, scope in weighted.items() if scope.startswith("model.encoder.layer.0.") and scope.endswith(("value", "dense"))]
    for layer in picked[:3]:
        ob.dynamic_int8(
            graph.path, tmp_path / "one.onnx", per_channel=True, reduce_range=False, exclude=[n for n in layers if n != layer], fused=False
        )
        expected = ob.session(tmp_path / "one.onnx", 1).run(None, feed)[0]
        got = ob.session(splice(float_model, quant_model, layer), 1).run(None, feed)[0]
        ref = ob.session(graph.path, 1).run(None, feed)[0]
        assert np.abs(got - expected).max() <= SPLICE_ATOL
        assert np.abs(got - ref).max() > QUANTIZED_MOVES  # the layer really is quantized
        checked += 1
    assert checked == 3


def test_ort_dynamic_ranks_every_layer_and_feeds_the_retry(tiny_encoder, tmp_path):
    art = mp.load(tiny_encoder)
    cfg = DynamicInt8(per_channel=True, fuse=True, exclude=["Attention_1"])
    layers = quantizable_layers(art, cfg)
    assert "Attention_0" in layers and "Attention_1" not in layers  # the fused graph; exclusions are not scanned
    assert len(layers) == 7  # 2 fused attentions + 3 MatMuls per layer, minus the excluded one
    ranked = layer_sensitivity(art, cfg, _batches(art))
    assert [n for n, _ in ranked] != [] and sorted(n for n, _ in ranked) == sorted(layers)
    scores = [s for _, s in ranked]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
    worst = [n for n, _ in ranked[:2]]
    retry = cfg.excluding(worst)
    variant = mp.apply_technique(art, retry, tmp_path / "v")
    assert set(variant.manifest.metrics["technique"]["excluded"]) == {"Attention_1", *worst}
    by_sqnr = layer_sensitivity(art, cfg, _batches(art), metric="sqnr", layers=worst)
    assert [s for _, s in by_sqnr] == sorted(s for _, s in by_sqnr)  # lowest SQNR first
    assert {n for n, _ in by_sqnr} == set(worst)


@pytest.mark.needs_data
def test_ort_static_finds_the_gelu_output_projection_of_minilm(data_dir):
    # The FFN output projection reads GELU activations with large outliers: per-tensor uint8 hurts it most.
    art = mp.load("minilm")
    cfg = StaticInt8()
    layers = quantizable_layers(art, cfg)
    assert len(layers) == 48  # 6 layers x (4 projections + 2 attention products + 2 FFN)
    batches, _ = calibration_batches(art, Calibration(samples=16, batch_size=8), data_dir)
    first = ["node_MatMul_82", "node_MatMul_146", "node_MatMul_155", "node_MatMul_144"]  # q, FFN in, FFN out, attention out
    ranked = layer_sensitivity(art, cfg, batches, layers=first)
    assert ranked[0][0] == "node_MatMul_155", ranked


def test_openvino_scans(tiny_encoder):
    art = mp.load(tiny_encoder)
    batches = _batches(art)
    wo = WeightOnly(runtime="openvino", bits=4, group_size=32)
    layers = quantizable_layers(art, wo)
    assert len(layers) == 12  # the weighted MatMuls (the attention products have no weight)
    ranked = layer_sensitivity(art, wo, batches, layers=layers[:3])
    assert len(ranked) == 3 and [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True) and ranked[0][1] > 0
    static = StaticInt8(runtime="openvino", calibration={"samples": 8})
    assert len(quantizable_layers(art, static)) == 16
    one = layer_sensitivity(art, static, batches, layers=["node_MatMul_155"])
    assert one[0][0] == "node_MatMul_155" and one[0][1] > 0
    assert quantizable_layers(art, Precision(runtime="openvino")) == []  # the precision is model-wide


def test_sensitivity_errors(tiny_encoder, monkeypatch):
    art = mp.load(tiny_encoder)
    with pytest.raises(ConfigError, match="Unknown sensitivity metric"):
        layer_sensitivity(art, DynamicInt8(), _batches(art), metric="mse")
    with pytest.raises(OptimizationError, match="at least one input batch"):
        layer_sensitivity(art, DynamicInt8(), [])
    with pytest.raises(ConfigError, match="Not layers this technique changes"):
        layer_sensitivity(art, DynamicInt8(fuse=False), _batches(art), layers=["nope"])
    monkeypatch.delitem(SCANNERS, "torch", raising=False)
    with pytest.raises(OptimizationError, match="not available for DynamicInt8 on torch") as err:
        quantizable_layers(art, DynamicInt8(runtime="torch"))
    assert "auto_exclude: 0" in err.value.hint
