"""Each version keeps its own manifest.

Two versions can share their files (one stored artifact) yet differ in what the manifest says
about running them: a variant that only changes runtime options copies its parent's files.
Before this revision the shared artifact row held the first registrant's manifest for both.
Existing versions get their artifact's manifest, which is what they showed until now.

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column: adding it needs no table rebuild on SQLite (a rebuild of `versions`
    # with foreign keys on would cascade-delete the rows that reference it).
    op.add_column("versions", sa.Column("manifest", sa.JSON(), nullable=True))
    versions = sa.table("versions", sa.column("artifact_sha", sa.String), sa.column("manifest", sa.JSON))
    artifacts = sa.table("artifacts", sa.column("sha256", sa.String), sa.column("manifest", sa.JSON))
    op.execute(
        versions.update().values(
            manifest=sa.select(artifacts.c.manifest).where(artifacts.c.sha256 == versions.c.artifact_sha).scalar_subquery()
        )
    )


def downgrade() -> None:
    op.drop_column("versions", "manifest")  # SQLite >= 3.35 drops a column in place
