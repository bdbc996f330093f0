"""ExecuTorch export: a ``.pte`` program lowered to the XNNPACK backend (format ``executorch``).

``torch.export`` captures the model with bounded dynamic axes (ExecuTorch plans its memory for
the largest shape ahead of time, so every dynamic axis needs a maximum: the batch up to
``max_batch``, default :data:`DEFAULT_MAX_BATCH`; the sequence up to ``max_sequence``, default the
model's ``max_position_embeddings``), ``executorch.exir.to_edge_transform_and_lower`` delegates
what XNNPACK runs, and the program is checked for parity on the ExecuTorch runner that will serve
it (``executorch.runtime``), on two batches of different shapes, before the folder is renamed
into place. The runner cuts a larger batch into pieces of ``max_batch`` rows.

Lowering is slow (MiniLM: minutes on 2 busy cores), so :func:`as_executorch` caches the program
per content hash. Needs ``pip install 'modelpress[executorch]'``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.artifacts import Artifact, Signature
from modelpress.errors import ConfigError, ExportError, UnsupportedModelError, require
from modelpress.export.cache import cached
from modelpress.export.torch_export import LEAFSPEC_DEPRECATED, axis_ranges, export_program, export_torch_program
from modelpress.runtimes.executorch import RESOURCES_DEPRECATED

DEFAULT_MAX_BATCH = 8  # memory is planned for the largest batch; the runner cuts larger batches into pieces of this size


def write_executorch(max_batch: int, max_sequence: int | None):
    """The writer of a ``.pte`` with the batch up to ``max_batch`` and the sequence up to ``max_sequence``."""

    def write(module: Any, sig: Signature, batches: list[dict[str, np.ndarray]], path: Path) -> dict[str, Any]:
        require("executorch", "executorch")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=RESOURCES_DEPRECATED, category=DeprecationWarning)
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.exir import to_edge_transform_and_lower

        ranges = axis_ranges(module, sig)
        if "batch" in ranges:
            ranges["batch"][1] = max_batch
        if "sequence" in ranges and max_sequence is not None:
            known = ranges["sequence"][1]
            ranges["sequence"][1] = min(max_sequence, known) if isinstance(known, int) else max_sequence
        unbounded = [name for name, (_, hi) in ranges.items() if hi is None]
        if unbounded:
            raise ConfigError(
                f"ExecuTorch plans memory for the largest input: the axes {', '.join(unbounded)} need a maximum.",
                hint="Pass max_sequence=, e.g. mp.export(model, 'executorch', DIR, max_sequence=256).",
            )
        program = export_program(module, sig, batches[0], ranges)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=LEAFSPEC_DEPRECATED, category=FutureWarning)
                warnings.filterwarnings("ignore", message=RESOURCES_DEPRECATED, category=DeprecationWarning)
                lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
        except Exception as exc:  # exir's passes and the XNNPACK partitioner raise many types
            raise ExportError(
                f"ExecuTorch could not lower '{type(module).__name__}': {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}",
                hint="Export to the aoti or onnx format instead (--format aoti).",
            ) from exc
        path.write_bytes(lowered.buffer)
        return {"dynamic_axes": ranges, "backend": "xnnpack", "executorch": _version()}

    return write


def _version() -> str:
    from importlib.metadata import version

    return version("executorch")


def export_executorch(
    source: Artifact,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_sequence: int | None = None,
    attn_implementation: str | None = None,
) -> Artifact:
    """Export ``source`` (HF folder or torch module) to an ExecuTorch folder at ``output`` (``model.pte``)."""
    for name, value in (("max_batch", max_batch), ("max_sequence", max_sequence)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}.", hint=f"Example: {name}=8")
    return export_torch_program(
        source,
        output,
        fmt="executorch",
        model_file="model.pte",
        runtime="executorch",
        write=write_executorch(max_batch, max_sequence),
        overwrite=overwrite,
        attn_implementation=attn_implementation,
    )


def as_executorch(artifact: Artifact) -> Artifact:
    """``artifact`` as an ExecuTorch program: itself, or its program from the cache (lowered on first use)."""
    if artifact.format == "executorch":
        return artifact
    if artifact.format not in ("hf", "torch"):
        raise UnsupportedModelError(
            f"The executorch runtime lowers PyTorch models; '{artifact.name}' is a {artifact.format} artifact.",
            hint="Run it on its own runtime (e.g. --runtime onnxruntime), or lower the original model: -r executorch on the HF folder.",
        )
    return cached(artifact, "executorch", lambda target: export_executorch(artifact, target, overwrite=True))
