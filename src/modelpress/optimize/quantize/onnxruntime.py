"""Technique handlers for ONNX Runtime: dynamic and static int8, MatMulNBits weight-only, fp16.

Each handler reads the source as ONNX (an export cached by content hash, see
:func:`.handlers.onnx_source`), optionally through ORT's BERT fusions (``fuse``), transforms the
graph (:mod:`.onnx_backend`), opens the result once with ONNX Runtime, and writes a new ONNX
artifact whose manifest records the step, the layers kept in float and what was found.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelpress._fs import atomic_file, atomic_write_text
from modelpress.artifacts import Artifact
from modelpress.errors import OptimizationError
from modelpress.optimize.configs import DynamicInt8, Precision, StaticInt8, TechniqueConfig, WeightOnly
from modelpress.optimize.handlers import (
    BERT_LIKE,
    StepContext,
    calibration_batches,
    excluded_layers,
    hf_config,
    onnx_source,
    register_handler,
    write_variant,
)
from modelpress.optimize.quantize import onnxruntime_backend as ob


@dataclass
class OnnxGraph:
    """The ONNX graph a technique works on, and how it was made."""

    path: Path
    artifact: Artifact  # the ONNX artifact it came from (its signature is the variant's)
    fused: bool = False
    info: dict[str, Any] = field(default_factory=dict)


def _fusion_plan(source: Artifact) -> tuple[Any, str | None]:
    """The HF config when ORT's BERT fusion applies to ``source``, else why it does not."""
    cfg = hf_config(source)
    if cfg is None:
        return None, f"no Hugging Face config.json beside the {source.format} model (the fusion needs num_heads and hidden_size)"
    model_type = getattr(cfg, "model_type", "")
    if model_type not in BERT_LIKE:
        return None, f"model type '{model_type}' is not BERT-like (ORT's BERT fusion knows {', '.join(BERT_LIKE)})"
    if not getattr(cfg, "num_attention_heads", None) or not getattr(cfg, "hidden_size", None):
        return None, "the config has no num_attention_heads / hidden_size"
    return cfg, None


def prepare_graph(source: Artifact, *, fuse: bool) -> OnnxGraph:
    """``source`` as ONNX; with ``fuse``, the eager-attention export through ORT's BERT fusions.

    The fused graph is cached beside the exports (``<hash>-onnx-fused.onnx``), so a sensitivity
    scan and the handler it precedes fuse once. A model the fusion does not apply to is used
    unfused, and ``info["fusion"]`` says why.
    """
    from modelpress.locations import cache_dir

    if not fuse:
        art = onnx_source(source)
        return OnnxGraph(art.model_file, art, info={"fusion": "off"})
    cfg, reason = _fusion_plan(source)
    if cfg is None:
        art = onnx_source(source)
        return OnnxGraph(art.model_file, art, info={"fusion": f"skipped: {reason}"})
    eager = onnx_source(source, eager_attention=source.format == "hf")
    target = cache_dir("exports") / f"{eager.content_hash()[:20]}-onnx-fused.onnx"
    stats_file = target.with_suffix(".stats")
    if not target.is_file() or not stats_file.is_file():
        with atomic_file(target) as tmp:
            stats = ob.fuse_transformer(eager.model_file, tmp, num_heads=int(cfg.num_attention_heads), hidden_size=int(cfg.hidden_size))
        atomic_write_text(stats_file, json.dumps(stats))
    stats = json.loads(stats_file.read_text())
    info: dict[str, Any] = {
        "fusion": "bert",
        "fused_operators": stats,
        "num_heads": int(cfg.num_attention_heads),
        "hidden_size": int(cfg.hidden_size),
    }
    if not stats.get("Attention"):
        info["fusion_note"] = "no attention block was fused (the graph's attention pattern was not recognised)"
    return OnnxGraph(target, eager, fused=True, info=info)


def _write(
    source: Artifact,
    config: TechniqueConfig,
    ctx: StepContext,
    graph: OnnxGraph,
    layers: dict[str, str],
    transform: Any,
    metrics: dict[str, Any],
) -> Artifact:
    """Transform ``graph`` into the variant's ``model.onnx``, check ORT opens it, write the artifact."""
    excluded = excluded_layers(layers, config.exclude)
    unmatched = [p for p in config.exclude if not excluded_layers(layers, [p])]
    t0 = time.perf_counter()

    def fill(tmp: Path) -> dict[str, Any]:
        dst = tmp / "model.onnx"
        transform(graph.path, dst, excluded)
        ob.check_loads(dst)
        found = {
            **graph.info,
            **metrics,
            "layers": len(layers),
            "excluded": excluded,
            "ops": ob.op_counts(dst),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if unmatched:
            found["exclude_unmatched"] = unmatched
        return {"metrics": found}

    return write_variant(source, config, ctx, fmt="onnx", model_file="model.onnx", fill=fill, signature=graph.artifact.manifest.signature)


def layers_for(graph: OnnxGraph, config: TechniqueConfig) -> dict[str, str]:
    """The layers ``config`` changes in ``graph`` (name -> module path)."""
    if isinstance(config, DynamicInt8):
        # Gathers are layers only where they read a weight (an embedding table), not a shape.
        compute = ob.onnx_layers(graph.path, tuple(o for o in ob.DYNAMIC_OPS if o != "Gather"))
        return {**compute, **ob.onnx_layers(graph.path, ("Gather",), weights_only=True)}
    if isinstance(config, StaticInt8):
        return ob.onnx_layers(graph.path, ob.STATIC_OPS)
    if isinstance(config, WeightOnly):
        return ob.onnx_layers(graph.path, ob.WEIGHT_ONLY_OPS, weights_only=True)
    return ob.onnx_layers(graph.path, ())


def static_batches(source: Artifact, config: StaticInt8, ctx_data: Path | None) -> tuple[list[Any], dict[str, Any]]:
    """Calibration batches; one sequence length for the histogram methods (they stack activations)."""
    batches, used = calibration_batches(source, config.calibration, ctx_data)
    if config.method != "minmax" and batches and "input_ids" in batches[0]:
        longest = max(int(b["input_ids"].shape[1]) for b in batches)
        batches, used = calibration_batches(source, config.calibration, ctx_data, seq_len=longest)
    return batches, used


@register_handler(DynamicInt8, "onnxruntime")
def ort_dynamic_int8(source: Artifact, config: DynamicInt8, ctx: StepContext) -> Artifact:
    """``quantize_dynamic`` (per-tensor or per-channel int8 weights), after the BERT fusions with ``fuse``."""
    graph = prepare_graph(source, fuse=config.fuse)
    layers = layers_for(graph, config)

    def transform(src: Path, dst: Path, excluded: list[str]) -> None:
        dynamic_int8(config, src, dst, excluded, fused=graph.fused)

    return _write(source, config, ctx, graph, layers, transform, {"per_channel": config.per_channel})


def dynamic_int8(config: DynamicInt8, src: Path, dst: Path, excluded: list[str], *, fused: bool) -> None:
    """ONNX Runtime's ``quantize_dynamic`` of ``src`` into ``dst`` with ``config``'s settings, ``excluded`` kept in float."""
    ob.dynamic_int8(
        src,
        dst,
        per_channel=config.per_channel,
        reduce_range=config.reduce_range,
        exclude=excluded,
        fused=fused,
        weight_type=config.weight_type,
    )


@register_handler(StaticInt8, "onnxruntime")
def ort_static_int8(source: Artifact, config: StaticInt8, ctx: StepContext) -> Artifact:
    """QDQ static int8 calibrated on ``calibration.samples`` real inputs (minmax, entropy, percentile)."""
    graph = prepare_graph(source, fuse=config.fuse)
    layers = layers_for(graph, config)
    batches, used = static_batches(source, config, ctx.data_dir)
    if not batches:
        raise OptimizationError(
            "No calibration samples were found.", hint="Name a dataset with samples, e.g. calibration: {dataset: stsb-train}."
        )

    def transform(src: Path, dst: Path, excluded: list[str]) -> None:
        ob.static_int8(
            src, dst, batches, method=config.method, per_channel=config.per_channel, reduce_range=False, exclude=excluded, fused=graph.fused
        )

    metrics = {"calibration": used, "method": config.method, "quantized_op_types": list(ob.STATIC_OPS)}
    return _write(source, config, ctx, graph, layers, transform, metrics)


@register_handler(WeightOnly, "onnxruntime")
def ort_weight_only(source: Artifact, config: WeightOnly, ctx: StepContext) -> Artifact:
    """MatMulNBits: 4- or 8-bit weights per block of ``group_size`` input channels."""
    graph = prepare_graph(source, fuse=False)
    layers = layers_for(graph, config)
    group = config.effective_group_size

    def transform(src: Path, dst: Path, excluded: list[str]) -> None:
        ob.weight_only(src, dst, bits=config.bits, group_size=group, symmetric=config.symmetric, exclude=excluded)

    return _write(source, config, ctx, graph, layers, transform, {"bits": config.bits, "group_size": group})


@register_handler(Precision, "onnxruntime")
def ort_precision(source: Artifact, config: Precision, ctx: StepContext) -> Artifact:
    """fp16 weights and math with fp32 inputs and outputs (``convert_float_to_float16(keep_io_types)``)."""
    graph = prepare_graph(source, fuse=False)
    layers = layers_for(graph, config)

    def transform(src: Path, dst: Path, excluded: list[str]) -> None:
        if config.dtype == "fp32":
            import shutil

            shutil.copyfile(src, dst)
        else:
            ob.fp16(src, dst, exclude=excluded)

    return _write(source, config, ctx, graph, layers, transform, {"dtype": config.dtype})
