"""The model registry: versions, lineage, metrics and stages of every model variant.

    reg = Registry()                                   # ~/.modelpress/registry.db + store/
    v1 = reg.register(artifact, "minilm", metrics={"spearman": 0.84}, reuse=True)
    v2 = reg.register(quantized, "minilm", parent=v1.ref, metrics={"spearman": 0.83})
    reg.promote("minilm:2", "production", why="same quality, 2x faster")
    reg.rollback("minilm")                             # production goes back to the one before

:class:`Registry` is put together by idea: :mod:`.connection` (the database, the store and
transactions), :mod:`.registering` (``register``: files first, then rows in one transaction, so
a crash leaves the old state or the new one), :mod:`.maintenance` (``delete``, ``export``,
``check``); reading, stages and annotations are here.
"""

from __future__ import annotations

import os
import re
from typing import Any

from sqlalchemy import delete, select

from modelpress.artifacts import Artifact
from modelpress.errors import ConfigError
from modelpress.registry import queries, stages
from modelpress.registry.connection import RefLike, as_ref
from modelpress.registry.db import MetricRow, NoteRow, TagRow, VersionRow
from modelpress.registry.maintenance import Maintenance
from modelpress.registry.names import validate_name, validate_stage, validate_tag
from modelpress.registry.records import ModelVersion, current_user, normalize_metrics
from modelpress.registry.registering import Registering

_SHA_RE = re.compile(r"[0-9a-f]{64}")

__all__ = ["RefLike", "Registry", "validate_tag"]


class Registry(Registering, Maintenance):
    """A registry database (SQLite file by default, any SQLAlchemy URL) plus its artifact store.

    ``url``: a SQLAlchemy URL or a SQLite file path; default ``$MODELPRESS_REGISTRY_URL``, else
    ``<home>/registry.db``. ``home``: default ``$MODELPRESS_HOME`` or ``~/.modelpress``.
    ``store``: where artifact files go; default ``$MODELPRESS_REGISTRY_STORE``, else beside a
    SQLite file (``<dir>/store`` for ``registry.db``, ``<dir>/<stem>-store`` otherwise), else
    ``<home>/stores/<registry id>`` for a server database (point a shared registry at shared
    storage). Close it (or use ``with``) when done.
    """

    @property
    def rollouts(self) -> Any:
        """Deployments and rollout decisions (:class:`modelpress.registry.rollouts.Rollouts`)."""
        from modelpress.registry.rollouts import Rollouts

        return Rollouts(self)

    @property
    def leases(self) -> Any:
        """Which server drives each deployment's rollout (:class:`modelpress.registry.leases.Leases`)."""
        from modelpress.registry.leases import Leases

        return Leases(self)

    # -- reading -------------------------------------------------------------------------
    def get(self, ref: RefLike) -> ModelVersion:
        """One version: ``NAME:VERSION``, ``NAME@stage``, ``NAME:latest`` or ``NAME`` (the latest)."""
        r = as_ref(ref)
        return self._read(lambda s: self._describe(s, queries.resolve(s, r)))

    def list_models(self) -> list[dict[str, Any]]:
        """Every model: name, number of versions, latest version, production version, last change."""
        return self._read(queries.list_models)

    def list_versions(self, name: str) -> list[ModelVersion]:
        """Every version of a model, oldest first."""
        name = validate_name(name)

        def run(s: Any) -> list[ModelVersion]:
            model = queries.get_model(s, name)
            rows = s.scalars(select(VersionRow).where(VersionRow.model_id == model.id).order_by(VersionRow.version)).all()
            return [self._describe(s, row) for row in rows]

        return self._read(run)

    def lineage(self, ref: RefLike) -> dict[str, Any]:
        """The tree holding ``ref``, from its original to every descendant (a JSON-able dict).

        ``{"focus": "m:3", "root": node}``; a node has ref, name, version, stage, content_hash,
        metrics ({name: latest value}), step and config (what made it from its parent), changes
        (per shared metric: from, to, delta, relative), focus, other_parents and children.
        """
        r = as_ref(ref)
        return self._read(lambda s: queries.lineage_tree(s, queries.resolve(s, r)))

    def find_by_hash(self, name: str, content_hash: str) -> list[ModelVersion]:
        """The versions of ``name`` whose files have this content hash (``Artifact.content_hash()``), oldest first."""
        name = validate_name(name)
        if not isinstance(content_hash, str) or not _SHA_RE.fullmatch(content_hash):
            raise ConfigError(
                f"{content_hash!r} is not a content hash.", hint="A content hash is 64 lowercase hex digits, e.g. artifact.content_hash()."
            )
        return self._read(lambda s: [self._describe(s, row) for row in queries.versions_with_hash(s, name, content_hash)])

    def find(self, name: str, artifact: Artifact | str | os.PathLike) -> ModelVersion | None:
        """The latest version of ``name`` with the same files and settings as ``artifact``, or None.

        Settings are what the manifest says about running it: task, format, model_file,
        signature and task_config (runtime options included). Hashes the files; copies nothing.
        """
        name = validate_name(name)
        prepared = self.store.prepare(artifact if isinstance(artifact, Artifact) else Artifact.open(artifact))
        return self._read(lambda s: self._same(s, name, prepared, describe=True))

    # -- stages ----------------------------------------------------------------------------
    def promote(self, ref: RefLike, stage: str, who: str | None = None, why: str | None = None) -> ModelVersion:
        """Move a version to a stage. Promoting to production archives the version that was there."""
        r, stage, who = as_ref(ref), validate_stage(stage), who or current_user()

        def run(s: Any) -> ModelVersion:
            row = queries.resolve(s, r, lock=True)
            stages.set_stage(s, row, stage, who, why, "promote")
            return self._describe(s, row)

        return self._write(run)

    def rollback(self, name: str | ModelVersion, who: str | None = None, why: str | None = None) -> ModelVersion:
        """Put the previous production version of ``name`` back in production; the current one is archived."""
        name = validate_name(name.name if isinstance(name, ModelVersion) else name)
        who = who or current_user()

        def run(s: Any) -> ModelVersion:
            model = queries.get_model(s, name, lock=True)
            current, target = stages.rollback_target(s, model)
            stages.set_stage(s, target, "production", who, why or f"rollback from {name}:{current.version}", "rollback")
            return self._describe(s, target)

        return self._write(run)

    # -- annotations -----------------------------------------------------------------------
    def tag(self, ref: RefLike, tag: str) -> ModelVersion:
        """Add a tag to a version (adding it twice is a no-op)."""
        r, tag = as_ref(ref), validate_tag(tag)

        def run(s: Any) -> ModelVersion:
            row = queries.resolve(s, r)
            if s.scalar(select(TagRow).where(TagRow.version_id == row.id, TagRow.tag == tag)) is None:
                s.add(TagRow(version_id=row.id, tag=tag))
                s.flush()
            return self._describe(s, row)

        return self._write(run)

    def untag(self, ref: RefLike, tag: str) -> ModelVersion:
        """Remove a tag from a version (a no-op when it has no such tag)."""
        r, tag = as_ref(ref), validate_tag(tag)

        def run(s: Any) -> ModelVersion:
            row = queries.resolve(s, r)
            s.execute(delete(TagRow).where(TagRow.version_id == row.id, TagRow.tag == tag))
            return self._describe(s, row)

        return self._write(run)

    def note(self, ref: RefLike, text: str, who: str | None = None) -> ModelVersion:
        """Attach a free-form note to a version."""
        if not isinstance(text, str) or not text.strip():
            raise ConfigError("A note needs some text.", hint="Example: reg.note('minilm:2', 'calibrated on 512 STS-B pairs')")
        r, who = as_ref(ref), who or current_user()

        def run(s: Any) -> ModelVersion:
            row = queries.resolve(s, r)
            s.add(NoteRow(version_id=row.id, text=text, who=who))
            s.flush()
            return self._describe(s, row)

        return self._write(run)

    def record_metrics(
        self,
        ref: RefLike,
        metrics: dict[str, Any],
        dataset: str | None = None,
        runtime: str | None = None,
        machine: str | None = None,
        kind: str | None = None,
    ) -> ModelVersion:
        """Record quality or speed metrics of a version, with where they were measured."""
        rows = normalize_metrics(metrics, dataset=dataset, runtime=runtime, machine=machine, kind=kind)
        if not rows:
            raise ConfigError(
                "No metrics to record.", hint="Example: record_metrics('minilm:2', {'latency_ms': 3.2}, runtime='onnxruntime')"
            )
        r = as_ref(ref)

        def run(s: Any) -> ModelVersion:
            row = queries.resolve(s, r)
            for m in rows:
                s.add(MetricRow(version_id=row.id, **m))
            s.flush()
            return self._describe(s, row)

        return self._write(run)
