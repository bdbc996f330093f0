"""ONNX Runtime techniques: transformer fusion, dynamic and static int8, MatMulNBits, fp16.

Each function reads an ONNX file and writes a new one; the technique handlers wrap them into
artifacts. Pitfalls measured on this project's machines (see PEERS.md):

* the BERT fusion (``optimize_model(model_type="bert")``) recognises attention only in an export
  made with ``attn_implementation="eager"`` and the TorchScript exporter;
* ``quantize_dynamic`` on a fused graph needs ``extra_options={"DefaultTensorType": FLOAT}``, or
  shape inference fails on the fused operators.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OptimizationError, require

# Operators the int8 quantizers touch, i.e. the "layers" exclusion patterns are matched against.
INT8_OPS = ("MatMul", "Gemm", "Conv", "Attention", "EmbedLayerNormalization", "Gather")
MATMUL_OPS = ("MatMul",)


class _QuietQuantLogs:
    """ORT's quantizer logs a 'consider pre-processing' warning per call through the root logger."""

    def __enter__(self) -> None:
        self._level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger().setLevel(self._level)


def layer_names(path: Path, op_types: tuple[str, ...] = INT8_OPS) -> list[str]:
    """Names of the nodes of ``op_types`` (nodes without a name cannot be excluded and are skipped)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type in op_types and n.name]


def fuse_transformer(src: Path, dst: Path, *, num_heads: int, hidden_size: int) -> dict[str, int]:
    """ORT's BERT fusions (attention, skip-layernorm, bias-gelu, embeddings); fused-op counts."""
    require("onnxruntime", "onnx")
    from onnxruntime.transformers.optimizer import optimize_model

    try:
        model = optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size)
    except Exception as exc:  # the optimizer raises many kinds of errors on graphs it does not know
        raise OptimizationError(f"ONNX Runtime's transformer fusion failed: {type(exc).__name__}: {exc}", hint="Set fuse: false.") from exc
    stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
    model.save_model_to_file(str(dst), use_external_data_format=False)
    return stats


def dynamic_int8(src: Path, dst: Path, *, per_channel: bool, reduce_range: bool, exclude: list[str], fused: bool) -> None:
    require("onnxruntime", "onnx")
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT} if fused else {}
    with _QuietQuantLogs():
        quantize_dynamic(
            str(src), str(dst), per_channel=per_channel, reduce_range=reduce_range, weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude or None, extra_options=extra,
        )  # fmt: skip


class _Reader:
    """An ONNX Runtime CalibrationDataReader over prepared batches."""

    def __init__(self, batches: list[dict[str, np.ndarray]], input_names: list[str]) -> None:
        self._batches = [{n: b[n] for n in input_names if n in b} for b in batches]
        self._it = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._batches)


def static_int8(
    src: Path, dst: Path, batches: list[dict[str, np.ndarray]], *, method: str, per_channel: bool, reduce_range: bool, exclude: list[str], fused: bool
) -> None:
    """QDQ static quantization: uint8 activations (asymmetric), int8 weights (symmetric)."""
    require("onnxruntime", "onnx")
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    names = [i.name for i in ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()]
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(batches, names)
    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[method]
    extra: dict[str, Any] = {"WeightSymmetric": True, "ActivationSymmetric": False}
    if fused:
        extra["DefaultTensorType"] = onnx.TensorProto.FLOAT
    if method == "percentile":
        extra["CalibPercentile"] = 99.99
    with _QuietQuantLogs():
        try:
            quantize_static(
                str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel, reduce_range=reduce_range,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude or None,
                calibrate_method=calib, extra_options=extra,
            )  # fmt: skip
        except MemoryError as exc:  # histogram methods keep every activation
            raise OptimizationError(f"Calibration with '{method}' ran out of memory.", hint="Use fewer calibration samples or method: minmax.") from exc


def weight_only(src: Path, dst: Path, *, bits: int, group_size: int, symmetric: bool, exclude: list[str]) -> None:
    """MatMulNBits: int4/int8 weights per block of ``group_size`` (or per channel), float math."""
    require("onnxruntime", "onnx")
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model = onnx.load(str(src))
    per_channel = group_size == -1
    algo = DefaultWeightOnlyQuantConfig(block_size=128 if per_channel else group_size, is_symmetric=symmetric, bits=bits, channel_wised_quantize=per_channel)
    quant = MatMulNBitsQuantizer(
        model, bits=bits, block_size=128 if per_channel else group_size, is_symmetric=symmetric, nodes_to_exclude=exclude or [],
        channel_wised_quantize=per_channel, algo_config=algo,
    )  # fmt: skip
    with _QuietQuantLogs():
        quant.process()
    quant.model.save_model_to_file(str(dst), use_external_data_format=False)


def fp16(src: Path, dst: Path, *, exclude: list[str]) -> None:
    """An fp16 graph with fp32 inputs and outputs (ORT inserts casts around ops without fp16 kernels)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    try:
        half = convert_float_to_float16(model, keep_io_types=True, node_block_list=exclude or None)
    except Exception as exc:
        raise OptimizationError(f"Converting the ONNX graph to fp16 failed: {type(exc).__name__}: {exc}") from exc
    onnx.save(half, str(dst))


def check_loads(path: Path) -> None:
    """Open the new graph once, so a graph ORT cannot run is never written as an artifact."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise OptimizationError(f"ONNX Runtime cannot load the quantized graph: {type(exc).__name__}: {str(exc)[:400]}") from exc
