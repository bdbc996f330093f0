"""Structured pruning: exact shapes, the same function as the masked original, loading and export."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import modelpress
from modelpress.errors import ConfigError, OptimizationError
from modelpress.optimize.configs import parse_step
from modelpress.optimize.prune.structured import StructuredPrune, prune_cnn, prune_structured, prune_transformer

# the (technique, runtime) pairs this file tests (read by the handler-completeness test)
COVERED = {("StructuredPrune", "torch")}

# Pruning removes exactly what masking zeroes, so outputs agree up to float summation order.
MASKED_ATOL = 1e-5


def _tokens(tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def _mask_inputs(module, keep, size, width=1):
    """A pre-hook zeroing every input feature of ``module`` outside ``keep`` (in units of ``width``)."""
    mask = torch.zeros(size * width)
    for k in keep:
        mask[k * width : (k + 1) * width] = 1.0
    return module.register_forward_pre_hook(lambda _m, args: (args[0] * mask, *args[1:]))


def test_config_round_trips_and_rejects_bad_values():
    cfg = parse_step(
        {"technique": "structured-prune", "ratio": 0.25, "targets": ["ffn", "heads"], "finetune": {"max_steps": 50, "eval_every": 25}}
    )
    assert parse_step(json.loads(cfg.to_json())) == cfg
    assert parse_step(__import__("yaml").safe_load(cfg.to_yaml())) == cfg
    assert cfg.label() == "structured-prune@torch(ratio=0.25, targets=['ffn', 'heads'], finetune.max_steps=50, finetune.eval_every=25)"
    with pytest.raises(ConfigError, match="ratio"):
        StructuredPrune(ratio=1.0)
    with pytest.raises(ConfigError, match="head_ratio is set but 'heads'"):
        StructuredPrune(targets=["ffn"], head_ratio=0.5)
    with pytest.raises(ConfigError, match="runtime"):
        StructuredPrune(runtime="openvino")


def test_encoder_ffn_prunes_to_exact_shapes_and_matches_the_masked_original(tiny_encoder):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_encoder))
    original = AutoModel.from_pretrained(str(tiny_encoder)).eval()
    pruned = copy.deepcopy(original)
    report = prune_transformer(pruned, ["ffn"], 0.5, importance="magnitude")
    assert report["ffn"] == {"before": 64, "after": 32} and pruned.config.intermediate_size == 32
    for layer in pruned.encoder.layer:
        assert tuple(layer.intermediate.dense.weight.shape) == (32, 32)
        assert tuple(layer.output.dense.weight.shape) == (32, 32)
    hooks = [_mask_inputs(layer.output.dense, keep, 64) for layer, keep in zip(original.encoder.layer, report["kept"]["ffn"], strict=True)]
    batch = _tokens(tok, ["a short sentence", "another, somewhat longer sentence to pad"])
    with torch.no_grad():
        want, got = original(**batch).last_hidden_state, pruned(**batch).last_hidden_state
    for h in hooks:
        h.remove()
    torch.testing.assert_close(got, want, atol=MASKED_ATOL, rtol=0)


def test_pruned_encoder_loads_evaluates_and_exports_with_parity(tiny_encoder, tmp_path):
    art = prune_structured(str(tiny_encoder), tmp_path / "pruned", {"ratio": 0.5, "importance": "magnitude"})
    cfg = json.loads((art.path / "config.json").read_text())
    assert cfg["intermediate_size"] == 32 and cfg["num_hidden_layers"] == 2
    assert (art.path / "modules.json").is_file() and (art.path / "1_Pooling/config.json").is_file()
    assert art.manifest.step["technique"] == "structured-prune" and art.manifest.parent is not None
    m = art.manifest.metrics["technique"]
    assert m["ffn"] == {"before": 64, "after": 32} and m["parameters_after"] == m["parameters_before"] - 2 * (2 * 32 * 32 + 32)
    loaded = modelpress.load(art.path)
    assert loaded.task == "embedding" and loaded.manifest.task_config["pooling"] == "mean"
    from modelpress.runtimes import create_runner

    runner = create_runner(loaded, "torch").load()
    batch = runner_batch(loaded)
    out = runner.run(batch)["last_hidden_state"]
    assert out.shape[-1] == 32 and np.isfinite(out).all()
    from modelpress.export import exported

    ov = modelpress.export(loaded, "openvino", tmp_path / "ov")  # through the ONNX export, each checked for parity
    for art_ in (exported(loaded, "onnx"), ov):
        diffs = art_.manifest.metrics["parity_max_abs_diff"]
        assert diffs["last_hidden_state"] <= diffs["last_hidden_state_tolerance"]


def runner_batch(art):
    from modelpress.tasks import task_for

    return task_for(art).preprocess(["pruned models still read text", "and give one vector per token"])


def test_decoder_heads_and_ffn_prune_to_exact_shapes_and_match_the_masked_original(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    original = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    pruned = copy.deepcopy(original)
    report = prune_transformer(pruned, ["ffn", "heads"], 0.5, importance="magnitude")
    assert report["heads"] == {"before": 4, "after": 2, "kv_before": 2, "kv_after": 1, "head_dim": 8}
    c = pruned.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (2, 1, 8, 32)
    for layer in pruned.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        assert [tuple(x.weight.shape) for x in (a.q_proj, a.k_proj, a.v_proj, a.o_proj)] == [(16, 32), (8, 32), (8, 32), (32, 16)]
        assert [tuple(x.weight.shape) for x in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)] == [(32, 32), (32, 32), (32, 32)]
    # The whole key/value group goes with its query heads: 0 and 1 share kv head 0, 2 and 3 kv head 1.
    assert all(k in ([0, 1], [2, 3]) for k in report["kept"]["heads"])
    hooks = []
    for layer, heads, ffn in zip(original.model.layers, report["kept"]["heads"], report["kept"]["ffn"], strict=True):
        hooks.append(_mask_inputs(layer.self_attn.o_proj, heads, 4, width=8))
        hooks.append(_mask_inputs(layer.mlp.down_proj, ffn, 64))
    ids = _tokens(tok, ["once upon a time there was a small model"])
    ids.pop("token_type_ids", None)
    with torch.no_grad():
        want, got = original(**ids).logits, pruned(**ids).logits
    for h in hooks:
        h.remove()
    torch.testing.assert_close(got, want, atol=MASKED_ATOL, rtol=0)

    art = prune_structured(str(tiny_llama), tmp_path / "pruned", {"ratio": 0.5, "targets": ["ffn", "heads"], "importance": "magnitude"})
    saved = json.loads((art.path / "config.json").read_text())
    assert (saved["num_attention_heads"], saved["num_key_value_heads"], saved["head_dim"], saved["intermediate_size"]) == (2, 1, 8, 32)
    reloaded = AutoModelForCausalLM.from_pretrained(str(art.path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**ids).logits, got, atol=MASKED_ATOL, rtol=0)
    onnx = modelpress.export(modelpress.load(art.path), "onnx", tmp_path / "onnx", dynamo=False)
    assert onnx.manifest.metrics["parity_max_abs_diff"]["logits"] <= onnx.manifest.metrics["parity_max_abs_diff"]["logits_tolerance"]


def test_bert_heads_are_refused_with_the_reason(tiny_encoder, tmp_path):
    with pytest.raises(OptimizationError, match="pruned_heads") as exc:
        prune_structured(str(tiny_encoder), tmp_path / "x", {"targets": ["ffn", "heads"], "importance": "magnitude"})
    assert "targets: [ffn]" in exc.value.hint
    assert not (tmp_path / "x").exists()


def test_cnn_channels_prune_to_exact_shapes_and_match_the_masked_original(tiny_cnn):
    original = copy.deepcopy(tiny_cnn).eval()
    pruned = copy.deepcopy(tiny_cnn).eval()
    report = prune_cnn(pruned, torch.zeros(2, 1, 28, 28), 0.5)
    assert report["widths_before"] == {"0": 8, "3": 16, "7": 10} and report["widths_after"] == {"0": 4, "3": 8, "7": 10}
    assert tuple(pruned[0].weight.shape) == (4, 1, 3, 3) and tuple(pruned[3].weight.shape) == (8, 4, 3, 3)
    assert tuple(pruned[7].weight.shape) == (10, 8 * 7 * 7)
    # Zeroing the pruned channels after each ReLU is the same function.
    hooks = []
    for relu, name in ((original[1], "0"), (original[4], "3")):
        mask = torch.zeros(report["widths_before"][name])
        mask[report["kept"][name]] = 1.0
        hooks.append(relu.register_forward_hook(lambda _m, _a, out, mask=mask: out * mask[None, :, None, None]))
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = original(x), pruned(x)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(got, want, atol=MASKED_ATOL, rtol=0)


def test_cnn_artifact_keeps_its_module_and_exports_with_parity(tiny_cnn, tmp_path):
    src = modelpress.load(copy.deepcopy(tiny_cnn), task="image-classification")
    art = prune_structured(src, tmp_path / "pruned", {"ratio": 0.5})
    assert art.format == "torch" and (art.path / "model.safetensors").is_file()
    assert art.module[0].out_channels == 4 and tiny_cnn[0].out_channels == 8  # the source is untouched
    assert art.manifest.metrics["technique"]["parameters_after"] < art.manifest.metrics["technique"]["parameters_before"]
    from modelpress.export import exported

    ov = modelpress.export(art, "openvino", tmp_path / "ov")  # through the ONNX export, each checked for parity
    for art_ in (exported(art, "onnx"), ov):
        diffs = art_.manifest.metrics["parity_max_abs_diff"]
        assert diffs["logits"] <= diffs["logits_tolerance"]
    with pytest.raises(OptimizationError, match="channels"):
        prune_structured(src, tmp_path / "bad", {"targets": ["ffn"]})


def test_zoo_cnn_saves_its_new_channel_counts_and_reloads(tmp_path):
    from modelpress.zoo.architectures import MnistCNN

    torch.manual_seed(0)
    src = modelpress.load(MnistCNN({"conv_channels": [8, 16], "hidden": [32]}).eval(), task="image-classification")
    art = prune_structured(src, tmp_path / "pruned", {"ratio": 0.5})
    arch = art.manifest.task_config["architecture"]
    assert arch["name"] == "mnist-cnn" and arch["config"]["conv_channels"] == [4, 8] and arch["config"]["hidden"] == [16]
    reloaded = modelpress.load(art.path)  # rebuilt from the architecture in the manifest and the safetensors
    assert reloaded.module is not art.module and reloaded.module.features[0].out_channels == 4
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.module(x), art.module(x))


@pytest.mark.needs_data
def test_mnist_cnn_half_channels_fine_tuned_keeps_its_accuracy(trained_mnist_cnn, data_dir, tmp_path):
    from modelpress.optimize.evaluation import Evaluator

    src = modelpress.load(copy.deepcopy(trained_mnist_cnn), task="image-classification")
    art = prune_structured(
        src,
        tmp_path / "pruned",
        {"ratio": 0.5, "finetune": {"max_steps": 300, "lr": 2e-3, "eval_every": 100, "alpha": 0.5}},
        data_dir=data_dir,
    )
    ev = Evaluator(src, data="mnist-test", data_dir=data_dir, limit=2000)
    base = ev.original_result()["metrics"]["accuracy"]
    got = ev.evaluate(art, "torch")["metrics"]["accuracy"]
    ft = art.manifest.metrics["technique"]["finetune"]["training"]
    assert ft["best_metric"] >= ft["first_metric"]  # recovery training helped on the held-out split
    assert got >= 0.99 * base, (base, got)


def test_prune_structured_command_prints_json_with_gate_and_speed(tiny_encoder, tmp_path):
    from typer.testing import CliRunner

    from modelpress.cli import app

    pairs = tmp_path / "pairs.csv"
    pairs.write_text("sentence1,sentence2,score\n" + "\n".join(f"a cat number {i},a dog number {i},{i % 5}" for i in range(20)) + "\n")
    args = [
        "prune-structured",
        str(tiny_encoder),
        "-o",
        str(tmp_path / "p"),
        "--no-finetune",
        "--importance",
        "magnitude",
        "--eval-data",
        str(pairs),
        "--task",
        "embedding",
    ]
    res = CliRunner().invoke(app, [*args, "--max-drop", "99%", "--bench-rounds", "2", "--json"])
    data = json.loads(res.stdout)
    assert res.exit_code == (0 if data["gate"]["passed"] else 4), res.output  # a random tiny model may lose its (random) Spearman
    assert data["step"]["technique"] == "structured-prune" and data["technique"]["ffn"] == {"before": 64, "after": 32}
    assert data["gate"]["rows"][0]["metric"] == "spearman"
    row = data["speed"]["throughput"][0]
    assert (row["batch"], row["seq_len"]) == (32, 128) and row["speedup"] > 0
    bad = CliRunner().invoke(
        app, [*args[:3], str(tmp_path / "q"), "--targets", "ffn,heads", "--importance", "magnitude", "--no-finetune", "--bench-rounds", "0"]
    )
    assert bad.exit_code == 2 and "pruned_heads" in bad.output and "Traceback" not in bad.output
    assert "--json" in CliRunner().invoke(app, ["prune-structured", "--help"]).output
