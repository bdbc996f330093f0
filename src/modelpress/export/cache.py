"""The export cache: a model's ONNX or OpenVINO IR export, made once per content hash.

Entries live under ``$MODELPRESS_HOME/cache/exports/<content hash>-<kind>``. A runner given a
Hugging Face folder or a torch module on ONNX Runtime or OpenVINO runs the cached export
(``modelpress.export`` registers :func:`modelpress.export.exported` as the runtimes' converter),
and so do the optimization steps that work on a graph. A damaged entry is rebuilt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from modelpress.artifacts import Artifact
from modelpress.errors import ArtifactError
from modelpress.locations import cache_dir

log = logging.getLogger(__name__)


def entry(artifact: Artifact, kind: str) -> Path:
    """Where the ``kind`` export (onnx, openvino, ...) of ``artifact`` is cached."""
    return cache_dir("exports") / f"{artifact.content_hash()[:20]}-{kind}"


def cached(artifact: Artifact, kind: str, build: Callable[[Path], Artifact]) -> Artifact:
    """The cached ``kind`` export of ``artifact``, or ``build(target)`` when it is missing or damaged."""
    target = entry(artifact, kind)
    if target.is_dir():
        try:
            return Artifact.open(target)
        except (ArtifactError, OSError) as exc:  # a damaged cache entry is rebuilt below
            log.info("rebuilding the damaged export cache entry %s: %s", target, exc)
    return build(target)
