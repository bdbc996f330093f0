"""The artifact store: files on disk, content-addressed by the sha256 over an artifact's files.

Layout under the store root::

    artifacts/<sha256>/     one folder per distinct artifact (model files + modelpress.json)
    tmp-<host>-<pid>-<rand>/ a copy in progress (renamed into artifacts/ when complete)
    registry-id             the id of the registry database this store belongs to
    lock                    an advisory file lock held while the store and the database change

Every path the store touches is built from a sha256 it computed itself, never from a name a
user typed, and is checked to stay inside the root. A copy is written to a temporary folder,
hashed, fsynced and renamed, so ``artifacts/<sha256>/`` is either absent or complete.

A folder with a symbolic link that points outside it (a link to ``~/.ssh/id_rsa`` would copy the
secret into the store) is refused before anything is read. A full disk fails with a
:class:`RegistryError` that says so; the store and the database keep their previous state.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from modelpress._fs import CRASH_ENV, CRASH_PAUSE_ENV, atomic_folder, atomic_write_text, crash_point, file_lock, fsync_dir, fsync_tree
from modelpress.artifacts import MANIFEST_NAME, Artifact, Manifest, hash_folder, links_outside, sha256_file
from modelpress.artifacts import disk_full_is_clear as _artifact_disk_full
from modelpress.artifacts import safe_relpath as _safe_relpath
from modelpress.errors import ArtifactError, RegistryError

_SHA_RE = re.compile(r"[0-9a-f]{64}")
__all__ = ["CRASH_ENV", "CRASH_PAUSE_ENV", "CRASH_POINTS", "ArtifactStore", "Prepared", "crash_point", "safe_relpath"]

_TMP_PREFIX = "tmp-"
CRASH_POINTS = ("during_copy", "after_copy", "after_rename", "before_commit", "after_commit")
STALE_TMP_SECONDS = 24 * 3600  # a temp folder of another machine is left alone for this long


@dataclass
class Prepared:
    """An artifact about to be stored: its file hashes, the manifest to keep, and (once copied)
    the temporary folder in the store that holds a complete, fsynced copy."""

    source: Path
    sha256: str
    files: dict[str, str]
    manifest: Manifest
    size_bytes: int
    tmp: Path | None = None


def safe_relpath(rel: str) -> PurePosixPath:
    """``rel`` as a relative path that stays inside its folder (no absolute path, no '..'); a :class:`RegistryError` otherwise."""
    try:
        return _safe_relpath(rel)
    except ArtifactError as exc:
        raise RegistryError(exc.message, hint="File paths are relative, e.g. 'onnx/model.onnx'.") from None


@contextlib.contextmanager
def disk_full_is_clear(where: Path, what: str) -> Iterator[None]:
    """ENOSPC / EDQUOT in the block becomes a :class:`RegistryError` that says so (the caller has already cleaned up)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise RegistryError(
            f"No space left on the device of the registry's store {where} while {what}; "
            "the registry keeps its previous state (nothing was recorded).",
            hint=f"Free some space (df -h {where}), or move the store (MODELPRESS_REGISTRY_STORE=DIR), then register again.",
        ) from exc


class ArtifactStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().resolve()
        self.artifacts = self.root / "artifacts"

    def ensure(self) -> None:
        self.artifacts.mkdir(parents=True, exist_ok=True)

    # -- identity ------------------------------------------------------------------------
    def bind(self, registry_id: str) -> None:
        """Tie the store to one registry, so that two databases never share (and repair) one store."""
        self.ensure()
        id_file = self.root / "registry-id"
        if id_file.is_file():
            found = id_file.read_text().strip()
            if found != registry_id:
                raise RegistryError(
                    f"The artifact store {self.root} belongs to another registry (id {found}, this one is {registry_id}).",
                    hint="Give this registry its own store: Registry(url, store=DIR) or MODELPRESS_REGISTRY_STORE=DIR.",
                )
            return
        if any(self.artifacts.iterdir()):
            raise RegistryError(
                f"The artifact store {self.root} already holds artifacts but has no registry-id file.",
                hint="Point the registry at the store it was created with, or at an empty folder.",
            )
        atomic_write_text(id_file, registry_id + "\n")

    # -- paths -----------------------------------------------------------------------------
    def path_for(self, sha256: str) -> Path:
        if not isinstance(sha256, str) or not _SHA_RE.fullmatch(sha256):
            raise RegistryError(f"'{sha256}' is not a sha256 content hash.", hint="A content hash is 64 lowercase hex digits.")
        path = self.artifacts / sha256
        if path.parent != self.artifacts:  # pragma: no cover - impossible for a hex digest
            raise RegistryError(f"Refusing a path outside the store: {path}")
        return path

    def list_artifacts(self) -> list[str]:
        if not self.artifacts.is_dir():
            return []
        return sorted(p.name for p in self.artifacts.iterdir() if p.is_dir() and _SHA_RE.fullmatch(p.name))

    def list_strays(self) -> list[Path]:
        """Entries of artifacts/ that are not sha256 folders (a file, a half-removed folder, ...)."""
        if not self.artifacts.is_dir():
            return []
        return sorted(p for p in self.artifacts.iterdir() if not (p.is_dir() and _SHA_RE.fullmatch(p.name)))

    def list_temps(self, *, include_live: bool = False) -> list[Path]:
        """Temporary folders left by copies; those of a live process on this machine are skipped."""
        if not self.root.is_dir():
            return []
        found = []
        for p in sorted(self.root.iterdir()):
            if p.name.startswith(_TMP_PREFIX) and (include_live or not _owner_alive(p)):
                found.append(p)
        return found

    def clean_dead_temps(self) -> list[Path]:
        """Remove the temporary folders of copies whose process (on this machine) died; returns them.

        Safe without the lock: a dead process writes nothing more, and a live one's folders are kept.
        """
        removed = []
        for p in self.list_temps():
            parts = p.name.split("-")
            if len(parts) >= 3 and parts[1] == _host() and parts[2].isdigit():
                self.remove_path(p)
                removed.append(p)
        return removed

    # -- locking ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive advisory lock over the store (and the database change that goes with it)."""
        self.ensure()
        with file_lock(self.root / "lock"):
            yield

    # -- writing ---------------------------------------------------------------------------
    def prepare(self, artifact: Artifact) -> Prepared:
        """Check an artifact folder and hash its files (nothing is written yet)."""
        src = artifact.path
        if src is None:
            raise ArtifactError(
                f"The artifact '{artifact.name}' lives only in memory, so there are no files to register.",
                hint="Save it first (modelpress.export(...) or Artifact.write(folder, manifest, fill)) and register the folder.",
            )
        src = Path(src)
        if not src.is_dir():
            raise ArtifactError(
                f"'{src}' is not an artifact folder.",
                hint="Register a folder with a modelpress.json manifest, e.g. the output of `modelpress export`.",
            )
        escaping = links_outside(src)
        if escaping:
            raise ArtifactError(
                f"Refusing to register '{src}': it holds symbolic links to paths outside the folder (or to nothing): "
                f"{', '.join(escaping[:5])}; what they point to would be copied into the store.",
                hint="Replace each link with a copy of the file inside the folder (cp --dereference), or remove it.",
            )
        files, digest = hash_folder(src)
        if not files:
            raise ArtifactError(f"The artifact folder '{src}' has no files.", hint="Register a folder that holds the model files.")
        expected = artifact.manifest.content_hash
        if expected and expected != digest:
            raise ArtifactError(
                f"The files in '{src}' changed after its manifest was written (content hash {digest[:12]} != {expected[:12]}).",
                hint="Write the artifact again (Artifact.write) so that its manifest matches its files.",
            )
        model_file = artifact.manifest.model_file
        if model_file is not None:
            inside = model_file in files or any(f.startswith(model_file.rstrip("/") + "/") for f in files)
            try:
                safe_relpath(model_file.rstrip("/"))
            except RegistryError:
                inside = False
            if not inside:
                raise ArtifactError(
                    f"The manifest's model_file '{model_file}' is not one of the files in '{src}'.",
                    hint="model_file is a path inside the artifact folder, e.g. 'model.onnx'.",
                )
        task_config = dict(artifact.manifest.task_config)
        tok = task_config.get("tokenizer")
        if isinstance(tok, str) and Path(tok).expanduser().resolve() == src.resolve():
            del task_config["tokenizer"]  # the tokenizer travels with the files; the stored copy finds it in its own folder
        manifest = artifact.manifest.model_copy(update={"files": files, "content_hash": digest, "task_config": task_config})
        size = sum((src / rel).stat().st_size for rel in files)
        return Prepared(source=src, sha256=digest, files=files, manifest=manifest, size_bytes=size)

    def copy_in(self, prepared: Prepared) -> Path:
        """Copy a prepared artifact into a temporary folder of the store, check its hashes, fsync it (``prepared.tmp``)."""
        self.ensure()
        src, files = prepared.source, prepared.files
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{_host()}-{os.getpid()}-", dir=self.root))
        try:
            for i, rel in enumerate(sorted(files)):
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / rel, dest)
                if i == 0:
                    crash_point("during_copy")
            copied, copied_digest = hash_folder(tmp)
            if copied != files or copied_digest != prepared.sha256:
                raise ArtifactError(
                    f"The files of '{src}' changed while they were copied.", hint="Register it again once nothing writes to it."
                )
            (tmp / MANIFEST_NAME).write_text(prepared.manifest.model_dump_json(indent=2))
            fsync_tree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        prepared.tmp = tmp
        crash_point("after_copy")
        return tmp

    def holds(self, sha256: str) -> bool:
        """Whether ``artifacts/<sha256>/`` exists (intact or not: :meth:`verify` says)."""
        return self.path_for(sha256).is_dir()

    def place(self, prepared: Prepared) -> bool:
        """Make ``artifacts/<sha256>/`` hold the prepared files (call with :meth:`lock` held).

        An intact folder already there (another version shares the files, or an earlier attempt
        died before its database commit) is kept and the copy dropped; a damaged one is
        replaced. Copies now if :meth:`copy_in` was skipped. True when this call created the folder.
        """
        final = self.path_for(prepared.sha256)
        if final.is_dir() and not self.verify(prepared.sha256, prepared.files):
            self.discard_copy(prepared)
            return False
        tmp = prepared.tmp if prepared.tmp is not None else self.copy_in(prepared)
        if final.is_dir():
            self._discard(final)
        os.rename(tmp, final)
        prepared.tmp = None
        fsync_dir(self.artifacts)
        return True

    def discard_copy(self, prepared: Prepared) -> None:
        if prepared.tmp is not None:
            shutil.rmtree(prepared.tmp, ignore_errors=True)
            prepared.tmp = None

    def verify(self, sha256: str, files: dict[str, str]) -> list[str]:
        """Files that are missing or whose hash differs (empty when the folder is intact)."""
        folder = self.path_for(sha256)
        bad = []
        for rel, digest in sorted(files.items()):
            try:
                f = folder / safe_relpath(rel)
            except RegistryError:  # a tampered row: report it, never follow it
                bad.append(rel)
                continue
            if not f.is_file() or sha256_file(f) != digest:
                bad.append(rel)
        if not (folder / MANIFEST_NAME).is_file():
            bad.append(MANIFEST_NAME)
        return bad

    def remove(self, sha256: str) -> None:
        path = self.path_for(sha256)
        if path.exists():
            self._discard(path)

    def remove_path(self, path: Path) -> None:
        """Remove a temporary or stray entry; only paths directly under the store are accepted."""
        path = Path(path)
        if path.parent not in (self.root, self.artifacts):
            raise RegistryError(f"Refusing to remove {path}: it is not inside the store {self.root}.")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def _discard(self, folder: Path) -> None:
        """Move a folder out of artifacts/ in one rename, then delete it (never half a folder in place)."""
        trash = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{_host()}-{os.getpid()}-trash-", dir=self.root))
        os.rename(folder, trash / folder.name)
        fsync_dir(self.artifacts)
        shutil.rmtree(trash, ignore_errors=True)

    def export(self, sha256: str, files: dict[str, str], dest: str | os.PathLike, *, manifest: Manifest, overwrite: bool = False) -> Path:
        """Copy a stored artifact to ``dest`` with ``manifest`` (the version's), through a temporary
        folder beside it, checking every hash."""
        src = self.path_for(sha256)
        dest = Path(dest).expanduser().resolve()
        if dest == self.root or self.root in dest.parents or dest in self.root.parents:
            raise ArtifactError(
                f"Refusing to export into '{dest}': it overlaps the registry's store {self.root}.",
                hint="Export to a folder outside the store, e.g. ./out/minilm-3.",
            )
        if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())) and not overwrite:
            raise ArtifactError(f"'{dest}' already exists and is not empty.", hint="Choose a new folder or pass overwrite=True (--force).")
        if not src.is_dir():
            raise RegistryError(
                f"The stored files of artifact {sha256[:12]} are missing from {self.artifacts}.", hint="Run `modelpress registry check`."
            )
        with _artifact_disk_full(dest.parent, f"exporting to '{dest.name}'"), atomic_folder(dest) as tmp:
            for rel in sorted(files):
                safe = safe_relpath(rel)
                (tmp / safe).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / safe, tmp / safe)
            (tmp / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2))
            copied, _ = hash_folder(tmp)
            if copied != files:
                bad = sorted(k for k in set(files) | set(copied) if files.get(k) != copied.get(k))
                raise RegistryError(
                    f"The stored artifact {sha256[:12]} is corrupt ({', '.join(bad[:5])} do not match their hashes).",
                    hint="Run `modelpress registry check` and register the model again.",
                )
        return dest


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _owner_alive(tmp: Path) -> bool:
    """Whether the process that made a temp folder may still be writing it."""
    parts = tmp.name.split("-")
    if len(parts) >= 3 and parts[0] == "tmp" and parts[1] == _host() and parts[2].isdigit():
        pid = int(parts[2])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if len(parts) >= 3 and parts[0] == "tmp":  # another machine's copy: give it time
        try:
            return time.time() - tmp.stat().st_mtime < STALE_TMP_SECONDS
        except FileNotFoundError:
            return False
    return False
