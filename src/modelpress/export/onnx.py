"""ONNX export with the ``torch.onnx`` dynamo exporter (legacy TorchScript exporter as fallback).

Batch and sequence axes stay dynamic. The export is run next to its source on real sample
inputs of two shapes before the folder is renamed into place; a mismatch raises
:class:`~modelpress.errors.ParityError` and nothing is written.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from modelpress.artifacts import Artifact, Manifest
from modelpress.errors import ExportError, require
from modelpress.locations import find_data_dir
from modelpress.export.parity import check_parity, parity_batches

log = logging.getLogger(__name__)
DEFAULT_OPSET = 18


def _dynamic_axes(sig) -> dict[str, dict[int, str]]:
    out = {}
    for spec in list(sig.inputs) + list(sig.outputs):
        out[spec.name] = {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)}
    return out


def torch_to_onnx(module: Any, args: tuple, path: Path, sig, *, opset: int = DEFAULT_OPSET, dynamo: bool = True) -> str:
    """Write ``module`` to ``path``; returns which exporter succeeded (and why the other did not)."""
    import torch

    axes = _dynamic_axes(sig)
    reason = "dynamo=False was asked for"
    if dynamo:
        try:
            # Axis names as strings: the exporter makes them dynamic and keeps the names.
            shapes = [{i: d for i, d in enumerate(spec.shape) if isinstance(d, str)} for spec in sig.inputs]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    module,
                    args,
                    dynamo=True,
                    input_names=sig.input_names,
                    output_names=sig.output_names,
                    dynamic_shapes=tuple(shapes),
                    opset_version=max(opset, DEFAULT_OPSET),
                    verbose=False,
                )
            program.save(str(path), external_data=_needs_external(module))
            return "dynamo"
        except Exception as exc:  # the dynamo exporter raises many types; fall back and say why
            reason = f"the dynamo exporter failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            log.warning("ONNX export: %s; using the legacy exporter", reason)
            for f in path.parent.glob(path.name + "*"):
                f.unlink()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                input_names=sig.input_names,
                output_names=sig.output_names,
                dynamic_axes=axes,
                opset_version=min(opset, 17),
                do_constant_folding=True,
            )
    except Exception as exc:
        raise ExportError(f"ONNX export failed with both exporters: {reason}; legacy: {type(exc).__name__}: {exc}") from exc
    return f"legacy ({reason})"


def _needs_external(module: Any) -> bool:
    n = sum(p.numel() * p.element_size() for p in module.parameters())
    return n > 1_900_000_000  # protobuf's 2 GB limit


def _onnx_callable(path: Path, threads: int = 1):
    ort = require("onnxruntime", "onnx")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    outs = [o.name for o in sess.get_outputs()]
    return lambda batch: dict(zip(outs, sess.run(outs, {n: batch[n] for n in names}), strict=True))


def export_onnx(
    source: Artifact,
    output: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    dynamo: bool = True,
    attn_implementation: str | None = None,
    overwrite: bool = False,
) -> Artifact:
    """Export ``source`` (HF folder or torch module) to an ONNX artifact folder at ``output``."""
    from modelpress.runtimes.torch import TorchRunner, load_torch_module
    from modelpress.tasks import task_for

    if source.format == "onnx":
        raise ExportError(f"'{source.name}' is already ONNX.", hint="Use it directly, or export it to OpenVINO with --format openvino.")
    import torch

    module, sig = load_torch_module(source, attn_implementation=attn_implementation)
    task = task_for(source)
    batches = parity_batches(task, find_data_dir())
    args = tuple(torch.from_numpy(batches[0][n]) for n in sig.input_names)
    reference = TorchRunner(source, attn_implementation=attn_implementation)
    reference.module, reference.signature, reference._call, reference._loaded = module, sig, module, True

    def fill(tmp: Path) -> dict[str, Any]:
        with torch.inference_mode():
            how = torch_to_onnx(module, args, tmp / "model.onnx", sig, opset=opset, dynamo=dynamo)
        if task.tokenizer is not None:
            task.tokenizer.save_pretrained(str(tmp))
        report = check_parity(reference.run, _onnx_callable(tmp / "model.onnx"), batches)
        return {"metrics": {"parity_max_abs_diff": report}, "step": {"export": "onnx", "exporter": how, "opset": opset}}

    cfg = {k: v for k, v in source.manifest.task_config.items() if k != "tokenizer"}
    manifest = Manifest(
        name=source.name,
        task=source.task,
        format="onnx",
        model_file="model.onnx",
        signature=sig,
        task_config=cfg,
        parent=source.content_hash(),
    )
    return Artifact.write(output, manifest, fill, overwrite=overwrite)
