"""Exporters: every export is checked for numerical parity with its source."""

from __future__ import annotations

import os

from modelpress.artifacts import Artifact
from modelpress.errors import ConfigError

FORMATS = ("onnx", "openvino")


def export(source: Artifact, fmt: str, output: str | os.PathLike, *, overwrite: bool = False, **options) -> Artifact:
    """Export ``source`` to ``fmt`` (onnx, openvino) in the folder ``output``."""
    if fmt == "onnx":
        from modelpress.export.onnx import export_onnx

        return export_onnx(source, output, overwrite=overwrite, **options)
    if fmt == "openvino":
        from modelpress.export.openvino import export_openvino

        return export_openvino(source, output, overwrite=overwrite, **options)
    raise ConfigError(f"Unknown export format '{fmt}'.", hint=f"Use one of {', '.join(FORMATS)}, e.g. --format onnx")
