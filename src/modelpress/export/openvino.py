"""OpenVINO IR export (``model.xml`` + ``model.bin``), checked against its source in f32.

The source is converted through its ONNX export (cached), which keeps the input and output
names of the signature; ``openvino.convert_model`` reads the ONNX graph directly. Parity is
checked on the OpenVINO runner that will serve the IR, in f32, against the source on its own
runner (PyTorch for a Hugging Face folder or a torch module, ONNX Runtime for an ONNX artifact).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from modelpress.artifacts import Artifact
from modelpress.errors import require
from modelpress.export.cache import cached
from modelpress.export.onnx import as_onnx, check_served, export_manifest
from modelpress.export.parity import parity_batches
from modelpress.locations import find_data_dir
from modelpress.runtimes import create_runner
from modelpress.tasks import task_for


def export_openvino(source: Artifact, output: str | os.PathLike, *, overwrite: bool = False) -> Artifact:
    """Export ``source`` (HF folder, torch module or ONNX artifact) to OpenVINO IR at ``output``."""
    ov = require("openvino", "openvino")
    onnx_art = as_onnx(source)
    task = task_for(onnx_art if onnx_art.path else source)
    batches = parity_batches(task, find_data_dir())
    reference = create_runner(source, "torch" if source.format in ("hf", "torch") else "onnxruntime", threads=1)
    manifest = export_manifest(source, "openvino", "model.xml", onnx_art.manifest.signature or source.manifest.signature)

    def fill(tmp: Path) -> dict[str, Any]:
        model = ov.convert_model(str(onnx_art.model_file))
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        # The runner that will serve it, in f32 (a stored bf16 hint is a choice of speed, not what parity checks).
        report = check_served(reference, manifest, tmp, task, batches, "openvino", precision="f32")
        return {"metrics": {"parity_max_abs_diff": report}, "step": {"export": "openvino", "via": "onnx", "precision_checked": "f32"}}

    try:
        return Artifact.write(output, manifest, fill, overwrite=overwrite)
    finally:
        reference.close()


def as_openvino(artifact: Artifact) -> Artifact:
    """``artifact`` as OpenVINO reads it: itself (IR or ONNX), or its IR export from the cache (made on first use)."""
    if artifact.format in ("openvino", "onnx"):
        return artifact
    return cached(artifact, "openvino", lambda target: export_openvino(artifact, target, overwrite=True))
