"""A reminder's lifecycle: its statuses, the changes allowed between them, and the one way to
make a change.

::

    pending -> queued -> sending -> sent -> delivered | undelivered
       ^         |          |         |
       +---------+----------+---------+   (deferred, retried, released, moved to the next channel)
    pending -> sending (claimed into a digest with an earlier reminder; see reminders.digest)
    any open status -> canceled (condition gone, superseded, opted out, expired)
    canceled -> pending (its occurrence vanished from the query, then came back)
    queued | sending -> failed (permanent error, retries used up); failed -> pending (ops retry)
    sending -> unknown (the provider may have it: no answer, or the worker died mid-send);
    unknown -> sent (found in the provider's records) | pending (not there: sent once more)
            | failed | canceled (decided by ops); see reminders.reconcile

Every change goes through :func:`move` (one conditional UPDATE for many reminders) or
:func:`move_each` (one executemany when each reminder gets its own values). Both check the change
against :data:`TRANSITIONS` before touching the database (a change not listed there is a bug, raised
as :class:`TransitionNotAllowed`, never a silent no-op), make the UPDATE conditional on the status
the caller saw (a reminder another process changed meanwhile is left alone), and write one ``event``
row per reminder changed, with its reason, in the caller's transaction. The console's timeline and
the metrics read those events; :func:`reminders.outbox.on_move` writes, in the same transaction,
the outbox rows of the changes some write-back statement or webhook wants (nothing otherwise).
Each change also adds to the counts by rule and status (:mod:`reminders.counts`), in the same
transaction.

The statuses are stored as their plain string values: ``Status.SENT == "sent"``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import counts, outbox, state_db
from .errors import RemindersError
from .models import event, reminder


class Status(StrEnum):
    """Where a reminder is in its life (the stored value is the lowercase name)."""

    PENDING = "pending"  # scheduled: waits for its send time
    QUEUED = "queued"  # in an RQ job (its id in ``job_id``)
    SENDING = "sending"  # claimed by a worker, handed to the provider
    SENT = "sent"  # the provider accepted it
    UNKNOWN = "unknown"  # the provider may have it (no answer): reconciled before any resend
    DELIVERED = "delivered"  # the provider reported it delivered
    UNDELIVERED = "undelivered"  # the provider reported it could not be delivered
    CANCELED = "canceled"  # no longer wanted (see the reason)
    FAILED = "failed"  # could not be sent (see the reason)


PENDING, QUEUED, SENDING, SENT = Status.PENDING, Status.QUEUED, Status.SENDING, Status.SENT
DELIVERED, UNDELIVERED = Status.DELIVERED, Status.UNDELIVERED
CANCELED, FAILED = Status.CANCELED, Status.FAILED
UNKNOWN = Status.UNKNOWN

STATUSES: tuple[Status, ...] = tuple(Status)
OPEN = frozenset({PENDING, QUEUED})  # not yet with a worker: what a scan may still move or cancel
FINAL = frozenset({SENT, DELIVERED, UNDELIVERED, CANCELED, FAILED})  # a scan leaves these alone

# Each status and the statuses a reminder may go to from it.
TRANSITIONS: Mapping[Status, frozenset[Status]] = {
    # dispatched; moved or snoozed (a new send time); canceled; claimed into a digest with an
    # earlier reminder of the customer's (reminders.digest)
    PENDING: frozenset({QUEUED, PENDING, CANCELED, SENDING}),
    # claimed; enqueued again (its job was lost); back to pending (deferred by quiet hours or caps,
    # released unsent, retried, moved to another channel, moved or snoozed); canceled; failed
    # before sending (no channel left, a template error)
    QUEUED: frozenset({SENDING, QUEUED, PENDING, CANCELED, FAILED}),
    # accepted by the provider; retried or moved to the next channel; failed for good; ops' retry;
    # the outcome unknown (no answer from the provider, or its worker died mid-send)
    SENDING: frozenset({SENT, PENDING, FAILED, UNKNOWN}),
    # reconciled: found in the provider's records; not there, so sent once more; ops' retry
    # (pending) or their decision (failed, canceled)
    UNKNOWN: frozenset({SENT, PENDING, FAILED, CANCELED}),
    # the provider's delivery report; a dead number falls back to the next channel
    SENT: frozenset({DELIVERED, UNDELIVERED, PENDING}),
    DELIVERED: frozenset(),
    UNDELIVERED: frozenset(),
    # restored: the occurrence whose absence canceled it is back (see reminders.scan)
    CANCELED: frozenset({PENDING}),
    FAILED: frozenset({PENDING}),  # ops' retry
}


class TransitionNotAllowed(RemindersError, RuntimeError):
    """A change the lifecycle does not allow was asked for: a bug in the caller."""

    def __init__(self, source: str, target: str) -> None:
        allowed = ", ".join(sorted(TRANSITIONS.get(Status(source), ()))) or "nothing"
        super().__init__(f"a reminder cannot go from {source} to {target} (allowed: {allowed})")


def allowed(source: str, target: str) -> bool:
    """Whether a reminder in ``source`` may go to ``target``."""
    return Status(target) in TRANSITIONS[Status(source)]


def check(source: str, target: str) -> None:
    """Raise :class:`TransitionNotAllowed` unless ``source -> target`` is allowed."""
    if not allowed(source, target):
        raise TransitionNotAllowed(source, target)


def move(
    conn: Connection,
    ids: Iterable[int],
    *,
    source: str | Collection[str],
    target: str,
    now: datetime,
    reason: str | None = None,
    values: Mapping[str, Any] | None = None,
    where: Sequence[sa.ColumnElement[bool]] = (),
    keep_reason: bool = False,
) -> list[int]:
    """Move the reminders ``ids`` that are in ``source`` (and match ``where``) to ``target``.

    ``reason`` is recorded on the event and, unless ``keep_reason`` (or ``values`` names its own
    ``reason``), shown on the reminder. ``values`` are more columns to write. One UPDATE per source
    status, so each event names the status the reminder really left. Returns the ids changed, in
    ascending order; the others were not in ``source`` (another process changed them first) and
    are left alone.
    """
    sources = [source] if isinstance(source, str) else sorted(source)
    for old in sources:
        check(old, target)
    wanted = sorted(set(ids))
    if not wanted:
        return []
    r = reminder
    columns = {**(values or {}), "status": Status(target).value, "updated_at": now}
    if reason is not None and not keep_reason:
        columns.setdefault("reason", reason)
    changed: list[int] = []
    events: list[dict[str, Any]] = []
    left: Counter[tuple[str, str]] = Counter()
    # The ids pick the rows: SQLite must not read the status's index instead (state_db).
    status = state_db.by_id_alone(conn, r.c.status)
    for old in sources:
        for start in range(0, len(wanted), _CHUNK):
            got = conn.execute(
                sa.update(r)
                .where(r.c.id.in_(wanted[start : start + _CHUNK]), status == old, *where)
                .values(**columns)
                .returning(r.c.id, r.c.rule)
            ).all()
            ids_moved = sorted(row.id for row in got)
            changed += ids_moved
            events += [_event(rid, old, target, reason, now) for rid in ids_moved]
            left.update((row.rule, old) for row in got)
    if events:
        events.sort(key=lambda e: e["reminder_id"])
        _record(conn, events)
        outbox.on_move(conn, [(e["reminder_id"], reason) for e in events], target, now)
    counts.moved(conn, left, target, now)
    return sorted(changed)


def move_each(
    conn: Connection,
    rows: Sequence[Mapping[str, Any]],
    *,
    source: str | Collection[str],
    target: str,
    now: datetime,
    values: Mapping[str, Any] | None = None,
) -> int:
    """Move many reminders, each with its own values, in one executemany.

    Each row holds ``id``, ``source`` (the status the caller saw, for its event), ``reason`` (for
    its event) and the parameters that ``values`` names with :func:`param` (``values={"send_at":
    param("planned")}`` reads each row's ``planned``). Each UPDATE is conditional on the reminder
    still being in one of ``source``. For callers that hold the reminders (claimed by this
    worker, or under the rule's scan lock), so every row is recorded as changed; returns how many
    rows were given. A row may also hold its reminder's ``rule`` (for the counts by rule and
    status, :mod:`reminders.counts`), which saves looking the rules up.
    """
    if not rows:
        return 0
    sources = {source} if isinstance(source, str) else set(source)
    for old in sources:
        check(old, target)
    for row in rows:
        if row["source"] not in sources:
            raise TransitionNotAllowed(row["source"], target)
    r = reminder
    # One equality per status, not status IN (...): SQLAlchemy refuses an expanding IN in an
    # executemany.
    still = sa.or_(*(r.c.status == old for old in sorted(sources)))
    # A reminder that stays in its status (a scan moving a pending one's date) is not given its
    # status again: SQLite rewrites every index entry of a column a statement sets, even to the
    # same value, and the status is in six of the reminder's indexes.
    staying = [row for row in rows if row["source"] == target]
    leaving = [row for row in rows if row["source"] != target]
    for group, status in ((staying, {}), (leaving, {"status": Status(target).value})):
        if group:
            columns = {**(values or {}), **status, "updated_at": now}
            conn.execute(
                sa.update(r).where(r.c.id == sa.bindparam(f"{_PARAM}id"), still).values(**columns),
                [{f"{_PARAM}{k}": v for k, v in row.items()} for row in group],
            )
    events = [_event(row["id"], row["source"], target, row.get("reason"), now) for row in rows]
    _record(conn, events)
    outbox.on_move(conn, [(row["id"], row.get("reason")) for row in rows], target, now)
    counts.moved(conn, _rules_left(conn, rows), target, now)
    return len(rows)


def _record(conn: Connection, events: list[dict[str, Any]]) -> None:
    """Insert the moves' events: by the state DB's bulk insert (an event conflicts with nothing),
    which converts each distinct time once rather than SQLAlchemy each row's (a scan moving
    10,000 reminders spent 12 us an event in that conversion)."""
    state_db.insert_ignoring_conflicts(conn, event, events)


def _rules_left(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> Counter[tuple[str, str]]:
    """How many of ``rows`` left each (rule, status): their ``rule``, or looked up."""
    rules = {row["id"]: row["rule"] for row in rows if "rule" in row}
    missing = sorted(row["id"] for row in rows if "rule" not in row)
    for start in range(0, len(missing), _CHUNK):
        chunk = missing[start : start + _CHUNK]
        found = sa.select(reminder.c.id, reminder.c.rule).where(reminder.c.id.in_(chunk))
        rules.update((row.id, row.rule) for row in conn.execute(found))
    return Counter((rules[row["id"]], row["source"]) for row in rows if row["id"] in rules)


def param(name: str) -> Any:
    """A per-row value for :func:`move_each`'s ``values``: the row's key ``name``."""
    return sa.bindparam(f"{_PARAM}{name}")


# Bind names of move_each: prefixed, as SQLAlchemy reserves a column's own name for its SET value.
_PARAM = "lc_"
# Ids a single UPDATE names at most (SQLite's default limit is 32,766 bound parameters).
_CHUNK = 5000


def _event(rid: int, old: str, new: str, reason: str | None, at: datetime) -> dict[str, Any]:
    return {
        "reminder_id": rid,
        "at": at,
        "from_status": Status(old).value,
        "to_status": Status(new).value,
        "reason": reason,
    }
