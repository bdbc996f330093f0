"""The export cache: a model's ONNX or OpenVINO IR export, made once per content hash.

Entries live under ``$MODELPRESS_HOME/cache/exports/<content hash>-<kind>``. A runner given a
Hugging Face folder or a torch module on ONNX Runtime or OpenVINO runs the cached export
(``modelpress.export`` registers :func:`modelpress.export.exported` as the runtimes' converter),
and so do the optimization steps that work on a graph. A damaged entry is rebuilt.

The key is the hash of what the source really holds, computed here from its files (or its
module's weights), never the ``content_hash`` its manifest claims: a folder whose manifest lies
cannot be handed the export of another model. An entry is used only when its own files still
match its manifest's hashes.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from modelpress.artifacts import Artifact, hash_folder
from modelpress.errors import ArtifactError
from modelpress.locations import cache_dir

log = logging.getLogger(__name__)

_MEMO_SIZE = 64  # folders whose hash is remembered while their files' sizes and times stay the same
_memo: OrderedDict[tuple[str, tuple], str] = OrderedDict()
_memo_lock = threading.Lock()


def _stat_signature(folder: Path) -> tuple:
    """The names, sizes and modification times of every file under ``folder`` (a change in any of them is seen)."""
    out = []
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            st = os.stat(os.path.join(dirpath, name))
            out.append((os.path.relpath(os.path.join(dirpath, name), folder), st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(sorted(out))


def source_hash(artifact: Artifact) -> str:
    """The content hash of what ``artifact`` really holds (its files hashed, not its manifest's claim)."""
    if artifact.path is None or not artifact.path.is_dir():
        return artifact.content_hash()  # a module in memory: the hash of its weights
    folder = artifact.path.resolve()
    key = (str(folder), _stat_signature(folder))
    with _memo_lock:
        if key in _memo:
            _memo.move_to_end(key)
            return _memo[key]
    _, digest = hash_folder(folder)
    claimed = artifact.manifest.content_hash
    if claimed and claimed != digest:
        log.warning("the manifest of %s claims the content hash %s but its files hash to %s", folder, claimed[:12], digest[:12])
    with _memo_lock:
        _memo[key] = digest
        while len(_memo) > _MEMO_SIZE:
            _memo.popitem(last=False)
    return digest


def entry(artifact: Artifact, kind: str) -> Path:
    """Where the ``kind`` export (onnx, openvino, ...) of ``artifact`` is cached."""
    return cache_dir("exports") / f"{source_hash(artifact)[:20]}-{kind}"


def open_entry(target: Path) -> Artifact | None:
    """The cached artifact at ``target`` when it is there and intact (its files match its manifest), else None."""
    if not target.is_dir():
        return None
    try:
        art = Artifact.open(target)
        bad = art.verify()
    except (ArtifactError, OSError) as exc:  # a damaged cache entry is rebuilt
        log.info("rebuilding the damaged export cache entry %s: %s", target, exc)
        return None
    if bad or not art.manifest.files:
        log.info("rebuilding the export cache entry %s: %s do not match their hashes", target, ", ".join(bad[:3]) or "no files")
        return None
    return art


def cached(artifact: Artifact, kind: str, build: Callable[[Path], Artifact]) -> Artifact:
    """The cached ``kind`` export of ``artifact``, or ``build(target)`` when it is missing or damaged."""
    target = entry(artifact, kind)
    found = open_entry(target)
    return found if found is not None else build(target)
