"""Every technique's handlers, loaded: importing this module imports each backend module once.

The registry itself is :mod:`modelpress.optimize.handlers` (which imports no backend); each
backend registers its handlers there on import. Callers that apply a technique use
:func:`handler_for` / :func:`apply_technique` from here, so the registry is always full.
Heavy libraries (torch, ONNX Runtime, OpenVINO, NNCF) are imported inside the handlers, not here.
"""

from __future__ import annotations

# Each import registers that backend's handlers (distill; SparseGPT and Wanda; magnitude and N:M;
# structured; ONNX Runtime, OpenVINO and torch quantization; quantization-aware training).
import modelpress.optimize.distill.distill
import modelpress.optimize.prune.llm
import modelpress.optimize.prune.magnitude
import modelpress.optimize.prune.structured
import modelpress.optimize.quantize.llm
import modelpress.optimize.quantize.onnxruntime
import modelpress.optimize.quantize.openvino
import modelpress.optimize.quantize.qat
import modelpress.optimize.quantize.torch  # noqa: F401
from modelpress.optimize.configs import TechniqueConfig
from modelpress.optimize.handlers import HANDLERS, Handler, StepContext, apply_technique, register_handler
from modelpress.optimize.handlers import handler_for as _lookup


def handler_for(config: TechniqueConfig) -> Handler:
    """The handler of ``config`` (every backend is loaded); raises UnknownTechniqueError when none fits."""
    return _lookup(config)


__all__ = ["HANDLERS", "StepContext", "apply_technique", "handler_for", "register_handler"]
