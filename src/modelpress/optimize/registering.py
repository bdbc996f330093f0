"""Recording what optimize and tune made in the registry, with lineage.

The original is registered once (registering the same files and settings again returns the
version that holds them: ``Registry.register(..., reuse=True)``); each shipped variant becomes a
new version whose parent is the version it was made from, with the technique config as the
lineage step and its quality and speed as metrics.
"""

from __future__ import annotations

from typing import Any

from modelpress.artifacts import Artifact
from modelpress.optimize.gate import flat_metrics


def open_registry(url: str | None = None) -> Any:
    from modelpress.registry.api import Registry

    return Registry(url)


def metric_rows(
    quality: dict[str, float], speed: dict[str, float] | None = None, *, dataset: str | None = None, runtime: str | None = None
) -> dict[str, Any]:
    """Registry metric rows: every quality and speed figure with where it was measured."""
    rows: dict[str, Any] = {}
    for k, v in quality.items():
        rows[k] = {"value": float(v), "dataset": dataset, "runtime": runtime, "kind": "quality"}
    for k, v in (speed or {}).items():
        if v is not None:
            rows[k] = {"value": float(v), "runtime": runtime, "kind": "speed"}
    return rows


def _from_evaluation(evaluation: dict[str, Any] | None) -> dict[str, Any]:
    if not evaluation:
        return {}
    return metric_rows(flat_metrics(evaluation), dataset=evaluation.get("dataset"), runtime=evaluation.get("runtime"))


def register_original(registry: Any, artifact: Artifact, name: str, evaluation: dict[str, Any] | None) -> str:
    """The original's ``NAME:VERSION``, registering it unless a version already holds the same files."""
    version = registry.register(
        artifact, name, metrics=_from_evaluation(evaluation), note="original, registered by modelpress optimize/tune", reuse=True
    )
    return version.ref


def register_variant(
    registry: Any,
    artifact: Artifact,
    name: str,
    parent_ref: str | None,
    *,
    evaluation: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> str:
    """Register a shipped variant as the next version of ``name``, child of ``parent_ref``.

    ``metrics``: rows from :func:`metric_rows` (else taken from ``evaluation``).
    """
    version = registry.register(
        artifact, name, parent=parent_ref, metrics=metrics if metrics is not None else _from_evaluation(evaluation), reuse=True
    )
    return version.ref
