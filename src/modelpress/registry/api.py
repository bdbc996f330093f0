"""The model registry: versions, lineage, metrics and stages of every model variant.

    reg = Registry()                                   # ~/.modelpress/registry.db + store/
    v1 = reg.register(artifact, "minilm", metrics={"spearman": 0.84})
    v2 = reg.register(quantized, "minilm", parent=v1.ref, step={"technique": "quantize", "bits": 8})
    reg.promote("minilm:2", "production", why="same quality, 2x faster")
    reg.rollback("minilm")                             # production goes back to the one before

Registering copies the files into the store first (temporary folder, fsync, rename to
``artifacts/<sha256>/``) and only then commits the rows in one transaction, all under the
store's lock: a crash leaves the old state or the new one, at worst an orphan folder that
:meth:`Registry.check` finds and ``check(repair=True)`` removes.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..artifacts import Artifact
from ..errors import ConfigError, InvalidReferenceError, RegistryConflictError, RegistryError, RegistryNotFoundError
from .db import ArtifactRow, DeploymentRow, LineageRow, MetaRow, MetricRow, ModelRow, NoteRow, StageEventRow, TagRow, VersionRow
from .engine import STORE_ENV, WRITE, create_engine, display_url, make_url, upgrade
from .lineage import build_tree
from .names import Ref, parse_ref, validate_name, validate_stage
from .records import CheckReport, ModelVersion, current_user, iso, latest_metrics, normalize_metrics
from .store import ArtifactStore, crash_point

RefLike = str | Ref | ModelVersion
_RETRIES = 8


def _as_ref(ref: RefLike) -> Ref:
    if isinstance(ref, ModelVersion):
        return Ref(ref.name, version=ref.version)
    return parse_ref(ref)


def validate_tag(tag: object) -> str:
    ok = isinstance(tag, str) and 0 < len(tag) <= 128 and tag.isprintable() and not tag.isspace()
    if not ok:
        raise ConfigError(f"{tag!r} is not a valid tag.", hint="A tag is 1 to 128 printable characters, e.g. 'fp16' or 'best-sts'.")
    return tag.strip()


def _split_step(step: str | dict[str, Any] | None, manifest_step: dict[str, Any] | None) -> tuple[str | None, dict[str, Any] | None]:
    """The step's name and config, from ``step`` (a name or a config dict) or the manifest."""
    if step is None:
        step = manifest_step
    if step is None:
        return None, None
    if isinstance(step, str):
        return step[:128], manifest_step
    if isinstance(step, dict):
        name = next((str(step[k]) for k in ("technique", "type", "name", "step") if step.get(k)), "step")
        return name[:128], step
    if hasattr(step, "model_dump"):  # a pydantic technique config
        data = step.model_dump(mode="json")
        return type(step).__name__[:128], data
    raise ConfigError(f"A step must be a name or a config dict, not {type(step).__name__}.", hint="Example: step={'technique': 'quantize', 'bits': 8}")


class Registry:
    """A registry database (SQLite file by default, any SQLAlchemy URL) plus its artifact store.

    ``url``: a SQLAlchemy URL or a SQLite file path; default ``$MODELPRESS_REGISTRY_URL``, else
    ``<home>/registry.db``. ``home``: default ``$MODELPRESS_HOME`` or ``~/.modelpress``.
    ``store``: where artifact files go; default ``$MODELPRESS_REGISTRY_STORE``, else beside a
    SQLite file (``<dir>/store`` for ``registry.db``, ``<dir>/<stem>-store`` otherwise), else
    ``<home>/store`` for a server database. Close it (or use ``with``) when done.
    """

    def __init__(self, url: str | os.PathLike | None = None, home: str | os.PathLike | None = None, store: str | os.PathLike | None = None) -> None:
        from ..locations import home_dir

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
        return self.home / "store"

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
        from sqlalchemy.exc import IntegrityError, OperationalError
        from sqlalchemy.orm import Session

        try:
            with Session(self._writer if write else self.engine, expire_on_commit=False) as s, s.begin():
                yield s
        except IntegrityError:
            raise
        except OperationalError as exc:
            raise RegistryError(
                f"The registry database {display_url(self.url)} failed: {str(exc.orig).strip().splitlines()[0]}",
                hint="Check that the database is reachable and not locked by a stuck process; then try again.",
            ) from None

    def _with_retry(self, fn: Any) -> Any:
        """Run a write transaction again when a concurrent writer won a unique-constraint race."""
        from sqlalchemy.exc import IntegrityError

        for attempt in range(_RETRIES):
            try:
                return fn()
            except IntegrityError as exc:
                if attempt == _RETRIES - 1:
                    raise RegistryError(f"The registry kept conflicting with concurrent writers: {str(exc.orig).splitlines()[0]}") from None
                time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    # -- lookups -------------------------------------------------------------------------
    def _model(self, s: Any, name: str, *, lock: bool = False) -> ModelRow:
        from sqlalchemy import select

        q = select(ModelRow).where(ModelRow.name == name)
        model = s.scalar(q.with_for_update() if lock else q)
        if model is None:
            known = s.scalars(select(ModelRow.name).order_by(ModelRow.name).limit(10)).all()
            hint = f"Known models: {', '.join(known)}." if known else "The registry is empty; register one with `modelpress registry register PATH --name NAME`."
            raise RegistryNotFoundError(f"There is no model named '{name}' in the registry.", hint=hint)
        return model

    def _resolve(self, s: Any, ref: RefLike, *, lock: bool = False) -> VersionRow:
        from sqlalchemy import select

        r = _as_ref(ref)
        model = self._model(s, r.name, lock=lock)
        q = select(VersionRow).where(VersionRow.model_id == model.id)
        if r.version is not None:
            row = s.scalar(q.where(VersionRow.version == r.version))
            if row is None:
                have = s.scalars(select(VersionRow.version).where(VersionRow.model_id == model.id).order_by(VersionRow.version)).all()
                raise RegistryNotFoundError(f"'{r.name}' has no version {r.version}.", hint=f"Versions: {', '.join(map(str, have)) or 'none'}.")
            return row
        if r.stage is not None:
            row = s.scalar(q.where(VersionRow.stage == r.stage).order_by(VersionRow.version.desc()).limit(1))
            if row is None:
                raise RegistryNotFoundError(
                    f"No version of '{r.name}' is in {r.stage}.", hint=f"Promote one: modelpress registry promote {r.name}:VERSION --stage {r.stage}"
                )
            return row
        row = s.scalar(q.order_by(VersionRow.version.desc()).limit(1))
        if row is None:
            raise RegistryNotFoundError(f"'{r.name}' has no versions left.", hint=f"Register one with --name {r.name}.")
        return row

    def _describe(self, s: Any, row: VersionRow) -> ModelVersion:
        from sqlalchemy import select

        art = row.artifact
        parents = s.execute(
            select(ModelRow.name, VersionRow.version, LineageRow.step, LineageRow.config)
            .join(VersionRow, VersionRow.id == LineageRow.parent_id)
            .join(ModelRow, ModelRow.id == VersionRow.model_id)
            .where(LineageRow.child_id == row.id)
            .order_by(LineageRow.id)
        ).all()
        metrics = s.scalars(select(MetricRow).where(MetricRow.version_id == row.id).order_by(MetricRow.id)).all()
        events = s.scalars(select(StageEventRow).where(StageEventRow.version_id == row.id).order_by(StageEventRow.id)).all()
        notes = s.scalars(select(NoteRow).where(NoteRow.version_id == row.id).order_by(NoteRow.id)).all()
        tags = s.scalars(select(TagRow.tag).where(TagRow.version_id == row.id).order_by(TagRow.id)).all()
        return ModelVersion(
            name=row.model.name,
            version=row.version,
            stage=row.stage,
            content_hash=art.sha256,
            path=self.store.path_for(art.sha256),
            task=art.task,
            format=art.format,
            model_file=art.model_file,
            size_bytes=art.size_bytes,
            created_at=iso(row.created_at),
            created_by=row.created_by,
            parents=[f"{p.name}:{p.version}" for p in parents],
            step=parents[0].step if parents else None,
            config=parents[0].config if parents else None,
            tags=list(tags),
            notes=[{"text": n.text, "who": n.who, "at": iso(n.at)} for n in notes],
            metrics=[
                {"name": m.name, "value": m.value, "kind": m.kind, "dataset": m.dataset, "runtime": m.runtime, "machine": m.machine, "recorded_at": iso(m.recorded_at)}
                for m in metrics
            ],
            stage_history=[{"from": e.from_stage, "to": e.to_stage, "action": e.action, "who": e.who, "why": e.why, "at": iso(e.at)} for e in events],
            manifest=dict(art.manifest),
        )

    # -- reading -------------------------------------------------------------------------
    def get(self, ref: RefLike) -> ModelVersion:
        """One version: ``NAME:VERSION``, ``NAME@stage``, ``NAME:latest`` or ``NAME`` (the latest)."""
        with self._session() as s:
            return self._describe(s, self._resolve(s, ref))

    def list_models(self) -> list[dict[str, Any]]:
        """Every model: name, number of versions, latest version, production version, last change."""
        from sqlalchemy import func, select

        with self._session() as s:
            out = []
            for model in s.scalars(select(ModelRow).order_by(ModelRow.name)):
                counts = s.execute(
                    select(func.count(VersionRow.id), func.max(VersionRow.version), func.max(VersionRow.created_at)).where(VersionRow.model_id == model.id)
                ).one()
                prod = s.scalar(select(VersionRow.version).where(VersionRow.model_id == model.id, VersionRow.stage == "production"))
                out.append(
                    {
                        "name": model.name,
                        "versions": counts[0],
                        "latest": counts[1],
                        "production": prod,
                        "created_at": iso(model.created_at),
                        "updated_at": iso(counts[2]),
                    }
                )
            return out

    def list_versions(self, name: str) -> list[ModelVersion]:
        """Every version of a model, oldest first."""
        from sqlalchemy import select

        validate_name(name)
        with self._session() as s:
            model = self._model(s, name)
            rows = s.scalars(select(VersionRow).where(VersionRow.model_id == model.id).order_by(VersionRow.version)).all()
            return [self._describe(s, row) for row in rows]

    def lineage(self, ref: RefLike) -> dict[str, Any]:
        """The tree holding ``ref``, from its original to every descendant (a JSON-able dict).

        ``{"focus": "m:3", "root": node}``; a node has ref, name, version, stage, content_hash,
        metrics ({name: latest value}), step and config (what made it from its parent), changes
        (per shared metric: from, to, delta, relative), focus, other_parents and children.
        """
        from sqlalchemy import select

        with self._session() as s:
            focus = self._resolve(s, ref)
            edges = [(e.parent_id, e.child_id, e.step, e.config) for e in s.scalars(select(LineageRow).order_by(LineageRow.id))]
            ids = {focus.id}
            frontier = [focus.id]
            while frontier:  # the connected component of the focus
                nxt = []
                for p, c, _, _ in edges:
                    for a, b in ((p, c), (c, p)):
                        if a in frontier and b not in ids:
                            ids.add(b)
                            nxt.append(b)
                frontier = nxt
            rows = s.execute(
                select(VersionRow.id, ModelRow.name, VersionRow.version, VersionRow.stage, VersionRow.artifact_sha, VersionRow.created_at)
                .join(ModelRow, ModelRow.id == VersionRow.model_id)
                .where(VersionRow.id.in_(ids))
            ).all()
            metric_rows: dict[int, list[dict[str, Any]]] = {}
            for m in s.scalars(select(MetricRow).where(MetricRow.version_id.in_(ids)).order_by(MetricRow.id)):
                metric_rows.setdefault(m.version_id, []).append({"name": m.name, "value": m.value})
            nodes = {
                r.id: {
                    "ref": f"{r.name}:{r.version}",
                    "name": r.name,
                    "version": r.version,
                    "stage": r.stage,
                    "content_hash": r.artifact_sha,
                    "created_at": iso(r.created_at),
                    "metrics": latest_metrics(metric_rows.get(r.id, [])),
                }
                for r in rows
            }
            return build_tree(focus.id, nodes, edges)

    # -- registering -----------------------------------------------------------------------
    def register(
        self,
        artifact: Artifact | str | os.PathLike,
        name: str,
        parent: RefLike | None = None,
        step: str | dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        stage: str = "candidate",
        tags: Iterable[str] = (),
        note: str | None = None,
        *,
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
        """
        name = validate_name(name)
        stage = validate_stage(stage)
        if not isinstance(artifact, Artifact):
            artifact = Artifact.open(artifact)
        parent_ref = _as_ref(parent) if parent is not None else None
        step_name, step_config = _split_step(step, artifact.manifest.step)
        metric_rows = normalize_metrics(artifact.manifest.metrics, strict=False)
        explicit = normalize_metrics(metrics)
        metric_rows = [m for m in metric_rows if m["name"] not in {e["name"] for e in explicit}] + explicit
        tag_list = [validate_tag(t) for t in ([tags] if isinstance(tags, str) else tags)]
        who = who or current_user()
        if parent_ref is not None:
            with self._session() as s:
                self._resolve(s, parent_ref)  # fail before copying anything

        staged = self.store.stage(artifact)
        try:
            with self.store.lock():
                self.store.place(staged)
                crash_point("after_rename")

                def insert() -> ModelVersion:
                    with self._session(write=True) as s:
                        row = self._insert_version(s, staged, name, who)
                        self._link_parent(s, row, parent_ref, artifact.manifest.parent, step_name, step_config)
                        for m in metric_rows:
                            s.add(MetricRow(version_id=row.id, **m))
                        for t in dict.fromkeys(tag_list):
                            s.add(TagRow(version_id=row.id, tag=t))
                        if note:
                            s.add(NoteRow(version_id=row.id, text=str(note), who=who))
                        if stage != "candidate":
                            self._set_stage(s, row, stage, who, why, "register")
                        s.flush()
                        described = self._describe(s, row)
                        crash_point("before_commit")
                    return described

                result = self._with_retry(insert)
                crash_point("after_commit")
        finally:
            if staged.tmp.exists():
                shutil.rmtree(staged.tmp, ignore_errors=True)
        return result

    def _insert_version(self, s: Any, staged: Any, name: str, who: str | None) -> VersionRow:
        from sqlalchemy import select

        if s.get(ArtifactRow, staged.sha256) is None:
            m = staged.manifest
            s.add(
                ArtifactRow(
                    sha256=staged.sha256,
                    task=m.task,
                    format=m.format,
                    model_file=m.model_file,
                    files=staged.files,
                    manifest=m.model_dump(mode="json"),
                    size_bytes=staged.size_bytes,
                )
            )
        model = s.scalar(select(ModelRow).where(ModelRow.name == name).with_for_update())
        if model is None:
            model = ModelRow(name=name, next_version=1)
            s.add(model)
        s.flush()
        number = model.next_version
        model.next_version = number + 1
        row = VersionRow(model_id=model.id, version=number, artifact_sha=staged.sha256, stage="candidate", created_by=who)
        s.add(row)
        s.flush()
        s.add(StageEventRow(version_id=row.id, from_stage=None, to_stage="candidate", action="register", who=who))
        return row

    def _link_parent(self, s: Any, row: VersionRow, parent_ref: Ref | None, parent_hash: str | None, step: str | None, config: dict | None) -> None:
        from sqlalchemy import select

        parent_row = None
        if parent_ref is not None:
            parent_row = self._resolve(s, parent_ref)
        elif parent_hash:
            parent_row = s.scalar(
                select(VersionRow)
                .where(VersionRow.artifact_sha == parent_hash, VersionRow.id != row.id)
                .order_by(VersionRow.created_at.desc(), VersionRow.id.desc())
                .limit(1)
            )
        if parent_row is not None:
            s.add(LineageRow(parent_id=parent_row.id, child_id=row.id, step=step, config=config))

    # -- stages ----------------------------------------------------------------------------
    def _set_stage(self, s: Any, row: VersionRow, stage: str, who: str | None, why: str | None, action: str) -> None:
        from sqlalchemy import select

        if row.stage == stage:
            return
        if stage == "production":
            current = s.scalar(select(VersionRow).where(VersionRow.model_id == row.model_id, VersionRow.stage == "production").with_for_update())
            if current is not None and current.id != row.id:
                current.stage = "archived"
                s.add(StageEventRow(version_id=current.id, from_stage="production", to_stage="archived", action=action, who=who, why=why))
                s.flush()  # the old production row changes first: one production version at any instant
        s.add(StageEventRow(version_id=row.id, from_stage=row.stage, to_stage=stage, action=action, who=who, why=why))
        row.stage = stage
        s.flush()

    def promote(self, ref: RefLike, stage: str, who: str | None = None, why: str | None = None) -> ModelVersion:
        """Move a version to a stage. Promoting to production archives the version that was there."""
        stage = validate_stage(stage)
        who = who or current_user()

        def run() -> ModelVersion:
            with self._session(write=True) as s:
                row = self._resolve(s, ref, lock=True)
                self._set_stage(s, row, stage, who, why, "promote")
                return self._describe(s, row)

        return self._with_retry(run)

    def rollback(self, name: str, who: str | None = None, why: str | None = None) -> ModelVersion:
        """Put the previous production version of ``name`` back in production; the current one is archived."""
        from sqlalchemy import select

        name = validate_name(name.name if isinstance(name, ModelVersion) else name)
        who = who or current_user()

        def run() -> ModelVersion:
            with self._session(write=True) as s:
                model = self._model(s, name, lock=True)
                current = s.scalar(select(VersionRow).where(VersionRow.model_id == model.id, VersionRow.stage == "production"))
                if current is None:
                    raise RegistryConflictError(
                        f"'{name}' has no version in production to roll back from.", hint=f"Promote one: modelpress registry promote {name}:VERSION --stage production"
                    )
                events = s.execute(
                    select(StageEventRow.version_id, StageEventRow.action)
                    .join(VersionRow, VersionRow.id == StageEventRow.version_id)
                    .where(VersionRow.model_id == model.id, StageEventRow.to_stage == "production")
                    .order_by(StageEventRow.id)
                ).all()
                stack: list[int] = []
                for version_id, action in events:
                    if action == "rollback":
                        while stack and stack[-1] != version_id:
                            stack.pop()
                        if not stack:
                            stack.append(version_id)
                    else:
                        if version_id in stack:
                            stack.remove(version_id)
                        stack.append(version_id)
                earlier = [v for v in stack if v != current.id]
                if not earlier:
                    raise RegistryConflictError(
                        f"{name}:{current.version} is the only version of '{name}' that has been in production; there is nothing to roll back to.",
                        hint=f"Promote a specific version instead: modelpress registry promote {name}:VERSION --stage production",
                    )
                target = s.get(VersionRow, earlier[-1])
                self._set_stage(s, target, "production", who, why or f"rollback from {name}:{current.version}", "rollback")
                return self._describe(s, target)

        return self._with_retry(run)

    # -- annotations -----------------------------------------------------------------------
    def tag(self, ref: RefLike, tag: str) -> ModelVersion:
        """Add a tag to a version (adding it twice is a no-op)."""
        from sqlalchemy import select

        tag = validate_tag(tag)

        def run() -> ModelVersion:
            with self._session(write=True) as s:
                row = self._resolve(s, ref)
                if s.scalar(select(TagRow).where(TagRow.version_id == row.id, TagRow.tag == tag)) is None:
                    s.add(TagRow(version_id=row.id, tag=tag))
                    s.flush()
                return self._describe(s, row)

        return self._with_retry(run)

    def untag(self, ref: RefLike, tag: str) -> ModelVersion:
        from sqlalchemy import delete

        with self._session(write=True) as s:
            row = self._resolve(s, ref)
            s.execute(delete(TagRow).where(TagRow.version_id == row.id, TagRow.tag == tag))
            return self._describe(s, row)

    def note(self, ref: RefLike, text: str, who: str | None = None) -> ModelVersion:
        """Attach a free-form note to a version."""
        if not isinstance(text, str) or not text.strip():
            raise ConfigError("A note needs some text.", hint="Example: reg.note('minilm:2', 'calibrated on 512 STS-B pairs')")
        with self._session(write=True) as s:
            row = self._resolve(s, ref)
            s.add(NoteRow(version_id=row.id, text=text, who=who or current_user()))
            s.flush()
            return self._describe(s, row)

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
            raise ConfigError("No metrics to record.", hint="Example: record_metrics('minilm:2', {'latency_ms': 3.2}, runtime='onnxruntime')")
        with self._session(write=True) as s:
            row = self._resolve(s, ref)
            for m in rows:
                s.add(MetricRow(version_id=row.id, **m))
            s.flush()
            return self._describe(s, row)

    # -- removing and copying out ----------------------------------------------------------
    def delete(self, ref: RefLike, force: bool = False) -> dict[str, Any]:
        """Delete one version (``NAME:VERSION``); its files go when no other version shares them.

        Refused for a version in production, with descendants, or deployed, unless ``force``.
        Version numbers are never reused.
        """
        from sqlalchemy import func, select

        r = _as_ref(ref)
        if r.version is None:
            raise InvalidReferenceError(f"'{r}' does not name a version; delete needs one.", hint=f"Example: modelpress registry delete {r.name}:3")
        with self.store.lock():
            with self._session(write=True) as s:
                row = self._resolve(s, r, lock=True)
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
                        hint="Promote another version / delete the descendants first, or pass force=True (--force).",
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
        """Copy a version's stored files to ``dest`` (atomically, every hash checked) and open it."""
        with self._session() as s:
            row = self._resolve(s, ref)
            sha, files = row.artifact_sha, dict(row.artifact.files)
        return Artifact.open(self.store.export(sha, files, dest, overwrite=overwrite))

    # -- integrity -------------------------------------------------------------------------
    def check(self, repair: bool = False) -> CheckReport:
        """Verify every stored artifact against its hashes; find orphan and temporary folders.

        With ``repair``, orphans (folders without a database row, left by a crash before the
        commit) and temporary folders are removed. Versions whose files are missing or corrupt
        are reported (``damaged_versions``), never deleted.
        """
        from sqlalchemy import select

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
