"""ONNX Runtime runner. A source model (HF folder, torch module) is exported once into a cache."""

from __future__ import annotations

import numpy as np

from modelpress.errors import require
from modelpress.runtimes.base import Runner, register_runtime


def exported(artifact, fmt: str):
    """The artifact in ``fmt`` (onnx, openvino): itself, or an export cached by content hash."""
    if artifact.format == fmt or (fmt == "openvino" and artifact.format == "onnx"):
        return artifact
    from modelpress.artifacts import Artifact
    from modelpress.locations import cache_dir

    target = cache_dir("exports") / f"{artifact.content_hash()[:20]}-{fmt}"
    if target.is_dir():
        try:
            return Artifact.open(target)
        except Exception:  # a damaged cache entry is rebuilt below
            pass
    if fmt == "onnx":
        from modelpress.export.onnx import export_onnx

        return export_onnx(artifact, target, overwrite=True)
    from modelpress.export.openvino import export_openvino

    return export_openvino(artifact, target, overwrite=True)


@register_runtime
class OnnxRuntimeRunner(Runner):
    """Options: ``providers`` (list, default CPU), ``optimization`` ("all", "basic", "none")."""

    name = "onnxruntime"

    def _load(self) -> None:
        ort = require("onnxruntime", "onnx")
        art = self.loaded_artifact = exported(self.artifact, "onnx")
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        level = self.options.get("optimization", "all")
        so.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[level]
        providers = self.options.get("providers") or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(art.model_file), so, providers=providers)
        self.signature = self.signature or art.manifest.signature
        self._inputs = [i.name for i in self.session.get_inputs()]
        self._outputs = [o.name for o in self.session.get_outputs()]

    def _run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        res = self.session.run(self._outputs, {n: batch[n] for n in self._inputs})
        return dict(zip(self._outputs, res, strict=True))
