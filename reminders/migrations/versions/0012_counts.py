"""counts kept as the rows change: reminders by rule and status, messages by rule, channel,
status and error code, messages sent and reminders ended by hour (reminders.counts), filled from
the rows already there

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 17:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import reminders.models

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
OPEN = sa.text("status IN ('pending', 'queued')")
CANCELED = sa.text("status = 'canceled'")


def upgrade() -> None:
    op.create_table(
        "reminders_reminder_count",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("rule", sa.String(100), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("n", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reminders_reminder_count")),
    )
    op.create_table(
        "reminders_message_count",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("rule", sa.String(100), nullable=True),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error_code", sa.String(32), nullable=True),
        sa.Column("n", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reminders_message_count")),
    )
    op.create_table(
        "reminders_hour_count",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("hour", reminders.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("what", sa.String(32), nullable=False),
        sa.Column("n", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reminders_hour_count")),
    )
    op.create_index(
        op.f("ix_reminders_hour_count_hour_what_n"), "reminders_hour_count", ["hour", "what", "n"]
    )
    op.create_index(
        "ix_reminders_reminder_open_occurrence",
        "reminders_reminder",
        ["rule", "occurrence"],
        postgresql_where=OPEN,
        sqlite_where=OPEN,
    )
    op.create_index(
        "ix_reminders_reminder_canceled_updated_at",
        "reminders_reminder",
        ["rule", "updated_at"],
        postgresql_where=CANCELED,
        sqlite_where=CANCELED,
    )
    # The rows already there, counted once (in this migration's transaction).
    op.execute(
        "INSERT INTO reminders_reminder_count (rule, status, n) "
        "SELECT rule, status, count(*) FROM reminders_reminder GROUP BY rule, status"
    )
    op.execute(
        "INSERT INTO reminders_message_count (rule, channel, status, error_code, n) "
        "SELECT rule, channel, status, error_code, count(*) FROM reminders_message "
        "GROUP BY rule, channel, status, error_code"
    )
    if op.get_bind().dialect.name == "postgresql":
        hour = "(date_trunc('hour', {0} AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')"
    else:  # SQLite keeps UTC as text
        hour = "strftime('%Y-%m-%d %H:00:00.000000', {0})"
    sent, ended = hour.format("created_at"), hour.format("at")
    op.execute(
        f"INSERT INTO reminders_hour_count (hour, what, n) SELECT {sent}, 'sent:' || channel, "
        f"count(*) FROM reminders_message GROUP BY {sent}, channel"
    )
    op.execute(
        f"INSERT INTO reminders_hour_count (hour, what, n) SELECT {ended}, to_status, count(*) "
        "FROM reminders_event WHERE to_status IN ('delivered', 'failed', 'canceled') "
        f"GROUP BY {ended}, to_status"
    )


def downgrade() -> None:
    op.drop_index("ix_reminders_reminder_canceled_updated_at", table_name="reminders_reminder")
    op.drop_index("ix_reminders_reminder_open_occurrence", table_name="reminders_reminder")
    op.drop_table("reminders_hour_count")
    op.drop_table("reminders_message_count")
    op.drop_table("reminders_reminder_count")
