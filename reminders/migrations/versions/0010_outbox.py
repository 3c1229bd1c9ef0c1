"""the outbox: write-back statements and webhooks to deliver, one row per event and destination

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 17:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import reminders.models

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_TABLE = "reminders_outbox"


def upgrade() -> None:
    utc = reminders.models.UtcDateTime(timezone=True)
    op.create_table(
        _TABLE,
        sa.Column("id", reminders.models.BigId, autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(40), nullable=False),
        sa.Column("destination", sa.String(120), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("rule", sa.String(100)),
        sa.Column("reminder_id", reminders.models.BigId),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_at", utc, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("last_attempt_at", utc),
        sa.Column("created_at", utc, nullable=False),
        sa.Column("done_at", utc),
        sa.PrimaryKeyConstraint("id", name=f"pk_{_TABLE}"),
    )
    op.create_index(f"ix_{_TABLE}_destination_status_id", _TABLE, ["destination", "status", "id"])
    op.create_index(f"ix_{_TABLE}_status_done_at", _TABLE, ["status", "done_at"])


def downgrade() -> None:
    op.drop_index(f"ix_{_TABLE}_status_done_at", _TABLE)
    op.drop_index(f"ix_{_TABLE}_destination_status_id", _TABLE)
    op.drop_table(_TABLE)
