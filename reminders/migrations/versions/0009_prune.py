"""retention: final reminders by their last change, for pruning

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 18:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# The same text as reminders.prune.FINAL_SQL (a migration does not import the code it migrates).
FINAL = sa.text("status IN ('canceled', 'delivered', 'failed', 'sent', 'undelivered')")


def upgrade() -> None:
    op.create_index(
        "ix_reminders_reminder_final_updated_at",
        "reminders_reminder",
        ["updated_at", "id"],
        postgresql_where=FINAL,
        sqlite_where=FINAL,
    )


def downgrade() -> None:
    op.drop_index("ix_reminders_reminder_final_updated_at", table_name="reminders_reminder")
