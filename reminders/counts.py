"""Reminders by rule and status, messages by rule, channel, status and error code, and what
happened by UTC hour (messages sent by channel; reminders delivered, failed, canceled), counted as
the rows change, so the console and ``GET /metrics`` read a few dozen rows instead of counting a
million at every request.

Each count is kept as rows of a small table (``reminders_reminder_count``,
``reminders_message_count``, ``reminders_hour_count``): a key and ``n``, a signed number. The
count of a key is the sum of its rows. A change *adds* rows, in the transaction of the change
itself (a reminder leaving ``queued`` for ``sending`` adds -1 to ``queued`` and +1 to ``sending``
for its rule), and never updates one: on PostgreSQL many workers adding to the same (rule,
status) at once would otherwise wait on one another for that row's lock, each until the other's
transaction commits. Inserts take no lock that another insert waits for.

:func:`fold` (run by every dispatch pass) replaces each key's rows by one row holding their sum,
so the tables stay about as small as the number of keys. A row is deleted by one fold only (on
PostgreSQL a second fold blocks on the rows the first deleted and skips them once it commits; an
advisory lock keeps two from trying at once), and rows added meanwhile are left for the next fold,
so folding never changes a sum. Reads sum whatever is there, folded or not: exact at any moment.

Who adds: :func:`reminders.lifecycle.move` and :func:`~reminders.lifecycle.move_each` for every
status change, the scan's insert for new reminders (:func:`created`), the message writers
(:func:`message_added`, :func:`message_changed`), and whatever deletes reminders
(:func:`deleting`, before it deletes). Migration 0012 fills the tables from the rows already
there; :func:`rebuild` counts them afresh.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .models import UtcDateTime, event, hour_count, message, message_count, reminder, reminder_count

Key = tuple[Any, ...]

# pg_try_advisory_xact_lock's key for folding (the scan's per-rule locks hash rule names).
_FOLD_LOCK = 0x72656D636E74  # "remcnt"


class Tally:
    """Counts of one family: rows of ``table`` keyed by ``keys``, summed when read."""

    def __init__(self, table: sa.Table, source: sa.Table, keys: tuple[str, ...]) -> None:
        self.table = table
        self.source = source  # the table whose rows are counted
        self.keys = keys

    def add(self, conn: Connection, changes: Mapping[Key, int]) -> None:
        """Add ``n`` to each key's count (negative: subtract), in the caller's transaction."""
        rows = [
            {**dict(zip(self.keys, key, strict=True)), "n": n} for key, n in changes.items() if n
        ]
        if rows:
            conn.execute(self.table.insert(), rows)

    def totals(self, conn: Connection) -> dict[Key, int]:
        """Every key's count (keys that add up to 0 left out)."""
        columns = [self.table.c[k] for k in self.keys]
        query = sa.select(*columns, sa.func.sum(self.table.c.n)).group_by(*columns)
        return {tuple(row[:-1]): int(row[-1]) for row in conn.execute(query) if row[-1]}

    def recent(self, conn: Connection) -> list[sa.ColumnElement[bool]]:
        """Which rows a fold looks at (all of them)."""
        return []

    def fold(self, conn: Connection) -> int:
        """Replace each key's rows by one holding their sum; returns how many rows went."""
        columns = [self.table.c[k] for k in self.keys]
        where = self.recent(conn)
        rows = conn.execute(
            sa.select(sa.func.count()).select_from(self.table).where(*where)
        ).scalar_one()
        keys = sa.select(*columns).where(*where).group_by(*columns).subquery()
        if rows <= conn.execute(sa.select(sa.func.count()).select_from(keys)).scalar_one():
            return 0  # one row a key already
        gone = conn.execute(
            sa.delete(self.table).where(*where).returning(*columns, self.table.c.n)
        ).all()
        sums: Counter[Key] = Counter()
        for row in gone:
            sums[tuple(row[:-1])] += row[-1]
        self.add(conn, sums)
        return len(gone)

    def count_rows(self, conn: Connection) -> dict[Key, int]:
        """The counts as ``COUNT(*)`` of the counted rows finds them (a full read of the table)."""
        columns = [self.source.c[k] for k in self.keys]
        query = sa.select(*columns, sa.func.count()).group_by(*columns)
        return {tuple(row[:-1]): int(row[-1]) for row in conn.execute(query)}

    def rebuild(self, conn: Connection) -> None:
        """Count the rows afresh (a migration, a repair); run where nothing else writes."""
        conn.execute(sa.delete(self.table))
        self.add(conn, self.count_rows(conn))


def hour_of(conn: Connection, column: Any) -> Any:
    """A UTC instant column cut down to its hour, in SQL (as :func:`hour` does in Python)."""
    if conn.dialect.name == "postgresql":
        utc = sa.func.date_trunc("hour", sa.func.timezone("UTC", column))
        return sa.type_coerce(sa.func.timezone("UTC", utc), UtcDateTime())
    # SQLite stores UTC as text, "2027-03-10 15:04:05.000000".
    return sa.type_coerce(sa.func.strftime("%Y-%m-%d %H:00:00.000000", column), UtcDateTime())


def hour(moment: datetime) -> datetime:
    """The UTC hour an aware instant falls in."""
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


# What the hour counts hold: messages sent by channel ("sent:" + channel), and the reminders that
# became one of these statuses (the console's delivered, failed and canceled a day).
ENDED = frozenset({"delivered", "failed", "canceled"})
SENT_ON = "sent:"


class HourTally(Tally):
    """Counts by UTC hour: what the events and messages say happened in each."""

    def count_rows(self, conn: Connection) -> dict[Key, int]:
        found: Counter[Key] = Counter()
        at = hour_of(conn, message.c.created_at).label("hour")
        for when, channel, n in conn.execute(
            sa.select(at, message.c.channel, sa.func.count()).group_by(at, message.c.channel)
        ):
            found[(when, SENT_ON + channel)] += n
        at = hour_of(conn, event.c.at).label("hour")
        for when, status, n in conn.execute(
            sa.select(at, event.c.to_status, sa.func.count())
            .where(event.c.to_status.in_(sorted(ENDED)))
            .group_by(at, event.c.to_status)
        ):
            found[(when, status)] += n
        return dict(found)

    def recent(self, conn: Connection) -> list[sa.ColumnElement[bool]]:
        """The last two days' hours: changes land on the current hour, and the older hours,
        folded long ago, are left alone."""
        newest = conn.execute(sa.select(sa.func.max(self.table.c.hour))).scalar()
        return [] if newest is None else [self.table.c.hour >= newest - timedelta(days=2)]

    def between(self, conn: Connection, lo: datetime, hi: datetime) -> dict[Key, int]:
        """The counts of the hours in [lo, hi)."""
        t = self.table
        query = (
            sa.select(t.c.hour, t.c.what, sa.func.sum(t.c.n))
            .where(t.c.hour >= lo, t.c.hour < hi)
            .group_by(t.c.hour, t.c.what)
        )
        return {(row[0], row[1]): int(row[2]) for row in conn.execute(query) if row[2]}


REMINDERS = Tally(reminder_count, reminder, ("rule", "status"))
MESSAGES = Tally(message_count, message, ("rule", "channel", "status", "error_code"))
HOURS = HourTally(hour_count, event, ("hour", "what"))
FAMILIES: tuple[Tally, ...] = (REMINDERS, MESSAGES, HOURS)


# -- reminders --------------------------------------------------------------------------------


def moved(
    conn: Connection, left: Mapping[tuple[str, str], int], target: str, now: datetime
) -> None:
    """``left[(rule, status)]`` reminders of a rule left that status for ``target`` at ``now``."""
    changes: Counter[Key] = Counter()
    for (rule, status), n in left.items():
        if status != target:
            changes[(rule, status)] -= n
            changes[(rule, target)] += n
    REMINDERS.add(conn, changes)
    if target in ENDED:
        HOURS.add(conn, {(hour(now), target): sum(left.values())})


def created(conn: Connection, rule: str, status: str, n: int) -> None:
    """``n`` new reminders of ``rule`` were inserted in ``status``."""
    REMINDERS.add(conn, {(rule, status): n})


def removed(conn: Connection, gone: Mapping[tuple[str, str], int]) -> None:
    """``gone[(rule, status)]`` reminders were deleted (their messages go by cascade: pass
    those to :func:`messages_removed`)."""
    REMINDERS.add(conn, {key: -n for key, n in gone.items()})


def deleting(conn: Connection, ids: Sequence[int]) -> None:
    """The reminders ``ids`` and their messages are about to be deleted in this transaction
    (retention): take them off the counts. Call it before the DELETE, under the same locks. The
    counts by hour keep them: they say what happened in each hour, not what is kept."""
    if not ids:
        return
    r, m = reminder, message
    gone = conn.execute(
        sa.select(r.c.rule, r.c.status, sa.func.count())
        .where(r.c.id.in_(list(ids)))
        .group_by(r.c.rule, r.c.status)
    )
    removed(conn, {(row[0], row[1]): row[2] for row in gone})
    keys = (m.c.rule, m.c.channel, m.c.status, m.c.error_code)
    sent = conn.execute(
        sa.select(*keys, sa.func.count()).where(m.c.reminder_id.in_(list(ids))).group_by(*keys)
    )
    messages_removed(conn, {tuple(row[:-1]): row[-1] for row in sent})


def reminders(conn: Connection) -> dict[tuple[str, str], int]:
    """Reminders by (rule, status) now; statuses with none left out."""
    return {(k[0], k[1]): n for k, n in REMINDERS.totals(conn).items()}


# -- messages ---------------------------------------------------------------------------------


def message_added(conn: Connection, rows: Iterable[Mapping[str, Any]]) -> None:
    """Messages were inserted (the rows as inserted: ``rule``, ``channel``, ``status``,
    ``error_code``, ``created_at``)."""
    rows = list(rows)
    MESSAGES.add(conn, Counter(_message_key(row) for row in rows))
    HOURS.add(conn, Counter((hour(row["created_at"]), SENT_ON + row["channel"]) for row in rows))


def message_changed(conn: Connection, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """One message's status or error code changed from ``old`` to ``new`` (each with ``rule``,
    ``channel``, ``status``, ``error_code``)."""
    before, after = _message_key(old), _message_key(new)
    if before != after:
        MESSAGES.add(conn, {before: -1, after: 1})


def messages_removed(conn: Connection, gone: Mapping[Key, int]) -> None:
    """``gone[(rule, channel, status, error_code)]`` messages were deleted."""
    MESSAGES.add(conn, {key: -n for key, n in gone.items()})


def messages(conn: Connection) -> dict[Key, int]:
    """Messages by (rule, channel, status, error_code) now."""
    return MESSAGES.totals(conn)


def _message_key(row: Mapping[str, Any]) -> Key:
    return (row.get("rule"), row["channel"], row["status"], row.get("error_code"))


# -- upkeep -----------------------------------------------------------------------------------


def fold(conn: Connection) -> int:
    """Fold every family's rows (see the module's docstring); returns how many rows went. On
    PostgreSQL it does nothing while another fold runs."""
    if (
        conn.dialect.name == "postgresql"
        and not conn.execute(sa.select(sa.func.pg_try_advisory_xact_lock(_FOLD_LOCK))).scalar_one()
    ):
        return 0
    return sum(family.fold(conn) for family in FAMILIES)


def rebuild(conn: Connection) -> None:
    """Count every family afresh from its rows."""
    for family in FAMILIES:
        family.rebuild(conn)
