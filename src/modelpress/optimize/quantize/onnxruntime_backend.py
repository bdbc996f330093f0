"""ONNX Runtime techniques: transformer fusion, dynamic and static int8, MatMulNBits, fp16.

Each function reads an ONNX file and writes a new one; the technique handlers
(:mod:`modelpress.optimize.quantize.onnxruntime`) wrap them into artifacts. Pitfalls measured on this project's machines
(see PEERS.md):

* the BERT fusion (``optimize_model(model_type="bert")``) recognises attention only in an export
  made with ``attn_implementation="eager"`` and the TorchScript exporter;
* ``quantize_dynamic`` on a fused graph needs ``extra_options={"DefaultTensorType": FLOAT}``, or
  shape inference fails on the fused operators;
* static (QDQ) quantization of every operator type quantizes the additive attention mask (whose
  range reaches -3.4e38) and wrecks a transformer (cosine 0.29 to the float MiniLM): only the
  operators that do the arithmetic (``STATIC_OPS``) are quantized;
* the histogram calibrators (entropy, percentile) stack activations, so every calibration batch
  must have the same sequence length;
* MatMulNBits quantizes per block of input channels (any K: the last block is padded); per
  channel is not available for 8 bits.

Layers are ONNX nodes. An exclusion entry matches a node's name or its module path: the torch
module a node came from (``model.encoder.layer.0.output.dense``), read from the dynamo
exporter's ``pkg.torch.onnx.name_scopes`` metadata or from the TorchScript exporter's
``/model/encoder/layer.0/output/dense/MatMul`` names.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.errors import OptimizationError, require

# Operators each technique changes, i.e. the layers exclusion patterns are matched against.
DYNAMIC_OPS = ("MatMul", "Attention", "Conv", "Gather", "EmbedLayerNormalization")
STATIC_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
WEIGHT_ONLY_OPS = ("MatMul",)
SCOPE_KEY = "pkg.torch.onnx.name_scopes"
# ORT's percentile calibrator keeps this share of each activation's histogram (the usual 99.99).
CALIB_PERCENTILE = 99.99


class _QuietQuantLogs:
    """ORT's quantizers log a 'consider pre-processing' warning per call through the root logger."""

    def __enter__(self) -> None:
        self._level = logging.getLogger().level
        logging.getLogger().setLevel(logging.CRITICAL)

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger().setLevel(self._level)


def _scope(node: Any) -> str:
    """The torch module path a node came from ('' when the exporter did not record one)."""
    for prop in node.metadata_props:
        if prop.key == SCOPE_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ""
            # The last entry names the operation (``linear_3``); the one before is the module.
            return str(scopes[-2]) if len(scopes) >= 2 else ""
    if node.name.startswith("/") and "/" in node.name[1:]:
        return node.name[1:].rsplit("/", 1)[0].replace("/", ".")
    return ""


def onnx_layers(path: Path, op_types: tuple[str, ...] = DYNAMIC_OPS, *, weights_only: bool = False) -> dict[str, str]:
    """Nodes of ``op_types`` (all nodes when empty): name -> module path ('' if unknown).

    ``weights_only``: only nodes with a constant (initializer) input, i.e. MatMuls with a weight,
    not the activation-by-activation products inside attention. Unnamed nodes cannot be excluded
    and are skipped.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    out = {}
    for node in model.graph.node:
        if not node.name or (op_types and node.op_type not in op_types) or node.op_type == "Constant":
            continue
        if weights_only and not any(i in inits or i in consts for i in node.input):
            continue
        out[node.name] = _scope(node)
    return out


def op_counts(path: Path) -> dict[str, int]:
    """How many nodes of each operator type a graph has (recorded in the manifest)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(Counter(n.op_type for n in model.graph.node if n.op_type != "Constant").most_common())


def fuse_transformer(src: Path, dst: Path, *, num_heads: int, hidden_size: int, model_type: str = "bert") -> dict[str, int]:
    """ORT's transformer fusions (attention, skip-layernorm, bias-gelu, embeddings); fused-op counts."""
    require("onnxruntime", "onnx")
    from onnxruntime.transformers.optimizer import optimize_model

    try:
        with _QuietQuantLogs():
            model = optimize_model(str(src), model_type=model_type, num_heads=num_heads, hidden_size=hidden_size)
    except Exception as exc:  # the optimizer raises many kinds of errors on graphs it does not know
        raise OptimizationError(f"ONNX Runtime's transformer fusion failed: {type(exc).__name__}: {exc}", hint="Set fuse: false.") from exc
    stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
    model.save_model_to_file(str(dst), use_external_data_format=False)
    return stats


def dynamic_int8(
    src: Path, dst: Path, *, per_channel: bool, reduce_range: bool, exclude: list[str], fused: bool, weight_type: str = "int8"
) -> None:
    """int8 (or uint8) weights, activations quantized at run time (``MatMulInteger``, ``QAttention``, ...)."""
    require("onnxruntime", "onnx")
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT} if fused else {}
    with _QuietQuantLogs():
        quantize_dynamic(
            str(src),
            str(dst),
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type=QuantType.QUInt8 if weight_type == "uint8" else QuantType.QInt8,
            op_types_to_quantize=list(DYNAMIC_OPS),
            nodes_to_exclude=exclude or None,
            extra_options=extra,
        )


class _Reader:
    """An ONNX Runtime CalibrationDataReader over prepared batches."""

    def __init__(self, batches: list[dict[str, np.ndarray]], input_names: list[str]) -> None:
        self._batches = [{n: b[n] for n in input_names if n in b} for b in batches]
        self._it = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._batches)


def input_names(path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


@contextlib.contextmanager
def _private_view(src: Path) -> Iterator[Path]:
    """``src`` seen from a folder of this call's own, through symlinks (the graph and its external data).

    ONNX Runtime's ``quantize_static`` writes ``<model>-inferred.onnx`` beside its input and deletes
    it after reading it back; two jobs quantizing the same cached export at once removed each
    other's file (a FileNotFoundError seen when parallel runs calibrated one model). In a private
    folder each job has its own.
    """
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    locations = {
        e.value
        for t in model.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }
    with tempfile.TemporaryDirectory(prefix="modelpress-ortq-") as tmp:
        view = Path(tmp) / src.name
        view.symlink_to(src.resolve())
        for loc in locations:
            target = Path(tmp) / loc
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to((src.parent / loc).resolve())
        yield view


def static_int8(
    src: Path,
    dst: Path,
    batches: list[dict[str, np.ndarray]] | None,
    *,
    method: str,
    per_channel: bool,
    reduce_range: bool,
    exclude: list[str],
    fused: bool,
    calibration_cache: Path | None = None,
) -> None:
    """QDQ static quantization of ``STATIC_OPS``: uint8 activations (asymmetric), int8 weights (symmetric).

    ``calibration_cache``: a file where the activation ranges are stored after the first call and
    read by later ones (then ``batches`` may be None), so quantizing one model many times (the
    layer sensitivity scan) calibrates once.
    """
    require("onnxruntime", "onnx")
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    reader = None
    if batches is not None:
        reader = type("Reader", (_Reader, CalibrationDataReader), {})(batches, input_names(src))
    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[method]
    extra: dict[str, Any] = {"WeightSymmetric": True, "ActivationSymmetric": False}
    if fused:
        extra["DefaultTensorType"] = onnx.TensorProto.FLOAT
    if method == "percentile":
        extra["CalibPercentile"] = CALIB_PERCENTILE
    with _QuietQuantLogs(), _private_view(src) as view:
        try:
            quantize_static(
                str(view),
                str(dst),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=list(STATIC_OPS),
                nodes_to_exclude=exclude or None,
                calibrate_method=calib,
                extra_options=extra,
                calibration_cache_path=str(calibration_cache) if calibration_cache else None,
            )
        except MemoryError as exc:  # histogram methods keep every activation
            raise OptimizationError(
                f"Calibration with '{method}' ran out of memory.", hint="Use fewer calibration samples or method: minmax."
            ) from exc
        except ValueError as exc:
            if "inhomogeneous" in str(exc):
                raise OptimizationError(
                    f"Calibration with '{method}' needs batches of one shape; these differ in sequence length.",
                    hint="Pad the calibration batches to one length (the handler does), or use method: minmax.",
                ) from exc
            raise


def weight_only(src: Path, dst: Path, *, bits: int, group_size: int, symmetric: bool, exclude: list[str]) -> None:
    """MatMulNBits: int4/int8 weights per block of ``group_size`` input channels, float math."""
    require("onnxruntime", "onnx")
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    if group_size < 16 or group_size & (group_size - 1):
        raise OptimizationError(
            f"MatMulNBits quantizes per block of a power-of-two size >= 16; got group_size {group_size}.",
            hint="Use group_size: 32, 64 or 128 on onnxruntime.",
        )
    model = onnx.load(str(src))
    algo = DefaultWeightOnlyQuantConfig(block_size=group_size, is_symmetric=symmetric, bits=bits, op_types_to_quantize=WEIGHT_ONLY_OPS)
    quant = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=group_size,
        is_symmetric=symmetric,
        nodes_to_exclude=exclude or [],
        op_types_to_quantize=WEIGHT_ONLY_OPS,
        algo_config=algo,
    )
    with _QuietQuantLogs():
        quant.process()
    quant.model.save_model_to_file(str(dst), use_external_data_format=False)


def fp16(src: Path, dst: Path, *, exclude: list[str]) -> None:
    """An fp16 graph with fp32 inputs and outputs (ORT inserts casts around ops without fp16 kernels)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    try:
        with _QuietQuantLogs():
            half = convert_float_to_float16(model, keep_io_types=True, node_block_list=exclude or None)
    except Exception as exc:
        raise OptimizationError(f"Converting the ONNX graph to fp16 failed: {type(exc).__name__}: {exc}") from exc
    onnx.save(half, str(dst))


def session(model: Path | Any, threads: int | None = None) -> Any:
    """A CPU session on a graph file or an in-memory ``ModelProto`` (``threads``: all cores when None), as the runner opens it."""
    from modelpress.runtimes.onnxruntime import session as runner_session

    return runner_session(model, threads, log_severity=3)


def check_loads(path: Path) -> None:
    """Open the new graph once, so a graph ORT cannot run is never written as an artifact."""
    try:
        session(path, 1)
    except Exception as exc:
        raise OptimizationError(f"ONNX Runtime cannot load the new graph: {type(exc).__name__}: {str(exc)[:400]}") from exc
