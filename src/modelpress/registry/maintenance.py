"""Deleting versions, copying them out, and checking the store against the database.

Every change here holds the store's lock, so it never races a registration: a version's files
go only when no other version shares them, an export is checked hash by hash, and ``check``
finds (and with ``repair`` removes) what a crash left behind.
"""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import func, select

from modelpress.artifacts import Artifact, Manifest
from modelpress.errors import InvalidReferenceError, RegistryConflictError
from modelpress.registry import queries
from modelpress.registry.connection import RefLike, RegistryBase, as_ref
from modelpress.registry.db import ArtifactRow, DeploymentRow, LineageRow, ModelRow, VersionRow
from modelpress.registry.records import CheckReport

__all__ = ["Maintenance"]


class Maintenance(RegistryBase):
    """:meth:`delete`, :meth:`export` and :meth:`check` (a mixin of :class:`~modelpress.registry.api.Registry`)."""

    # -- removing and copying out ----------------------------------------------------------
    def delete(self, ref: RefLike, force: bool = False) -> dict[str, Any]:
        """Delete one version (``NAME:VERSION``); its files go when no other version shares them.

        Refused for a version in production, with descendants, or deployed, unless ``force``.
        Version numbers are never reused.
        """
        r = as_ref(ref)
        if r.version is None:
            raise InvalidReferenceError(
                f"'{r}' does not name a version; delete needs one.", hint=f"Example: modelpress registry delete {r.name}:3"
            )
        with self.store.lock():
            with self._session(write=True) as s:
                row = queries.resolve(s, r, lock=True)
                problems = []
                if row.stage == "production":
                    problems.append("it is in production")
                kids = s.execute(
                    select(ModelRow.name, VersionRow.version)
                    .join(VersionRow, VersionRow.model_id == ModelRow.id)
                    .join(LineageRow, LineageRow.child_id == VersionRow.id)
                    .where(LineageRow.parent_id == row.id)
                ).all()
                if kids:
                    problems.append(f"it has descendants ({', '.join(f'{k.name}:{k.version}' for k in kids)})")
                deployed = s.scalars(select(DeploymentRow.name).where(DeploymentRow.version_id == row.id)).all()
                if deployed:
                    problems.append(f"it is deployed as {', '.join(deployed)}")
                if problems and not force:
                    raise RegistryConflictError(
                        f"Refusing to delete {r}: {'; '.join(problems)}.",
                        hint=f"Promote another version / delete the descendants first, or force it: modelpress registry delete {r} --force",
                    )
                sha = row.artifact_sha
                s.delete(row)
                s.flush()
                shared = s.scalar(select(func.count(VersionRow.id)).where(VersionRow.artifact_sha == sha))
                if not shared:
                    s.delete(s.get(ArtifactRow, sha))
            if not shared:
                self.store.remove(sha)
        return {"deleted": str(r), "content_hash": sha, "files_removed": not shared, "forced_past": problems}

    def export(self, ref: RefLike, dest: str | os.PathLike, overwrite: bool = False) -> Artifact:
        """Copy a version's stored files and its manifest to ``dest`` (atomically, every hash checked) and open it."""
        r = as_ref(ref)

        def run(s: Any) -> tuple[str, dict[str, str], dict[str, Any]]:
            row = queries.resolve(s, r)
            return row.artifact_sha, dict(row.artifact.files), dict(row.manifest or row.artifact.manifest)

        sha, files, manifest = self._read(run)
        return Artifact.open(self.store.export(sha, files, dest, manifest=Manifest.model_validate(manifest), overwrite=overwrite))

    # -- integrity -------------------------------------------------------------------------
    def check(self, repair: bool = False) -> CheckReport:
        """Verify every stored artifact against its hashes; find orphan and temporary folders.

        With ``repair``, orphans (folders without a database row, left by a crash before the
        commit) and temporary folders are removed. Versions whose files are missing or corrupt
        are reported (``damaged_versions``), never deleted.
        """
        report = CheckReport()
        with self.store.lock():
            with self._session() as s:
                arts = {a.sha256: dict(a.files) for a in s.scalars(select(ArtifactRow))}
                refs: dict[str, list[str]] = {}
                for name, version, sha in s.execute(
                    select(ModelRow.name, VersionRow.version, VersionRow.artifact_sha).join(ModelRow, ModelRow.id == VersionRow.model_id)
                ):
                    refs.setdefault(sha, []).append(f"{name}:{version}")
            report.versions_checked = sum(len(v) for v in refs.values())
            on_disk = set(self.store.list_artifacts())
            for sha, files in sorted(arts.items()):
                report.artifacts_checked += 1
                if sha not in on_disk:
                    report.missing.append({"content_hash": sha, "versions": sorted(refs.get(sha, []))})
                    continue
                bad = self.store.verify(sha, files)
                if bad:
                    report.corrupt.append({"content_hash": sha, "versions": sorted(refs.get(sha, [])), "files": bad})
            orphans = [self.store.path_for(sha) for sha in sorted(on_disk - set(arts))] + self.store.list_strays()
            report.orphans = [str(p) for p in orphans]
            temps = self.store.list_temps()
            report.temps = [str(p) for p in temps]
            if repair:
                for p in [*orphans, *temps]:
                    self.store.remove_path(p)
                    report.removed.append(str(p))
        return report
