"""aeforge_jobs.priority_class, max_hours, preempted_by: the fair queue's class, backfill limit and preemption mark.

A job queued before them has no class (the scheduler treats it as of the policy's default class, at its stored
priority), no max_hours (it never backfills) and is preempted by nobody.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("aeforge_jobs") as batch:
        batch.add_column(sa.Column("priority_class", sa.String(64)))
        batch.add_column(sa.Column("max_hours", sa.Float()))
        batch.add_column(sa.Column("preempted_by", sa.String(128)))


def downgrade() -> None:
    with op.batch_alter_table("aeforge_jobs") as batch:
        batch.drop_column("preempted_by")
        batch.drop_column("max_hours")
        batch.drop_column("priority_class")
