"""scan runs record their kind (full or incremental) and the rule's digest; two redundant
reminder indexes dropped

(rule, status) is the prefix of (rule, status, send_at) and (status, send_at) the prefix of
(status, send_at, rule): every query that used the shorter one uses the longer one as well,
and each index is written on every insert and status change.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 18:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The runs before this one were all full scans.
    op.add_column(
        "reminders_scan_run",
        sa.Column("kind", sa.String(16), nullable=False, server_default="full"),
    )
    op.add_column("reminders_scan_run", sa.Column("rule_digest", sa.String(16), nullable=True))
    op.drop_index(op.f("ix_reminders_reminder_rule_status"), table_name="reminders_reminder")
    op.drop_index(op.f("ix_reminders_reminder_status_send_at"), table_name="reminders_reminder")


def downgrade() -> None:
    op.create_index(
        op.f("ix_reminders_reminder_status_send_at"), "reminders_reminder", ["status", "send_at"]
    )
    op.create_index(
        op.f("ix_reminders_reminder_rule_status"), "reminders_reminder", ["rule", "status"]
    )
    with op.batch_alter_table("reminders_scan_run") as batch:
        batch.drop_column("rule_digest")
        batch.drop_column("kind")
