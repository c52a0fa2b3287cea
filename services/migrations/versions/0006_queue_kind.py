"""aeforge_jobs.queue_kind and an index on (state, owner, priority, queue_kind, seq): a scheduling pass reads of each
owner's queued jobs alike only the first few.

``queue_kind`` says what the scheduler judges a queued job by, but its max_hours and its past attempts: kind,
priority class and resources as stored (services.store.queue_kind_of); a sweep's is its own (its resources depend
on the cluster). Every row is given its kind here, in one statement.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("aeforge_jobs") as batch:
        batch.add_column(sa.Column("queue_kind", sa.Text()))
    # As services.store.queue_kind_of writes it: "sweep:ID", or "KIND|CLASS|RESOURCES-JSON".
    op.execute(
        "UPDATE aeforge_jobs SET queue_kind = CASE WHEN kind = 'sweep' THEN 'sweep:' || id "
        "ELSE kind || '|' || COALESCE(priority_class, '') || '|' || CAST(resources AS TEXT) END"
    )
    op.create_index("ix_aeforge_jobs_queue_kind", "aeforge_jobs", ["state", "owner", "priority", "queue_kind", "seq"])


def downgrade() -> None:
    op.drop_index("ix_aeforge_jobs_queue_kind", table_name="aeforge_jobs")
    with op.batch_alter_table("aeforge_jobs") as batch:
        batch.drop_column("queue_kind")
