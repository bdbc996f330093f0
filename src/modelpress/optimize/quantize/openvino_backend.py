"""OpenVINO techniques through NNCF: static int8 (``nncf.quantize``) and weight compression.

Each function takes an ``openvino.Model`` in memory and returns a new one; the handlers
(:mod:`modelpress.optimize.quantize.openvino`) read the source, save the result and write the artifact. Layers are
OpenVINO operations, named as in the ONNX graph they were converted from (``node_MatMul_82``),
so an exclusion entry may also match the torch module path recorded in that ONNX graph
(see :mod:`.onnx_backend`).

Group-wise 4-bit weights need the input-channel count of every weight to divide by the group
size; a model whose dimensions do not (stories260k's FFN width 172) uses NNCF's
``GroupSizeFallbackMode.ADJUST`` by default: such a weight gets the largest power-of-two group
below the asked one that divides it (at least ``MIN_ADJUSTED_GROUP``), or the int8 backup
precision when there is none. The handler records which layers were adjusted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.errors import OptimizationError, require

QUANTIZED_OPS = ("MatMul", "Convolution", "GroupConvolution", "ConvolutionBackpropData")
WEIGHT_OPS = ("MatMul", "Convolution", "GroupConvolution", "Gather")
# NNCF's default smallest group for GroupSizeFallbackMode.ADJUST: smaller groups cost speed.
MIN_ADJUSTED_GROUP = 32
PRECISION_HINTS = {"bf16": "bf16", "fp16": "f16", "fp32": "f32"}


@contextmanager
def quiet_nncf() -> Iterator[None]:
    """NNCF logs a table and an INFO line per step; keep errors only while it works."""
    nncf = require("nncf", "openvino")
    logger = logging.getLogger("nncf")
    level = logger.level
    nncf.set_log_level(logging.ERROR)
    try:
        yield
    finally:
        nncf.set_log_level(level or logging.INFO)


def read_model(path: Path) -> Any:
    ov = require("openvino", "openvino")
    return ov.Core().read_model(str(path))


def save_model(model: Any, path: Path) -> None:
    ov = require("openvino", "openvino")
    ov.save_model(model, str(path), compress_to_fp16=False)


def _weight_const(op: Any, port: int) -> Any | None:
    """The Constant feeding input ``port`` of ``op`` (through Convert / decompression ops)."""
    node = op.input_value(port).get_node()
    for _ in range(4):
        if node.get_type_name() == "Constant":
            return node
        if node.get_type_name() not in ("Convert", "Multiply", "Subtract", "Reshape") or node.get_input_size() == 0:
            return None
        node = node.input_value(0).get_node()
    return None


def ov_layers(model: Any, op_types: tuple[str, ...] = QUANTIZED_OPS, *, weights_only: bool = False) -> list[str]:
    """Names of the operations of ``op_types``; ``weights_only``: those with a constant weight."""
    out = []
    for op in model.get_ordered_ops():
        if op.get_type_name() not in op_types:
            continue
        if weights_only and not any(_weight_const(op, i) is not None for i in range(op.get_input_size())):
            continue
        out.append(op.get_friendly_name())
    return out


def matmul_in_channels(model: Any) -> dict[str, int]:
    """Each weighted MatMul's input-channel count (the axis weight groups run along)."""
    out = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        const = _weight_const(op, 1)
        if const is None:
            continue
        shape = list(const.get_output_shape(0))
        if len(shape) < 2:
            continue
        transpose_b = bool(op.get_attributes().get("transpose_b", False))
        out[op.get_friendly_name()] = int(shape[-1] if transpose_b else shape[-2])
    return out


def group_fallback(channels: dict[str, int], group_size: int, ignored: list[str]) -> dict[str, int | str]:
    """Layers whose input channels do not divide by ``group_size``: the group NNCF's ADJUST picks, or 'int8'."""
    out: dict[str, int | str] = {}
    for name, k in channels.items():
        if name in ignored or group_size <= 0 or k % group_size == 0:
            continue
        g = group_size // 2
        while g >= MIN_ADJUSTED_GROUP and k % g:
            g //= 2
        out[name] = g if g >= MIN_ADJUSTED_GROUP else "int8"
    return out


def ignored_scope(names: list[str]) -> Any:
    nncf = require("nncf", "openvino")
    # validate=False: a name may not be a node NNCF works on (e.g. an attention MatMul for
    # weight compression); it is then simply not touched.
    return nncf.IgnoredScope(names=list(names), validate=False) if names else None


def static_int8(
    model: Any,
    batches: list[dict[str, np.ndarray]],
    *,
    transformer: bool,
    preset: str,
    fast_bias_correction: bool,
    ignored: list[str],
) -> Any:
    """``nncf.quantize`` with every calibration batch (batches may differ in sequence length)."""
    nncf = require("nncf", "openvino")
    names = [p.get_any_name() for p in model.inputs]
    missing = [n for n in names if batches and n not in batches[0]]
    if missing:
        raise OptimizationError(f"The calibration batches lack the model inputs {missing} (they have {sorted(batches[0])}).")
    dataset = nncf.Dataset(batches, lambda b: {n: b[n] for n in names})
    kwargs: dict[str, Any] = {
        "preset": nncf.QuantizationPreset.MIXED if preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE,
        "fast_bias_correction": fast_bias_correction,
        "subset_size": max(1, len(batches)),
        "ignored_scope": ignored_scope(ignored),
    }
    if transformer:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    with quiet_nncf():
        try:
            return nncf.quantize(model, dataset, **kwargs)
        except Exception as exc:  # NNCF raises its own and backend errors
            raise OptimizationError(f"NNCF static quantization failed: {type(exc).__name__}: {str(exc)[:400]}") from exc


def weight_only(model: Any, *, bits: int, symmetric: bool, group_size: int, ratio: float, ignored: list[str], fallback: str) -> Any:
    """``nncf.compress_weights``: INT8_SYM/ASYM per output channel, INT4_SYM/ASYM per group."""
    nncf = require("nncf", "openvino")
    mode = {
        (8, True): nncf.CompressWeightsMode.INT8_SYM,
        (8, False): nncf.CompressWeightsMode.INT8_ASYM,
        (4, True): nncf.CompressWeightsMode.INT4_SYM,
        (4, False): nncf.CompressWeightsMode.INT4_ASYM,
    }[(bits, symmetric)]
    kwargs: dict[str, Any] = {"mode": mode, "ignored_scope": ignored_scope(ignored)}
    if bits == 4:
        fb = {
            "adjust": nncf.GroupSizeFallbackMode.ADJUST,
            "ignore": nncf.GroupSizeFallbackMode.IGNORE,
            "error": nncf.GroupSizeFallbackMode.ERROR,
        }[fallback]
        kwargs.update(
            group_size=group_size,
            ratio=ratio,
            advanced_parameters=nncf.AdvancedCompressionParameters(group_size_fallback_mode=fb, min_adjusted_group_size=MIN_ADJUSTED_GROUP),
        )
    with quiet_nncf():
        try:
            return nncf.compress_weights(model, **kwargs)
        except Exception as exc:
            raise OptimizationError(
                f"NNCF weight compression failed: {type(exc).__name__}: {str(exc)[:400]}",
                hint="For group-wise 4 bits on dimensions that divide by no group size, use group_size_fallback: adjust.",
            ) from exc


def check_compiles(model: Any, precision: str = "f32") -> None:
    """Compile the new model once on CPU, so a model OpenVINO cannot run is never written."""
    from modelpress.runtimes.openvino import compile_model

    try:
        compile_model(model, 1, precision=precision)  # as the runner compiles it
    except Exception as exc:
        raise OptimizationError(f"OpenVINO cannot compile the new model: {type(exc).__name__}: {str(exc)[:400]}") from exc


def compiled(model: Any, precision: str = "f32", threads: int | None = None) -> Any:
    from modelpress.runtimes.openvino import compile_model

    return compile_model(model, threads, precision=precision)


def op_counts(model: Any) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(op.get_type_name() for op in model.get_ordered_ops() if op.get_type_name() not in ("Constant",)).most_common())
