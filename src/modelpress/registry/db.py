"""The registry's tables (SQLAlchemy 2 typed ORM).

The schema itself is created and changed only by the Alembic revisions in ``migrations/``;
these classes must match the head revision (``tests/registry/test_migrations.py`` checks it).

- ``models``: one row per name; ``next_version`` hands out version numbers (a row lock makes
  concurrent registrations get distinct numbers).
- ``versions``: (model, integer version) -> one artifact plus the version's own manifest (two
  versions may share files yet differ in settings, e.g. runtime options); never rewritten once
  written, except for its current ``stage`` (whose history is in ``stage_events``).
- ``artifacts``: content-addressed by the sha256 over their files; stored once on disk however
  many versions share them.
- ``lineage``: parent version -> child version, with the recipe step and config that made it.
- ``metrics``: quality and speed numbers, with the dataset, runtime and machine.
- ``tags``, ``notes``; ``deployments`` and ``rollout_events`` for serving.
- ``rollout_leases``: which server drives the rollout of a deployment name (owner, expiry, a
  sequence number that changes hands with the lease; see :mod:`modelpress.registry.leases`).
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Deterministic constraint and index names, spelled out the same way in the migrations.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
STAGE_CHECK = "stage IN ('candidate', 'staging', 'production', 'archived')"


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, _dt.datetime: DateTime(timezone=True)}


class MetaRow(Base):
    """Key/value facts about the registry itself (its id, which ties it to one artifact store)."""

    __tablename__ = "registry_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class ModelRow(Base):
    __tablename__ = "models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    next_version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[_dt.datetime] = mapped_column(default=utcnow)
    versions: Mapped[list[VersionRow]] = relationship(back_populates="model", passive_deletes=True, order_by="VersionRow.version")


class ArtifactRow(Base):
    __tablename__ = "artifacts"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    task: Mapped[str] = mapped_column(String(64))
    format: Mapped[str] = mapped_column(String(32))
    model_file: Mapped[str | None] = mapped_column(String(512))
    files: Mapped[dict[str, Any]]  # relative path -> sha256
    manifest: Mapped[dict[str, Any]]
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[_dt.datetime] = mapped_column(default=utcnow)


class VersionRow(Base):
    __tablename__ = "versions"
    __table_args__ = (
        UniqueConstraint("model_id", "version", name="uq_versions_model_version"),
        CheckConstraint(STAGE_CHECK, name="ck_versions_stage"),
        # At most one production version per model, whatever the code above does.
        Index(
            "uq_versions_one_production",
            "model_id",
            unique=True,
            sqlite_where=text("stage = 'production'"),
            postgresql_where=text("stage = 'production'"),
        ),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    artifact_sha: Mapped[str] = mapped_column(ForeignKey("artifacts.sha256", ondelete="RESTRICT"), index=True)
    stage: Mapped[str] = mapped_column(String(16), default="candidate")
    created_at: Mapped[_dt.datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(128))
    # This version's manifest (task, task_config, signature, step, ...); NULL only in rows
    # written before revision 0003 whose artifact row held no manifest.
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    model: Mapped[ModelRow] = relationship(back_populates="versions")
    artifact: Mapped[ArtifactRow] = relationship()


class LineageRow(Base):
    __tablename__ = "lineage"
    __table_args__ = (UniqueConstraint("parent_id", "child_id", name="uq_lineage_edge"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), index=True)
    child_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), index=True)
    step: Mapped[str | None] = mapped_column(String(128))  # the technique, e.g. "quantize"
    config: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the step's full config
    created_at: Mapped[_dt.datetime] = mapped_column(default=utcnow)


class MetricRow(Base):
    __tablename__ = "metrics"
    __table_args__ = (CheckConstraint("kind IN ('quality', 'speed')", name="ck_metrics_kind"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    value: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(16))
    dataset: Mapped[str | None] = mapped_column(String(256))
    runtime: Mapped[str | None] = mapped_column(String(64))
    machine: Mapped[str | None] = mapped_column(String(256))
    recorded_at: Mapped[_dt.datetime] = mapped_column(default=utcnow)


class StageEventRow(Base):
    __tablename__ = "stage_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), index=True)
    from_stage: Mapped[str | None] = mapped_column(String(16))
    to_stage: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(16))  # register, promote, rollback
    who: Mapped[str | None] = mapped_column(String(128))
    why: Mapped[str | None] = mapped_column(Text)
    at: Mapped[_dt.datetime] = mapped_column(default=utcnow)


class TagRow(Base):
    __tablename__ = "tags"
    __table_args__ = (UniqueConstraint("version_id", "tag", name="uq_tags_version_tag"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), index=True)
    tag: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[_dt.datetime] = mapped_column(default=utcnow)


class NoteRow(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), index=True)
    text: Mapped[str] = mapped_column(Text)
    who: Mapped[str | None] = mapped_column(String(128))
    at: Mapped[_dt.datetime] = mapped_column(default=utcnow)


class DeploymentRow(Base):
    """A named service: which model and version it serves, its traffic policy and rollout state."""

    __tablename__ = "deployments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    version_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id", ondelete="SET NULL"))
    traffic_policy: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    rollout_state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[_dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[_dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class RolloutEventRow(Base):
    """One decision of a rollout controller (promote, hold, roll back), with its evidence."""

    __tablename__ = "rollout_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"), index=True)
    at: Mapped[_dt.datetime] = mapped_column(default=utcnow)
    decision: Mapped[dict[str, Any]] = mapped_column(JSON)


class LeaseRow(Base):
    """Which server drives the rollout of deployment ``name``: owner, expiry (epoch seconds), and ``seq``, the fencing token."""

    __tablename__ = "rollout_leases"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(256))
    expires_at: Mapped[float | None] = mapped_column(Float)
    seq: Mapped[int] = mapped_column(Integer)
