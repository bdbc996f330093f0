"""Reading the registry inside a session: resolving references, describing versions, lineage data.

Plain functions over a SQLAlchemy session, used by :class:`~modelpress.registry.api.Registry`
(which owns the sessions); nothing here writes.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from modelpress.errors import RegistryNotFoundError
from modelpress.registry.db import LineageRow, MetricRow, ModelRow, NoteRow, StageEventRow, TagRow, VersionRow
from modelpress.registry.lineage import build_tree
from modelpress.registry.names import Ref
from modelpress.registry.records import ModelVersion, iso, latest_metrics
from modelpress.registry.store import ArtifactStore

# What a manifest says about running an artifact: two versions with the same files and the same
# settings are the same thing (register(..., reuse=True) returns the one already there).
SETTINGS_KEYS = ("task", "format", "model_file", "signature", "task_config")


def settings_of(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: manifest.get(k) for k in SETTINGS_KEYS}


def get_model(s: Any, name: str, *, lock: bool = False) -> ModelRow:
    """The model row named ``name`` (locked FOR UPDATE with ``lock``), or a clear not-found error."""
    q = select(ModelRow).where(ModelRow.name == name)
    model = s.scalar(q.with_for_update() if lock else q)
    if model is None:
        known = s.scalars(select(ModelRow.name).order_by(ModelRow.name).limit(10)).all()
        hint = (
            f"Known models: {', '.join(known)}."
            if known
            else "The registry is empty; register one with `modelpress registry register PATH --name NAME`."
        )
        raise RegistryNotFoundError(f"There is no model named '{name}' in the registry.", hint=hint)
    return model


def resolve(s: Any, r: Ref, *, lock: bool = False) -> VersionRow:
    """The version row a parsed reference names: NAME:VERSION, NAME@stage, or the latest."""
    model = get_model(s, r.name, lock=lock)
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
                f"No version of '{r.name}' is in {r.stage}.",
                hint=f"Promote one: modelpress registry promote {r.name}:VERSION --stage {r.stage}",
            )
        return row
    row = s.scalar(q.order_by(VersionRow.version.desc()).limit(1))
    if row is None:
        raise RegistryNotFoundError(f"'{r.name}' has no versions left.", hint=f"Register one with --name {r.name}.")
    return row


def describe(s: Any, store: ArtifactStore, row: VersionRow) -> ModelVersion:
    """Everything about one version, as a detached :class:`ModelVersion`."""
    art = row.artifact
    manifest = dict(row.manifest or art.manifest or {})
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
        path=store.path_for(art.sha256),
        task=manifest.get("task") or art.task,
        format=manifest.get("format") or art.format,
        model_file=manifest.get("model_file", art.model_file),
        size_bytes=art.size_bytes,
        created_at=iso(row.created_at),
        created_by=row.created_by,
        parents=[f"{p.name}:{p.version}" for p in parents],
        step=parents[0].step if parents else None,
        config=parents[0].config if parents else None,
        tags=list(tags),
        notes=[{"text": n.text, "who": n.who, "at": iso(n.at)} for n in notes],
        metrics=[
            {
                "name": m.name,
                "value": m.value,
                "kind": m.kind,
                "dataset": m.dataset,
                "runtime": m.runtime,
                "machine": m.machine,
                "recorded_at": iso(m.recorded_at),
            }
            for m in metrics
        ],
        stage_history=[
            {"from": e.from_stage, "to": e.to_stage, "action": e.action, "who": e.who, "why": e.why, "at": iso(e.at)} for e in events
        ],
        manifest=manifest,
    )


def versions_with_hash(s: Any, name: str, sha256: str) -> list[VersionRow]:
    """The versions of ``name`` whose files have this content hash, oldest first (none if no such model)."""
    return list(
        s.scalars(
            select(VersionRow)
            .join(ModelRow, ModelRow.id == VersionRow.model_id)
            .where(ModelRow.name == name, VersionRow.artifact_sha == sha256)
            .order_by(VersionRow.version)
        )
    )


def list_models(s: Any) -> list[dict[str, Any]]:
    """Every model: name, number of versions, latest version, production version, last change."""
    stats = {
        model_id: (count, latest, updated)
        for model_id, count, latest, updated in s.execute(
            select(VersionRow.model_id, func.count(VersionRow.id), func.max(VersionRow.version), func.max(VersionRow.created_at)).group_by(
                VersionRow.model_id
            )
        )
    }
    prod = dict(s.execute(select(VersionRow.model_id, VersionRow.version).where(VersionRow.stage == "production")).all())
    out = []
    for model in s.scalars(select(ModelRow).order_by(ModelRow.name)):
        count, latest, updated = stats.get(model.id, (0, None, None))
        out.append(
            {
                "name": model.name,
                "versions": count,
                "latest": latest,
                "production": prod.get(model.id),
                "created_at": iso(model.created_at),
                "updated_at": iso(updated),
            }
        )
    return out


def lineage_tree(s: Any, focus: VersionRow) -> dict[str, Any]:
    """The lineage tree holding ``focus`` (see :func:`modelpress.registry.lineage.build_tree`)."""
    edges = [(e.parent_id, e.child_id, e.step, e.config) for e in s.scalars(select(LineageRow).order_by(LineageRow.id))]
    neighbours: dict[int, set[int]] = {}
    for p, c, _, _ in edges:
        neighbours.setdefault(p, set()).add(c)
        neighbours.setdefault(c, set()).add(p)
    ids, frontier = {focus.id}, {focus.id}
    while frontier:  # the connected component of the focus
        frontier = {b for a in frontier for b in neighbours.get(a, ()) if b not in ids}
        ids.update(frontier)
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
