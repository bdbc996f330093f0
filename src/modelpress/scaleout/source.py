"""What the KServe and Triton writers share: the model a reference names, resolved exactly as the server resolves it.

A source is a registry reference (``NAME@production``, ``NAME:3``), a folder, or a short name
(``minilm``); its served name and version label are the ones ``modelpress serve`` gives it, so a
client sees the same model name and versions on our server, on KServe and on Triton.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelpress.errors import ConfigError, ExportError, ModelpressError
from modelpress.serving.config import ModelConfig, validated

# The runtimes whose model files other engines can load: onnxruntime (ONNX) and openvino (IR)
EXPORT_FORMAT = {"onnxruntime": "onnx", "openvino": "openvino"}


@dataclass(frozen=True)
class Resolved:
    """One model version: the served name and version label, the artifact, and its registry ref (or None)."""

    name: str
    version: str
    artifact: Any
    registry_ref: str | None
    task: str


def resolve(source: str, *, name: str | None = None, task: str | None = None, registry: str | None = None) -> Resolved:
    """``source`` (a registry ref, folder or short name) as the server would load it (same name, same version label)."""
    from modelpress.registry.names import validate_name
    from modelpress.serving.repository import resolve_source

    cfg = validated(ModelConfig, {"source": source, "name": name, "task": task}, f"the source '{source}'", what="model source")
    artifact, default_name, version, ref = resolve_source(cfg, registry)
    return Resolved(validate_name(name or default_name), version, artifact, ref, artifact.task)


def exported_form(resolved: Resolved, runtime: str) -> Any:
    """The artifact in the format ``runtime`` loads (ONNX or OpenVINO IR): itself, or its export (cached, parity-checked)."""
    if runtime not in EXPORT_FORMAT:
        raise ConfigError(
            f"'{runtime}' is not a runtime other engines can load.", hint="Use onnxruntime or openvino, e.g. --runtime onnxruntime"
        )
    from modelpress.export import exported

    try:
        return exported(resolved.artifact, EXPORT_FORMAT[runtime])
    except ExportError as exc:
        raise ExportError(
            f"'{resolved.name}' ({resolved.registry_ref or resolved.artifact.path}) has no {EXPORT_FORMAT[runtime]} form: {exc.message}",
            hint=exc.hint or "Export formats other engines load are ONNX and OpenVINO IR; serve this model with modelpress serve instead.",
        ) from None
    except ModelpressError:
        raise
    except Exception as exc:  # noqa: BLE001 - an exporter fails in many ways on a model it cannot trace; say which model and why
        raise ExportError(
            f"'{resolved.name}' could not be exported to {EXPORT_FORMAT[runtime]}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
            hint="Export formats other engines load are ONNX and OpenVINO IR; serve this model with modelpress serve instead.",
        ) from None


def copy_model_files(artifact: Any, folder: Path) -> list[str]:
    """Copy the artifact's folder (model files, tokenizer, manifest) into ``folder``; the relative paths copied."""
    src = Path(artifact.path)
    if not src.is_dir():
        raise ExportError(
            f"'{artifact.name}' is a model in memory, not a folder, so its files cannot be copied.",
            hint="Save it first (modelpress export NAME --format onnx -o DIR) and pass the folder.",
        )
    copied = []
    for path in sorted(src.rglob("*")):
        if path.is_file() and not path.is_symlink():
            rel = path.relative_to(src)
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, folder / rel)
            copied.append(rel.as_posix())
    return copied


def check_output(output: str | os.PathLike, overwrite: bool, example: str) -> Path:
    """``output`` as a path; a :class:`ConfigError` when it exists and may not be replaced."""
    path = Path(output).expanduser()
    if path.exists() and not overwrite:
        raise ConfigError(f"'{path}' already exists.", hint=f"Pass overwrite=True (--force) to replace it, e.g. {example} --force")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"'{path}' is a file, not a folder.", hint=f"Name a folder, e.g. {example}")
    return path
