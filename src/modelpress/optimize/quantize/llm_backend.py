"""NNCF on a causal LM's KV-cache decoder IR: weight compression (RTN, GPTQ, AWQ, scale
estimation) and SmoothQuant W8A8. Each function takes an ``openvino.Model`` and returns a new one.

The calibration items are the decoder's own inputs, one window per item (batch 1: NNCF's
data-aware weight algorithms collect statistics per item): ``input_ids`` and ``position_ids`` of
the window, an all-ones ``attention_mask`` and an empty cache ``[1, layers*kv_heads, 0, head_dim]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from modelpress.errors import OptimizationError, require
from modelpress.optimize.configs import TechniqueConfig, WeightOnly
from modelpress.optimize.configs.llm import AWQ, GPTQ, DecoderWeights, SmoothQuant
from modelpress.optimize.quantize import openvino_backend as vb

FLOAT_OPS = ("ScaledDotProductAttention",)  # kept in float by SmoothQuant (see smoothquant)


def cache_shape(model: Any) -> tuple[int, int]:
    """(layers * kv_heads, head_dim): the static dimensions of the decoder's ``past_k`` input."""
    for port in model.inputs:
        if "past_k" in port.get_names():
            shape = port.get_partial_shape()
            return int(shape[1].get_length()), int(shape[3].get_length())
    raise OptimizationError("The decoder IR has no 'past_k' input: it is not a KV-cache decoder written by modelpress.")


def decoder_items(windows: list[np.ndarray], model: Any) -> list[dict[str, np.ndarray]]:
    """The decoder's inputs for each token window (``[1, seq]`` int64)."""
    heads, head_dim = cache_shape(model)
    items: list[dict[str, np.ndarray]] = []
    for ids in windows:
        x = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        empty = np.zeros((1, heads, 0, head_dim), dtype=np.float32)
        items.append(
            {
                "input_ids": x,
                "position_ids": np.arange(x.shape[1], dtype=np.int64)[None],
                "attention_mask": np.ones_like(x),
                "past_k": empty,
                "past_v": empty,
            }
        )
    return items


def _mode(nncf: Any, bits: int, symmetric: bool) -> Any:
    return {
        (8, True): nncf.CompressWeightsMode.INT8_SYM,
        (8, False): nncf.CompressWeightsMode.INT8_ASYM,
        (4, True): nncf.CompressWeightsMode.INT4_SYM,
        (4, False): nncf.CompressWeightsMode.INT4_ASYM,
    }[(bits, symmetric)]


def compress_kwargs(config: WeightOnly | DecoderWeights, items: list[dict[str, np.ndarray]], ignored: list[str]) -> dict[str, Any]:
    """The ``nncf.compress_weights`` arguments of a config (what the manifest records, too)."""
    nncf = require("nncf", "openvino")
    kwargs: dict[str, Any] = {"mode": _mode(nncf, config.bits, config.symmetric), "ignored_scope": vb.ignored_scope(ignored)}
    if config.bits == 8:
        return kwargs
    fallback = {
        "adjust": nncf.GroupSizeFallbackMode.ADJUST,
        "ignore": nncf.GroupSizeFallbackMode.IGNORE,
        "error": nncf.GroupSizeFallbackMode.ERROR,
    }[config.group_size_fallback]
    advanced: dict[str, Any] = {"group_size_fallback_mode": fallback, "min_adjusted_group_size": vb.MIN_ADJUSTED_GROUP}
    kwargs.update(group_size=config.effective_group_size, ratio=config.ratio)
    if isinstance(config, DecoderWeights):
        n = len(items)
        kwargs.update(all_layers=config.all_layers, dataset=nncf.Dataset(items), subset_size=n)
        if config.scale_estimation:
            kwargs["scale_estimation"] = True
            advanced["scale_estimation_params"] = nncf.AdvancedScaleEstimationParameters(subset_size=n)
        if isinstance(config, GPTQ):
            kwargs["gptq"] = True
            advanced["gptq_params"] = nncf.AdvancedGPTQParameters(damp_percent=config.damping, block_size=config.block_size, subset_size=n)
        elif isinstance(config, AWQ):
            kwargs["awq"] = True
            advanced["awq_params"] = nncf.AdvancedAWQParameters(
                subset_size=n,
                percent_to_apply=config.percent_to_apply,
                alpha_min=config.alpha_min,
                alpha_max=config.alpha_max,
                steps=config.steps,
            )
    kwargs["advanced_parameters"] = nncf.AdvancedCompressionParameters(**advanced)
    return kwargs


def compress(model: Any, config: WeightOnly | DecoderWeights, items: list[dict[str, np.ndarray]], ignored: list[str]) -> Any:
    """``nncf.compress_weights`` with the config's algorithm (RTN for ``weight-only``)."""
    nncf = require("nncf", "openvino")
    kwargs = compress_kwargs(config, items, ignored)
    with vb.quiet_nncf():
        try:
            return nncf.compress_weights(model, **kwargs)
        except Exception as exc:  # NNCF raises its own and backend errors
            raise OptimizationError(
                f"NNCF weight compression ({config.technique_name}) failed: {type(exc).__name__}: {str(exc)[:400]}",
                hint="For group-wise 4 bits on dimensions that divide by no group size, use group_size_fallback: adjust.",
            ) from exc


def smoothquant(model: Any, config: SmoothQuant, items: list[dict[str, np.ndarray]], ignored: list[str]) -> Any:
    """``nncf.quantize`` (TRANSFORMER) with SmoothQuant's migration strength ``alpha`` on the MatMuls."""
    nncf = require("nncf", "openvino")
    advanced = nncf.AdvancedQuantizationParameters(smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=config.alpha))
    kwargs: dict[str, Any] = {
        "model_type": nncf.ModelType.TRANSFORMER,
        "preset": nncf.QuantizationPreset.MIXED if config.preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE,
        "subset_size": len(items),
        # Attention stays in float: its inputs include the cache, empty while calibrating (the statistics
        # of an empty tensor are infinite), and SmoothQuant's W8A8 is about the linear layers.
        "ignored_scope": nncf.IgnoredScope(names=list(ignored), types=list(FLOAT_OPS), validate=False),
        "advanced_parameters": advanced,
    }
    with vb.quiet_nncf():
        try:
            return nncf.quantize(model, nncf.Dataset(items), **kwargs)
        except Exception as exc:
            raise OptimizationError(f"NNCF SmoothQuant failed: {type(exc).__name__}: {str(exc)[:400]}") from exc


def describe(config: TechniqueConfig) -> str:
    """The short name ``engine.json`` records as ``quantize`` (e.g. ``int4-gptq``, ``int8-rtn``, ``w8a8-smoothquant``)."""
    if isinstance(config, SmoothQuant):
        return "w8a8-smoothquant"
    algo = {GPTQ: "gptq", AWQ: "awq"}.get(type(config), "rtn")
    se = "-se" if getattr(config, "scale_estimation", False) else ""
    return f"int{getattr(config, 'bits', 8)}-{algo}{se}"
