"""digests: the digest a reminder was claimed into (its first reminder's id)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 18:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.add_column("reminders_reminder", sa.Column("digest_id", big_id, nullable=True))
    op.create_index("ix_reminders_reminder_digest_id", "reminders_reminder", ["digest_id"])


def downgrade() -> None:
    op.drop_index("ix_reminders_reminder_digest_id", table_name="reminders_reminder")
    with op.batch_alter_table("reminders_reminder") as batch:
        batch.drop_column("digest_id")
