"""ExecuTorch runner: a ``.pte`` program (XNNPACK delegate) run by ``executorch.runtime`` in this process.

``modelpress.export`` lowers the program (:mod:`modelpress.export.executorch`) and registers the
converter of the ``executorch`` format, so ``create_runner(art, "executorch")`` runs the cached
program of a Hugging Face folder or a torch module. ExecuTorch plans memory for the largest shape
the program was exported for: a batch larger than the exported maximum is run in pieces of that
size (a longer sequence is refused). One loaded method is not safe to call from two threads at
once, so calls take a lock. XNNPACK sizes its own thread pool (``threads`` is not passed to it).
Needs ``pip install 'modelpress[executorch]'``.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

from modelpress.errors import ArtifactError, require
from modelpress.runtimes._torch_program import TorchProgramRunner
from modelpress.runtimes.base import register_runtime

EXPERIMENTAL_API = "This API is experimental and subject to change"
# exir reads its dialect tables and flatbuffer schema with importlib.resources' legacy functions
# (read_text, open_text, read_binary: deprecated), when imported and when it serializes.
RESOURCES_DEPRECATED = r"(read|open)_(text|binary) is deprecated"


@register_runtime
class ExecuTorchRunner(TorchProgramRunner):
    """Runs an ExecuTorch ``.pte`` program (format ``executorch``); other formats are lowered first. No options."""

    name = "executorch"
    formats = ("executorch",)
    target_format = "executorch"
    splits_batch = True
    parallel_calls = False  # calls take a lock

    def _open(self, artifact: Any) -> Any:
        with warnings.catch_warnings():
            # executorch.runtime announces itself as experimental (ExperimentalWarning) when imported
            warnings.filterwarnings("ignore", message=EXPERIMENTAL_API)
            warnings.filterwarnings("ignore", message=RESOURCES_DEPRECATED, category=DeprecationWarning)
            runtime = require("executorch.runtime", "executorch").Runtime.get()

        try:
            self._program = runtime.load_program(str(artifact.model_file))
            method = self._program.load_method("forward")
        except (RuntimeError, ValueError, OSError) as exc:
            raise ArtifactError(
                f"'{artifact.model_file}' is not an ExecuTorch program this runtime can load: {str(exc).splitlines()[0][:300]}",
                hint="Export it again: modelpress export MODEL --format executorch -o DIR --force",
            ) from exc
        self._lock = threading.Lock()
        return method

    def _call(self, args: list[Any]) -> Any:
        import torch

        step = self._ranges.get("batch", (1, None))[1] or len(args[0])
        pieces = []
        with self._lock:
            for start in range(0, len(args[0]), step):
                pieces.append(self.program.execute([a[start : start + step] for a in args]))
        if len(pieces) == 1:
            return tuple(pieces[0])
        return tuple(torch.cat(parts) for parts in zip(*pieces, strict=True))

    def close(self) -> None:
        self._program = None
        super().close()
