"""metrics: messages keep their rule; indexes for GET /metrics

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 15:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

UNSENT = sa.text("status IN ('pending', 'queued', 'sending')")


def upgrade() -> None:
    with op.batch_alter_table("reminders_message") as batch:
        batch.add_column(sa.Column("rule", sa.String(length=100), nullable=True))
    # The messages sent before: their reminder's rule.
    op.execute(
        "UPDATE reminders_message SET rule = (SELECT r.rule FROM reminders_reminder r "
        "WHERE r.id = reminders_message.reminder_id)"
    )
    op.create_index(
        op.f("ix_reminders_message_rule_channel_status_error_code"),
        "reminders_message",
        ["rule", "channel", "status", "error_code"],
    )
    op.create_index(
        op.f("ix_reminders_reminder_rule_status"), "reminders_reminder", ["rule", "status"]
    )
    op.create_index(
        "ix_reminders_reminder_unsent_send_at",
        "reminders_reminder",
        ["send_at", "rule"],
        postgresql_where=UNSENT,
        sqlite_where=UNSENT,
    )


def downgrade() -> None:
    op.drop_index("ix_reminders_reminder_unsent_send_at", table_name="reminders_reminder")
    op.drop_index(op.f("ix_reminders_reminder_rule_status"), table_name="reminders_reminder")
    op.drop_index(
        op.f("ix_reminders_message_rule_channel_status_error_code"),
        table_name="reminders_message",
    )
    with op.batch_alter_table("reminders_message") as batch:
        batch.drop_column("rule")
