"""Artifacts: a model's files plus a ``modelpress.json`` manifest.

An artifact is a folder (or, for a module built in Python, an object in memory) together with
what modelpress knows about it: the task, the format, the input/output signature, the task's
settings (pooling, labels, ...), the artifact it was made from, the step that made it, metrics,
content hashes and tool versions. Folders are written to a temporary path beside the target,
fsynced and renamed, so a crash never leaves a half-written artifact.

A manifest read from a folder is data from whoever wrote the folder: every path it names
(``model_file``, the ``files`` it lists, ``task_config.tokenizer``, a runtime's ``calibration``
file) must stay inside the folder, symbolic links included (:func:`check_manifest_paths`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from modelpress._fs import atomic_folder
from modelpress.errors import ArtifactError

MANIFEST_NAME = "modelpress.json"
SCHEMA_VERSION = 1

Format = Literal["hf", "onnx", "openvino", "torch", "aoti", "torchscript", "executorch"]
Dim = int | str  # a fixed size, or the name of a dynamic axis


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    dtype: str  # numpy dtype name: float32, int64, ...
    shape: list[Dim]


class Signature(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION
    name: str
    task: str
    format: Format
    model_file: str | None = None  # the main file inside the folder (model.onnx, model.xml)
    signature: Signature | None = None
    task_config: dict[str, Any] = Field(default_factory=dict)
    parent: str | None = None  # content hash of the artifact this one was made from
    step: dict[str, Any] | None = None  # the recipe step (technique config) that made it
    metrics: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)  # relative path -> sha256
    content_hash: str | None = None
    created_at: str | None = None
    tool_versions: dict[str, str] = Field(default_factory=dict)


def safe_relpath(rel: str, what: str = "file path") -> PurePosixPath:
    """``rel`` as a relative path that stays inside its folder (no absolute path, no '..')."""
    if not isinstance(rel, str):
        raise ArtifactError(f"Refusing the {what} {rel!r}: it is not a string.", hint="Paths in a manifest are strings, e.g. 'model.onnx'.")
    path = PurePosixPath(rel)
    if not rel or "\\" in rel or "\0" in rel or path.is_absolute() or any(part in ("", ".", "..") for part in rel.split("/")):
        raise ArtifactError(
            f"Refusing the {what} '{rel}': it could point outside its artifact folder.",
            hint="File paths in a manifest are relative and stay inside the folder, e.g. 'onnx/model.onnx'.",
        )
    return path


def inside(folder: Path, rel: str, what: str = "file path") -> Path:
    """``folder / rel``, checked to stay inside ``folder`` also once symbolic links are followed."""
    path = Path(folder) / safe_relpath(rel, what)
    root = Path(folder).resolve()
    if path.exists() or path.is_symlink():
        real = path.resolve()
        if real != root and root not in real.parents:
            raise ArtifactError(
                f"Refusing the {what} '{rel}' of '{folder}': it is a symbolic link to '{real}', outside the folder.",
                hint="Replace the link with a copy of the file, inside the artifact folder.",
            )
    return path


def links_outside(folder: Path) -> list[str]:
    """Symbolic links under ``folder`` (files or folders) that point outside it (or nowhere), as relative paths."""
    root = Path(folder).resolve()
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):  # never descends into a linked folder
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                real = p.resolve()
                if (real != root and root not in real.parents) or not real.exists():
                    bad.append(p.relative_to(root).as_posix())
    return sorted(bad)


def check_manifest_paths(manifest: Manifest, folder: Path) -> None:
    """Every path ``manifest`` names stays inside ``folder`` (an :class:`ArtifactError` otherwise)."""
    if manifest.model_file is not None:
        inside(folder, manifest.model_file.rstrip("/") or manifest.model_file, "model_file")
    for rel in manifest.files:
        safe_relpath(rel, "path in 'files'")
    tok = manifest.task_config.get("tokenizer")
    if tok is not None:
        if isinstance(tok, str) and Path(tok).is_absolute():
            real = Path(tok).resolve()
            if real != Path(folder).resolve():
                raise ArtifactError(
                    f"Refusing task_config.tokenizer '{tok}' in the manifest of '{folder}': it points outside the artifact folder.",
                    hint="Keep the tokenizer files in the artifact folder and drop the setting, "
                    "or load the model with an explicit tokenizer: modelpress.load(path, tokenizer='hf-folder').",
                )
        elif tok not in (".", "./"):  # relative: inside the folder (tasks read it relative to the folder)
            inside(folder, tok, "task_config.tokenizer")
    options = manifest.task_config.get("runtime_options")
    if isinstance(options, dict):
        for runtime, opts in options.items():
            if isinstance(opts, dict) and opts.get("calibration") is not None:
                inside(folder, opts["calibration"], f"runtime_options.{runtime}.calibration")


@contextlib.contextmanager
def disk_full_is_clear(where: Path, what: str) -> Iterator[None]:
    """An ``OSError`` ENOSPC / EDQUOT in the block becomes an :class:`ArtifactError` that says what to do."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise ArtifactError(
            f"No space left on the device of '{where}' while {what}; nothing was changed there.",
            hint=f"Free some space (df -h {where}) or write somewhere else, then run the command again.",
        ) from exc


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_folder(folder: Path, exclude: tuple[str, ...] = (MANIFEST_NAME,)) -> tuple[dict[str, str], str]:
    """sha256 of every file under ``folder`` and one hash over all of them (order-independent)."""
    files: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            rel = path.relative_to(folder).as_posix()
            if rel in exclude or rel.startswith(".") or "/." in rel:
                continue
            files[rel] = sha256_file(path)
    total = hashlib.sha256()
    for rel, digest in sorted(files.items()):
        total.update(f"{rel}\0{digest}\n".encode())
    return files, total.hexdigest()


def tool_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("modelpress", "torch", "transformers", "onnx", "onnxruntime", "openvino", "nncf", "torchao"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


class Artifact:
    """A model plus its manifest. ``path`` is None for a module that lives only in memory."""

    def __init__(self, manifest: Manifest, path: Path | None = None, module: Any = None) -> None:
        self.manifest = manifest
        self.path = Path(path) if path is not None else None
        self.module = module  # a torch.nn.Module for format "torch"

    # -- convenient views ------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def format(self) -> str:
        return self.manifest.format

    @property
    def model_file(self) -> Path | None:
        if self.path is None or self.manifest.model_file is None:
            return None
        return inside(self.path, self.manifest.model_file.rstrip("/") or self.manifest.model_file, "model_file")

    def content_hash(self) -> str:
        """A stable id: the hash of the files, or of the module's weights when in memory."""
        if self.manifest.content_hash:
            return self.manifest.content_hash
        if self.path is not None:
            _, digest = hash_folder(self.path)
        else:
            digest = _module_hash(self.module)
        self.manifest.content_hash = digest
        return digest

    def size_bytes(self) -> int:
        """Bytes on disk of the model files (tokenizer and manifest included)."""
        if self.path is None:
            return sum(p.numel() * p.element_size() for p in self.module.state_dict().values())
        if self.path.is_file():
            return self.path.stat().st_size
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def with_task_options(self, options: dict[str, Any] | None) -> Artifact:
        """A copy whose task settings include ``options`` (for evaluation only: this artifact and its folder are untouched)."""
        if not options:
            return self
        manifest = self.manifest.model_copy(deep=True)
        manifest.task_config.update(options)
        return Artifact(manifest, self.path, self.module)

    def __repr__(self) -> str:
        where = str(self.path) if self.path else "<in memory>"
        return f"Artifact(name={self.name!r}, task={self.task!r}, format={self.format!r}, path={where!r})"

    # -- reading and writing ---------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> Artifact:
        path = Path(path)
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise ArtifactError(
                f"'{path}' has no {MANIFEST_NAME}, so it is not a modelpress artifact.",
                hint="Load a plain model with modelpress.load(path) instead.",
            )
        try:
            manifest = Manifest.model_validate_json(manifest_path.read_text())
        except ValueError as exc:
            raise ArtifactError(f"The manifest {manifest_path} is invalid: {exc}") from exc
        check_manifest_paths(manifest, path)
        return cls(manifest, path)

    @classmethod
    def write(
        cls,
        target: str | os.PathLike,
        manifest: Manifest,
        fill: Callable[[Path], dict[str, Any] | None],
        *,
        overwrite: bool = False,
    ) -> Artifact:
        """Create an artifact folder atomically.

        ``fill(tmp)`` writes the model files into a temporary folder beside ``target`` and may
        return updates for the manifest (metrics found while writing); the manifest (with file
        hashes) is added, everything is fsynced, and the folder is renamed
        into place. If ``target`` exists it is replaced only when ``overwrite`` is true, and even
        then the old folder stays intact until the new one is complete.
        """
        target = Path(target).resolve()
        if target.exists() and not overwrite:
            raise ArtifactError(f"'{target}' already exists.", hint="Choose another output folder or pass overwrite=True (--force).")
        with disk_full_is_clear(target.parent, f"writing the artifact '{target.name}'"), atomic_folder(target) as tmp:
            updates = fill(tmp) or {}
            files, digest = hash_folder(tmp)
            manifest = manifest.model_copy(
                update={
                    **updates,
                    "files": files,
                    "content_hash": digest,
                    "created_at": manifest.created_at or _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                    "tool_versions": manifest.tool_versions or tool_versions(),
                }
            )
            (tmp / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2))
        return cls(manifest, target)

    def verify(self) -> list[str]:
        """Files whose hash no longer matches the manifest (empty when intact)."""
        if self.path is None:
            return []
        bad = []
        for rel, digest in self.manifest.files.items():
            try:
                f = inside(self.path, rel)
            except ArtifactError:  # a path that leaves the folder: reported, never followed
                bad.append(rel)
                continue
            if not f.is_file() or sha256_file(f) != digest:
                bad.append(rel)
        return bad

    def to_json(self) -> dict[str, Any]:
        data = self.manifest.model_dump(mode="json")
        data["path"] = str(self.path) if self.path else None
        return data


def _module_hash(module: Any) -> str:
    import torch

    h = hashlib.sha256()
    if module is None:
        return h.hexdigest()
    for key, tensor in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def manifest_dict(manifest: Manifest) -> dict[str, Any]:
    return json.loads(manifest.model_dump_json())
