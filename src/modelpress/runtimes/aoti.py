"""AOTInductor runner: a ``.pt2`` package that ``torch._inductor`` compiled ahead of time.

``modelpress.export`` makes the package (``torch.export`` with dynamic batch and sequence axes,
then ``torch._inductor.aoti_compile_and_package``) and registers the converter of the ``aoti``
format, so ``create_runner(hf_or_torch_artifact, "aoti")`` runs the model's cached package
(compiled once per content hash; MiniLM takes 12 s on an idle 2-core machine, about a minute
under load). The runner loads it with ``torch._inductor.aoti_load_package``: no Python model
code runs, only the compiled kernels.

What a package is tied to:

* **the CPU's vector instructions.** Inductor compiles its kernels for the best vector ISA of
  the machine that compiled them (``avx512_vnni`` here). A package compiled for AVX-512 stops a
  process with an illegal instruction on a machine without it, so the runner compares the ISA
  the export recorded (``manifest.step["vec_isa"]``) with the ISAs of this machine and refuses
  with a clear error instead. Export on (a machine like) the one that serves.
* **native code.** The package holds a compiled shared library: loading it runs its code, like
  importing a Python package. Load only packages you built (the export cache builds its own);
  the runner refuses a package whose files no longer match the hashes its manifest recorded.
"""

from __future__ import annotations

from typing import Any

from modelpress.errors import ArtifactError, BackendUnavailableError
from modelpress.runtimes._torch_program import TorchProgramRunner
from modelpress.runtimes.base import register_runtime


def machine_vec_isas() -> list[str]:
    """The vector ISAs inductor can compile for on this machine, best first (e.g. ``["avx512 avx512_vnni", "avx512", "avx2"]``)."""
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    return [str(isa) for isa in valid_vec_isa_list()]


def machine_vec_isa() -> str:
    """The vector ISA inductor compiles for on this machine ("" when it has none it uses)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return str(pick_vec_isa())


@register_runtime
class AOTIRunner(TorchProgramRunner):
    """Runs an AOTInductor ``.pt2`` package (format ``aoti``); other formats are exported first. No options."""

    name = "aoti"
    formats = ("aoti",)
    target_format = "aoti"

    def _open(self, artifact: Any) -> Any:
        import torch

        step = artifact.manifest.step or {}
        isa = step.get("vec_isa")
        if isa and isa not in machine_vec_isas():
            raise BackendUnavailableError(
                f"'{artifact.name}' was compiled for the {isa} vector instructions, which this machine lacks "
                f"({', '.join(machine_vec_isas()) or 'none'}); its kernels would stop the process with an illegal instruction.",
                hint="Export it on this machine (modelpress export MODEL --format aoti -o DIR), or serve the ONNX export instead.",
            )
        bad = artifact.verify() if artifact.manifest.files else []
        if bad:
            raise ArtifactError(
                f"Refusing to load '{artifact.path}': {', '.join(bad[:3])} no longer match the hashes its manifest recorded "
                "(a .pt2 package holds native code that runs when it is loaded).",
                hint="Export it again: modelpress export MODEL --format aoti -o DIR --force",
            )
        try:
            return torch._inductor.aoti_load_package(str(artifact.model_file))
        except (RuntimeError, OSError) as exc:
            raise ArtifactError(
                f"torch {torch.__version__} could not load the AOTInductor package '{artifact.model_file}' "
                f"(compiled with torch {step.get('torch', 'unknown')}): {str(exc).splitlines()[0][:300]}",
                hint="Export it again with this torch: modelpress export MODEL --format aoti -o DIR --force",
            ) from exc
