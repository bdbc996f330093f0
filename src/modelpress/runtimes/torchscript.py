"""TorchScript runner: a traced ``.pt`` module, for users whose serving stack still needs TorchScript.

``modelpress.export`` makes it (``torch.jit.trace`` on real inputs, not frozen)
and registers the converter of the ``torchscript`` format, so ``create_runner(art, "torchscript")``
runs the cached trace of a Hugging Face folder or a torch module. TorchScript is deprecated since
torch 2.13 (``torch.jit.load`` warns); the ``aoti`` runtime is its successor. ``torch.jit.load``
reads TorchScript code and tensors, not arbitrary pickled Python objects.
"""

from __future__ import annotations

import warnings
from typing import Any

from modelpress.errors import ArtifactError
from modelpress.runtimes._torch_program import TorchProgramRunner
from modelpress.runtimes.base import register_runtime

# torch 2.13 deprecates torch.jit.load; this runtime exists for the users who still need TorchScript.
JIT_LOAD_DEPRECATED = r"`torch\.jit\.load` is deprecated"


@register_runtime
class TorchScriptRunner(TorchProgramRunner):
    """Runs a TorchScript ``.pt`` file (format ``torchscript``); other formats are traced first. No options."""

    name = "torchscript"
    formats = ("torchscript",)
    target_format = "torchscript"

    def _open(self, artifact: Any) -> Any:
        import torch

        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=JIT_LOAD_DEPRECATED, category=DeprecationWarning)
                program = torch.jit.load(str(artifact.model_file), map_location="cpu")
        except (RuntimeError, OSError, ValueError) as exc:
            raise ArtifactError(
                f"'{artifact.model_file}' is not a TorchScript file torch {torch.__version__} can read: {str(exc).splitlines()[0][:300]}",
                hint="Export it again: modelpress export MODEL --format torchscript -o DIR --force",
            ) from exc
        return program.eval()
