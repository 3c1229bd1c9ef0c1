"""console: users, API keys, audit log, paused rules; indexes for the console's queries

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import reminders.models

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_AT = reminders.models.UtcDateTime(timezone=True)
DEFERRED = "status = 'pending' AND reason LIKE 'deferred:%'"


def upgrade() -> None:
    op.create_table(
        "reminders_user",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("created_at", _AT, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reminders_user")),
        sa.UniqueConstraint("name", name=op.f("uq_reminders_user_name")),
    )
    op.create_table(
        "reminders_api_key",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("key_hash", sa.String(length=255), nullable=False),
        sa.Column("created_at", _AT, nullable=False),
        sa.Column("revoked_at", _AT, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reminders_api_key")),
        sa.UniqueConstraint("name", name=op.f("uq_reminders_api_key_name")),
        sa.UniqueConstraint("key_id", name=op.f("uq_reminders_api_key_key_id")),
    )
    op.create_table(
        "reminders_audit",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("at", _AT, nullable=False),
        sa.Column("actor", sa.String(length=120), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("target", sa.String(length=255), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reminders_audit")),
    )
    op.create_index(op.f("ix_reminders_audit_at"), "reminders_audit", ["at"])
    op.create_index(
        op.f("ix_reminders_audit_action_actor_at"), "reminders_audit", ["action", "actor", "at"]
    )
    op.create_table(
        "reminders_rule_state",
        sa.Column("rule", sa.String(length=100), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("paused_at", _AT, nullable=True),
        sa.Column("paused_by", sa.String(length=120), nullable=True),
        sa.PrimaryKeyConstraint("rule", name=op.f("pk_reminders_rule_state")),
    )
    # The console's day counts read events by status and time, messages and opt-outs by time;
    # a rule page reads a rule's reminders by status and send time.
    op.create_index(op.f("ix_reminders_event_to_status_at"), "reminders_event", ["to_status", "at"])
    op.create_index(
        op.f("ix_reminders_message_created_at_channel"),
        "reminders_message",
        ["created_at", "channel"],
    )
    op.create_index(op.f("ix_reminders_optout_created_at"), "reminders_optout", ["created_at"])
    op.create_index(
        op.f("ix_reminders_reminder_rule_status_send_at"),
        "reminders_reminder",
        ["rule", "status", "send_at"],
    )
    # Pending reminders by send day and rule (the overview's coming-due chart), from the index.
    op.create_index(
        op.f("ix_reminders_reminder_status_send_at_rule"),
        "reminders_reminder",
        ["status", "send_at", "rule"],
    )
    # The deferred ones (quiet hours, caps) among all those pending.
    op.create_index(
        op.f("ix_reminders_reminder_deferred"),
        "reminders_reminder",
        ["send_at"],
        postgresql_where=sa.text(DEFERRED),
        sqlite_where=sa.text(DEFERRED),
    )
    # A rule's outcomes read the reminders it sent in a period.
    op.create_index(
        op.f("ix_reminders_reminder_rule_sent_at"), "reminders_reminder", ["rule", "sent_at"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_reminders_reminder_rule_sent_at"), "reminders_reminder")
    op.drop_index(op.f("ix_reminders_reminder_deferred"), "reminders_reminder")
    op.drop_index(op.f("ix_reminders_reminder_status_send_at_rule"), "reminders_reminder")
    op.drop_index(op.f("ix_reminders_reminder_rule_status_send_at"), "reminders_reminder")
    op.drop_index(op.f("ix_reminders_optout_created_at"), "reminders_optout")
    op.drop_index(op.f("ix_reminders_message_created_at_channel"), "reminders_message")
    op.drop_index(op.f("ix_reminders_event_to_status_at"), "reminders_event")
    op.drop_table("reminders_rule_state")
    op.drop_index(op.f("ix_reminders_audit_action_actor_at"), "reminders_audit")
    op.drop_index(op.f("ix_reminders_audit_at"), "reminders_audit")
    op.drop_table("reminders_audit")
    op.drop_table("reminders_api_key")
    op.drop_table("reminders_user")
