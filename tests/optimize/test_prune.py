"""Magnitude pruning: exact masks (layer-wise, global, N:M), the gradual schedule, the sparse store,
the handler on Hugging Face folders and torch modules, other runtimes, recipes and the CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.artifacts import hash_folder
from modelpress.errors import ConfigError
from modelpress.optimize.configs import parse_step, step_from_json, step_from_yaml
from modelpress.optimize.prune.magnitude import (
    FineTune,
    GradualPruner,
    GradualSchedule,
    MagnitudePrune,
    apply_masks,
    magnitude_masks,
    magnitude_prune,
    nm_mask,
    prunable_layers,
)
from modelpress.optimize.prune.sparse_store import pack, size_report, unpack
from modelpress.optimize.techniques import apply_technique, handler_for

COVERED = {("MagnitudePrune", "torch"), ("MagnitudePrune", "onnxruntime"), ("MagnitudePrune", "openvino")}

# fp32 logits of a tiny random model through ONNX Runtime / OpenVINO (f32 hint) against PyTorch:
# the same graph with reassociated sums, so differences stay at float rounding (about 1e-6).
RUNTIME_ATOL = 1e-4
# A bitmask + values file holds one bit per weight and 4 bytes per non-zero fp32 value, plus the
# safetensors header (tensor names, offsets, the layout metadata): under 1 KiB for one tensor.
HEADER_BYTES = 1024


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Two OpenMP threads on the shared 2-core machine spin-wait each other: one is faster here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text file to calibrate, fine-tune and score on (built-in sentences, no data folder)."""
    from modelpress.tasks.text import real_sentences

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(real_sentences(64, None)) + "\n")
    return path


# -- masks ----------------------------------------------------------------------------------------
def test_magnitude_prunes_exactly_the_smallest_weights():
    lin = nn.Linear(4, 3, bias=False)
    w = torch.tensor([[0.5, -0.1, 2.0, -3.0], [0.05, 1.5, -0.7, 0.2], [-0.3, 0.9, 0.01, -1.2]])
    with torch.no_grad():
        lin.weight.copy_(w)
    apply_masks({"l": lin}, magnitude_masks({"l": lin}, 0.5))
    # The six smallest |w|: 0.01, 0.05, 0.1, 0.2, 0.3, 0.5.
    expected = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1], [1, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(lin.weight == 0, expected)
    assert torch.equal(lin.weight[~expected], w[~expected])  # the rest untouched


def test_nm_keeps_exactly_n_of_every_m_and_the_largest():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    for n, m in ((2, 4), (4, 8), (1, 4)):
        pruned = nm_mask(w.abs(), n, m)
        kept = (~pruned).reshape(8, 16 // m, m)
        assert (kept.sum(-1) == n).all()
        groups = w.abs().reshape(8, 16 // m, m)
        top = torch.zeros_like(kept)
        top.scatter_(2, groups.topk(n, dim=2).indices, True)
        assert torch.equal(kept, top)


def test_global_scope_differs_from_layer_wise_as_expected():
    big, small = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        big.weight.copy_(torch.linspace(1.0, 2.0, 64).reshape(8, 8))
        small.weight.copy_(torch.linspace(0.01, 0.02, 64).reshape(8, 8))
    layers = {"big": big, "small": small}
    per_layer = magnitude_masks(layers, 0.5, scope="layer")
    assert [int(m.sum()) for m in per_layer.values()] == [32, 32]
    glob = magnitude_masks(layers, 0.5, scope="global")
    # One threshold over both: every weight of the small layer goes first, none of the big one.
    assert int(glob["small"].sum()) == 64 and int(glob["big"].sum()) == 0


def test_gradual_schedule_is_zhu_and_gupta_cubic_and_hits_its_target():
    sched = GradualSchedule(initial_sparsity=0.0, begin_step=10, end_step=110, frequency=10)
    assert sched.sparsity_at(0, 0.8) == 0.0 and sched.sparsity_at(10, 0.8) == 0.0
    assert sched.sparsity_at(60, 0.8) == pytest.approx(0.8 * (1 - 0.5**3))
    assert sched.sparsity_at(110, 0.8) == 0.8 and sched.sparsity_at(500, 0.8) == 0.8
    values = [sched.sparsity_at(t, 0.8) for t in range(120)]
    assert all(b >= a for a, b in itertools.pairwise(values))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    pruner = GradualPruner(model, MagnitudePrune(sparsity=0.75), sched)
    assert list(pruner.layers) == ["0", "2"]  # the output layer stays dense
    for step in range(120):
        target = pruner.update(step)
        with torch.no_grad():  # stand-in for an optimizer step: every weight moves
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        pruner.apply()
        if sched.updates_at(step):
            for mod in pruner.layers.values():
                assert int((mod.weight == 0).sum()) == round(mod.weight.numel() * target)
    assert all(float((m.weight == 0).float().mean()) == 0.75 for m in pruner.layers.values())
    assert float((model[4].weight == 0).float().mean()) == 0.0


# -- configs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg",
    [
        MagnitudePrune(),
        MagnitudePrune(sparsity=0.7, scope="global", exclude=[r"\.0\."], runtime="onnxruntime"),
        MagnitudePrune(nm="2:4", runtime="openvino", keep_output_layer=False),
        MagnitudePrune(sparsity=0.9, schedule=GradualSchedule(end_step=50), fine_tune=FineTune(steps=60, lr=3e-4)),
    ],
    ids=lambda c: c.label(),
)
def test_config_round_trips(cfg):
    assert step_from_json(cfg.to_json()) == cfg and step_from_yaml(cfg.to_yaml()) == cfg
    assert parse_step(json.loads(json.dumps(cfg.to_step()))) == cfg


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"nm": "4:2"}, "0 < N < M"),
        ({"nm": "2:4", "scope": "global"}, "no global scope"),
        ({"nm": "2:4", "sparsity": 0.3}, "means sparsity 0.5"),
        ({"sparsity": 1.5}, "sparsity"),
        ({"schedule": {"end_step": 100}, "nm": "2:4"}, "N:M pattern is applied at once"),
        ({"fine_tune": {"steps": 10}}, "runs with a gradual schedule"),
        ({"schedule": {"end_step": 300}, "fine_tune": {"steps": 100}}, "after the last fine-tuning step"),
        ({"auto_exclude": 2}, "exclude"),
        ({"sparsty": 0.5}, "Did you mean 'sparsity'?"),
    ],
)
def test_config_errors_say_what_to_do(bad, words):
    with pytest.raises(ConfigError) as err:
        parse_step({"technique": "magnitude-prune", **bad})
    assert words in str(err.value)


# -- the handler ---------------------------------------------------------------------------------------
def _decoder_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


def test_prunes_a_hugging_face_folder_and_saves_it_loadable(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    before_files, before_hash = hash_folder(tiny_llama)
    art = apply_technique(str(tiny_llama), {"technique": "magnitude-prune", "sparsity": 0.5}, tmp_path / "out")
    assert hash_folder(tiny_llama) == (before_files, before_hash)  # the source is untouched (no write through a hard link)
    assert art.manifest.step["technique"] == "magnitude-prune" and art.manifest.parent == mp.load(str(tiny_llama)).content_hash()

    orig = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    pruned = AutoModelForCausalLM.from_pretrained(str(art.path))
    for name, mod in _decoder_linears(pruned).items():
        assert int((mod.weight == 0).sum()) == mod.weight.numel() // 2, name
    assert torch.equal(pruned.lm_head.weight, orig.lm_head.weight)  # the output layer stays dense
    assert torch.equal(pruned.model.embed_tokens.weight, orig.model.embed_tokens.weight)

    m = art.manifest.metrics["technique"]
    assert m["sparsity"] == 0.5 and m["pruned_layers"] == 14
    size = m["size"]
    assert size["bitmask_bytes"] < size["dense_bytes"] and size["dense_zlib_bytes"] < size["dense_bytes"]
    reloaded = mp.load(str(art.path))
    out = mp.create_runner(reloaded, "torch", threads=1).run(mp.task_for(reloaded).sample_inputs(2))
    assert np.isfinite(out["logits"]).all()


def test_prunes_a_torch_module_globally(tiny_cnn, tmp_path):
    src = mp.load(tiny_cnn, task="image-classification")
    art = apply_technique(src, MagnitudePrune(scope="global", sparsity=0.6), tmp_path / "cnn")
    m = art.manifest.metrics["technique"]
    assert m["pruned_layers"] == 2  # two convs; the classifier stays dense
    assert m["zero_weights"] == round(m["pruned_weights"] * 0.6)  # exactly, over both layers together
    assert len(set(m["layer_sparsity"].values())) == 2  # one threshold gives the layers different sparsities
    batch = mp.task_for(src).sample_inputs(4)
    got = mp.create_runner(art, "torch", threads=1).run(batch)["logits"]
    ref = mp.create_runner(src, "torch", threads=1).run(batch)["logits"]
    assert got.shape == ref.shape and not np.allclose(got, ref)
    assert float((tiny_cnn[0].weight == 0).float().mean()) == 0.0  # the caller's module is not pruned


def test_every_runtime_runs_the_pruned_model(tiny_llama, tmp_path):
    from modelpress.export.onnx import export_onnx

    for rt in ("torch", "onnxruntime", "openvino"):
        assert handler_for(MagnitudePrune(runtime=rt)) is magnitude_prune
    art = apply_technique(str(tiny_llama), {"technique": "magnitude-prune", "nm": "2:4", "runtime": "onnxruntime"}, tmp_path / "nm")
    assert art.manifest.step["runtime"] == "onnxruntime"
    onnx_art = export_onnx(art, tmp_path / "onnx", dynamo=False)  # checks parity with the source itself
    batch = mp.task_for(art).sample_inputs(2)
    ref = mp.create_runner(art, "torch", threads=1).run(batch)["logits"]
    for runtime, options in (("onnxruntime", {}), ("openvino", {"precision": "f32"})):
        got = mp.create_runner(onnx_art, runtime, threads=1, **options).run(batch)["logits"]
        assert np.abs(got - ref).max() < RUNTIME_ATOL, runtime


def test_gradual_pruning_while_fine_tuning(tiny_llama, tmp_path, corpus):
    cfg = MagnitudePrune(
        sparsity=0.75,
        schedule=GradualSchedule(end_step=6, frequency=2),
        fine_tune=FineTune(steps=8, batch_size=2, seq_len=16, lr=1e-3, dataset=str(corpus)),
    )
    art = apply_technique(str(tiny_llama), cfg, tmp_path / "gradual")
    m = art.manifest.metrics["technique"]
    assert m["fine_tune"]["steps"] == 8 and m["sparsity"] == 0.75
    assert all(v == 0.75 for v in m["layer_sparsity"].values())


def test_nothing_to_prune_is_an_error(tiny_llama, tmp_path):
    from modelpress.errors import OptimizationError

    with pytest.raises(OptimizationError, match="No layer to prune"):
        apply_technique(str(tiny_llama), {"technique": "magnitude-prune", "exclude": ["layers"]}, tmp_path / "none")


def test_tied_output_layer_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    from modelpress.errors import OptimizationError

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=True
        )
    )
    with pytest.raises(OptimizationError, match="shares its weights"):
        prunable_layers(model, MagnitudePrune(keep_output_layer=False))


# -- the sparse store ------------------------------------------------------------------------------------
def test_bitmask_store_round_trips_exactly_and_is_smaller(tmp_path):
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0.0
    dense = rng.standard_normal((32, 32)).astype(np.float32)  # no zeros: stays dense
    ids = np.arange(100, dtype=np.int64)
    save_file({"w": w, "dense": dense, "ids": ids}, str(tmp_path / "model.safetensors"))
    sizes = pack(tmp_path / "model.safetensors", tmp_path / "packed.safetensors")
    assert sizes["sparse_tensors"] == 1
    back = unpack(tmp_path / "packed.safetensors", tmp_path / "restored.safetensors")
    restored = load_file(str(tmp_path / "restored.safetensors"))
    for name, arr in {"w": w, "dense": dense, "ids": ids}.items():
        assert back[name].dtype == arr.dtype and np.array_equal(back[name], arr) and np.array_equal(restored[name], arr)

    (tmp_path / "only").mkdir()
    save_file({"w": w}, str(tmp_path / "only" / "model.safetensors"))
    report = size_report(tmp_path / "only")
    nnz = int(np.count_nonzero(w))
    assert w.size / 8 + nnz * 4 <= report["bitmask_bytes"] <= w.size / 8 + nnz * 4 + HEADER_BYTES
    assert report["bitmask_fraction"] < 0.6 and report["zlib_fraction"] < 1.0


# -- recipes and the command ------------------------------------------------------------------------------
def test_a_recipe_step_prunes_evaluates_and_gates(tiny_llama, tmp_path, corpus):
    from modelpress.optimize.recipe import run_recipe

    res = run_recipe(
        str(tiny_llama),
        {"gate": {"perplexity": {"min_recovery": 0.5}}, "steps": [{"technique": "magnitude-prune", "sparsity": 0.25}]},
        tmp_path / "recipe",
        data=str(corpus),
        threads=1,
    )
    step = res.steps[0]
    assert step.shipped and step.gate.passed and step.evaluation["metrics"]["perplexity"] > 0
    saved = json.loads((tmp_path / "recipe" / step.path.split("/")[-1] / "modelpress.json").read_text())
    assert saved["metrics"]["shippable"] is True and saved["metrics"]["technique"]["sparsity"] == 0.25


def test_prune_command_prints_gate_and_measured_speed(tiny_llama, tmp_path, corpus):
    from typer.testing import CliRunner

    from modelpress.cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(
        app,
        ["prune", str(tiny_llama), "--method", "nm", "--data", str(corpus), "-o", str(out), "--seconds", "0.2", "--threads", "1", "--json"],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["gate"]["passed"] and data["sparsity"] == 0.5 and data["config"]["nm"] == "2:4"
    assert data["speed"]["throughput_ratio"] > 0 and data["speed"]["runtime"] == "torch"
    assert json.loads((out / "modelpress.json").read_text())["metrics"]["speed"]["latency_ratio"] > 0

    text = runner.invoke(app, ["prune", str(tiny_llama), "--data", str(corpus), "-o", str(tmp_path / "t"), "--no-speed", "--threads", "1"])
    assert text.exit_code == 0 and "recovery" in text.stdout and "bitmask + values" in text.stdout

    bad = runner.invoke(app, ["prune", str(tiny_llama), "--method", "snip", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "Unknown pruning method" in bad.output and "wanda" in bad.output


def test_prunes_a_zoo_torch_folder_and_it_loads_back(tmp_path):
    """A format-"torch" folder (weights + architecture as data) stays one after pruning."""
    from modelpress.sources import write_torch_artifact
    from modelpress.zoo.architectures import build_module
    from modelpress.zoo.mnist import task_config

    torch.manual_seed(0)
    module = build_module("mnist-cnn", {"conv_channels": [4, 8], "hidden": [16]})
    src = write_torch_artifact(module, tmp_path / "cnn", name="cnn", task="image-classification", task_config=task_config())
    art = apply_technique(str(src.path), {"technique": "magnitude-prune", "sparsity": 0.5}, tmp_path / "pruned")
    back = mp.load(str(art.path))
    assert back.format == "torch" and back.manifest.task_config["architecture"] == src.manifest.task_config["architecture"]
    pruned = [m for m in back.module.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert [float((m.weight == 0).float().mean()) for m in pruned] == [0.5, 0.5, 0.5, 0.0]  # the classifier stays dense
    batch = mp.task_for(back).sample_inputs(2)
    assert mp.create_runner(back, "torch", threads=1).run(batch)["logits"].shape == (2, 10)
