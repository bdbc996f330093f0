"""The PyTorch runner's options: dtype, transform specs, compile with dynamic shapes, and their errors."""

from __future__ import annotations

import numpy as np
import pytest

import modelpress as mp
from modelpress.errors import ConfigError
from modelpress.runtimes.torch_transforms import load_batches, normalize_transforms, save_batches, sqnr_db

# bf16 keeps 8 mantissa bits (relative rounding 2**-9 per operation); through two tiny BERT layers
# the hidden states keep about 30-40 dB, far above 25, while a wrong cast (e.g. fp32 weights fed
# bf16 activations through an un-hooked excluded layer) fails outright or falls to a few dB.
BF16_SQNR_DB = 25.0
# int8 per-channel weights and per-token activations leave about 30-35 dB on these random
# encoders; 20 dB (a 10% error) is well below that and far above a broken quantizer.
INT8_SQNR_DB = 20.0


def _texts(n: int, words: int) -> list[str]:
    base = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "it", "rains"]
    return [" ".join(base[(i + j) % len(base)] for j in range(words)) for i in range(n)]


@pytest.fixture(scope="module")
def encoder(tiny_encoder):
    art = mp.load(tiny_encoder)
    task = mp.task_for(art)
    batch = task.preprocess(_texts(3, 9))
    ref = mp.create_runner(art, "torch", threads=1).run(batch)["last_hidden_state"]
    return art, task, batch, ref


def test_dtype_casts_weights_and_stays_close(encoder):
    art, _task, batch, ref = encoder
    runner = mp.create_runner(art, "torch", threads=1, dtype="bf16").load()
    import torch

    assert {p.dtype for p in runner.module.parameters()} == {torch.bfloat16}
    got = runner.run(batch)["last_hidden_state"]
    assert got.dtype == np.float32
    assert BF16_SQNR_DB < sqnr_db(ref, got) < 80  # close, but really bf16 (not bit-identical to fp32)


def test_cast_exclude_keeps_modules_fp32_and_runs(encoder):
    import torch

    art, _task, batch, ref = encoder
    runner = mp.create_runner(art, "torch", transform={"kind": "cast", "dtype": "bf16", "exclude": [r"encoder\.layer\.1$"]}).load()
    kept = runner.module.get_submodule("model.encoder.layer.1")
    assert {p.dtype for p in kept.parameters()} == {torch.float32}
    assert runner.module.get_submodule("model.encoder.layer.0.output.dense").weight.dtype == torch.bfloat16
    assert sqnr_db(ref, runner.run(batch)["last_hidden_state"]) > BF16_SQNR_DB


def test_transform_spec_quantizes_linears_except_excluded(encoder):
    from torchao.utils import TorchAOBaseTensor

    art, _task, batch, ref = encoder
    name = "model.encoder.layer.0.attention.self.query"
    runner = mp.create_runner(art, "torch", transform={"kind": "dynamic-int8", "exclude": [name]}).load()
    linears = {n: m for n, m in runner.module.named_modules() if type(m).__name__ == "Linear"}
    assert not isinstance(linears.pop(name).weight, TorchAOBaseTensor)
    assert linears and all(isinstance(m.weight, TorchAOBaseTensor) for m in linears.values())
    assert sqnr_db(ref, runner.run(batch)["last_hidden_state"]) > INT8_SQNR_DB


def test_a_module_given_in_memory_is_never_changed(tiny_cnn):
    import torch

    art = mp.load(tiny_cnn, task="image-classification")
    x = {"pixel_values": np.random.default_rng(0).normal(size=(2, 1, 28, 28)).astype(np.float32)}
    before = tiny_cnn(torch.from_numpy(x["pixel_values"])).detach().numpy()
    got = mp.create_runner(art, "torch", dtype="bf16", transform={"kind": "dynamic-int8"}).run(x)["logits"]
    assert {p.dtype for p in tiny_cnn.parameters()} == {torch.float32}
    assert type(tiny_cnn[-1].weight) is torch.nn.Parameter
    np.testing.assert_array_equal(tiny_cnn(torch.from_numpy(x["pixel_values"])).detach().numpy(), before)
    assert sqnr_db(before, got) > 15.0  # bf16 activations and int8 weights together: still close


def test_compile_with_dynamic_shapes_compiles_once_for_many_lengths(encoder):
    """Three batch sizes and three lengths run through one compiled graph (batch 1 would add one)."""
    import torch
    from torch._dynamo.utils import counters

    art, task, batch, ref = encoder
    runner = mp.create_runner(art, "torch", threads=1, compile=True).load()
    before = counters["stats"]["unique_graphs"]
    got = runner.run(batch)["last_hidden_state"]
    for n, words in ((2, 4), (4, 15), (5, 7)):
        out = runner.run(task.preprocess(_texts(n, words)))["last_hidden_state"]
        assert out.shape[0] == n
    assert counters["stats"]["unique_graphs"] - before == 1
    # Freezing + inductor reorders fp32 sums: equal to float rounding, not bit for bit.
    np.testing.assert_allclose(got, ref, atol=1e-4 * max(1.0, float(np.abs(ref).max())))
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"compiled": True}, "Unknown option.*compiled.*Valid options"),
        ({"transform": {"kind": "int3"}}, "unknown kind 'int3'.*Known kinds"),
        ({"transform": {"kind": "cast", "dtype": "bf16", "precision": 1}}, r"unknown keys \['precision'\]"),
        ({"transform": {"kind": "dynamic-int8", "exclude": ["("]}}, "not a valid regular expression"),
        ({"transform": {"kind": "weight-only", "bits": 4, "symmetric": False, "group_size": 16}}, "group sizes"),
        ({"transform": [{"kind": "cast", "dtype": "bf16"}, {"kind": "static-int8"}]}, "static-int8 on torch runs"),
        ({"transform": [{"kind": "dynamic-int8"}, {"kind": "weight-only"}]}, "at most one cast and one quantization"),
        ({"transform": {"kind": "cast", "dtype": "fp16"}, "dtype": "bf16"}, "contradicts the variant's own cast"),
    ],
)
def test_bad_options_are_refused_with_the_fix(encoder, options, message):
    art = encoder[0]
    with pytest.raises(ConfigError, match="(?s)" + message):
        mp.create_runner(art, "torch", **options)


def test_errors_found_at_load(encoder):
    art = encoder[0]
    with pytest.raises(ConfigError, match=r"(?s)matches no layer.*e\.g\. model"):
        mp.create_runner(art, "torch", transform={"kind": "dynamic-int8", "exclude": ["classifier"]}).load()
    with pytest.raises(ConfigError, match="names no calibration file"):
        mp.create_runner(art, "torch", transform={"kind": "static-int8"}).load()


def test_cast_goes_before_quantization_whatever_the_order():
    specs = normalize_transforms(
        [{"kind": "weight-only", "bits": 4, "symmetric": False, "group_size": 32}, {"kind": "cast", "dtype": "bf16"}]
    )
    assert [s["kind"] for s in specs] == ["cast", "weight-only"]
    assert specs[1]["exclude"] == [] and specs[0]["exclude"] == []


def test_calibration_batches_round_trip_without_pickle(tmp_path):
    batches = [
        {"input_ids": np.arange(6, dtype=np.int64).reshape(2, 3), "attention_mask": np.ones((2, 3), np.int64)},
        {"input_ids": np.arange(20, dtype=np.int64).reshape(4, 5), "attention_mask": np.ones((4, 5), np.int64)},
    ]
    path = tmp_path / "calibration.npz"
    save_batches(path, batches)
    back = load_batches(path)  # np.load(allow_pickle=False): object arrays could not be read
    assert len(back) == 2
    for a, b in zip(batches, back, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(ConfigError, match="does not exist"):
        load_batches(tmp_path / "missing.npz")
