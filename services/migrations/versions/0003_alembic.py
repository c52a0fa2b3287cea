"""Alembic versions the job store from here on (aeforge_schema says 3: an older aeforge refuses the database).

The runner before Alembic read aeforge_schema and knew versions 1 and 2; with 3 there it stops with "newer than
this aeforge understands" instead of running on a schema it does not know.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("UPDATE aeforge_schema SET version = 3 WHERE id = 1")


def downgrade() -> None:
    op.execute("UPDATE aeforge_schema SET version = 2 WHERE id = 1")
