"""LLM weight quantization on the KV-cache decoder: ``weight-only`` (round-to-nearest), ``gptq``,
``awq`` and ``smoothquant`` on the ``openvino-decoder`` runtime, all by NNCF.

The source (a Hugging Face causal LM folder) is exported once per content hash to the decoder
graph the OpenVINO generation engine runs (:func:`modelpress.generation.openvino_engine.export_decoder`
with ``all_logits``, checked against PyTorch), compressed in memory (:mod:`.llm_backend`),
compiled once and written as a folder both the engine and the ``openvino-decoder`` runner read::

    decoder.xml, decoder.bin    the compressed IR
    engine.json                 {format_version, quantize: "int4-gptq", all_logits: true, model_type, precision}
    config.json, generation_config.json, tokenizer files
    modelpress.json             the manifest: step (runtime openvino-decoder), parent, metrics

so ``modelpress serve FOLDER --engine openvino`` serves it and ``modelpress evaluate FOLDER`` scores
it on the same graph. Calibration windows come from ``calibration.dataset``, else the training
split of the dataset the step is evaluated on (see :func:`calibration_dataset`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from modelpress.artifacts import Artifact
from modelpress.errors import OptimizationError, UnsupportedModelError
from modelpress.optimize.configs import TechniqueConfig, WeightOnly
from modelpress.optimize.configs.llm import AWQ, GPTQ, DecoderCalibration, SmoothQuant
from modelpress.optimize.configs.quantize import DECODER_RUNTIME
from modelpress.optimize.handlers import StepContext, copy_model_files, excluded_layers, register_handler, write_variant
from modelpress.optimize.quantize import llm_backend as lb
from modelpress.optimize.quantize import openvino_backend as vb
from modelpress.runtimes.base import register_converter

MODEL_FILE = "decoder.xml"
DEFAULT_CORPUS = "tinyshakespeare-train"  # as SparseGPT and Wanda: text the zoo's LMs were trained on
# Files of a decoder folder that are the model itself (the rest, config and tokenizer, travel with it).
MODEL_FILES = ("decoder.xml", "decoder.bin", "engine.json", "modelpress.json")


# -- the float decoder ------------------------------------------------------------------------------
def _hf_model(source: Artifact) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from modelpress.runtimes.torch import hf_load_kwargs

    if source.format == "torch" and source.module is not None:
        return source.module.eval()
    if source.format != "hf" or source.path is None:
        raise UnsupportedModelError(
            f"LLM quantization exports a Hugging Face causal LM to its KV-cache decoder; '{source.name}' is a {source.format} artifact.",
            hint="Start from the model folder, e.g. modelpress optimize ../shared/data/models/stories260k --recipe recipes/llm-int4.yaml",
        )
    return AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32, **hf_load_kwargs(source.path)).eval()


def float_decoder(source: Artifact) -> Artifact:
    """The f32 decoder (every position's logits) of ``source``: exported once per content hash, checked against PyTorch.

    Registered as the runtimes' ``openvino-decoder`` converter, so the ``openvino-decoder`` runner
    also runs an original (for its evaluation and speed on that runtime).
    """
    if source.format == "openvino" and source.path is not None and (source.path / "engine.json").is_file():
        return source
    if source.task != "causal-lm":
        raise UnsupportedModelError(f"The {DECODER_RUNTIME} runtime runs causal LMs; '{source.name}' is a {source.task} model.")
    from modelpress.export.cache import cached

    return cached(source, DECODER_RUNTIME, lambda target: _export(source, target))


def _export(source: Artifact, target: Path) -> Artifact:
    from modelpress.export.onnx import check_served, export_manifest
    from modelpress.export.onnx_decoder import unpadded_rows
    from modelpress.export.parity import parity_batches
    from modelpress.generation.openvino_engine import export_decoder, supported
    from modelpress.locations import find_data_dir
    from modelpress.runtimes import create_runner
    from modelpress.tasks import task_for

    if source.path is not None and not supported(source.path):
        raise UnsupportedModelError(
            f"'{source.name}' is not a decoder the KV-cache export knows (Llama, Mistral, Qwen2 without sliding windows).",
            hint="Quantize it with {technique: weight-only, runtime: openvino} instead (the full-sequence graph).",
        )
    task = task_for(source)
    manifest = export_manifest(source, "openvino", MODEL_FILE, source.manifest.signature or task.signature())
    reference = create_runner(source, "torch", threads=1)

    def fill(tmp: Path) -> dict[str, Any]:
        hf = _hf_model(source)
        export_decoder(hf, tmp, all_logits=True)
        if source.path is not None:
            for name in ("config.json", "generation_config.json"):
                if (source.path / name).is_file():
                    (tmp / name).write_bytes((source.path / name).read_bytes())
        else:
            hf.config.save_pretrained(str(tmp))
        report = check_served(
            reference, manifest, tmp, task, unpadded_rows(parity_batches(task, find_data_dir())), DECODER_RUNTIME, precision="f32"
        )
        return {"metrics": {"parity_max_abs_diff": report}, "step": {"export": DECODER_RUNTIME, "all_logits": True}}

    try:
        return Artifact.write(target, manifest, fill, overwrite=True)
    finally:
        reference.close()


register_converter(DECODER_RUNTIME, float_decoder)


# -- calibration --------------------------------------------------------------------------------------
def calibration_dataset(calib: DecoderCalibration, ctx: StepContext) -> tuple[str, str]:
    """The corpus the windows come from, and why: the config's, else the evaluation data's training split.

    ``ctx.data`` is the dataset the step is evaluated on (``--data``), when the pipeline passes it.
    """
    from modelpress.datasets.local import NAMED

    if calib.dataset:
        return calib.dataset, "calibration.dataset"
    data = getattr(ctx, "data", None)
    if data:
        for suffix in ("-test", "-dev", "-validation"):
            if str(data).endswith(suffix) and f"{str(data)[: -len(suffix)]}-train" in NAMED:
                return f"{str(data)[: -len(suffix)]}-train", f"the training split of {data}"
        return str(data), "the evaluation dataset (it has no training split)"
    return DEFAULT_CORPUS, "the default corpus"


def calibration_items(source: Artifact, model: Any, calib: DecoderCalibration, ctx: StepContext) -> tuple[list[dict], dict[str, Any]]:
    """``calib.samples`` windows of ``calib.seq_len`` tokens as the decoder's inputs, and what was used."""
    from modelpress.optimize.configs.prune import LLMCalibration
    from modelpress.optimize.prune.llm import calibration_token_batches

    name, why = calibration_dataset(calib, ctx)
    windows = LLMCalibration(dataset=name, samples=calib.samples, seq_len=calib.seq_len, batch_size=1, seed=calib.seed)
    batches, used = calibration_token_batches(source, windows, ctx.data_dir)
    return lb.decoder_items([b["input_ids"] for b in batches], model), {**used, "chosen_as": why}


# -- the handlers ---------------------------------------------------------------------------------------
def _layers(model: Any, config: TechniqueConfig) -> tuple[list[str], dict[str, Any]]:
    ops = vb.QUANTIZED_OPS if isinstance(config, SmoothQuant) else vb.WEIGHT_OPS
    layers = vb.ov_layers(model, ops, weights_only=not isinstance(config, SmoothQuant))
    excluded = excluded_layers(layers, config.exclude)
    found: dict[str, Any] = {"layers": len(layers), "excluded": excluded}
    unmatched = [p for p in config.exclude if not excluded_layers(layers, [p])]
    if unmatched:
        found["exclude_unmatched"] = unmatched
    return excluded, found


def _write(source: Artifact, config: TechniqueConfig, ctx: StepContext, make: Any) -> Artifact:
    """Export (cached), ``make(model) -> (model, metrics)``, compile once, write the decoder folder."""
    t0 = time.perf_counter()
    decoder = float_decoder(source)
    folder = decoder.path
    if folder is None:  # pragma: no cover - the cache always returns a folder
        raise OptimizationError(f"The decoder export of '{source.name}' has no folder.")
    hint = getattr(config, "precision_hint", None)
    precision = vb.PRECISION_HINTS[hint] if hint else "f32"

    def fill(tmp: Path) -> dict[str, Any]:
        model, found = make(vb.read_model(folder / MODEL_FILE))
        vb.check_compiles(model, precision)
        vb.save_model(model, tmp / MODEL_FILE)
        copy_model_files(folder, tmp, skip=MODEL_FILES)
        meta = json.loads((folder / "engine.json").read_text())
        meta.update(quantize=lb.describe(config), precision=precision)
        (tmp / "engine.json").write_text(json.dumps(meta))
        return {"metrics": {**found, "ops": vb.op_counts(model), "seconds": round(time.perf_counter() - t0, 3)}}

    return write_variant(
        source,
        config,
        ctx,
        fmt="openvino",
        model_file=MODEL_FILE,
        fill=fill,
        signature=decoder.manifest.signature,
        runtime_options={"precision": precision} if hint else None,
    )


@register_handler(WeightOnly, DECODER_RUNTIME)
@register_handler(GPTQ, DECODER_RUNTIME)
@register_handler(AWQ, DECODER_RUNTIME)
def decoder_weights(source: Artifact, config: Any, ctx: StepContext) -> Artifact:
    """``nncf.compress_weights`` on the decoder: RTN (``weight-only``), GPTQ or AWQ, optionally with scale estimation."""

    def make(model: Any) -> tuple[Any, dict[str, Any]]:
        excluded, found = _layers(model, config)
        group = config.effective_group_size if config.bits == 4 else -1
        found.update(algorithm=lb.describe(config), bits=config.bits, symmetric=config.symmetric, group_size=group, ratio=config.ratio)
        if config.bits == 4:
            fallback = vb.group_fallback(vb.matmul_in_channels(model), group, excluded)
            if fallback and config.group_size_fallback == "error":
                raise OptimizationError(
                    f"These layers' input channels do not divide by group_size {group}: {', '.join(fallback)[:600]}.",
                    hint="Use group_size_fallback: adjust (a smaller group, or int8, for those layers), a group that divides them, "
                    "or exclude them.",
                )
            if fallback:
                ignore = config.group_size_fallback == "ignore"
                found["group_size_fallback"] = dict.fromkeys(fallback, "kept in float") if ignore else fallback
        items: list[dict] = []
        if not isinstance(config, WeightOnly):
            items, found["calibration"] = calibration_items(source, model, config.calibration, ctx)
        return lb.compress(model, config, items, excluded), found

    return _write(source, config, ctx, make)


@register_handler(SmoothQuant, DECODER_RUNTIME)
def decoder_smoothquant(source: Artifact, config: SmoothQuant, ctx: StepContext) -> Artifact:
    """SmoothQuant W8A8 on the decoder: ``nncf.quantize`` with the smoothing strength ``alpha``."""

    def make(model: Any) -> tuple[Any, dict[str, Any]]:
        excluded, found = _layers(model, config)
        items, found["calibration"] = calibration_items(source, model, config.calibration, ctx)
        found.update(algorithm="w8a8-smoothquant", alpha=config.alpha, preset=config.preset)
        return lb.smoothquant(model, config, items, excluded), found

    return _write(source, config, ctx, make)
