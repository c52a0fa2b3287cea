"""aeforge_jobs.wait_reason: why a queued job waits (schema version 2).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("aeforge_jobs") as batch:
        batch.add_column(sa.Column("wait_reason", sa.Text()))
    op.execute("UPDATE aeforge_schema SET version = 2 WHERE id = 1")


def downgrade() -> None:
    with op.batch_alter_table("aeforge_jobs") as batch:
        batch.drop_column("wait_reason")
    op.execute("UPDATE aeforge_schema SET version = 1 WHERE id = 1")
