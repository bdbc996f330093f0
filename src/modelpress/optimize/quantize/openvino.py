"""Technique handlers for OpenVINO: NNCF static int8, NNCF weight compression, inference precision.

Each handler reads the source as OpenVINO IR (an export cached by content hash, see
:func:`.handlers.openvino_source`; an ONNX artifact is read directly), transforms it in memory
(:mod:`.openvino_backend`), compiles the result once on CPU, and writes a new IR artifact.
An inference precision (``precision_hint``, or the Precision technique) is not a property of
the IR: it is stored in the artifact's ``runtime_options`` and applied by the OpenVINO runner.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from modelpress.artifacts import Artifact
from modelpress.errors import OptimizationError
from modelpress.optimize.configs import Precision, StaticInt8, TechniqueConfig, WeightOnly
from modelpress.optimize.handlers import (
    StepContext,
    calibration_batches,
    copy_model_files,
    excluded_layers,
    openvino_source,
    register_handler,
    write_variant,
)
from modelpress.optimize.quantize import openvino_backend as vb


def onnx_scopes(source: Artifact) -> dict[str, str]:
    """Module paths of the ONNX nodes the IR was converted from (OpenVINO keeps the node names)."""
    from modelpress.export import exported
    from modelpress.optimize.quantize.onnxruntime_backend import onnx_layers

    if source.format == "openvino":
        return {}
    onnx_art = exported(source, "onnx")
    return onnx_layers(onnx_art.model_file, ()) if onnx_art.model_file is not None else {}


def ov_graph(source: Artifact) -> tuple[Artifact, Any, dict[str, str]]:
    """The IR (or ONNX) artifact OpenVINO reads, the model in memory, and each op's module path."""
    art = openvino_source(source)
    if art.model_file is None:
        raise OptimizationError(f"'{source.name}' has no model file OpenVINO can read.")
    return art, vb.read_model(art.model_file), onnx_scopes(source)


def layers_for(model: Any, scopes: dict[str, str], config: TechniqueConfig) -> dict[str, str]:
    """The operations ``config`` changes (name -> module path)."""
    if isinstance(config, WeightOnly):
        names = vb.ov_layers(model, vb.WEIGHT_OPS, weights_only=True)
    else:
        names = vb.ov_layers(model, vb.QUANTIZED_OPS)
    return {n: scopes.get(n, "") for n in names}


def runtime_options(config: TechniqueConfig) -> dict[str, Any] | None:
    hint = getattr(config, "precision_hint", None)
    return {"precision": vb.PRECISION_HINTS[hint]} if hint else None


def _write(source: Artifact, config: TechniqueConfig, ctx: StepContext, art: Artifact, make: Any, metrics: dict[str, Any]) -> Artifact:
    """Run ``make() -> model``, compile it once, save the IR and write the artifact."""
    options = runtime_options(config)
    precision = (options or {}).get("precision", "f32")
    t0 = time.perf_counter()

    def fill(tmp: Path) -> dict[str, Any]:
        model = make()
        vb.check_compiles(model, precision)
        vb.save_model(model, tmp / "model.xml")
        return {"metrics": {**metrics, "ops": vb.op_counts(model), "seconds": round(time.perf_counter() - t0, 3)}}

    return write_variant(
        source, config, ctx, fmt="openvino", model_file="model.xml", fill=fill, signature=art.manifest.signature, runtime_options=options
    )


def _exclusions(layers: dict[str, str], config: TechniqueConfig) -> tuple[list[str], dict[str, Any]]:
    excluded = excluded_layers(layers, config.exclude)
    found: dict[str, Any] = {"layers": len(layers), "excluded": excluded}
    unmatched = [p for p in config.exclude if not excluded_layers(layers, [p])]
    if unmatched:
        found["exclude_unmatched"] = unmatched
    return excluded, found


@register_handler(StaticInt8, "openvino")
def ov_static_int8(source: Artifact, config: StaticInt8, ctx: StepContext) -> Artifact:
    """``nncf.quantize`` on ``calibration.samples`` real inputs (model_type TRANSFORMER for text models)."""
    from modelpress.tasks import task_for

    art, model, scopes = ov_graph(source)
    layers = layers_for(model, scopes, config)
    excluded, found = _exclusions(layers, config)
    batches, used = calibration_batches(source, config.calibration, ctx.data_dir)
    if not batches:
        raise OptimizationError(
            "No calibration samples were found.", hint="Name a dataset with samples, e.g. calibration: {dataset: stsb-train}."
        )
    transformer = task_for(source).uses_tokenizer()

    def make() -> Any:
        return vb.static_int8(
            model,
            batches,
            transformer=transformer,
            preset=config.preset,
            fast_bias_correction=config.fast_bias_correction,
            ignored=excluded,
        )

    found.update(calibration=used, model_type="transformer" if transformer else "default", preset=config.preset)
    return _write(source, config, ctx, art, make, found)


@register_handler(WeightOnly, "openvino")
def ov_weight_only(source: Artifact, config: WeightOnly, ctx: StepContext) -> Artifact:
    """``nncf.compress_weights``: INT8 per output channel, INT4 per group (``ratio`` of layers in 4 bits)."""
    art, model, scopes = ov_graph(source)
    layers = layers_for(model, scopes, config)
    excluded, found = _exclusions(layers, config)
    group = config.effective_group_size
    found.update(bits=config.bits, symmetric=config.symmetric, group_size=group if config.bits == 4 else -1, ratio=config.ratio)
    if config.bits == 4:
        fallback = vb.group_fallback(vb.matmul_in_channels(model), group, excluded)
        if fallback and config.group_size_fallback == "error":
            shown = ", ".join(f"{n} ({k} input channels)" for n, k in list(vb.matmul_in_channels(model).items()) if n in fallback)
            raise OptimizationError(
                f"These layers' input channels do not divide by group_size {group}: {shown[:600]}.",
                hint="Use group_size_fallback: adjust (a smaller group, or int8, for those layers), a group that divides them, "
                "or exclude them.",
            )
        if fallback:
            found["group_size_fallback"] = dict.fromkeys(fallback, "kept in float") if config.group_size_fallback == "ignore" else fallback

    def make() -> Any:
        return vb.weight_only(
            model,
            bits=config.bits,
            symmetric=config.symmetric,
            group_size=group,
            ratio=config.ratio,
            ignored=excluded,
            fallback=config.group_size_fallback,
        )

    return _write(source, config, ctx, art, make, found)


@register_handler(Precision, "openvino")
def ov_precision(source: Artifact, config: Precision, ctx: StepContext) -> Artifact:
    """The model unchanged, run with ``INFERENCE_PRECISION_HINT`` (stored in the runtime options)."""
    art = openvino_source(source)
    precision = vb.PRECISION_HINTS[config.dtype]
    options = {"precision": precision}
    t0 = time.perf_counter()

    def fill(tmp: Path) -> dict[str, Any]:
        model = vb.read_model(art.model_file)
        vb.check_compiles(model, precision)
        if art.format == "openvino" and art.path is not None:
            copy_model_files(art.path, tmp)
        else:
            vb.save_model(model, tmp / "model.xml")
        return {"metrics": {"precision": precision, "seconds": round(time.perf_counter() - t0, 3)}}

    return write_variant(
        source, config, ctx, fmt="openvino", model_file="model.xml", fill=fill, signature=art.manifest.signature, runtime_options=options
    )
