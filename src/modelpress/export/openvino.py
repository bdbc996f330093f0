"""OpenVINO IR export (``model.xml`` + ``model.bin``), checked against its source in f32.

The source is converted through its ONNX export (cached), which keeps the input and output
names of the signature; ``openvino.convert_model`` reads the ONNX graph directly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from modelpress.artifacts import Artifact, Manifest
from modelpress.errors import require
from modelpress.locations import find_data_dir
from modelpress.export.parity import check_parity, parity_batches


def export_openvino(source: Artifact, output: str | os.PathLike, *, overwrite: bool = False) -> Artifact:
    """Export ``source`` (HF folder, torch module or ONNX artifact) to OpenVINO IR at ``output``."""
    ov = require("openvino", "openvino")
    from modelpress.runtimes import create_runner
    from modelpress.runtimes.onnxruntime import exported
    from modelpress.tasks import task_for

    onnx_art = exported(source, "onnx")
    task = task_for(onnx_art if onnx_art.path else source)
    batches = parity_batches(task, find_data_dir())
    reference = create_runner(source, "torch" if source.format in ("hf", "torch") else "onnxruntime", threads=1)

    def fill(tmp: Path) -> dict[str, Any]:
        model = ov.convert_model(str(onnx_art.model_file))
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        if task.tokenizer is not None:
            task.tokenizer.save_pretrained(str(tmp))
        core = ov.Core()
        compiled = core.compile_model(
            core.read_model(str(tmp / "model.xml")), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1}
        )
        outs = [p.get_any_name() for p in compiled.outputs]

        def run(batch):
            res = compiled({p.get_any_name(): batch[p.get_any_name()] for p in compiled.inputs})
            return {n: res[i] for i, n in enumerate(outs)}

        report = check_parity(reference.run, run, batches)
        return {"metrics": {"parity_max_abs_diff": report}, "step": {"export": "openvino", "via": "onnx", "precision_checked": "f32"}}

    cfg = {k: v for k, v in source.manifest.task_config.items() if k != "tokenizer"}
    manifest = Manifest(
        name=source.name,
        task=source.task,
        format="openvino",
        model_file="model.xml",
        signature=onnx_art.manifest.signature or source.manifest.signature,
        task_config=cfg,
        parent=source.content_hash(),
    )
    return Artifact.write(output, manifest, fill, overwrite=overwrite)
