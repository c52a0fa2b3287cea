"""Indexes for keyset listing (newest first per state, owner, name) and for retention (finished_at).

Revision ID: 0004
Revises: 0003

``aeforge jobs`` pages by ``seq`` (newest first) under a filter; each filter gets an index ending in seq, so a page
is an index range however many finished jobs the table holds. The owner and name indexes become (owner, seq) and
(name, seq): the old single-column ones are their prefixes.
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_aeforge_jobs_state_seq", "aeforge_jobs", ["state", "seq"])
    op.create_index("ix_aeforge_jobs_owner_seq", "aeforge_jobs", ["owner", "seq"])
    op.create_index("ix_aeforge_jobs_name_seq", "aeforge_jobs", ["name", "seq"])
    op.drop_index("ix_aeforge_jobs_owner", table_name="aeforge_jobs")
    op.drop_index("ix_aeforge_jobs_name", table_name="aeforge_jobs")
    op.create_index("ix_aeforge_jobs_finished_at", "aeforge_jobs", ["finished_at"])


def downgrade() -> None:
    op.drop_index("ix_aeforge_jobs_finished_at", table_name="aeforge_jobs")
    op.create_index("ix_aeforge_jobs_name", "aeforge_jobs", ["name"])
    op.create_index("ix_aeforge_jobs_owner", "aeforge_jobs", ["owner"])
    op.drop_index("ix_aeforge_jobs_name_seq", table_name="aeforge_jobs")
    op.drop_index("ix_aeforge_jobs_owner_seq", table_name="aeforge_jobs")
    op.drop_index("ix_aeforge_jobs_state_seq", table_name="aeforge_jobs")
