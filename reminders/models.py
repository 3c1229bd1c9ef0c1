"""The state DB's tables: the source of truth for what is scheduled and what was sent.

Every table carries the ``reminders_`` prefix (alembic's version table too), so the engine's tables
can live inside the business's own database without colliding with anything. Times are stored in
UTC through one column type, :class:`UtcDateTime`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

PREFIX = "reminders_"
VERSION_TABLE = f"{PREFIX}alembic_version"

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
    }
)


def status_is(*statuses: str) -> str:
    """``(status = 'a' OR status = 'b' ...)``: a partial index's condition on the status, for
    SQLite, and the text a query writes to use that index.

    Not ``status IN (...)``: SQLite (3.40) checks an IN of three or more values by building a
    temporary table of them each time, and a partial index's condition is checked for every row
    whose indexed column changes: a new ``updated_at`` for a pending reminder cost 45 us of CPU
    with the IN, 9 with the ORs (migration 0013).
    """
    return "(" + " OR ".join(f"status = '{status}'" for status in statuses) + ")"


class UtcDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime: refuses naive values, returns aware UTC values on every backend."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the state DB: pass an aware UTC datetime")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            # SQLite has no zone type; stored naive UTC keeps ISO strings sortable.
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

reminder = sa.Table(
    f"{PREFIX}reminder",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("rule", sa.String(100), nullable=False),
    sa.Column("occurrence", sa.String(255), nullable=False),
    sa.Column("offset", sa.String(16), nullable=False),
    sa.Column("customer_id", sa.String(255), nullable=False),
    # planned_at comes from the due date; send_at is the current send time (deferrals, retries).
    sa.Column("planned_at", UtcDateTime(), nullable=False),
    sa.Column("send_at", UtcDateTime(), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # a lifecycle.Status
    sa.Column("channel", sa.String(16)),
    sa.Column("channel_index", sa.Integer, nullable=False, server_default="0"),
    sa.Column("reason", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("data", sa.Text, nullable=False),  # the row's values, typed JSON (see codec)
    sa.Column("row_hash", sa.String(32), nullable=False),
    sa.Column("job_id", sa.String(64)),
    sa.Column("queued_at", UtcDateTime()),
    sa.Column("sent_at", UtcDateTime()),
    sa.Column("provider_id", sa.String(128)),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
    # The current send attempt, written by the claim (queued -> sending) for reconciliation:
    # when it began on the real clock (the provider's records are on it), the worker that made
    # it, and the SHA-256 of the text sent (see reminders.reconcile).
    sa.Column("attempt_at", UtcDateTime()),
    sa.Column("claimed_by", sa.String(128)),
    sa.Column("body_digest", sa.String(64)),
    # The digest the reminder was last claimed into (several reminders, one message): the id of
    # the digest's first reminder, on every item of it; NULL for a message of its own. What
    # reconciliation decides for one item of a digest it decides for all (reminders.digest).
    sa.Column("digest_id", BigId),
    sa.UniqueConstraint("rule", "occurrence", "offset"),
    sa.Index(None, "customer_id"),
    sa.Index(None, "digest_id"),
    # By status and send time, (status, send_at, rule), and by rule, (rule, status, send_at),
    # below. (A partial index of the unsent ones by send time, which GET /metrics read, went in
    # migration 0014: the first answers that query as fast, and every index holding send_at is
    # written by every move and status change.)
)

event = sa.Table(
    f"{PREFIX}event",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column(
        "reminder_id",
        BigId,
        sa.ForeignKey(f"{PREFIX}reminder.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("at", UtcDateTime(), nullable=False),
    sa.Column("from_status", sa.String(16)),
    sa.Column("to_status", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text),
    sa.Index(None, "reminder_id"),
)

scan_run = sa.Table(
    f"{PREFIX}scan_run",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("rule", sa.String(100), nullable=False),
    sa.Column("started_at", UtcDateTime(), nullable=False),
    sa.Column("finished_at", UtcDateTime()),
    sa.Column("status", sa.String(16), nullable=False),  # running, done, failed, interrupted
    sa.Column("rows", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created", sa.Integer, nullable=False, server_default="0"),
    sa.Column("moved", sa.Integer, nullable=False, server_default="0"),
    sa.Column("canceled", sa.Integer, nullable=False, server_default="0"),
    sa.Column("unchanged", sa.Integer, nullable=False, server_default="0"),
    sa.Column("skipped", sa.Integer, nullable=False, server_default="0"),
    sa.Column("too_late", sa.Integer, nullable=False, server_default="0"),
    sa.Column("error", sa.Text),
    # full, or incremental (only the rows changed since the rule's last scan; see scan.scan_kind)
    sa.Column("kind", sa.String(16), nullable=False, server_default="full"),
    # the rule's query and schedule settings when it ran (scan.rule_digest): another forces a
    # full scan
    sa.Column("rule_digest", sa.String(16)),
    sa.Index(None, "rule", "started_at"),
)

skipped_row = sa.Table(
    f"{PREFIX}skipped_row",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column(
        "scan_run_id",
        BigId,
        sa.ForeignKey(f"{PREFIX}scan_run.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("rule", sa.String(100), nullable=False),
    sa.Column("row_number", sa.Integer, nullable=False),
    sa.Column("occurrence", sa.String(255)),
    sa.Column("column", sa.String(100)),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Index(None, "scan_run_id"),
)

message = sa.Table(
    f"{PREFIX}message",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column(
        "reminder_id",
        BigId,
        sa.ForeignKey(f"{PREFIX}reminder.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("channel", sa.String(16), nullable=False),
    # The reminder's rule, kept on the message so the metrics count messages by rule without
    # joining a million reminders (empty on messages written before it was kept: see 0003).
    sa.Column("rule", sa.String(100)),
    sa.Column("to_address", sa.String(320), nullable=False),  # E.164 or an email as sent
    sa.Column("provider_id", sa.String(128)),
    sa.Column("status", sa.String(16), nullable=False),  # sent, delivered, undelivered, failed
    sa.Column("error_code", sa.String(32)),
    sa.Column("segments", sa.Integer),
    # The template variant the customer's locale chose (es, fr-CA); NULL: the default template.
    sa.Column("locale", sa.String(35)),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
    sa.Index(None, "provider_id"),
    sa.Index(None, "to_address", "created_at"),
    sa.Index(None, "reminder_id"),
    sa.Index(None, "rule", "channel", "status", "error_code"),  # GET /metrics, from the index
)

# An address that must not be contacted on a channel: STOP, Twilio 21610, a dead number
# (30004/30005/30006), a one-click unsubscribe. Checked at send time, before every message.
optout = sa.Table(
    f"{PREFIX}optout",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("channel", sa.String(16), nullable=False),
    sa.Column("address", sa.String(320), nullable=False),
    sa.Column("customer_id", sa.String(255)),
    sa.Column("source", sa.String(32), nullable=False),  # stop, 21610, 30005, unsubscribe, ...
    sa.Column("reason", sa.Text),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.UniqueConstraint("channel", "address"),
)

# The history of consent: every opt-out recorded and every opt-in that lifted one (START, the
# preferences page), with what did it and when. ``optout`` holds only the current stops.
consent_event = sa.Table(
    f"{PREFIX}consent_event",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("channel", sa.String(16), nullable=False),
    sa.Column("address", sa.String(320), nullable=False),
    sa.Column("customer_id", sa.String(255)),
    sa.Column("action", sa.String(16), nullable=False),  # opt_out, opt_in
    sa.Column("source", sa.String(32), nullable=False),  # stop, start, unsubscribe, preferences...
    sa.Column("reason", sa.Text),
    sa.Column("at", UtcDateTime(), nullable=False),
    sa.Index(None, "channel", "address", "at"),
)

# A customer's own choices from the preferences page: a rule ("*" = every rule) on a channel
# ("*" = every channel) turned off (enabled false) or back on.
preference = sa.Table(
    f"{PREFIX}preference",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("customer_id", sa.String(255), nullable=False),
    sa.Column("rule", sa.String(100), nullable=False),
    sa.Column("channel", sa.String(16), nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
    sa.UniqueConstraint("customer_id", "rule", "channel"),
)

# Inbound SMS as received (keywords, replies), for ops and for the law's record of opt-outs.
inbound = sa.Table(
    f"{PREFIX}inbound",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("from_address", sa.String(32), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("provider_id", sa.String(128)),
    sa.Column("action", sa.String(32), nullable=False),  # stop, start, help, done, snooze, unknown
    sa.Column("reminder_id", BigId),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.UniqueConstraint("provider_id"),
)

# What must leave the engine (write-back statements into the business DB, signed webhooks): one
# row per event and destination, written in the transaction of the change it reports and applied
# by workers in id order per destination (see reminders.outbox). Not tied to the reminder by a
# foreign key: pruning reminders must not take undelivered events with it.
outbox = sa.Table(
    f"{PREFIX}outbox",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(40), nullable=False),  # evt_...: one per event, kept in retries
    # writeback:consent, writeback:<rule>, webhook:<key of its URL>
    sa.Column("destination", sa.String(120), nullable=False),
    sa.Column("type", sa.String(32), nullable=False),  # sent, delivered, ..., opted_out, opted_in
    sa.Column("rule", sa.String(100)),
    sa.Column("reminder_id", BigId),
    sa.Column("payload", sa.Text, nullable=False),  # the event's facts and row, typed JSON (codec)
    sa.Column("status", sa.String(16), nullable=False),  # pending, done, failed, skipped
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_at", UtcDateTime(), nullable=False),  # engine clock, like a reminder's send_at
    sa.Column("last_error", sa.Text),
    sa.Column("last_attempt_at", UtcDateTime()),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("done_at", UtcDateTime()),
    sa.Index(None, "destination", "status", "id"),
    sa.Index(None, "status", "done_at"),  # retention: delivered rows by when
)

# -- the console (reminders console): who may look and act, what they did, paused rules ----------

# A person who logs in to the console; the password is stored as a scrypt hash (accounts.py).
user = sa.Table(
    f"{PREFIX}user",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),  # viewer, operator
    sa.Column("password_hash", sa.String(255), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.UniqueConstraint("name"),
)

# A script's key for the console's API: shown once; its public id finds the row, the secret part
# is stored as a scrypt hash.
api_key = sa.Table(
    f"{PREFIX}api_key",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("key_id", sa.String(32), nullable=False),
    sa.Column("key_hash", sa.String(255), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("revoked_at", UtcDateTime()),
    sa.UniqueConstraint("name"),
    sa.UniqueConstraint("key_id"),
)

# Who did what, when: log-ins (and failed ones), retries, cancels, pauses, keys and users.
audit = sa.Table(
    f"{PREFIX}audit",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("at", UtcDateTime(), nullable=False),
    sa.Column("actor", sa.String(120), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("target", sa.String(255)),
    sa.Column("detail", sa.Text),
    sa.Index(None, "at"),
    sa.Index(None, "action", "actor", "at"),
)

# A rule paused from the console: its reminders are neither dispatched nor sent (pause.py).
rule_state = sa.Table(
    f"{PREFIX}rule_state",
    metadata,
    sa.Column("rule", sa.String(100), primary_key=True),
    sa.Column("paused", sa.Boolean, nullable=False),
    sa.Column("paused_at", UtcDateTime()),
    sa.Column("paused_by", sa.String(120)),
)

# Indexes the console's queries need (migration 0005).
sa.Index("ix_reminders_event_to_status_at", event.c.to_status, event.c.at)
sa.Index("ix_reminders_message_created_at_channel", message.c.created_at, message.c.channel)
sa.Index(
    "ix_reminders_reminder_status_send_at_rule",
    reminder.c.status,
    reminder.c.send_at,
    reminder.c.rule,
)
_DEFERRED = sa.text("status = 'pending' AND reason LIKE 'deferred:%'")
sa.Index(
    "ix_reminders_reminder_deferred",
    reminder.c.send_at,
    postgresql_where=_DEFERRED,
    sqlite_where=_DEFERRED,
)
sa.Index("ix_reminders_optout_created_at", optout.c.created_at)
sa.Index("ix_reminders_reminder_rule_sent_at", reminder.c.rule, reminder.c.sent_at)
sa.Index(
    "ix_reminders_reminder_rule_status_send_at",
    reminder.c.rule,
    reminder.c.status,
    reminder.c.send_at,
)
# Final reminders by their last change: what retention prunes first (migration 0009, and
# reminders.prune, which writes its condition with the same text so PostgreSQL uses it).
# (lifecycle.FINAL, written out: lifecycle imports this module; a test compares the two.)
FINAL_SQL = status_is("canceled", "delivered", "failed", "sent", "undelivered")
FINAL_INDEX = "ix_reminders_reminder_final_updated_at"
sa.Index(
    FINAL_INDEX,
    reminder.c.updated_at,
    reminder.c.id,
    # PostgreSQL's as migration 0009 made it: its planner proves FINAL_SQL implies it.
    postgresql_where=sa.text(
        "status IN ('canceled', 'delivered', 'failed', 'sent', 'undelivered')"
    ),
    sqlite_where=sa.text(FINAL_SQL),
)
# A rule's outcomes (the console's rule page): its open reminders by occurrence, read from the
# index alone, and its canceled reminders by when they were canceled.
_OPEN = sa.text("status IN ('pending', 'queued')")
OPEN_OCCURRENCE_INDEX = "ix_reminders_reminder_open_occurrence"  # also a full scan's anti-join
sa.Index(
    OPEN_OCCURRENCE_INDEX,
    reminder.c.rule,
    reminder.c.occurrence,
    postgresql_where=_OPEN,
    sqlite_where=_OPEN,
)
_CANCELED = sa.text("status = 'canceled'")
sa.Index(
    "ix_reminders_reminder_canceled_updated_at",
    reminder.c.rule,
    reminder.c.updated_at,
    postgresql_where=_CANCELED,
    sqlite_where=_CANCELED,
)

# Counts kept as the rows change, for the console and GET /metrics (reminders.counts): a key's
# count is the sum of its rows' n. Changes only insert rows (no lock a worker waits on); a fold
# replaces a key's rows by their sum.
reminder_count = sa.Table(
    f"{PREFIX}reminder_count",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("rule", sa.String(100), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("n", sa.BigInteger, nullable=False),
)

message_count = sa.Table(
    f"{PREFIX}message_count",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("rule", sa.String(100)),  # empty: a message written before messages kept it
    sa.Column("channel", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("error_code", sa.String(32)),
    sa.Column("n", sa.BigInteger, nullable=False),
)

# What happened by UTC hour, for the console's days (reminders.counts): messages sent by channel
# (``sent:sms``), reminders that became delivered, failed or canceled. Rows as above.
hour_count = sa.Table(
    f"{PREFIX}hour_count",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("hour", UtcDateTime(), nullable=False),
    sa.Column("what", sa.String(32), nullable=False),
    sa.Column("n", sa.BigInteger, nullable=False),
    sa.Index(None, "hour", "what", "n"),
)
