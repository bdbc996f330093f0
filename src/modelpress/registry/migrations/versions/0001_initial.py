"""The first registry schema: models, versions, artifacts, lineage, metrics, stages, tags, notes.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import datetime as _dt
import uuid

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    meta = op.create_table(
        "registry_meta",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_registry_meta"),
    )
    op.bulk_insert(
        meta,
        [
            {"key": "registry_id", "value": uuid.uuid4().hex},
            {"key": "created_at", "value": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")},
        ],
    )
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("next_version", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_models"),
        sa.UniqueConstraint("name", name="uq_models_name"),
    )
    op.create_table(
        "artifacts",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("task", sa.String(64), nullable=False),
        sa.Column("format", sa.String(32), nullable=False),
        sa.Column("model_file", sa.String(512), nullable=True),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("sha256", name="pk_artifacts"),
    )
    op.create_table(
        "versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("artifact_sha", sa.String(64), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("created_by", sa.String(128), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_versions"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name="fk_versions_model_id_models", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["artifact_sha"], ["artifacts.sha256"], name="fk_versions_artifact_sha_artifacts", ondelete="RESTRICT"),
        sa.UniqueConstraint("model_id", "version", name="uq_versions_model_version"),
        sa.CheckConstraint("stage IN ('candidate', 'staging', 'production', 'archived')", name="ck_versions_stage"),
    )
    op.create_index("ix_versions_model_id", "versions", ["model_id"])
    op.create_index("ix_versions_artifact_sha", "versions", ["artifact_sha"])
    op.create_index(
        "uq_versions_one_production",
        "versions",
        ["model_id"],
        unique=True,
        sqlite_where=sa.text("stage = 'production'"),
        postgresql_where=sa.text("stage = 'production'"),
    )
    op.create_table(
        "lineage",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=False),
        sa.Column("child_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.String(128), nullable=True),
        sa.Column("config", sa.JSON(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_lineage"),
        sa.ForeignKeyConstraint(["parent_id"], ["versions.id"], name="fk_lineage_parent_id_versions", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["child_id"], ["versions.id"], name="fk_lineage_child_id_versions", ondelete="CASCADE"),
        sa.UniqueConstraint("parent_id", "child_id", name="uq_lineage_edge"),
    )
    op.create_index("ix_lineage_parent_id", "lineage", ["parent_id"])
    op.create_index("ix_lineage_child_id", "lineage", ["child_id"])
    op.create_table(
        "metrics",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("dataset", sa.String(256), nullable=True),
        sa.Column("runtime", sa.String(64), nullable=True),
        sa.Column("machine", sa.String(256), nullable=True),
        sa.Column("recorded_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_metrics"),
        sa.ForeignKeyConstraint(["version_id"], ["versions.id"], name="fk_metrics_version_id_versions", ondelete="CASCADE"),
        sa.CheckConstraint("kind IN ('quality', 'speed')", name="ck_metrics_kind"),
    )
    op.create_index("ix_metrics_version_id", "metrics", ["version_id"])
    op.create_table(
        "stage_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("from_stage", sa.String(16), nullable=True),
        sa.Column("to_stage", sa.String(16), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("who", sa.String(128), nullable=True),
        sa.Column("why", sa.Text(), nullable=True),
        sa.Column("at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_stage_events"),
        sa.ForeignKeyConstraint(["version_id"], ["versions.id"], name="fk_stage_events_version_id_versions", ondelete="CASCADE"),
    )
    op.create_index("ix_stage_events_version_id", "stage_events", ["version_id"])
    op.create_table(
        "tags",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("tag", sa.String(128), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tags"),
        sa.ForeignKeyConstraint(["version_id"], ["versions.id"], name="fk_tags_version_id_versions", ondelete="CASCADE"),
        sa.UniqueConstraint("version_id", "tag", name="uq_tags_version_tag"),
    )
    op.create_index("ix_tags_version_id", "tags", ["version_id"])
    op.create_table(
        "notes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("who", sa.String(128), nullable=True),
        sa.Column("at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_notes"),
        sa.ForeignKeyConstraint(["version_id"], ["versions.id"], name="fk_notes_version_id_versions", ondelete="CASCADE"),
    )
    op.create_index("ix_notes_version_id", "notes", ["version_id"])


def downgrade() -> None:
    for table in ("notes", "tags", "stage_events", "metrics", "lineage", "versions", "artifacts", "models", "registry_meta"):
        op.drop_table(table)
