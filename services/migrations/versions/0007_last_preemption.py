"""aeforge_jobs.last_preempted_by, last_preempted_step: who preempted a re-queued job and at which step, so that the
event of its next start says it resumed after that preemption.

Set when a preemption re-queues a job (running -> queued), cleared by its next state change; a job re-queued by a
preemption before this revision has neither, and its start says only that it resumes from its checkpoint.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("aeforge_jobs") as batch:
        batch.add_column(sa.Column("last_preempted_by", sa.String(128)))
        batch.add_column(sa.Column("last_preempted_step", sa.Integer()))


def downgrade() -> None:
    with op.batch_alter_table("aeforge_jobs") as batch:
        batch.drop_column("last_preempted_step")
        batch.drop_column("last_preempted_by")
