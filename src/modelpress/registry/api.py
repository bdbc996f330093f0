"""The model registry: versions, lineage, metrics and stages of every model variant.

    reg = Registry()                                   # ~/.modelpress/registry.db + store/
    v1 = reg.register(artifact, "minilm", metrics={"spearman": 0.84}, reuse=True)
    v2 = reg.register(quantized, "minilm", parent=v1.ref, metrics={"spearman": 0.83})
    reg.promote("minilm:2", "production", why="same quality, 2x faster")
    reg.rollback("minilm")                             # production goes back to the one before

Registering hashes the artifact's files, copies them into the store (temporary folder, fsync,
rename to ``artifacts/<sha256>/``; skipped when the store already holds them) and only then
commits the rows in one transaction, all under the store's lock: a crash leaves the old state
or the new one, at worst an orphan folder that :meth:`Registry.check` finds and
``check(repair=True)`` removes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import case, delete, func, select
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from modelpress.artifacts import Artifact, Manifest
from modelpress.errors import ConfigError, InvalidReferenceError, RegistryConflictError, RegistryError
from modelpress.registry import queries, stages
from modelpress.registry.db import (
    ArtifactRow,
    DeploymentRow,
    LineageRow,
    MetaRow,
    MetricRow,
    ModelRow,
    NoteRow,
    StageEventRow,
    TagRow,
    VersionRow,
)
from modelpress.registry.engine import STORE_ENV, WRITE, create_engine, display_url, make_url, upgrade
from modelpress.registry.names import Ref, parse_ref, validate_name, validate_stage, validate_tag
from modelpress.registry.records import CheckReport, ModelVersion, current_user, normalize_metrics
from modelpress.registry.store import ArtifactStore, Prepared, crash_point

RefLike = str | Ref | ModelVersion
T = TypeVar("T")
_RETRIES = 8  # attempts of a write that lost a unique-constraint race to another writer
_SHA_RE = re.compile(r"[0-9a-f]{64}")

__all__ = ["Registry", "RefLike", "validate_tag"]


def _as_ref(ref: RefLike) -> Ref:
    if isinstance(ref, ModelVersion):
        return Ref(ref.name, version=ref.version)
    return parse_ref(ref)


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


class Registry:
    """A registry database (SQLite file by default, any SQLAlchemy URL) plus its artifact store.

    ``url``: a SQLAlchemy URL or a SQLite file path; default ``$MODELPRESS_REGISTRY_URL``, else
    ``<home>/registry.db``. ``home``: default ``$MODELPRESS_HOME`` or ``~/.modelpress``.
    ``store``: where artifact files go; default ``$MODELPRESS_REGISTRY_STORE``, else beside a
    SQLite file (``<dir>/store`` for ``registry.db``, ``<dir>/<stem>-store`` otherwise), else
    ``<home>/stores/<registry id>`` for a server database (point a shared registry at shared
    storage). Close it (or use ``with``) when done.
    """

    def __init__(
        self, url: str | os.PathLike | None = None, home: str | os.PathLike | None = None, store: str | os.PathLike | None = None
    ) -> None:
        from modelpress.locations import home_dir

        if home is not None:
            self.home = Path(home).expanduser().resolve()
            self.home.mkdir(parents=True, exist_ok=True)
        else:
            self.home = home_dir()
        self.url = make_url(url, self.home)
        self.engine = create_engine(self.url)
        self._writer = self.engine.execution_options(**WRITE)
        try:
            upgrade(self.engine)
            with self._session() as s:
                row = s.get(MetaRow, "registry_id")
                self.registry_id = row.value if row else "unknown"
            self.store = ArtifactStore(self._store_root(store))
            self.store.bind(self.registry_id)
        except BaseException:
            self.engine.dispose()
            raise

    def _store_root(self, store: str | os.PathLike | None) -> Path:
        if store is not None:
            return Path(store)
        if os.environ.get(STORE_ENV):
            return Path(os.environ[STORE_ENV])
        if self.url.get_backend_name() == "sqlite":
            db = Path(self.url.database).expanduser().resolve()
            return db.parent / ("store" if db.name == "registry.db" else f"{db.stem}-store")
        # Never <home>/store, which belongs to the default SQLite registry.
        return self.home / "stores" / re.sub(r"[^A-Za-z0-9]", "", self.registry_id)[:64]

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry(url={display_url(self.url)!r}, store={str(self.store.root)!r})"

    # -- sessions --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _session(self, write: bool = False) -> Iterator[Any]:
        """One transaction: committed when the block ends, rolled back on an error."""
        try:
            with Session(self._writer if write else self.engine, expire_on_commit=False) as s, s.begin():
                yield s
        except IntegrityError:
            raise  # a lost race: _with_retry runs the transaction again
        except DBAPIError as exc:
            first = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]
            raise RegistryError(
                f"The registry database {display_url(self.url)} failed: {first}",
                hint="Check that the database is reachable and not locked by a stuck process; then try again.",
            ) from None

    def _with_retry(self, fn: Callable[[], T]) -> T:
        """Run a write transaction again when a concurrent writer won a unique-constraint race."""
        for attempt in range(_RETRIES):
            try:
                return fn()
            except IntegrityError as exc:
                if attempt == _RETRIES - 1:
                    raise RegistryError(f"The registry kept conflicting with concurrent writers: {str(exc.orig).splitlines()[0]}") from None
                time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    def _read(self, fn: Callable[[Any], T]) -> T:
        with self._session() as s:
            return fn(s)

    def _write(self, fn: Callable[[Any], T]) -> T:
        def run() -> T:
            with self._session(write=True) as s:
                return fn(s)

        return self._with_retry(run)

    def _describe(self, s: Any, row: VersionRow) -> ModelVersion:
        return queries.describe(s, self.store, row)

    @property
    def rollouts(self) -> Any:
        """Deployments and rollout decisions (:class:`modelpress.registry.rollouts.Rollouts`)."""
        from modelpress.registry.rollouts import Rollouts

        return Rollouts(self)

    # -- reading -------------------------------------------------------------------------
    def get(self, ref: RefLike) -> ModelVersion:
        """One version: ``NAME:VERSION``, ``NAME@stage``, ``NAME:latest`` or ``NAME`` (the latest)."""
        r = _as_ref(ref)
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
        r = _as_ref(ref)
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

    def _same(self, s: Any, name: str, prepared: Prepared, *, describe: bool = False) -> Any:
        want = queries.settings_of(prepared.manifest.model_dump(mode="json"))
        for row in reversed(queries.versions_with_hash(s, name, prepared.sha256)):
            if queries.settings_of(row.manifest or row.artifact.manifest or {}) == want:
                return self._describe(s, row) if describe else row
        return None

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
        parent_ref = _as_ref(parent) if parent is not None else None
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

    # -- stages ----------------------------------------------------------------------------
    def promote(self, ref: RefLike, stage: str, who: str | None = None, why: str | None = None) -> ModelVersion:
        """Move a version to a stage. Promoting to production archives the version that was there."""
        r, stage, who = _as_ref(ref), validate_stage(stage), who or current_user()

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
        r, tag = _as_ref(ref), validate_tag(tag)

        def run(s: Any) -> ModelVersion:
            row = queries.resolve(s, r)
            if s.scalar(select(TagRow).where(TagRow.version_id == row.id, TagRow.tag == tag)) is None:
                s.add(TagRow(version_id=row.id, tag=tag))
                s.flush()
            return self._describe(s, row)

        return self._write(run)

    def untag(self, ref: RefLike, tag: str) -> ModelVersion:
        """Remove a tag from a version (a no-op when it has no such tag)."""
        r, tag = _as_ref(ref), validate_tag(tag)

        def run(s: Any) -> ModelVersion:
            row = queries.resolve(s, r)
            s.execute(delete(TagRow).where(TagRow.version_id == row.id, TagRow.tag == tag))
            return self._describe(s, row)

        return self._write(run)

    def note(self, ref: RefLike, text: str, who: str | None = None) -> ModelVersion:
        """Attach a free-form note to a version."""
        if not isinstance(text, str) or not text.strip():
            raise ConfigError("A note needs some text.", hint="Example: reg.note('minilm:2', 'calibrated on 512 STS-B pairs')")
        r, who = _as_ref(ref), who or current_user()

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
        r = _as_ref(ref)

        def run(s: Any) -> ModelVersion:
            row = queries.resolve(s, r)
            for m in rows:
                s.add(MetricRow(version_id=row.id, **m))
            s.flush()
            return self._describe(s, row)

        return self._write(run)

    # -- removing and copying out ----------------------------------------------------------
    def delete(self, ref: RefLike, force: bool = False) -> dict[str, Any]:
        """Delete one version (``NAME:VERSION``); its files go when no other version shares them.

        Refused for a version in production, with descendants, or deployed, unless ``force``.
        Version numbers are never reused.
        """
        r = _as_ref(ref)
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
        r = _as_ref(ref)

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
