"""the current send attempt on a reminder: when it began, which worker, the body's digest

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 15:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import reminders.models

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "reminders_reminder",
        sa.Column("attempt_at", reminders.models.UtcDateTime(timezone=True), nullable=True),
    )
    op.add_column("reminders_reminder", sa.Column("claimed_by", sa.String(128), nullable=True))
    op.add_column("reminders_reminder", sa.Column("body_digest", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("reminders_reminder") as batch:
        batch.drop_column("body_digest")
        batch.drop_column("claimed_by")
        batch.drop_column("attempt_at")
