"""SparseGPT and Wanda: exact masks on tiny tensors, exact sparsity on a tiny Llama, a lower layer
reconstruction error than magnitude pruning, and (with the shared data) a lower perplexity on
the real stories260K model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.errors import ConfigError, OptimizationError
from modelpress.optimize.configs import parse_step, step_from_json, step_from_yaml
from modelpress.optimize.prune.llm import (
    LLMCalibration,
    SparseGPT,
    Wanda,
    calibration_token_batches,
    llm_prune,
    reconstruction_error,
    sparsegpt_prune_,
    wanda_mask,
)
from modelpress.optimize.prune.magnitude import load_trainable, smallest
from modelpress.optimize.techniques import apply_technique, handler_for

RUNTIMES = ("torch", "onnxruntime", "openvino")
COVERED = {(cls, rt) for cls in ("SparseGPT", "Wanda") for rt in RUNTIMES}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Two OpenMP threads on the shared 2-core machine spin-wait each other: one is faster here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from modelpress.tasks.text import real_sentences

    path = tmp_path_factory.mktemp("llm_corpus") / "corpus.txt"
    path.write_text("\n".join(real_sentences(64, None)) + "\n")
    return path


def _calib(corpus, **kw):
    return {"dataset": str(corpus), "samples": 16, "seq_len": 32, **kw}


# -- the algorithms on tiny tensors ------------------------------------------------------------------
def test_wanda_scores_weight_times_input_norm_per_output_row():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5], [0.1, 4.0, -0.2, 1.0]])
    sq = torch.tensor([16.0, 1.0, 0.01, 4.0])  # feature norms 4, 1, 0.1, 2
    # scores |w| * norm: row 0 [4, 2, 0.3, 1] -> prune inputs 2 and 3; row 1 [0.4, 4, 0.02, 2] -> prune 0 and 2.
    expected = torch.tensor([[0, 0, 1, 1], [1, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(wanda_mask(w, sq, 0.5), expected)
    # Plain magnitude would prune row 0's inputs 3 and 0 instead: the input norms change the choice.
    assert not torch.equal(smallest(w.abs(), 4), expected)
    # The whole layer competing: the four lowest scores are 0.02, 0.3, 0.4, 1.
    assert torch.equal(wanda_mask(w, sq, 0.5, group="layer"), torch.tensor([[0, 0, 1, 1], [1, 0, 1, 0]], dtype=torch.bool))
    assert torch.equal(wanda_mask(w, sq, 0.25, group="layer"), torch.tensor([[0, 0, 1, 0], [0, 0, 1, 0]], dtype=torch.bool))
    # 1:2 keeps the higher score of each pair of inputs: row 0 (4 | 2), (0.3 | 1); row 1 (0.4 | 4), (0.02 | 2).
    assert torch.equal(wanda_mask(w, sq, 0.5, (1, 2)), torch.tensor([[0, 1, 1, 0], [1, 0, 1, 0]], dtype=torch.bool))


def test_sparsegpt_with_white_inputs_is_magnitude_pruning():
    """With H = I (uncorrelated unit-variance inputs) no update helps, so SparseGPT keeps the largest weights as they are."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    pruned = w.clone()
    mask = sparsegpt_prune_(pruned, torch.eye(16), 0.5, block_size=16)
    assert torch.equal(mask, smallest(w.abs(), 64))
    assert torch.allclose(pruned[~mask], w[~mask], atol=1e-6) and (pruned[mask] == 0).all()


def test_sparsegpt_updates_the_kept_weights_to_cancel_the_error():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 16, generator=g) @ torch.randn(16, 16, generator=g)  # correlated inputs
    w = torch.randn(8, 16, generator=g)
    H = x.T @ x
    pruned = w.clone()
    mask = sparsegpt_prune_(pruned, H, 0.5)
    assert int(mask.sum()) == 64 and (pruned[mask] == 0).all()
    just_masked = w.masked_fill(mask, 0.0)
    assert not torch.allclose(pruned[~mask], w[~mask])  # the survivors moved
    assert reconstruction_error(w, pruned, H) < reconstruction_error(w, just_masked, H)
    for n, m in ((2, 4), (1, 4)):
        nm_pruned = w.clone()
        nm_mask_ = sparsegpt_prune_(nm_pruned, H, 0.0, (n, m))
        assert ((~nm_mask_).reshape(8, 16 // m, m).sum(-1) == n).all()


# -- on the tiny Llama ----------------------------------------------------------------------------------
def _decoder_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


@pytest.mark.parametrize("technique", ["sparsegpt", "wanda"])
def test_reaches_the_exact_sparsity_and_pattern(tiny_llama, tmp_path, corpus, technique):
    from transformers import AutoModelForCausalLM

    un = apply_technique(str(tiny_llama), {"technique": technique, "sparsity": 0.5, "calibration": _calib(corpus)}, tmp_path / "un")
    nm = apply_technique(str(tiny_llama), {"technique": technique, "nm": "2:4", "calibration": _calib(corpus)}, tmp_path / "nm")
    orig = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    for art, check in ((un, "unstructured"), (nm, "2:4")):
        model = AutoModelForCausalLM.from_pretrained(str(art.path))
        linears = _decoder_linears(model)
        assert len(linears) == 14
        for name, mod in linears.items():
            zeros = mod.weight == 0
            if check == "unstructured":
                assert int(zeros.sum()) == mod.weight.numel() // 2, name
            else:
                assert ((~zeros).reshape(mod.weight.shape[0], -1, 4).sum(-1) == 2).all(), name
        assert torch.equal(model.lm_head.weight, orig.lm_head.weight)
        m = art.manifest.metrics["technique"]
        assert m["method"] == technique and m["sparsity"] == 0.5 and m["calibration"]["tokens"] == 16 * 32


def test_both_beat_magnitude_on_a_layers_output_error(tiny_llama, corpus):
    """The error ||(W - W') X||^2 / ||W X||^2 of each decoder layer's MLP output projection on real inputs.

    SparseGPT minimises exactly this, so it beats magnitude on every layer; Wanda's score assumes
    input features of uneven size, which the MLP's gated activations (the down projection's
    inputs) have. (After RMSNorm, a randomly initialised model's features are all about the same
    size, and there Wanda's per-output choice is no better than magnitude's over the layer.)
    """
    src = mp.load(str(tiny_llama))
    model, _ = load_trainable(src)
    batches, _ = calibration_token_batches(src, LLMCalibration(**_calib(corpus)), None)
    inputs: dict[str, list[torch.Tensor]] = {}
    linears = _decoder_linears(model)
    hooks = [
        m.register_forward_pre_hook(lambda _m, inp, n=n: inputs.setdefault(n, []).append(inp[0].reshape(-1, inp[0].shape[-1]).double()))
        for n, m in linears.items()
    ]
    with torch.no_grad():
        for b in batches:
            model(input_ids=torch.from_numpy(b["input_ids"]))
    for h in hooks:
        h.remove()
    for name, mod in linears.items():
        x = torch.cat(inputs[name])
        H = x.T @ x
        w = mod.weight.detach().double()
        magnitude = reconstruction_error(w, w.masked_fill(smallest(w.abs(), w.numel() // 2), 0.0), H)
        sgpt = w.clone()
        sparsegpt_prune_(sgpt, H, 0.5)
        assert reconstruction_error(w, sgpt, H) < magnitude, name
        if name.endswith("mlp.down_proj"):
            wanda = w.masked_fill(wanda_mask(w, (x * x).sum(0), 0.5), 0.0)
            assert reconstruction_error(w, wanda, H) < magnitude, name


def test_every_runtime_has_the_handler_and_runs_the_result(tiny_llama, tmp_path, corpus):
    from modelpress.export.onnx import export_onnx

    for cls in (SparseGPT, Wanda):
        for rt in RUNTIMES:
            assert handler_for(cls(runtime=rt)) is llm_prune
    art = apply_technique(str(tiny_llama), {"technique": "wanda", "runtime": "openvino", "calibration": _calib(corpus)}, tmp_path / "ov")
    onnx_art = export_onnx(art, tmp_path / "onnx", dynamo=False)
    batch = mp.task_for(art).sample_inputs(2)
    ref = mp.create_runner(art, "torch", threads=1).run(batch)["logits"]
    got = mp.create_runner(onnx_art, "openvino", threads=1, precision="f32").run(batch)["logits"]
    assert np.abs(got - ref).max() < 1e-4  # float rounding of one graph run two ways


def test_configs_round_trip_and_check_their_settings():
    for cfg in (
        SparseGPT(),
        Wanda(nm="4:8", calibration=LLMCalibration(dataset="wikitext2-test", samples=32)),
        SparseGPT(sparsity=0.6, block_size=64, damp=0.05, runtime="onnxruntime"),
        Wanda(group="layer"),
    ):
        assert step_from_json(cfg.to_json()) == cfg and step_from_yaml(cfg.to_yaml()) == cfg
    assert SparseGPT().target_sparsity == 0.5 and Wanda(nm="2:4").target_sparsity == 0.5
    with pytest.raises(ConfigError, match="block_size 6 must divide by M=4"):
        parse_step({"technique": "sparsegpt", "nm": "2:4", "block_size": 6})
    with pytest.raises(ConfigError, match="drop group: layer"):
        Wanda(nm="2:4", group="layer")
    with pytest.raises(ConfigError, match="Did you mean 'samples'"):
        parse_step({"technique": "wanda", "calibration": {"sample": 8}})


def test_refuses_models_that_are_not_causal_lms(tiny_encoder, tmp_path):
    with pytest.raises(OptimizationError) as err:
        apply_technique(str(tiny_encoder), {"technique": "wanda"}, tmp_path / "enc")
    assert "causal language models" in str(err.value) and "magnitude-prune" in str(err.value)


def test_a_corpus_too_short_for_one_window_is_an_error(tiny_llama, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short.\n")
    with pytest.raises(OptimizationError, match="fewer than one window"):
        apply_technique(str(tiny_llama), {"technique": "sparsegpt", "calibration": {"dataset": str(short), "seq_len": 64}}, tmp_path / "x")


# -- the real model ------------------------------------------------------------------------------------
@pytest.mark.needs_data
def test_wanda_keeps_stories260k_better_than_magnitude(data_dir, tmp_path):
    """At 50%, measured here: dense 3.55, magnitude 43.5, Wanda 18.7, SparseGPT 20.5 (calibrated on tinyshakespeare-train)."""
    src = str(data_dir / "models/stories260k")
    ppl = {}
    for name, step in (
        ("magnitude", {"technique": "magnitude-prune", "sparsity": 0.5}),
        ("wanda", {"technique": "wanda", "sparsity": 0.5, "calibration": {"samples": 32}}),
    ):
        art = apply_technique(src, step, tmp_path / name, data_dir=data_dir, threads=1)
        ppl[name] = mp.evaluate(art, data="tinystories", data_dir=data_dir, threads=1)["metrics"]["perplexity"]
    dense = mp.evaluate(src, data="tinystories", data_dir=data_dir, threads=1)["metrics"]["perplexity"]
    assert dense < ppl["wanda"] < ppl["magnitude"], ppl


def test_calibrates_on_padded_line_samples_too(tiny_llama, tmp_path, corpus):
    """``seq_len: null``: the padded batches of calibration_batches, padding left out of the statistics."""
    art = apply_technique(
        str(tiny_llama),
        {"technique": "sparsegpt", "calibration": {"dataset": str(corpus), "seq_len": None, "samples": 12, "batch_size": 4}},
        tmp_path / "lines",
    )
    m = art.manifest.metrics["technique"]
    assert m["sparsity"] == 0.5 and m["calibration"]["samples"] == 12 and "seq_len" not in m["calibration"]
    assert all(0.0 <= e < 1.0 for e in m["relative_output_error"].values())
