"""An index on (owner, state, seq) for a user's listing by state.

Revision ID: 0008
Revises: 0007

A user's ``aeforge jobs`` is always by owner; with ``--state`` the owner's newest jobs in that state are a range of
this index. Over (owner, seq) alone the listing read every job of the owner newest first until a page matched: all
of them for a state the owner has few jobs in (20,000 rows and 110 ms on SQLite at a million jobs).

On SQLite a database with planner statistics (ANALYZE) gets the new index's too: among indexes with statistics,
one without looks as good for ``owner = ?`` as (owner, seq), and the planner took it and sorted all of the owner's
jobs for every page of a plain listing (300 ms). PostgreSQL's statistics are per column, not per index.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_aeforge_jobs_owner_state_seq", "aeforge_jobs", ["owner", "state", "seq"])
    bind = op.get_bind()
    if bind.dialect.name == "sqlite" and _has_statistics(bind):
        op.execute("ANALYZE ix_aeforge_jobs_owner_state_seq")  # one pass over the index: a second a million rows


def _has_statistics(bind) -> bool:
    if not sa.inspect(bind).has_table("sqlite_stat1"):
        return False
    return bind.execute(sa.text("SELECT 1 FROM sqlite_stat1 WHERE tbl = 'aeforge_jobs' LIMIT 1")).first() is not None


def downgrade() -> None:
    op.drop_index("ix_aeforge_jobs_owner_state_seq", table_name="aeforge_jobs")
