"""The job store as aeforge released it first (schema version 1): jobs, their events, the schema marker.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "aeforge_jobs",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(128), nullable=False, unique=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("owner", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("spec_text", sa.Text(), nullable=False),
        sa.Column("spec_json", sa.Text(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("resources", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("cancel_requested_by", sa.String(100)),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("ray_submission_id", sa.String(160)),
        sa.Column("mlflow_run_id", sa.String(64)),
        sa.Column("model_version", sa.String(64)),
        sa.Column("result", sa.JSON()),
        sa.Column("error", sa.Text()),
        sa.Column("idempotency_key", sa.String(200)),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime()),
        sa.Column("finished_at", sa.DateTime()),
        sa.UniqueConstraint("owner", "idempotency_key", name="uq_aeforge_jobs_owner_idempotency_key"),
    )
    op.create_index("ix_aeforge_jobs_name", "aeforge_jobs", ["name"])
    op.create_index("ix_aeforge_jobs_owner", "aeforge_jobs", ["owner"])
    op.create_index("ix_aeforge_jobs_queue", "aeforge_jobs", ["state", sa.text("priority DESC"), "seq"])
    op.create_table(
        "aeforge_job_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(128), sa.ForeignKey("aeforge_jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("from_state", sa.String(16)),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
    )
    op.create_index("ix_aeforge_job_events_job_id", "aeforge_job_events", ["job_id"])
    marker = op.create_table(
        "aeforge_schema",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("migrated_at", sa.DateTime(), nullable=False),
    )
    op.bulk_insert(marker, [{"id": 1, "version": 1, "migrated_at": datetime.now(UTC).replace(tzinfo=None)}])


def downgrade() -> None:
    op.drop_table("aeforge_schema")
    op.drop_table("aeforge_job_events")
    op.drop_table("aeforge_jobs")
