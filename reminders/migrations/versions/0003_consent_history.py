"""consent history: every opt-out and every opt-in, with its source

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 14:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import reminders.models

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reminders_consent_event",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("customer_id", sa.String(length=255), nullable=True),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("at", reminders.models.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reminders_consent_event")),
    )
    op.create_index(
        op.f("ix_reminders_consent_event_channel_address_at"),
        "reminders_consent_event",
        ["channel", "address", "at"],
        unique=False,
    )
    # The opt-outs already recorded start the history.
    op.execute(
        "INSERT INTO reminders_consent_event "
        "(channel, address, customer_id, action, source, reason, at) "
        "SELECT channel, address, customer_id, 'opt_out', source, reason, created_at "
        "FROM reminders_optout"
    )


def downgrade() -> None:
    op.drop_index(
        op.f("ix_reminders_consent_event_channel_address_at"),
        table_name="reminders_consent_event",
    )
    op.drop_table("reminders_consent_event")
