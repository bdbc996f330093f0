"""ONNX export with the ``torch.onnx`` dynamo exporter (legacy TorchScript exporter as fallback).

Batch and sequence axes stay dynamic. The export is run next to its source on real sample
inputs of two shapes before the folder is renamed into place, on the runner that will serve it
(ONNX Runtime, with its serving options) against the source on the PyTorch runner; a mismatch
raises :class:`~modelpress.errors.ParityError` and nothing is written.

A causal LM (``kv_cache=True``, the default of the export verb) also gets ``decoder.onnx``, the
decoder with past keys and values for generation (:mod:`modelpress.export.onnx_decoder`), checked
on generated tokens before the rename; ``model.onnx`` stays the full-sequence graph the runners
score. The export cache (:func:`as_onnx`) writes ``model.onnx`` only.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from modelpress.artifacts import Artifact, Manifest, Signature
from modelpress.errors import ExportError
from modelpress.export import onnx_decoder
from modelpress.export.cache import cached
from modelpress.export.parity import check_parity, parity_batches
from modelpress.locations import find_data_dir
from modelpress.runtimes import create_runner
from modelpress.runtimes.torch import TorchRunner, load_torch_module
from modelpress.tasks import task_for

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
        except Exception as exc:  # noqa: BLE001 - the dynamo exporter raises many types; fall back and say why
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


def export_manifest(source: Artifact, fmt: str, model_file: str, signature: Signature | None) -> Manifest:
    """The manifest of ``source`` exported to ``fmt``: its name, task and task settings (the
    tokenizer travels as files, not as a setting), with ``source`` as the parent."""
    cfg = {k: v for k, v in source.manifest.task_config.items() if k != "tokenizer"}
    return Manifest(
        name=source.name,
        task=source.task,
        format=fmt,
        model_file=model_file,
        signature=signature,
        task_config=cfg,
        parent=source.content_hash(),
    )


def check_served(
    reference: Any, manifest: Manifest, folder: Path, task: Any, batches: list[Any], runtime: str, **options: Any
) -> dict[str, float]:
    """Save the tokenizer beside the exported file in ``folder``, then check parity against
    ``reference`` on the runner that will serve the folder (on ``runtime``, with ``options``)."""
    if task.tokenizer is not None:
        task.tokenizer.save_pretrained(str(folder))
    served = create_runner(Artifact(manifest.model_copy(deep=True), folder), runtime, threads=1, **options)
    try:
        return check_parity(reference.run, served.run, batches)
    finally:
        served.close()


def export_onnx(
    source: Artifact,
    output: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    dynamo: bool = True,
    attn_implementation: str | None = None,
    overwrite: bool = False,
    kv_cache: bool = True,
) -> Artifact:
    """Export ``source`` (HF folder or torch module) to an ONNX artifact folder at ``output``.

    ``kv_cache``: a Llama-style causal LM also gets ``decoder.onnx`` (past keys and values in and out).
    """
    if source.format == "onnx":
        raise ExportError(f"'{source.name}' is already ONNX.", hint="Use it directly, or export it to OpenVINO with --format openvino.")
    import torch

    module, sig = load_torch_module(source, attn_implementation=attn_implementation)
    task = task_for(source)
    batches = parity_batches(task, find_data_dir())
    args = tuple(torch.from_numpy(batches[0][n]) for n in sig.input_names)
    reference = TorchRunner.on_module(source, module, sig)
    manifest = export_manifest(source, "onnx", "model.onnx", sig)

    def fill(tmp: Path) -> dict[str, Any]:
        with torch.inference_mode():
            how = torch_to_onnx(module, args, tmp / "model.onnx", sig, opset=opset, dynamo=dynamo)
        report = check_served(reference, manifest, tmp, task, batches, "onnxruntime")
        out = {"metrics": {"parity_max_abs_diff": report}, "step": {"export": "onnx", "exporter": how, "opset": opset}}
        if kv_cache and task.name == "causal-lm":
            _add_decoder(getattr(module, "model", module), task, tmp, out, dynamo=dynamo, opset=opset)
        return out

    return Artifact.write(output, manifest, fill, overwrite=overwrite)


def _add_decoder(hf_model: Any, task: Any, folder: Path, out: dict[str, Any], *, dynamo: bool, opset: int) -> None:
    """Write the KV-cache decoder of a causal LM into ``folder``, checked on generated tokens (raises
    :class:`~modelpress.errors.ParityError` on a mismatch); record it in the manifest updates ``out``."""
    if not hasattr(hf_model, "config") or not onnx_decoder.supported(hf_model.config):
        kind = getattr(getattr(hf_model, "config", None), "model_type", type(hf_model).__name__)
        log.warning(
            "ONNX export: no KV-cache decoder for a '%s' model (only %s); model.onnx only", kind, ", ".join(onnx_decoder.SUPPORTED_TYPES)
        )
        out["step"]["kv_decoder"] = None
        return
    if task.tokenizer is not None:
        prompts = [task.encode(p) for p in onnx_decoder.PARITY_PROMPTS]
    else:  # a module without a tokenizer: any ids of its vocabulary prompt it
        prompts = [[1, 2, 3, 4], [5, 6]]
    report = onnx_decoder.write_checked(hf_model, folder, prompts, dynamo=dynamo, opset=opset)
    out["step"].update({"kv_decoder": onnx_decoder.DECODER_FILE, "kv_decoder_exporter": report.pop("exporter")})
    report.pop("reference_tokens")
    out["metrics"]["kv_decoder_parity"] = report


def as_onnx(artifact: Artifact) -> Artifact:
    """``artifact`` as ONNX: itself, or its export from the cache (made on first use; the runners' graph only)."""
    if artifact.format == "onnx":
        return artifact
    return cached(artifact, "onnx", lambda target: export_onnx(artifact, target, overwrite=True, kv_cache=False))
