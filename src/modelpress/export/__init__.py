"""Exporters: every export is checked for numerical parity with its source, on the runner that serves it.

Importing this package registers the export cache (:mod:`.cache`) as the runtimes' converter for
every format, so ``create_runner(hf_or_torch_artifact, "onnxruntime")`` runs the model's cached
ONNX export, and ``"aoti"`` / ``"torchscript"`` its cached AOTInductor package or TorchScript trace.

Formats (``FORMATS``, the names ``modelpress export --format`` takes):

* ``onnx``: :mod:`.onnx` (served by ``onnxruntime``); ``openvino``: :mod:`.openvino` (IR);
* ``aoti``: ``torch.export`` + AOTInductor ``.pt2`` (:mod:`.torch_export`, runtime ``aoti``);
* ``torchscript``: ``torch.jit.trace`` ``.pt`` (:mod:`.torchscript`, runtime ``torchscript``);
* ``executorch``: ``.pte`` lowered to XNNPACK (:mod:`.executorch`, runtime ``executorch``; the
  ``executorch`` extra).

TFLite / LiteRT is not a format here: docs/export.md says why.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from modelpress.artifacts import Artifact
from modelpress.errors import ConfigError
from modelpress.export.executorch import as_executorch, export_executorch
from modelpress.export.onnx import as_onnx, export_onnx
from modelpress.export.onnx_compressed import export_compressed, is_compressed_decoder
from modelpress.export.openvino import as_openvino, export_openvino
from modelpress.export.torch_export import as_aoti, export_aoti
from modelpress.export.torchscript import as_torchscript, export_torchscript
from modelpress.runtimes.base import register_converter

# format -> (export to a folder, the artifact in that format through the cache)
_EXPORTERS: dict[str, tuple[Callable[..., Artifact], Callable[[Artifact], Artifact]]] = {
    "onnx": (export_onnx, as_onnx),
    "openvino": (export_openvino, as_openvino),
    "aoti": (export_aoti, as_aoti),
    "torchscript": (export_torchscript, as_torchscript),
    "executorch": (export_executorch, as_executorch),
}
FORMATS: tuple[str, ...] = tuple(_EXPORTERS)

for _fmt, (_export, _as) in _EXPORTERS.items():
    register_converter(_fmt, _as)

__all__ = ["FORMATS", "as_aoti", "as_executorch", "as_onnx", "as_openvino", "as_torchscript", "export", "exported"]


def _unknown(fmt: object, example: str) -> ConfigError:
    return ConfigError(f"Unknown export format '{fmt}'.", hint=f"Use one of {', '.join(FORMATS)}, e.g. {example}")


def exported(artifact: Artifact, fmt: str) -> Artifact:
    """The artifact in ``fmt`` (one of ``FORMATS``): itself, or an export cached by content hash (:mod:`.cache`)."""
    if fmt not in _EXPORTERS:
        raise _unknown(fmt, "exported(art, 'onnx')")
    return _EXPORTERS[fmt][1](artifact)


def export(source: Artifact, fmt: str, output: str | os.PathLike, *, overwrite: bool = False, **options) -> Artifact:
    """Export ``source`` to ``fmt`` (one of ``FORMATS``) in the folder ``output``, checked for parity on its runner."""
    if fmt not in _EXPORTERS:
        raise _unknown(fmt, "--format onnx")
    if fmt == "onnx" and is_compressed_decoder(source):  # an LLM technique's decoder folder: its codes as MatMulNBits
        return export_compressed(source, output, overwrite=overwrite, **options)
    return _EXPORTERS[fmt][0](source, output, overwrite=overwrite, **options)
