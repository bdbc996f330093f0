"""Technique configs: JSON and YAML round trips, typos rejected with the valid keys, cross-field checks."""

import json

import pytest
import yaml

from modelpress.errors import ConfigError, UnknownTechniqueError
from modelpress.optimize.configs import (
    TECHNIQUES,
    Calibration,
    DynamicInt8,
    Precision,
    StaticInt8,
    WeightOnly,
    parse_step,
    step_from_json,
    step_from_yaml,
)

EXAMPLES = [
    DynamicInt8(),
    DynamicInt8(per_channel=True, fuse=False, reduce_range=True, exclude=["layer.0", r"output\.dense$"], auto_exclude=4),
    DynamicInt8(runtime="torch", compile=False),
    StaticInt8(),
    StaticInt8(method="entropy", per_channel=True, calibration=Calibration(dataset="stsb-train", samples=16, batch_size=4, seed=3)),
    StaticInt8(runtime="openvino", preset="mixed", fast_bias_correction=False, precision_hint="bf16", exclude=["node_MatMul_155"]),
    StaticInt8(runtime="torch"),
    WeightOnly(),
    WeightOnly(bits=4, group_size=32, symmetric=False),
    WeightOnly(runtime="openvino", bits=4, group_size=128, ratio=0.8, group_size_fallback="error", precision_hint="fp16"),
    WeightOnly(runtime="torch", bits=4, group_size=64),
    Precision(runtime="openvino", dtype="fp16"),
    Precision(runtime="onnxruntime", dtype="fp16", exclude=["LayerNorm"]),
    Precision(runtime="torch", dtype="bf16", compile=False),
]


@pytest.mark.parametrize("cfg", EXAMPLES, ids=lambda c: c.label())
def test_round_trips_through_json_and_yaml(cfg):
    assert step_from_json(cfg.to_json()) == cfg
    assert step_from_yaml(cfg.to_yaml()) == cfg
    # What the manifest stores: technique first, every setting present, plain JSON types.
    step = cfg.to_step()
    assert next(iter(step)) == "technique" and step["technique"] == cfg.technique_name
    assert parse_step(json.loads(json.dumps(step))) == cfg
    assert set(step) == set(type(cfg).model_fields)


def test_every_registered_technique_round_trips_with_its_defaults():
    built = 0
    for name, cls in TECHNIQUES.items():
        try:
            cfg = cls()
        except ConfigError:
            continue  # a technique with required settings; its own tests build it
        assert step_from_yaml(cfg.to_yaml()) == cfg and step_from_json(cfg.to_json()) == cfg, name
        built += 1
    assert built >= 4  # the four quantization techniques at least


def test_misspelled_key_lists_the_valid_keys():
    with pytest.raises(ConfigError) as err:
        DynamicInt8(per_chanel=True)
    text = str(err.value)
    assert "unknown key 'per_chanel'" in text and "Did you mean 'per_channel'?" in text
    assert "Valid keys for dynamic-int8:" in text and "auto_exclude" in text and "reduce_range" in text


def test_misspelled_nested_key_names_the_block():
    with pytest.raises(ConfigError) as err:
        StaticInt8(calibration={"sample": 8})
    text = str(err.value)
    assert "'calibration': unknown key 'sample'. Did you mean 'samples'?" in text
    assert "Valid keys for Calibration: batch_size, dataset, samples, seed" in text


def test_yaml_typo_fails_loudly():
    with pytest.raises(ConfigError, match="Did you mean 'group_size'"):
        step_from_yaml("technique: weight-only\nbits: 4\ngroupsize: 32\n")


def test_unknown_technique_lists_the_known():
    with pytest.raises(UnknownTechniqueError) as err:
        parse_step({"technique": "dynamic-int4"})
    assert "Did you mean 'dynamic-int8'?" in str(err.value) and "static-int8" in err.value.hint


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda: DynamicInt8(runtime="openvino"), "has no openvino implementation"),
        (lambda: StaticInt8(runtime="openvino", method="entropy"), "ONNX Runtime calibration method"),
        (lambda: WeightOnly(ratio=0.5), "ratio"),
        (lambda: WeightOnly(group_size=100), "power of two"),
        (lambda: WeightOnly(bits=8, group_size=64, runtime="openvino"), "per output channel"),
        (lambda: WeightOnly(group_size=-1), "not per channel"),
        (lambda: StaticInt8(precision_hint="bf16"), "precision_hint sets OpenVINO"),
        (lambda: Precision(runtime="onnxruntime", dtype="bf16"), "no bf16"),
        (lambda: Precision(runtime="openvino", exclude=["x"]), "whole model"),
        (lambda: DynamicInt8(exclude=["layer.(0"]), "valid regular expression"),
        (lambda: StaticInt8(calibration={"samples": 0}), "'calibration': 'samples': Input should be greater than or equal to 1"),
        (lambda: DynamicInt8(auto_exclude=-1), "auto_exclude"),
    ],
)
def test_invalid_combinations_say_why(make, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        make()


def test_excluding_adds_exact_names_once():
    cfg = DynamicInt8(exclude=["layer.0"])
    more = cfg.excluding(["/model/encoder/layer.1/output/dense/MatMul", "a.b"])
    assert more.exclude == ["layer.0", r"^/model/encoder/layer\.1/output/dense/MatMul$", r"^a\.b$"]
    assert more.excluding(["a.b"]).exclude == more.exclude
    assert cfg.exclude == ["layer.0"]  # the original is unchanged
    assert type(more) is DynamicInt8 and more.per_channel == cfg.per_channel


def test_label_shows_what_differs_from_the_defaults():
    assert DynamicInt8().label() == "dynamic-int8@onnxruntime"
    assert DynamicInt8(per_channel=True).label() == "dynamic-int8@onnxruntime(per_channel=True)"
    assert "precision_hint=bf16" in StaticInt8(runtime="openvino", precision_hint="bf16").label()


def test_effective_group_size_per_runtime():
    assert WeightOnly(runtime="openvino").effective_group_size == -1  # 8 bits: per output channel
    assert WeightOnly(runtime="openvino", bits=4).effective_group_size == 128
    assert WeightOnly(runtime="onnxruntime").effective_group_size == 128  # MatMulNBits works per block
    assert WeightOnly(bits=4, group_size=32).effective_group_size == 32


def test_yaml_is_readable_and_ordered():
    text = StaticInt8(runtime="openvino", precision_hint="bf16").to_yaml()
    data = yaml.safe_load(text)
    assert text.startswith("technique: static-int8") and data["calibration"]["samples"] == 64


def test_uint8_weights_are_an_onnx_runtime_setting():
    assert DynamicInt8(weight_type="uint8").label() == "dynamic-int8@onnxruntime(weight_type=uint8)"
    assert DynamicInt8().label() == "dynamic-int8@onnxruntime"  # the default (int8) stays out of labels
    # a nested setting shows only its keys that differ
    assert StaticInt8(runtime="openvino", calibration={"samples": 300}).label() == "static-int8@openvino(calibration.samples=300)"
    with pytest.raises(ConfigError, match="weight_type uint8 is an onnxruntime setting"):
        DynamicInt8(runtime="torch", weight_type="uint8")
    with pytest.raises(ConfigError, match="weight_type"):
        DynamicInt8(weight_type="int4")
