"""``torch.export`` + AOTInductor: a ``.pt2`` package of ahead-of-time compiled kernels (format ``aoti``).

The model is captured with ``torch.export.export`` (batch and sequence axes dynamic: one named
``torch.export.Dim`` per axis name of the signature, the sequence bounded by the model's
``max_position_embeddings``), compiled by ``torch._inductor.aoti_compile_and_package``, and
checked for parity on the runner that will serve it (:class:`~modelpress.runtimes.aoti.AOTIRunner`,
which loads it with ``aoti_load_package``) against the source on the PyTorch runner, on two
batches of different shapes, before the folder is renamed into place.

:func:`export_torch_program` is the path every format made from a PyTorch module takes
(``aoti`` here, ``torchscript``, ``tflite``): load the module, write the file into the temporary
folder, check it on its runner, rename.

Compiling MiniLM takes 12 s on an idle 2-core machine (about a minute under load), so
:func:`as_aoti` caches the package per content hash, CPU vector ISA and torch version
(:mod:`.cache`): a package is native code for one ISA and one torch.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.artifacts import Artifact, Signature, inside
from modelpress.errors import ExportError, UnsupportedModelError
from modelpress.export.cache import cached
from modelpress.export.onnx import check_served, export_manifest
from modelpress.export.parity import parity_batches
from modelpress.locations import find_data_dir
from modelpress.runtimes.torch import TorchRunner, load_torch_module
from modelpress.tasks import task_for

# Writes the program for ``module`` at ``path`` from real sample ``batches``; returns what the
# manifest's ``step`` records about it (and ``dynamic_axes``, which the runner enforces).
Writer = Callable[[Any, Signature, list[dict[str, np.ndarray]], Path], dict[str, Any]]

# Inductor copies the exported graph with copy.deepcopy, whose pytree specs still go through the
# LeafSpec class that torch 2.13 deprecates (a FutureWarning from inside torch, nothing we call).
LEAFSPEC_DEPRECATED = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def export_torch_program(
    source: Artifact,
    output: str | os.PathLike,
    *,
    fmt: str,
    model_file: str,
    runtime: str,
    write: Writer,
    overwrite: bool = False,
    attn_implementation: str | None = None,
) -> Artifact:
    """Export ``source`` (a Hugging Face folder or a torch module) with ``write`` to ``output``, checked on ``runtime``."""
    if source.format not in ("hf", "torch"):
        raise ExportError(
            f"'{source.name}' is a {source.format} artifact; the {fmt} export starts from the PyTorch model.",
            hint=f"Export the Hugging Face folder or torch module it was made from: modelpress export MODEL --format {fmt} -o DIR",
        )
    module, sig = load_torch_module(source, attn_implementation=attn_implementation)
    task = task_for(source)
    batches = parity_batches(task, find_data_dir())
    reference = TorchRunner.on_module(source, module, sig)
    manifest = export_manifest(source, fmt, model_file, sig)

    def fill(tmp: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        details = write(module, sig, batches, tmp / model_file)
        # The runner reads the recorded axis ranges while it checks parity, so they go in first.
        manifest.step = {"export": fmt, **details, "export_s": round(time.perf_counter() - t0, 1)}
        report = check_served(reference, manifest, tmp, task, batches, runtime)
        return {"metrics": {"parity_max_abs_diff": report}, "step": manifest.step}

    return Artifact.write(output, manifest, fill, overwrite=overwrite)


def max_positions(module: Any) -> int | None:
    """The longest sequence the module's (Hugging Face) config allows, if it says."""
    for sub in module.modules():
        n = getattr(getattr(sub, "config", None), "max_position_embeddings", None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def axis_ranges(module: Any, sig: Signature) -> dict[str, list[int | None]]:
    """``[min, max]`` of each named axis of the signature's inputs (max None: unbounded)."""
    ranges: dict[str, list[int | None]] = {}
    for spec in sig.inputs:
        for dim in spec.shape:
            if isinstance(dim, str):
                ranges.setdefault(dim, [1, None])
    if "sequence" in ranges:
        ranges["sequence"][1] = max_positions(module)
    return ranges


def export_program(module: Any, sig: Signature, example: dict[str, np.ndarray], ranges: dict[str, list[int | None]]) -> Any:
    """``torch.export.export`` of ``module`` on ``example`` with one named dynamic ``Dim`` per axis name."""
    import torch

    dims = {
        name: torch.export.Dim(name, min=lo or 1, max=hi) if hi else torch.export.Dim(name, min=lo or 1)
        for name, (lo, hi) in ranges.items()
    }
    shapes = tuple({i: dims[d] for i, d in enumerate(spec.shape) if isinstance(d, str)} for spec in sig.inputs)
    args = tuple(torch.from_numpy(example[n]) for n in sig.input_names)
    try:
        return torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # torch.export raises many types (UserError, guard and data-dependent errors)
        raise ExportError(
            f"torch.export could not capture '{type(module).__name__}' with dynamic {', '.join(ranges)}: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}",
            hint="Export to ONNX (--format onnx) or TorchScript (--format torchscript) instead, or report the model.",
        ) from exc


def vec_isa() -> str:
    from modelpress.runtimes.aoti import machine_vec_isa

    return machine_vec_isa()


def write_aoti(module: Any, sig: Signature, batches: list[dict[str, np.ndarray]], path: Path) -> dict[str, Any]:
    """Capture, compile and package ``module`` at ``path`` (``.pt2``)."""
    import torch

    ranges = axis_ranges(module, sig)
    program = export_program(module, sig, batches[0], ranges)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=LEAFSPEC_DEPRECATED, category=FutureWarning)
            torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    except Exception as exc:  # inductor's lowering and the C++ compiler raise many types
        raise ExportError(
            f"AOTInductor could not compile '{type(module).__name__}': {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}",
            hint="A C++ compiler (g++) is needed; or export to ONNX (--format onnx) instead.",
        ) from exc
    return {"dynamic_axes": ranges, "vec_isa": vec_isa(), "torch": torch.__version__}


def export_aoti(
    source: Artifact, output: str | os.PathLike, *, overwrite: bool = False, attn_implementation: str | None = None
) -> Artifact:
    """Export ``source`` (HF folder or torch module) to an AOTInductor package folder at ``output`` (``model.pt2``).

    The package is compiled once per content hash, ISA and torch (:func:`as_aoti`); ``output``
    gets a copy of the checked cache entry (its files hashed again as they are written, and
    compared with the entry's). ``attn_implementation`` compiles a package of its own.
    """
    if attn_implementation is None and source.format in ("hf", "torch"):
        return copy_entry(as_aoti(source), output, overwrite=overwrite)
    return compile_aoti(source, output, overwrite=overwrite, attn_implementation=attn_implementation)


def copy_entry(entry: Artifact, output: str | os.PathLike, *, overwrite: bool = False) -> Artifact:
    """A copy of the checked export ``entry`` at ``output``, written like every artifact (temporary folder, rename)."""
    if entry.path is None:
        raise ExportError(
            f"The cached export of '{entry.name}' has no folder.", hint="Clear $MODELPRESS_HOME/cache/exports and export again."
        )
    folder = entry.path

    def fill(tmp: Path) -> None:
        for rel in entry.manifest.files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(inside(folder, rel), tmp / rel)

    manifest = entry.manifest.model_copy(deep=True, update={"files": {}, "content_hash": None, "created_at": None})
    art = Artifact.write(output, manifest, fill, overwrite=overwrite)
    if art.manifest.files != entry.manifest.files:  # a cache entry changed while it was copied
        raise ExportError(
            f"The copy of the cached export {folder} does not match it.", hint="Clear $MODELPRESS_HOME/cache/exports and export again."
        )
    return art


def compile_aoti(
    source: Artifact, output: str | os.PathLike, *, overwrite: bool = False, attn_implementation: str | None = None
) -> Artifact:
    """Capture, compile and check ``source`` as an AOTInductor package folder at ``output``."""
    return export_torch_program(
        source,
        output,
        fmt="aoti",
        model_file="model.pt2",
        runtime="aoti",
        write=write_aoti,
        overwrite=overwrite,
        attn_implementation=attn_implementation,
    )


def aoti_cache_kind() -> str:
    """The cache entry's kind: a package is native code for one vector ISA and one torch version."""
    import torch

    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"aoti-{vec_isa()}-torch{torch.__version__}")


def as_aoti(artifact: Artifact) -> Artifact:
    """``artifact`` as an AOTInductor package: itself, or its package from the cache (compiled on first use)."""
    if artifact.format == "aoti":
        return artifact
    if artifact.format not in ("hf", "torch"):
        raise UnsupportedModelError(
            f"The aoti runtime compiles PyTorch models; '{artifact.name}' is a {artifact.format} artifact.",
            hint="Run it on its own runtime (e.g. --runtime onnxruntime), or compile the original model: -r aoti on the HF folder.",
        )
    return cached(artifact, aoti_cache_kind(), lambda target: compile_aoti(artifact, target, overwrite=True))
