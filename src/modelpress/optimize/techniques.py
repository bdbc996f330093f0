"""Every technique's handlers, loaded: importing this module imports each backend module once.

The registry itself is :mod:`modelpress.optimize.handlers` (which imports no backend); each
backend registers its handlers there on import. Callers that apply a technique use
:func:`handler_for` / :func:`apply_technique` from here, so the registry is always full.
Heavy libraries (torch, ONNX Runtime, OpenVINO, NNCF) are imported inside the handlers, not here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Each import registers that backend's handlers (distill; SparseGPT and Wanda; magnitude and N:M;
# structured; ONNX Runtime, OpenVINO and torch quantization).
import modelpress.optimize.distill.distill
import modelpress.optimize.prune.llm
import modelpress.optimize.prune.magnitude
import modelpress.optimize.prune.structured
import modelpress.optimize.quantize.onnxruntime
import modelpress.optimize.quantize.openvino
import modelpress.optimize.quantize.torch  # noqa: F401
from modelpress.artifacts import Artifact
from modelpress.optimize.configs import TechniqueConfig, parse_step
from modelpress.optimize.handlers import HANDLERS, Handler, ProgressFactory, StepContext, apply_with, register_handler
from modelpress.optimize.handlers import handler_for as _lookup


def handler_for(config: TechniqueConfig) -> Handler:
    """The handler of ``config`` (every backend is loaded); raises UnknownTechniqueError when none fits."""
    return _lookup(config)


def apply_technique(
    model: Any,
    config: TechniqueConfig | dict[str, Any],
    output: str | Path,
    *,
    task: str | None = None,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
    threads: int | None = None,
    progress: ProgressFactory | None = None,
) -> Artifact:
    """Apply one technique to ``model`` and write the new artifact to ``output`` (no evaluation, no gate)."""
    cfg = parse_step(config)
    return apply_with(
        handler_for(cfg), model, cfg, output, task=task, data_dir=data_dir, overwrite=overwrite, threads=threads, progress=progress
    )


__all__ = ["HANDLERS", "StepContext", "apply_technique", "handler_for", "register_handler"]
