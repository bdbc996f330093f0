"""An OpenVINO decoder run in f32 is f32 on every CPU: the CPU plugin's dynamic quantization of activations (on by
default where VNNI or AMX exists) is turned off, so quality and the ONNX export's parity reference do not depend on
the host (on an AVX-512 VNNI EPYC it moved the GPTQ stories260k's logits by 0.27; tests/export/test_onnx_gptq.py)."""

from __future__ import annotations

import numpy as np
import pytest

from modelpress.runtimes.openvino import compile_model, exact_f32

ov = pytest.importorskip("openvino")


def test_f32_turns_dynamic_quantization_off_and_other_precisions_keep_the_default():
    assert exact_f32("f32") == {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
    assert exact_f32("bf16") == {} and exact_f32("f16") == {}


def test_the_compiled_model_carries_the_setting():
    from openvino import opset13 as ops

    x = ops.parameter([1, 8], np.float32, name="x")
    w = ops.constant(np.ones((8, 4), dtype=np.float32))
    model = ov.Model([ops.matmul(x, w, False, False)], [x], "tiny")
    compiled = compile_model(model, 1, precision="f32", extra=exact_f32("f32"))
    assert int(compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE")) == 0
    out = compiled({"x": np.ones((1, 8), dtype=np.float32)})[0]
    np.testing.assert_array_equal(out, np.full((1, 4), 8.0, dtype=np.float32))
