"""Technique handlers for runtime torch: torchao int8 (dynamic, weight-only, int4), PT2E static int8, bf16/fp16.

A torch variant holds no pickled model. Its folder is the source's files (hard-linked) plus,
for static int8, the calibration batches (``calibration.npz``); the manifest records the step
and, in ``task_config["runtime_options"]["torch"]``, the transform the PyTorch runner applies
when it loads the model (:mod:`modelpress.runtimes.torch_transforms`), with ``compile`` and
``freezing``. torchao's quantization is deterministic from the float weights and PT2E observes
the same batches again, so every load rebuilds the same model. A variant of an in-memory torch
module stores the module's weights as ``model.safetensors`` and keeps the module attached.

While writing, the handler builds the variant exactly as the runner will (eagerly) and records
in ``metrics.technique``: the signal-to-quantization-noise ratio of its output against the
source's on sample inputs (``sqnr_db``), how many layers were quantized and which stayed float,
and the weights' bytes in memory before and after.

What each config means on torch:

* DynamicInt8: torchao ``Int8DynamicActivationInt8WeightConfig`` on every ``nn.Linear``
  (weights per output channel, activations per token; ``per_channel`` and ``fuse`` are ONNX
  Runtime settings: torch always quantizes weights per channel, its only fast path, and per
  tensor costs MiniLM 0.974 mean cosine against 0.997);
* StaticInt8: PT2E with ``X86InductorQuantizer`` (weights per channel, activations per tensor
  with histogram observers), calibrated on ``calibration`` (``per_channel``, ``fuse``,
  ``preset`` and ``fast_bias_correction`` are ONNX Runtime / NNCF settings);
* WeightOnly: 8 bits ``Int8WeightOnlyConfig`` (symmetric; per channel or ``group_size``), 4
  bits ``PrototypeInt4WeightOnlyConfig`` (``symmetric: false``; packed CPU kernel, groups
  32-256) or ``IntxWeightOnlyConfig`` (symmetric int4, or asymmetric int8, stored unpacked);
* Precision: weights and activations cast to bf16 / fp16 (fp32: unchanged, compile only).

``compile`` (default True) makes the runner ``torch.compile`` the model with freezing; torchao's
int8 is slower than fp32 in eager mode and pays only compiled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from modelpress.artifacts import Artifact
from modelpress.errors import OptimizationError
from modelpress.optimize.configs import DynamicInt8, Precision, StaticInt8, TechniqueConfig, WeightOnly
from modelpress.optimize.handlers import StepContext, calibration_batches, copy_model_files, register_handler, write_variant

CALIBRATION_FILE = "calibration.npz"
SAMPLE_BATCH = 8  # inputs the handler compares the variant with its source on


def transform_spec(config: TechniqueConfig) -> dict[str, Any]:
    """The torch-level transform (see :mod:`modelpress.runtimes.torch_transforms`) for a config."""
    exclude = list(config.exclude)
    if isinstance(config, DynamicInt8):
        return {"kind": "dynamic-int8", "reduce_range": config.reduce_range, "exclude": exclude}
    if isinstance(config, StaticInt8):
        return {"kind": "static-int8", "exclude": exclude}
    if isinstance(config, WeightOnly):
        return {
            "kind": "weight-only",
            "bits": config.bits,
            "group_size": config.effective_group_size,
            "symmetric": config.symmetric,
            "exclude": exclude,
        }
    if isinstance(config, Precision):
        return {"kind": "cast", "dtype": config.dtype, "exclude": exclude}
    raise OptimizationError(f"{type(config).__name__} has no torch transform.")  # pragma: no cover - handlers are registered per type


def _check_source(source: Artifact, config: TechniqueConfig) -> None:
    if source.format not in ("hf", "torch"):
        raise OptimizationError(
            f"{config.technique_name} on torch needs a PyTorch model (a Hugging Face folder or a torch module); "
            f"'{source.name}' is a {source.format} artifact.",
            hint="Start from the original model, "
            f"or use runtime: {'openvino' if source.format == 'openvino' else 'onnxruntime'} for this artifact.",
        )


def _sample_batches(source: Artifact, ctx: StepContext, calibration: list[dict[str, np.ndarray]] | None) -> list[dict[str, np.ndarray]]:
    from modelpress.tasks import task_for

    if calibration:
        return calibration[:2]
    return [task_for(source).sample_inputs(SAMPLE_BATCH, data_dir=ctx.data_dir)]


def _real_positions(output: np.ndarray, batch: dict[str, np.ndarray]) -> np.ndarray:
    """The output's values at real (not padding) tokens, flattened: padding is noise to compare."""
    mask = batch.get("attention_mask")
    if mask is not None and output.ndim >= 3 and output.shape[:2] == mask.shape:
        return output[mask.astype(bool)].reshape(-1)
    return output.reshape(-1)


def torch_variant(source: Artifact, config: TechniqueConfig, ctx: StepContext) -> Artifact:
    """Write the torch variant of ``source`` that ``config`` describes (all four techniques)."""
    from modelpress.runtimes import create_runner
    from modelpress.runtimes.torch_transforms import layer_report, normalize_transforms, save_batches, sqnr_db, weight_bytes

    _check_source(source, config)
    stored = (source.manifest.task_config.get("runtime_options") or {}).get("torch") or {}
    spec = transform_spec(config)
    chain = normalize_transforms([*normalize_transforms(stored.get("transform")), spec])
    calibration, used = None, None
    if isinstance(config, StaticInt8):
        calibration, used = calibration_batches(source, config.calibration, ctx.data_dir)
    samples = _sample_batches(source, ctx, calibration)

    def fill(tmp: Path) -> dict[str, Any]:
        if source.format == "torch":
            from safetensors.torch import save_model

            save_model(source.module, str(tmp / "model.safetensors"))
        else:
            copy_model_files(source.path, tmp, skip=("modelpress.json", CALIBRATION_FILE))
        options: dict[str, Any] = {}
        if calibration is not None:
            save_batches(tmp / CALIBRATION_FILE, calibration)
            options["calibration"] = str(tmp / CALIBRATION_FILE)
        variant = create_runner(source, "torch", threads=ctx.threads, transform=chain, compile=False, **options).load()
        reference = create_runner(source, "torch", threads=ctx.threads, compile=False)
        ref = np.concatenate([_real_positions(reference.run(b)[reference.signature.output_names[0]], b) for b in samples])
        got = np.concatenate([_real_positions(variant.run(b)[variant.signature.output_names[0]], b) for b in samples])
        metrics: dict[str, Any] = {"sqnr_db": round(sqnr_db(ref, got), 2), "float_weight_bytes": weight_bytes(reference.load().module)}
        if spec["kind"] == "cast":
            metrics["weight_bytes"] = weight_bytes(variant.module)
        else:
            metrics.update(layer_report(variant.module))
        if used is not None:
            metrics["calibration"] = used
        return {"metrics": metrics, "signature": variant.signature}

    runtime_options: dict[str, Any] = {"transform": chain[0] if len(chain) == 1 else chain, "compile": config.compile}
    if config.compile:
        runtime_options["freezing"] = True
    if calibration is not None:
        runtime_options["calibration"] = CALIBRATION_FILE
    art = write_variant(source, config, ctx, fmt=source.format, model_file=None, fill=fill, runtime_options=runtime_options)
    if source.format == "torch":
        art.module = source.module
    return art


# torch_variant makes every torch quantization; it registers as the handler of each config type.
for _config_type in (DynamicInt8, StaticInt8, WeightOnly, Precision):
    register_handler(_config_type, "torch")(torch_variant)
