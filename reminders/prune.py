"""Retention: the state DB keeps what is still of use and lets the rest go, in small batches.

What goes, once it is older than the retention (``state.retention``, default 180 days, or
``reminders prune --older-than``):

- a reminder in a final state (:data:`lifecycle.FINAL`) whose last change (``updated_at``) is
  older than that, with its events and its messages. Age is measured from the last change, not
  from the due date: a reminder delivered yesterday for a year-old occurrence stays, and so does a
  failed one ops retried last week.
- inbound SMS other than STOP and START (replies such as DONE, HELP, unknown words), by when they
  arrived;
- scan runs and their skipped rows, by when they started, except each rule's latest run (what
  ``status`` shows).

What stays, whatever its age: every reminder not final (pending, queued, sending, unknown), the
consent record (opt-outs, the consent history, STOP and START as received, the customers'
preferences: the law asks a sender to honour and to show them), the console's users, keys and
audit log.

A pruned reminder must not come back. A scan creates a reminder only when its planned time is
within its rule's grace of now, and an insert that meets an existing (rule, occurrence, offset) is
skipped: that existing row is what keeps a finished reminder from being created again. So a
reminder is pruned only when its planned time is already past its rule's grace (past the longest
grace of the rules loaded, for a rule no longer in them): the next scan finds its row too late and
creates nothing. A canceled reminder whose planned time is still ahead (a customer's DONE a year
before a warranty ends) is kept until that time has passed. The one change pruning makes to what
a scan does: an occurrence whose due date moves after its finished reminders were pruned gets
reminders for the new date, as a new row would.

The retention is at least ``web.link_max_age``: an unsubscribe link finds its customer's address
among the messages sent to them, and must keep working as long as it is valid (the same bound
covers the frequency caps' week of messages).

Each batch is one short transaction (a reminder's rows go together or not at all); an interrupted
prune leaves whole batches done and the next one finds the rest by the same test. On PostgreSQL
a batch locks its reminders (``FOR UPDATE SKIP LOCKED``), so a reminder changed meanwhile (ops'
retry of a failed one) is either left alone or pruned as it was seen, never half.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from . import counts, dberrors, state_db
from .errors import StateError
from .models import FINAL_INDEX, FINAL_SQL, event, inbound, message, reminder, scan_run, skipped_row
from .replies import START, STOP
from .rules import Rule

if TYPE_CHECKING:
    from .app import App

BATCH = 1000  # reminders (or other rows) one transaction deletes, by default
MAX_BATCH = 10_000  # the most a batch may hold (SQLite binds each id)
DEFAULT_GRACE: timedelta = Rule.model_fields["grace"].default  # a rule's when it sets none
KEPT_INBOUND = (STOP, START)  # the consent record: kept whatever its age

# Written as the partial index of migration 0009 is: PostgreSQL uses a partial index only for a
# condition written like its own.
_FINAL = sa.text(FINAL_SQL)

TABLES = ("reminders", "events", "messages", "inbound", "scan_runs", "skipped_rows")


@dataclass
class Pruned:
    """What a prune deleted (or, dry, would delete), per table; ``more`` when it stopped at its
    budget with rows left; ``stopped`` the reason it was asked to stop (a signal's name)."""

    cutoff: datetime
    reminders: int = 0
    events: int = 0
    messages: int = 0
    inbound: int = 0
    scan_runs: int = 0
    skipped_rows: int = 0
    batches: int = 0
    more: bool = False
    stopped: str | None = None

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in TABLES)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def graces(app: App) -> dict[str, timedelta]:
    """Each loaded rule's grace, by rule name."""
    return {rule.name: rule.grace for rule in app.ruleset.rules}


def cutoff(now: datetime, older_than: timedelta) -> datetime:
    """The instant before which final reminders (and the rest) are old enough to go."""
    return now - older_than


def prunable(now: datetime, older_than: timedelta, rule_graces: Mapping[str, timedelta]) -> Any:
    """The condition a reminder must meet to be pruned (see the module's docstring)."""
    r = reminder
    by_grace: dict[timedelta, list[str]] = {}
    for name, grace in rule_graces.items():
        by_grace.setdefault(grace, []).append(name)
    past_grace = [
        sa.and_(r.c.rule.in_(sorted(names)), r.c.planned_at < now - grace)
        for grace, names in sorted(by_grace.items())
    ]
    longest = max([DEFAULT_GRACE, *rule_graces.values()])
    gone = r.c.planned_at < now - longest
    if rule_graces:
        gone = sa.and_(r.c.rule.not_in(sorted(rule_graces)), gone)
    return sa.and_(_FINAL, r.c.updated_at < cutoff(now, older_than), sa.or_(*past_grace, gone))


def _old_inbound(before: datetime) -> Any:
    return sa.and_(inbound.c.created_at < before, inbound.c.action.not_in(KEPT_INBOUND))


def _old_runs(before: datetime) -> Any:
    latest = sa.select(sa.func.max(scan_run.c.id)).group_by(scan_run.c.rule)
    return sa.and_(scan_run.c.started_at < before, scan_run.c.id.not_in(latest))


def count(
    state: Engine, now: datetime, older_than: timedelta, rule_graces: Mapping[str, timedelta]
) -> Pruned:
    """What :func:`prune` would delete now, per table, deleting nothing."""
    before = cutoff(now, older_than)
    ids = sa.select(reminder.c.id).where(prunable(now, older_than, rule_graces))
    runs = sa.select(scan_run.c.id).where(_old_runs(before))

    def rows(table: sa.Table, where: Any) -> Any:
        return sa.select(sa.func.count()).select_from(table).where(where).scalar_subquery()

    with state.connect() as conn:
        got = conn.execute(
            sa.select(
                rows(reminder, reminder.c.id.in_(ids)),
                rows(event, event.c.reminder_id.in_(ids)),
                rows(message, message.c.reminder_id.in_(ids)),
                rows(inbound, _old_inbound(before)),
                rows(scan_run, scan_run.c.id.in_(runs)),
                rows(skipped_row, skipped_row.c.scan_run_id.in_(runs)),
            )
        ).one()
    return Pruned(before, *got)


def prune(
    state: Engine,
    now: datetime,
    older_than: timedelta,
    rule_graces: Mapping[str, timedelta],
    *,
    batch_size: int = BATCH,
    max_batches: int | None = None,
    max_seconds: float | None = None,
    should_stop: Callable[[], str | None] | None = None,
) -> Pruned:
    """Delete what is older than ``older_than`` (see the module's docstring), ``batch_size`` rows
    a transaction: reminders with their events and messages first, then old inbound replies,
    then old scan runs with their skipped rows.

    Stops early, with ``more`` set, after ``max_batches`` transactions that deleted rows, or once
    ``max_seconds`` (real time, checked between batches) have passed; ``should_stop`` is asked
    between batches, and a reason (a signal's name) stops it there, kept in ``stopped``.
    """
    if not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"batch_size must be 1 to {MAX_BATCH}, not {batch_size}")
    done = Pruned(cutoff(now, older_than))
    started = time.monotonic()
    steps: list[Callable[[Connection], bool]] = [
        lambda conn: _reminders(conn, now, older_than, rule_graces, batch_size, done),
        lambda conn: _inbound(conn, done.cutoff, batch_size, done),
        lambda conn: _scan_runs(conn, done.cutoff, batch_size, done),
    ]
    for step in steps:
        full = True
        while full:
            if max_batches is not None and done.batches >= max_batches:
                done.more = True
                return done
            if max_seconds is not None and time.monotonic() - started >= max_seconds:
                done.more = True
                return done
            if should_stop is not None and (why := should_stop()):
                done.stopped = why
                done.more = True
                return done
            before = done.total
            try:
                with state.begin() as conn:
                    full = step(conn)
            except sa.exc.SQLAlchemyError as exc:
                kept = ", ".join(f"{getattr(done, t)} {t.replace('_', ' ')}" for t in TABLES)
                raise StateError(
                    f"prune: state DB: {dberrors.message(exc)} (the batch was rolled back; "
                    f"deleted before it: {kept}; prune again to go on)"
                ) from None
            if done.total > before:  # a batch that found nothing costs no budget
                done.batches += 1
    return done


def _locked(conn: Connection, query: sa.Select[Any]) -> sa.Select[Any]:
    """Lock the rows a batch reads, skipping those another transaction holds (PostgreSQL; on
    SQLite the batch's BEGIN IMMEDIATE holds the whole database)."""
    if conn.dialect.name == "postgresql":
        return query.with_for_update(skip_locked=True)
    return query


def _reminders(
    conn: Connection,
    now: datetime,
    older_than: timedelta,
    rule_graces: Mapping[str, timedelta],
    batch_size: int,
    done: Pruned,
) -> bool:
    """One batch of final reminders, their events and messages; whether the batch was full."""
    query = (
        sa.select(reminder.c.id)
        .where(prunable(now, older_than, rule_graces))
        .order_by(reminder.c.updated_at, reminder.c.id)
        .limit(batch_size)
    )
    if conn.dialect.name == "sqlite":
        # SQLite's planner would take the status index and sort every final reminder for each
        # batch (seconds a batch at a million); PostgreSQL picks this index by itself.
        found = state_db.execute_indexed_by(conn, query, reminder, FINAL_INDEX)
    else:
        found = conn.execute(_locked(conn, query))
    ids = list(found.scalars())
    if not ids:
        return False
    counts.deleting(conn, ids)  # off the counts by rule and status, in this transaction
    done.events += _delete(conn, event, event.c.reminder_id.in_(ids))
    done.messages += _delete(conn, message, message.c.reminder_id.in_(ids))
    done.reminders += _delete(conn, reminder, reminder.c.id.in_(ids))
    return len(ids) == batch_size


def _inbound(conn: Connection, before: datetime, batch_size: int, done: Pruned) -> bool:
    query = sa.select(inbound.c.id).where(_old_inbound(before)).order_by(inbound.c.id)
    ids = list(conn.execute(_locked(conn, query.limit(batch_size))).scalars())
    done.inbound += _delete(conn, inbound, inbound.c.id.in_(ids)) if ids else 0
    return len(ids) == batch_size


def _scan_runs(conn: Connection, before: datetime, batch_size: int, done: Pruned) -> bool:
    query = sa.select(scan_run.c.id).where(_old_runs(before)).order_by(scan_run.c.id)
    ids = list(conn.execute(_locked(conn, query.limit(batch_size))).scalars())
    if not ids:
        return False
    done.skipped_rows += _delete(conn, skipped_row, skipped_row.c.scan_run_id.in_(ids))
    done.scan_runs += _delete(conn, scan_run, scan_run.c.id.in_(ids))
    return len(ids) == batch_size


def _delete(conn: Connection, table: sa.Table, where: Any) -> int:
    return int(conn.execute(sa.delete(table).where(where)).rowcount)
