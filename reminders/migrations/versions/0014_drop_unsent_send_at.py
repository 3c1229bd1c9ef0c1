"""The partial index of unsent reminders by send time dropped: the index of every reminder by
(status, send_at, rule) answers its queries as fast, and every index holding ``send_at`` is
written by every moved send time and every status change

Measured at 1,000,000 reminders. PostgreSQL: ``GET /metrics``' count of due and unsent
reminders (``status IN (pending, queued, sending) AND send_at <= now``) reads (status, send_at,
rule) index-only, one range a status: 12.4 ms against 12.1 ms on the partial index. SQLite
(3.40) never used the partial index: its planner chose (status, send_at, rule) for that query
with the statuses bound as parameters and even with the index's own condition written out, and
none of the 112 distinct statements on reminders that a third of the console, metrics, delivery
and caps tests ran planned through it (``EXPLAIN QUERY PLAN``). A reminder's raw move on SQLite
(its UPDATE and commit, 10,000 at random): 64 -> 40 us.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 03:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

NAME = "ix_reminders_reminder_unsent_send_at"


def upgrade() -> None:
    op.drop_index(NAME, table_name="reminders_reminder")


def downgrade() -> None:
    # As migrations 0006 and 0013 left it.
    op.create_index(
        NAME,
        "reminders_reminder",
        ["send_at", "rule"],
        postgresql_where=sa.text("status IN ('pending', 'queued', 'sending')"),
        sqlite_where=sa.text("(status = 'pending' OR status = 'queued' OR status = 'sending')"),
    )
