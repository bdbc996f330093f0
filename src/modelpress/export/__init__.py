"""Exporters: every export is checked for numerical parity with its source, on the runner that serves it.

Importing this package registers the export cache (:mod:`.cache`) as the runtimes' converter, so
``create_runner(hf_or_torch_artifact, "onnxruntime")`` runs the model's cached ONNX export.
"""

from __future__ import annotations

import os

from modelpress.artifacts import Artifact
from modelpress.errors import ConfigError
from modelpress.export.onnx import as_onnx, export_onnx
from modelpress.export.openvino import as_openvino, export_openvino
from modelpress.runtimes.base import register_converter

FORMATS = ("onnx", "openvino")

register_converter("onnx", as_onnx)
register_converter("openvino", as_openvino)

__all__ = ["FORMATS", "as_onnx", "as_openvino", "export", "exported"]


def exported(artifact: Artifact, fmt: str) -> Artifact:
    """The artifact in ``fmt`` (onnx, openvino): itself, or an export cached by content hash (:mod:`.cache`)."""
    if fmt == "onnx":
        return as_onnx(artifact)
    if fmt == "openvino":
        return as_openvino(artifact)
    raise ConfigError(f"Unknown export format '{fmt}'.", hint=f"Use one of {', '.join(FORMATS)}, e.g. exported(art, 'onnx')")


def export(source: Artifact, fmt: str, output: str | os.PathLike, *, overwrite: bool = False, **options) -> Artifact:
    """Export ``source`` to ``fmt`` (onnx, openvino) in the folder ``output``."""
    if fmt == "onnx":
        return export_onnx(source, output, overwrite=overwrite, **options)
    if fmt == "openvino":
        return export_openvino(source, output, overwrite=overwrite, **options)
    raise ConfigError(f"Unknown export format '{fmt}'.", hint=f"Use one of {', '.join(FORMATS)}, e.g. --format onnx")
