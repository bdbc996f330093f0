"""``onnx_nbits.to_nbits`` on small graphs: every layout an NNCF-compressed weight comes in (4 or 8 bits, per channel
or grouped, asymmetric or symmetric, a group MatMulNBits cannot take, an embedding) becomes a graph that ONNX Runtime
runs to the dequantized weights' product, and a weight the graph does not hold is a clear error."""

from __future__ import annotations

import numpy as np
import pytest

from modelpress.errors import ExportError
from modelpress.export.onnx_nbits import Quantized, to_nbits

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# f32 products of the same numbers: only the order of the sums differs
RTOL, ATOL = 1e-5, 1e-5


def _quantized(rng, n, k, bits, group, symmetric):
    groups = k // group if group else 1
    size = group or k
    codes = rng.integers(0, 1 << bits, size=(n, groups, size)).astype(np.uint8)
    scale = rng.uniform(0.01, 0.1, size=(n, groups)).astype(np.float32)
    zp = None if symmetric else rng.integers(0, 1 << bits, size=(n, groups)).astype(np.uint8)
    return Quantized(bits, codes, scale, zp)


def _run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _matmul_graph(weight_t):
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight_t.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, n])],
        [numpy_helper.from_array(weight_t, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize(
    ("n", "k", "bits", "group", "symmetric", "kind"),
    [
        (64, 172, 4, None, False, "MatMulNBits"),  # per channel, the input width no power of two: one padded block of 256
        (48, 64, 4, 32, True, "MatMulNBits"),  # grouped, symmetric (signed codes, no zero point)
        (32, 172, 8, None, True, "MatMulNBits"),  # an int8 layer (NNCF's fallback for a width no group divides)
        (16, 64, 8, None, False, "MatMulNBits"),
        (16, 72, 4, 24, False, "DequantizeLinear"),  # a group no MatMulNBits block fits: dequantized at run time
    ],
)
def test_a_matmul_weight_becomes_its_codes(n, k, bits, group, symmetric, kind):
    rng = np.random.default_rng(0)
    q = _quantized(rng, n, k, bits, group, symmetric)
    w = q.dequantize()
    model = _matmul_graph(np.ascontiguousarray(w.T))
    assert to_nbits(model, {"layer.weight": q})[kind] == 1
    assert {i.name for i in model.graph.initializer}.isdisjoint({"w"})  # the float weight is gone
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    np.testing.assert_allclose(_run(model, {"x": x}), x @ w.T, rtol=RTOL, atol=ATOL)


def test_an_embedding_gather_reads_its_dequantized_codes():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    q = _quantized(rng, 40, 16, 8, None, False)
    table = q.dequantize()
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["h"], name="embed", axis=0)],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 5, 16])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert to_nbits(model, {"embed.weight": q}) == {"MatMulNBits": 0, "DequantizeLinear": 1}
    ids = np.asarray([[0, 3, 39, 7, 3]], dtype=np.int64)
    np.testing.assert_array_equal(_run(model, {"ids": ids}), table[ids])


def test_a_weight_the_graph_does_not_hold_is_an_error():
    rng = np.random.default_rng(2)
    q = _quantized(rng, 16, 64, 4, None, False)
    model = _matmul_graph(rng.standard_normal((64, 16)).astype(np.float32))
    with pytest.raises(ExportError, match=r"no float weight equal to layer\.weight"):
        to_nbits(model, {"layer.weight": q})
