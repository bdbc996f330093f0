"""Quantization-aware training as a step (issue 16, item 4): configs, errors, and a real QAT run on mnist-cnn.

The run is short (30 steps on 512 training images) so the file stays fast: it checks that QAT
makes the same kind of artifact the post-training step makes (an ONNX Runtime QDQ int8 model),
that the runtime runs it at the float model's accuracy within a stated tolerance, and that the
manifest records the qat step. What QAT buys over PTQ is measured by benchmarks/qat_bench.py
(docs/qat.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelpress.errors import ConfigError, DatasetError
from modelpress.optimize.configs import TECHNIQUES, parse_step
from modelpress.optimize.configs.quantize import QAT, StaticInt8, WeightOnly

# int8 on mnist-cnn loses < 0.1 point (docs/qat.md), and 30 steps at lr 2e-5 barely move the
# weights: 1 point on 1,000 test images (10 images) is far outside both.
MAX_DROP = 0.01
TEST_IMAGES = 1000


def test_qat_is_a_registered_technique_and_round_trips_through_json():
    assert TECHNIQUES["qat"] is QAT
    cfg = parse_step(
        {
            "technique": "qat",
            "runtime": "openvino",
            "quantize": {"technique": "static-int8"},
            "training": {"max_steps": 50, "eval_every": 25},
        }
    )
    again = parse_step(json.loads(cfg.to_json()))
    assert again == cfg
    assert again.training.max_steps == 50
    assert cfg.label().startswith("qat@openvino")


def test_target_is_the_post_training_step_on_the_same_runtime():
    cfg = QAT(runtime="onnxruntime", quantize={"technique": "static-int8", "per_channel": True}, exclude=["classifier"])
    target = cfg.target()
    assert isinstance(target, StaticInt8)
    assert (target.runtime, target.per_channel, target.exclude) == ("onnxruntime", True, ["classifier"])
    wo = QAT(runtime="torch", quantize={"technique": "weight-only", "bits": 4, "group_size": 32}).target()
    assert isinstance(wo, WeightOnly) and (wo.bits, wo.group_size, wo.runtime) == (4, 32, "torch")


@pytest.mark.parametrize(
    ("step", "words"),
    [
        ({"technique": "qat", "quantize": "dynamic-int8"}, "static-int8 or weight-only"),
        ({"technique": "qat", "traning": {}}, "Did you mean 'training'"),
        ({"technique": "qat", "training": {"max_stepz": 3}}, "Did you mean 'max_steps'"),
        ({"technique": "qat", "runtime": "torch", "quantize": {"technique": "static-int8", "runtime": "openvino"}}, "give runtime once"),
        ({"technique": "qat", "auto_exclude": 2}, "drop auto_exclude"),
        ({"technique": "qat", "quantize": {"technique": "weight-only", "bits": 3}}, "bits"),
        ({"technique": "qat", "runtime": "onnxruntime", "quantize": {"technique": "static-int8", "method": "entropi"}}, "method"),
        ({"technique": "qat", "training": {"max_steps": 10, "eval_every": 50}}, "eval_every"),
    ],
)
def test_bad_qat_steps_are_config_errors_that_say_how_to_fix_them(step, words):
    with pytest.raises(ConfigError) as err:
        parse_step(step)
    assert words in str(err.value) + (err.value.hint or "")


def test_qat_candidate_for_the_tuner_needs_a_training_objective():
    from modelpress.optimize.quantize.qat import qat_candidate

    assert qat_candidate("object-detection") is None
    cfg = qat_candidate("image-classification", "onnxruntime", data=["mnist-train5k"], max_steps=90)
    assert isinstance(cfg, QAT) and cfg.training.max_steps == 90 and cfg.training.data == ["mnist-train5k"]
    # the task's training (a CNN trained at lr 3e-3 needs more than a transformer's 2e-5); the final weights kept
    assert cfg.training.lr == 5e-4 and cfg.training.eval_every is None
    text = qat_candidate("text-classification", "openvino", max_seconds=120, data_dir=Path("/nonexistent/data"))
    assert text is not None and text.training.lr == 2e-5 and text.training.max_steps == 300 and text.training.max_seconds == 120
    assert qat_candidate("causal-lm", data=["tinyshakespeare"]) is not None


@pytest.mark.needs_data
def test_qat_refuses_to_train_on_the_scored_split_and_says_what_data_it_needs(mnist_build, tmp_path):
    from modelpress.locations import find_data_dir
    from modelpress.optimize.techniques import apply_technique

    with pytest.raises(DatasetError) as err:
        apply_technique(
            mnist_build[0], {"technique": "qat", "training": {"data": ["mnist-test"]}}, tmp_path / "v", data_dir=find_data_dir()
        )
    assert "mnist-train5k" in (err.value.hint or "")
    assert not (tmp_path / "v").exists()


@pytest.mark.needs_data
@pytest.mark.slow
def test_qat_on_mnist_makes_an_onnxruntime_int8_artifact_that_keeps_accuracy(mnist_build, tmp_path):
    import onnx

    from modelpress.artifacts import Artifact
    from modelpress.optimize.recipe import run_recipe

    art = mnist_build[0]
    step = {
        "technique": "qat",
        "runtime": "onnxruntime",
        "quantize": {"technique": "static-int8", "per_channel": True, "calibration": {"samples": 64}},
        "training": {"max_steps": 30, "eval_every": 15, "samples": 512, "validation_samples": 128, "batch_size": 32},
    }
    recipe = {"gate": {"accuracy": {"min_recovery": 1 - MAX_DROP}}, "steps": [step]}
    stages: list[str] = []

    def progress(desc, total):
        stages.append(desc)
        return lambda n: None

    res = run_recipe(art, recipe, tmp_path / "out", data="mnist-test", limit=TEST_IMAGES, threads=2, progress=progress)
    (result,) = res.steps
    assert result.error is None, result.error
    base = res.original["metrics"]["accuracy"]
    assert result.evaluation["metrics"]["accuracy"] >= base - MAX_DROP, result.gate.summary()
    assert result.shipped
    variant = Artifact.open(result.path)
    assert variant.format == "onnx"
    assert variant.manifest.step["technique"] == "qat"
    assert variant.manifest.parent == art.content_hash()
    ops = {n.op_type for n in onnx.load(str(variant.model_file)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # the QDQ int8 graph static-int8 makes
    report = variant.manifest.metrics["technique"]["qat"]
    assert report["training"]["steps"] >= 1 and report["train_examples"] == 512
    assert any("quantization-aware training" in s for s in stages)


# Every (QAT, runtime) pair the technique registers has a run here (tests/optimize/test_ort_ov.py checks).
COVERED = {("QAT", "onnxruntime"), ("QAT", "openvino"), ("QAT", "torch")}


@pytest.mark.needs_data
@pytest.mark.slow
# torch: weight-only int8 (torchao). Static int8 QAT converted on torch fails in inductor's quantized-conv lowering
# on the CNN (a stride assertion); PTQ static int8 on torch works: a known gap, in the closing note.
@pytest.mark.parametrize(
    ("runtime", "quantize"),
    [("openvino", {"technique": "static-int8", "calibration": {"samples": 64}}), ("torch", {"technique": "weight-only", "bits": 8})],
    ids=["openvino", "torch"],
)
def test_qat_on_mnist_converts_through_the_post_training_step_of_each_runtime(mnist_build, tmp_path, runtime, quantize):
    """A shorter run than the ONNX Runtime one: the same fine-tuning, converted by this runtime's post-training step."""
    from modelpress.artifacts import Artifact
    from modelpress.optimize.recipe import run_recipe

    art = mnist_build[0]
    step = {
        "technique": "qat",
        "runtime": runtime,
        "quantize": quantize,
        "training": {"max_steps": 10, "eval_every": 10, "samples": 256, "validation_samples": 64, "batch_size": 32},
    }
    recipe = {"gate": {"accuracy": {"min_recovery": 1 - MAX_DROP}}, "steps": [step]}
    res = run_recipe(art, recipe, tmp_path / "out", data="mnist-test", limit=TEST_IMAGES, threads=2)
    (result,) = res.steps
    assert result.error is None, result.error
    assert result.evaluation["metrics"]["accuracy"] >= res.original["metrics"]["accuracy"] - MAX_DROP, result.gate.summary()
    variant = Artifact.open(result.path)
    assert variant.manifest.step["technique"] == "qat" and variant.manifest.parent == art.content_hash()
    assert variant.manifest.step["runtime"] == runtime


def _tiny_bert_hidden_states(kernel: str = "sdpa", *, pooler: bool = True):
    """A one-layer BertModel behind an embedding model's positional module (token states only), and an example input."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    cfg._attn_implementation = kernel
    bert = BertModel(cfg, add_pooling_layer=pooler).eval()

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = bert

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.randint(1, 64, (2, 8))
    return Hidden(), (ids, torch.ones_like(ids))


def test_static_qat_keeps_weights_the_outputs_never_use_out_of_the_lost_weights_check():
    """An embedding model's BertModel has a pooler its last-hidden-state module never uses: the export drops it
    with the dead code, so the prepared graph has no pooler weights; they are listed as unused, not lost."""

    from modelpress.optimize.quantize.qat_prepare import prepare_static

    module, example = _tiny_bert_hidden_states()
    graph = prepare_static(module, example, per_channel=True)
    assert graph.unused_weights == ["model.pooler.dense.bias", "model.pooler.dense.weight"]
    assert "model.encoder.layer.0.output.dense.weight" in graph.state_dict()  # the used weights are there to train


@pytest.mark.parametrize(("runtime", "kernel"), [("onnxruntime", "eager"), ("openvino", "eager"), ("torch", None)])
def test_static_qat_simulates_the_attention_matmuls_where_the_conversion_quantizes_them(runtime, kernel):
    """ONNX Runtime's and OpenVINO's static int8 quantize attention's Q K^T and P V; QAT trains with eager attention
    there, whose two matmuls per layer get fake quantizers on both inputs (sdpa's fused kernel gets none)."""
    import torch

    from modelpress.optimize.quantize.qat_prepare import attention_kernel, prepare_static

    target = QAT(runtime=runtime, quantize={"technique": "static-int8"}).target()
    assert attention_kernel(target) == kernel
    assert attention_kernel(QAT(runtime=runtime, quantize={"technique": "weight-only"}).target()) is None
    module, example = _tiny_bert_hidden_states(kernel or "sdpa", pooler=False)
    graph = prepare_static(module, example, per_channel=True, matmuls=kernel == "eager")
    matmuls = [n for n in graph.graph.nodes if n.target is torch.ops.aten.matmul.default]
    assert len(matmuls) == (2 if kernel == "eager" else 0)
    for node in matmuls:  # each input comes through a fake quantizer (a call_module of the prepared graph)
        assert all(arg.op == "call_module" and "activation_post_process" in str(arg.target) for arg in node.args), node.args
