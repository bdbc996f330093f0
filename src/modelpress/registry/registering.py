"""Registering: an artifact's files go into the store, then its rows into the database, in one transaction.

Registering hashes the artifact's files, copies them into the store (temporary folder, fsync,
rename to ``artifacts/<sha256>/``; skipped when the store already holds them) and only then
commits the rows in one transaction, all under the store's lock: a crash leaves the old state
or the new one, at worst an orphan folder that :meth:`Registry.check` finds and
``check(repair=True)`` removes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any

from sqlalchemy import case, select

from modelpress.artifacts import Artifact
from modelpress.errors import ConfigError, RegistryError
from modelpress.registry import queries, stages
from modelpress.registry.connection import RefLike, RegistryBase, as_ref
from modelpress.registry.db import ArtifactRow, LineageRow, MetricRow, ModelRow, NoteRow, StageEventRow, TagRow, VersionRow
from modelpress.registry.names import Ref, validate_name, validate_stage, validate_tag
from modelpress.registry.records import ModelVersion, current_user, normalize_metrics
from modelpress.registry.store import Prepared, crash_point, disk_full_is_clear

__all__ = ["Registering"]


def _split_step(step: Any, manifest_step: dict[str, Any] | None) -> tuple[str | None, dict[str, Any] | None]:
    """The step's name and config, from ``step`` (a name, a config dict or a technique config) or the manifest."""
    if step is None:
        step = manifest_step
    if step is None:
        return None, None
    if isinstance(step, str):
        return step[:128], manifest_step
    if not isinstance(step, dict):
        if hasattr(step, "to_step"):  # a modelpress technique config
            step = step.to_step()
        elif hasattr(step, "model_dump"):  # any pydantic config
            step = {"technique": type(step).__name__, **step.model_dump(mode="json")}
    if isinstance(step, dict):
        name = next((str(step[k]) for k in ("technique", "type", "name", "step") if step.get(k)), "step")
        return name[:128], step
    raise ConfigError(
        f"A step must be a name or a config dict, not {type(step).__name__}.", hint="Example: step={'technique': 'quantize', 'bits': 8}"
    )


class Registering(RegistryBase):
    """:meth:`register` (a mixin of :class:`~modelpress.registry.api.Registry`)."""

    # -- registering -----------------------------------------------------------------------
    def register(
        self,
        artifact: Artifact | str | os.PathLike,
        name: str,
        parent: RefLike | None = None,
        step: Any = None,
        metrics: dict[str, Any] | None = None,
        stage: str = "candidate",
        tags: Iterable[str] = (),
        note: str | None = None,
        *,
        reuse: bool = False,
        who: str | None = None,
        why: str | None = None,
    ) -> ModelVersion:
        """Store an artifact's files and record it as the next version of ``name``.

        ``parent``: the version it was made from (default: the latest version whose content
        hash is the manifest's ``parent``, if any). ``step``: the technique name or config that
        made it (default: the manifest's step). ``metrics``: ``{name: value}`` or
        ``{name: {"value": v, "dataset": ..., "runtime": ..., "machine": ...}}``; numeric
        metrics in the manifest are recorded too. Two processes registering at once get
        distinct version numbers.

        ``reuse=True``: when a version of ``name`` already has the same files and settings (see
        :meth:`find`), return it (``reused`` is True) instead of adding a duplicate; the metrics
        given are recorded on it, tags and a note it lacks are added, a stage other than
        candidate is applied, and its lineage stays as it was. Nothing is copied.
        """
        name = validate_name(name)
        stage = validate_stage(stage)
        if not isinstance(artifact, Artifact):
            artifact = Artifact.open(artifact)
        parent_ref = as_ref(parent) if parent is not None else None
        step_name, step_config = _split_step(step, artifact.manifest.step)
        explicit = normalize_metrics(metrics)
        from_manifest = normalize_metrics(artifact.manifest.metrics, strict=False)
        metric_rows = [m for m in from_manifest if m["name"] not in {e["name"] for e in explicit}] + explicit
        tag_list = list(dict.fromkeys(validate_tag(t) for t in ([tags] if isinstance(tags, str) else tags)))
        note = str(note) if note is not None and str(note).strip() else None
        who = who or current_user()
        if parent_ref is not None:
            self._read(lambda s: queries.resolve(s, parent_ref))  # fail before copying anything

        prepared = self.store.prepare(artifact)
        self.store.clean_dead_temps()  # what a registration killed on this machine left: the next one starts clean

        def annotate(s: Any, row: VersionRow, rows: list[dict[str, Any]]) -> None:
            for m in rows:
                s.add(MetricRow(version_id=row.id, **m))
            have = set(s.scalars(select(TagRow.tag).where(TagRow.version_id == row.id)))
            for t in tag_list:
                if t not in have:
                    s.add(TagRow(version_id=row.id, tag=t))
            if note and s.scalar(select(NoteRow.id).where(NoteRow.version_id == row.id, NoteRow.text == note).limit(1)) is None:
                s.add(NoteRow(version_id=row.id, text=note, who=who))  # the same note again (a rerun with reuse) is kept once
            if stage != "candidate":
                queries.get_model(s, row.model.name, lock=True)
                stages.set_stage(s, row, stage, who, why, "register")
            s.flush()

        def reuse_existing(s: Any) -> ModelVersion | None:
            row = self._same(s, name, prepared) if reuse else None
            if row is None:
                return None
            annotate(s, row, explicit)
            return dataclasses.replace(self._describe(s, row), reused=True)

        if reuse:
            found = self._write(reuse_existing)
            if found is not None:
                return found
        if not self.store.holds(prepared.sha256):
            with disk_full_is_clear(self.store.root, f"copying the files of '{prepared.source}'"):
                self.store.copy_in(prepared)  # outside the lock: a long copy does not hold up other writers

        def insert(s: Any) -> ModelVersion:
            found = reuse_existing(s)  # another process may have registered it meanwhile
            if found is not None:
                return found
            parent_row = self._parent_row(s, parent_ref, prepared.manifest.parent, name)  # before the new row exists
            row = self._insert_version(s, prepared, name, who)
            if parent_row is not None:
                s.add(LineageRow(parent_id=parent_row.id, child_id=row.id, step=step_name, config=step_config))
            annotate(s, row, metric_rows)
            described = self._describe(s, row)
            crash_point("before_commit")
            return described

        try:
            with self.store.lock():
                with disk_full_is_clear(self.store.root, f"placing the files of '{prepared.source}'"):
                    created = self.store.place(prepared)
                crash_point("after_rename")
                try:
                    result = self._write(insert)
                except BaseException:
                    if created:
                        self._drop_if_unreferenced(prepared.sha256)
                    raise
                crash_point("after_commit")
        finally:
            self.store.discard_copy(prepared)
        return result

    def _drop_if_unreferenced(self, sha256: str) -> None:
        """After a failed commit: remove the folder this call placed, unless a row refers to it after all."""
        try:
            referenced = self._read(lambda s: s.get(ArtifactRow, sha256) is not None)
        except RegistryError:  # cannot tell: leave it for `check --repair`
            return
        if not referenced:
            self.store.remove(sha256)

    def _insert_version(self, s: Any, prepared: Prepared, name: str, who: str | None) -> VersionRow:
        manifest = prepared.manifest.model_dump(mode="json")
        if s.get(ArtifactRow, prepared.sha256) is None:
            m = prepared.manifest
            s.add(
                ArtifactRow(
                    sha256=prepared.sha256,
                    task=m.task,
                    format=m.format,
                    model_file=m.model_file,
                    files=prepared.files,
                    manifest=manifest,
                    size_bytes=prepared.size_bytes,
                )
            )
        model = s.scalar(select(ModelRow).where(ModelRow.name == name).with_for_update())
        if model is None:
            model = ModelRow(name=name, next_version=1)
            s.add(model)
        s.flush()
        number = model.next_version
        model.next_version = number + 1
        row = VersionRow(
            model_id=model.id, version=number, artifact_sha=prepared.sha256, stage="candidate", created_by=who, manifest=manifest
        )
        s.add(row)
        s.flush()
        s.add(StageEventRow(version_id=row.id, from_stage=None, to_stage="candidate", action="register", who=who))
        return row

    def _parent_row(self, s: Any, parent_ref: Ref | None, parent_hash: str | None, name: str) -> VersionRow | None:
        """The explicit parent, else the latest version holding the manifest's parent hash (same model first)."""
        if parent_ref is not None:
            return queries.resolve(s, parent_ref)
        if not parent_hash:
            return None
        return s.scalar(
            select(VersionRow)
            .join(ModelRow, ModelRow.id == VersionRow.model_id)
            .where(VersionRow.artifact_sha == parent_hash)
            .order_by(case((ModelRow.name == name, 0), else_=1), VersionRow.id.desc())
            .limit(1)
        )
