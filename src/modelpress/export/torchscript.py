"""TorchScript export: ``torch.jit.trace`` on real inputs (format ``torchscript``, ``model.pt``).

For users whose serving stack still loads TorchScript (TorchServe handlers, LibTorch C++ apps).
TorchScript is deprecated since torch 2.13; new deployments should use the ``aoti`` format
(:mod:`.torch_export`). A trace records the operations one input took: Python control flow that
depends on shapes is frozen into it. Parity on two batches of different shapes, on the
TorchScript runner, is what shows the trace generalizes; a trace that does not is refused.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.artifacts import Artifact, Signature
from modelpress.errors import ExportError, UnsupportedModelError
from modelpress.export.cache import cached
from modelpress.export.torch_export import axis_ranges, export_torch_program

# torch 2.13 deprecates the torch.jit API (trace, trace_method); this format exists for
# the users who still need it.
JIT_DEPRECATED = r"`torch\.jit\.\w+` is deprecated"
# transformers reads the deprecated ``is_gradient_checkpointing`` property when the tracer walks
# the module's attributes (nothing modelpress calls).
GRADIENT_CHECKPOINTING_DEPRECATED = r"`is_gradient_checkpointing` is deprecated"


def write_torchscript(module: Any, sig: Signature, batches: list[dict[str, np.ndarray]], path: Path) -> dict[str, Any]:
    """Trace ``module`` on the first sample batch and save it at ``path``."""
    import torch

    args = tuple(torch.from_numpy(batches[0][n]) for n in sig.input_names)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=JIT_DEPRECATED, category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING_DEPRECATED, category=FutureWarning)
            # A TracerWarning says a Python value was frozen into the trace; whether that matters
            # is what the parity check on a second shape decides (a wrong trace fails it).
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            # Not torch.jit.freeze: it took 13 s on MiniLM under load and is deprecated too.
            with torch.inference_mode():
                traced = torch.jit.trace(module, args, check_trace=False)
            traced.save(str(path))
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ExportError(
            f"torch.jit.trace could not trace '{type(module).__name__}': {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}",
            hint="Export to the aoti or onnx format instead (--format aoti).",
        ) from exc
    return {"dynamic_axes": axis_ranges(module, sig), "torch": torch.__version__, "traced_on": list(args[0].shape)}


def export_torchscript(
    source: Artifact, output: str | os.PathLike, *, overwrite: bool = False, attn_implementation: str | None = None
) -> Artifact:
    """Export ``source`` (HF folder or torch module) to a TorchScript folder at ``output`` (``model.pt``)."""
    return export_torch_program(
        source,
        output,
        fmt="torchscript",
        model_file="model.pt",
        runtime="torchscript",
        write=write_torchscript,
        overwrite=overwrite,
        attn_implementation=attn_implementation,
    )


def as_torchscript(artifact: Artifact) -> Artifact:
    """``artifact`` as TorchScript: itself, or its trace from the cache (made on first use)."""
    if artifact.format == "torchscript":
        return artifact
    if artifact.format not in ("hf", "torch"):
        raise UnsupportedModelError(
            f"The torchscript runtime traces PyTorch models; '{artifact.name}' is a {artifact.format} artifact.",
            hint="Run it on its own runtime (e.g. --runtime onnxruntime), or trace the original model: -r torchscript on the HF folder.",
        )
    return cached(artifact, "torchscript", lambda target: export_torchscript(artifact, target, overwrite=True))
