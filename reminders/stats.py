"""What the console shows and its API answers: counts by day, what needs attention, rules,
searches, a reminder's timeline, outcomes and what was missed. Queries only; no writes.

Days are the config's zone's days: a day's ``sent``, ``delivered``, ``failed``, ``canceled`` and
``opted_out`` count what reached that state on that day (from the lifecycle's events, messages
and opt-outs); ``upcoming`` counts pending reminders by send day. Rows are counted by day in SQL
(see :class:`_Days`), never fetched one by one; messages and the reminders delivered, failed or
canceled are read from the counts kept by hour (:mod:`reminders.counts`) when the zone's days start
on UTC hours.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from . import clock, codec, lifecycle, phone, report, sendtime
from . import counts as reminder_counts
from .config import Config
from .errors import PermanentError
from .lifecycle import CANCELED, DELIVERED, FAILED, OPEN, PENDING, QUEUED, SENDING
from .models import event, inbound, message, optout, reminder, scan_run, skipped_row
from .pause import paused_detail, paused_rules

r = reminder


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A connection for the console's reads, in one transaction (one snapshot).

    On PostgreSQL without parallel plans or JIT compilation (``SET LOCAL``, this transaction
    only): the console's queries are index scans of some thousands of rows, and starting
    parallel workers or compiling a plan costs more than it saves (measured on a busy 2-core
    machine: a count took 48 ms with a parallel plan and 0.3 ms without).
    """
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET LOCAL max_parallel_workers_per_gather = 0")
            conn.exec_driver_sql("SET LOCAL jit = off")
        yield conn


STUCK_AFTER = timedelta(minutes=10)  # a reminder in sending longer than this: its worker died
MAX_DAYS = 366
# A reminder canceled for one of these reasons means the customer did what it reminded them of.
DONE_REASONS = (
    "canceled: the occurrence is no longer returned%",
    "canceled: the rule's check query returned no row%",
    "done: replied%",
)
EXPIRED = "expired:%"


# -- days -----------------------------------------------------------------------------------------


def today(config: Config, now: datetime) -> date:
    """Today in the config's zone."""
    return now.astimezone(config.tz()).date()


def day_bounds(first: date, count: int, tz: ZoneInfo) -> list[datetime]:
    """The UTC instants at which ``count`` local days from ``first`` begin, and the end of the
    last (``count + 1`` instants)."""
    return [
        sendtime.localize(datetime.combine(first + timedelta(days=i), datetime.min.time()), tz)
        for i in range(count + 1)
    ]


class _Days:
    """Which local day a column's instant falls in, as a SQL expression and its decoding.

    PostgreSQL converts to the zone itself (``timezone(zone, at)::date``, a cheap function a
    row); SQLite has no zones, so each day's UTC bounds (DST-aware, from Python) are compared
    in one ``CASE``. :meth:`index` turns a row's value into the day's index from ``first``:
    anything before the first day counts in it (overdue is "today"), nothing is past the last
    (the queries stop at its end).
    """

    def __init__(self, conn: Connection, config: Config, first: date, count: int) -> None:
        self.first = first
        self.count = count
        self.zone = config.timezone
        self.bounds = day_bounds(first, count, config.tz())
        self.native = conn.dialect.name == "postgresql"

    def of(self, column: Any) -> Any:
        if self.native:
            return sa.cast(sa.func.timezone(self.zone, column), sa.Date).label("day")
        bounds = self.bounds
        return sa.case(
            *((column < b, i) for i, b in enumerate(bounds[1:])), else_=len(bounds) - 1
        ).label("day")

    def index(self, value: Any) -> int:
        if self.native:
            value = (value - self.first).days
        return min(max(int(value), 0), self.count - 1)


def daily(conn: Connection, config: Config, now: datetime, days: int) -> list[dict[str, Any]]:
    """The last ``days`` days, oldest first, ending today: what was sent (by channel),
    delivered, failed, canceled and opted out on each."""
    first = today(config, now) - timedelta(days=days - 1)
    bucket = _Days(conn, config, first, days)
    lo, hi = bucket.bounds[0], bucket.bounds[-1]
    out: list[dict[str, Any]] = [
        {
            "date": (first + timedelta(days=i)).isoformat(),
            "sent": {c: 0 for c in config.channel_names},
            "delivered": 0,
            "failed": 0,
            "canceled": 0,
            "opted_out": 0,
        }
        for i in range(days)
    ]
    if _on_hours(bucket.bounds):
        # Every local day starts on a UTC hour (the zone is a whole number of hours from UTC):
        # the counts kept by hour hold the messages and the ended reminders of each.
        bounds = bucket.bounds
        for (when, what), n in reminder_counts.HOURS.between(conn, lo, hi).items():
            row = out[bisect.bisect_right(bounds, when) - 1]
            if what.startswith(reminder_counts.SENT_ON):
                channel = what.removeprefix(reminder_counts.SENT_ON)
                row["sent"][channel] = row["sent"].get(channel, 0) + n
            else:
                row[what] += n
    else:
        _sent_and_ended(conn, bucket, out)
    day = bucket.of(optout.c.created_at)
    for i, n in conn.execute(
        sa.select(day, sa.func.count())
        .where(optout.c.created_at >= lo, optout.c.created_at < hi)
        .group_by(day)
    ):
        out[bucket.index(i)]["opted_out"] += n
    return out


def _on_hours(bounds: Sequence[datetime]) -> bool:
    """Whether every day starts on a UTC hour (what the counts by hour can tell apart)."""
    return all(b.minute == 0 and b.second == 0 and b.microsecond == 0 for b in bounds)


def _sent_and_ended(conn: Connection, bucket: _Days, out: list[dict[str, Any]]) -> None:
    """Messages by channel and reminders delivered, failed and canceled a day, counted from the
    rows (a zone whose days do not start on a UTC hour)."""
    lo, hi = bucket.bounds[0], bucket.bounds[-1]
    m = message
    day = bucket.of(m.c.created_at)
    for i, channel, n in conn.execute(
        sa.select(day, m.c.channel, sa.func.count())
        .where(m.c.created_at >= lo, m.c.created_at < hi)
        .group_by(day, m.c.channel)
    ):
        sent = out[bucket.index(i)]["sent"]
        sent[channel] = sent.get(channel, 0) + n
    e = event
    day = bucket.of(e.c.at)
    for i, status, n in conn.execute(
        sa.select(day, e.c.to_status, sa.func.count())
        .where(e.c.to_status.in_([DELIVERED, FAILED, CANCELED]), e.c.at >= lo, e.c.at < hi)
        .group_by(day, e.c.to_status)
    ):
        out[bucket.index(i)][str(status)] += n


def upcoming(
    conn: Connection, config: Config, now: datetime, days: int, rule: str | None = None
) -> list[dict[str, Any]]:
    """Pending reminders by send day from today on (``days`` days), in all and by rule. Today's
    count includes those already due and not yet sent."""
    first = today(config, now)
    bucket = _Days(conn, config, first, days)
    out: list[dict[str, Any]] = [
        {"date": (first + timedelta(days=i)).isoformat(), "pending": 0, "by_rule": {}}
        for i in range(days)
    ]
    day = bucket.of(r.c.send_at)
    query = (
        sa.select(day, r.c.rule, sa.func.count())
        .where(r.c.status == PENDING, r.c.send_at < bucket.bounds[-1])
        .group_by(day, r.c.rule)
    )
    if rule is not None:
        query = query.where(r.c.rule == rule)
    for i, name, n in conn.execute(query):
        row = out[bucket.index(i)]
        row["pending"] += n
        row["by_rule"][name] = row["by_rule"].get(name, 0) + n
    return out


# -- attention ------------------------------------------------------------------------------------


def attention(conn: Connection, now: datetime) -> dict[str, Any]:
    """What needs ops now: failed reminders, stuck sends, due but unsent (and the age of the
    oldest), deferred by quiet hours or caps, paused rules."""
    kept = reminder_counts.reminders(conn)
    failed = sum(n for (_, status), n in kept.items() if status == FAILED)
    stuck = conn.execute(
        sa.select(sa.func.count()).where(r.c.status == SENDING, r.c.updated_at <= now - STUCK_AFTER)
    ).scalar_one()
    due, oldest = conn.execute(
        sa.select(sa.func.count(), sa.func.min(r.c.send_at)).where(
            r.c.status.in_(sorted(OPEN)), r.c.send_at <= now
        )
    ).one()
    deferred = _deferred(conn)
    return {
        "failed": int(failed),
        "stuck": int(stuck),
        "due_unsent": int(due),
        "oldest_due_unsent_seconds": None
        if oldest is None
        else int((now - _aware(oldest)).total_seconds()),
        "deferred": deferred["total"],
        "deferred_by_reason": deferred["by_reason"],
        "paused_rules": sorted(paused_rules(conn)),
    }


def _deferred(conn: Connection) -> dict[str, Any]:
    """Pending reminders quiet hours or caps pushed past their planned time, by reason (as
    ``reminders status`` counts them), read through the partial index of deferred reminders."""
    kind = sa.case(
        *((r.c.reason.like(like), name) for name, like in report.DEFERRALS), else_=sa.null()
    )
    by_reason: dict[str, int] = {}
    for name, n in conn.execute(
        sa.select(kind.label("kind"), sa.func.count())
        .where(
            # Literals, so the planner sees the partial index's own condition.
            r.c.status == sa.literal_column("'pending'"),
            r.c.reason.like(sa.literal_column("'deferred:%'")),
            r.c.send_at > r.c.planned_at,
        )
        .group_by(kind)
    ):
        if name is not None:
            by_reason[name] = n
    return {"total": sum(by_reason.values()), "by_reason": dict(sorted(by_reason.items()))}


def _aware(value: Any) -> datetime:
    if isinstance(value, str):
        return clock.parse_instant(value)
    return value if value.tzinfo else clock.parse_instant(value.isoformat())


def overview(conn: Connection, config: Config, now: datetime, days: int) -> dict[str, Any]:
    """The ``/api/v1/stats`` answer."""
    return {
        "timezone": config.timezone,
        "now": clock.iso_utc(now),
        "days": daily(conn, config, now, days),
        "upcoming": upcoming(conn, config, now, days),
        "attention": attention(conn, now),
    }


# -- rules ----------------------------------------------------------------------------------------


def rules(conn: Connection, names: Iterable[str], rule: str | None = None) -> list[dict[str, Any]]:
    """Each rule (the configured ones, and any with reminders) with its counts by status, its
    last scan, its next pending send time, and whether it is paused."""
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for (name, status), n in reminder_counts.reminders(conn).items():
        if rule is None or name == rule:
            counts[name][status] = n
    wanted = [rule] if rule is not None else sorted(set(names) | set(counts))
    next_due = {name: _next_due(conn, name) for name in wanted}
    s = scan_run
    latest = sa.select(s.c.rule, sa.func.max(s.c.id).label("id")).group_by(s.c.rule)
    if rule is not None:
        latest = latest.where(s.c.rule == rule)
    sub = latest.subquery()
    scans = {
        row.rule: _scan(row)
        for row in conn.execute(sa.select(s).join(sub, s.c.id == sub.c.id)).mappings()
    }
    paused = paused_detail(conn)
    return [
        {
            "name": name,
            "paused": name in paused,
            "paused_at": _iso(paused.get(name, (None, None))[0]),
            "paused_by": paused[name][1] if name in paused else None,
            "counts": {st: counts[name].get(st, 0) for st in lifecycle.STATUSES},
            "last_scan": scans.get(name),
            "next_due": _iso(next_due[name]),
        }
        for name in wanted
    ]


def _next_due(conn: Connection, rule: str) -> datetime | None:
    """A rule's earliest pending send time: the first entry of its (rule, status, send_at) index."""
    return conn.execute(
        sa.select(r.c.send_at)
        .where(r.c.rule == rule, r.c.status == PENDING)
        .order_by(r.c.send_at)
        .limit(1)
    ).scalar()


def _iso(value: datetime | None) -> str | None:
    return None if value is None else clock.iso_utc(value)


def _scan(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "at": clock.iso_utc(row["started_at"]),
        "status": row["status"],
        "rows": row["rows"],
        "created": row["created"],
        "moved": row["moved"],
        "canceled": row["canceled"],
        "unchanged": row["unchanged"],
        "skipped": row["skipped"],
        "too_late": row["too_late"],
        "error": row["error"],
    }


def scans(conn: Connection, rule: str, limit: int = 10) -> list[dict[str, Any]]:
    """A rule's last scans, newest first, each with its skipped rows grouped by column and
    reason (a few examples each)."""
    s = scan_run
    runs = [
        _scan(row)
        for row in conn.execute(
            sa.select(s).where(s.c.rule == rule).order_by(s.c.id.desc()).limit(limit)
        ).mappings()
    ]
    ids = [run["id"] for run in runs if run["skipped"]]
    why: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    if ids:
        k = skipped_row
        for row in conn.execute(
            sa.select(k.c.scan_run_id, k.c.column, k.c.reason, k.c.occurrence, k.c.row_number)
            .where(k.c.scan_run_id.in_(ids))
            .order_by(k.c.scan_run_id, k.c.row_number)
        ):
            key = _skip_kind(row.column, row.reason)
            found = why[row.scan_run_id].setdefault(
                key, {"reason": key, "count": 0, "examples": []}
            )
            found["count"] += 1
            if len(found["examples"]) < 3:
                found["examples"].append(row.reason)
    for run in runs:
        run["skipped_by_reason"] = sorted(
            why.get(run["id"], {}).values(), key=lambda x: -x["count"]
        )
    return runs


def _skip_kind(column: str | None, reason: str) -> str:
    """A skipped row's reason without its values: ``runs_out_on: not a date``."""
    text = reason
    for marker in (" = ", ": "):
        if marker in text and column and text.startswith(column):
            text = text.split(marker, 1)[1]
    if "'" in text or '"' in text:
        head, _, tail = text.partition(" is ")
        text = tail or head
    return f"{column}: {text}" if column else text


# -- reminders ------------------------------------------------------------------------------------

# The locale of the template variant of a reminder's latest message (null: the default template,
# or nothing sent yet).
_LATEST_LOCALE = (
    sa.select(message.c.locale)
    .where(message.c.reminder_id == r.c.id)
    .order_by(message.c.id.desc())
    .limit(1)
    .scalar_subquery()
)

LIST_COLUMNS = (
    r.c.id,
    r.c.rule,
    r.c.occurrence,
    r.c.customer_id,
    r.c.offset,
    r.c.send_at,
    r.c.status,
    r.c.channel,
    r.c.reason,
    r.c.sent_at,
    _LATEST_LOCALE.label("locale"),
)


def reminder_fields(row: Any) -> dict[str, Any]:
    """A reminder as ``reminders list --json`` prints it."""
    return {
        "id": row["id"],
        "rule": row["rule"],
        "occurrence": row["occurrence"],
        "customer_id": row["customer_id"],
        "offset": row["offset"],
        "send_at": clock.iso_utc(row["send_at"]),
        "status": row["status"],
        "channel": row["channel"],
        "reason": row["reason"],
        "sent_at": clock.iso_utc(row["sent_at"]) if row["sent_at"] else None,
        "locale": row.get("locale"),  # selected by LIST_COLUMNS; None where it was not
    }


def customers_by_address(
    conn: Connection, config: Config, phone_number: str | None, email: str | None
) -> list[str]:
    """The customer ids that messages or opt-outs tie to a phone number or an email address.

    A phone number is read as the engine stores it (E.164, the config's default region); an
    email lowercased. A customer never sent anything is found by their id.
    """
    addresses: list[tuple[str, str]] = []
    if phone_number:
        try:
            addresses.append(("sms", phone.normalize(phone_number, config.default_region)))
        except PermanentError:  # not a number the engine could have sent to: as typed
            addresses.append(("sms", phone_number.strip()))
    if email:
        addresses.append(("email", email.strip().lower()))
    ids: set[str] = set()
    for channel, address in addresses:
        ids.update(
            row.customer_id
            for row in conn.execute(
                sa.select(r.c.customer_id)
                .join(message, message.c.reminder_id == r.c.id)
                .where(message.c.to_address == address, message.c.channel == channel)
                .distinct()
            )
        )
        ids.update(
            row.customer_id
            for row in conn.execute(
                sa.select(optout.c.customer_id).where(
                    optout.c.channel == channel,
                    optout.c.address == address,
                    optout.c.customer_id.is_not(None),
                )
            )
        )
    return sorted(ids)


def search(
    conn: Connection,
    config: Config,
    *,
    customer_id: str | None = None,
    phone_number: str | None = None,
    email: str | None = None,
    rule: str | None = None,
    status: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Reminders by customer id, phone or email, rule and status; the newest send times first."""
    query = sa.select(*LIST_COLUMNS)
    if phone_number or email:
        ids = customers_by_address(conn, config, phone_number, email)
        if customer_id:
            ids = [i for i in ids if i == customer_id]
        if not ids:
            return []
        query = query.where(r.c.customer_id.in_(ids))
    elif customer_id:
        query = query.where(r.c.customer_id == customer_id)
    if rule:
        query = query.where(r.c.rule == rule)
    if status:
        query = query.where(r.c.status == status)
    query = query.order_by(r.c.send_at.desc(), r.c.id.desc()).limit(limit)
    return [reminder_fields(row) for row in conn.execute(query).mappings()]


def reminder_detail(conn: Connection, rid: int) -> dict[str, Any] | None:
    """One reminder with its timeline (events) and its messages, or None."""
    query = sa.select(r, _LATEST_LOCALE.label("locale")).where(r.c.id == rid)
    row = conn.execute(query).mappings().first()
    if row is None:
        return None
    out = reminder_fields(row)
    out.update(
        planned_at=clock.iso_utc(row["planned_at"]),
        created_at=clock.iso_utc(row["created_at"]),
        attempts=row["attempts"],
        provider_id=row["provider_id"],
    )
    events = conn.execute(
        sa.select(event).where(event.c.reminder_id == rid).order_by(event.c.at, event.c.id)
    ).mappings()
    out["events"] = [
        {
            "at": clock.iso_utc(e["at"]),
            "status": e["to_status"],
            "from": e["from_status"],
            "reason": e["reason"],
        }
        for e in events
    ]
    if not out["events"] or out["events"][0]["from"] is not None:
        # Creation is not a status change: the scan that made the reminder is its first entry.
        out["events"].insert(
            0,
            {
                "at": clock.iso_utc(row["created_at"]),
                "status": "created",
                "from": None,
                "reason": f"created by a scan for {clock.iso_utc(row['planned_at'])}",
            },
        )
    replies = conn.execute(
        sa.select(inbound.c.created_at, inbound.c.body, inbound.c.action)
        .where(inbound.c.reminder_id == rid)
        .order_by(inbound.c.created_at, inbound.c.id)
    ).all()
    if replies:  # the customer's SMS answers, in time order among the status changes
        out["events"] = sorted(
            out["events"]
            + [
                {
                    "at": clock.iso_utc(x.created_at),
                    "status": "replied",
                    "from": None,
                    "reason": f"replied {x.body.strip()[:40]!r} ({x.action})",
                }
                for x in replies
            ],
            key=lambda e: (e["status"] != "created", e["at"]),
        )
    msgs = conn.execute(
        sa.select(message).where(message.c.reminder_id == rid).order_by(message.c.id)
    ).mappings()
    out["messages"] = [
        {
            "channel": m["channel"],
            "to": phone.mask_address(m["channel"], m["to_address"]),
            "provider_id": m["provider_id"],
            "status": m["status"],
            "error_code": m["error_code"],
            "at": clock.iso_utc(m["created_at"]),
            "updated_at": clock.iso_utc(m["updated_at"]),
        }
        for m in msgs
    ]
    return out


# -- outcomes -------------------------------------------------------------------------------------


def _offset_span(text: str) -> timedelta:
    """An offset as a duration (calendar units at their usual length: for "before due")."""
    off = sendtime.parse_offset(text)
    per = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "mo": 30 * 86400, "y": 365 * 86400}
    return timedelta(seconds=off.amount * per[off.unit])


def outcomes(conn: Connection, rule: str, now: datetime, days: int = 90) -> dict[str, Any]:
    """Per offset, for the reminders sent in the last ``days`` days: of the occurrences
    reminded, how many were done afterwards (a later reminder canceled by the rule's check, a
    DONE reply, or the occurrence gone from the query), how many of those before their due
    date, how many are still open (a reminder pending or queued), expired (a later reminder
    expired), or show no sign either way."""
    since = now - timedelta(days=days)
    sent = (
        sa.select(r.c.occurrence, r.c.offset, r.c.planned_at, r.c.sent_at)
        .where(r.c.rule == rule, r.c.sent_at >= since)
        .subquery()
    )
    # The canceled reminders that say "done" or "expired", read once: per occurrence, when each
    # first happened.
    is_done = sa.or_(*(r.c.reason.like(x) for x in DONE_REASONS))
    is_expired = r.c.reason.like(EXPIRED)
    ended = (
        sa.select(
            r.c.occurrence,
            sa.func.min(sa.case((is_done, r.c.updated_at))).label("done_at"),
            sa.func.min(sa.case((is_expired, r.c.updated_at))).label("expired_at"),
        )
        .where(
            r.c.rule == rule,
            # A literal, so the planner sees the partial index's own condition.
            r.c.status == sa.literal_column("'canceled'"),
            r.c.updated_at >= since,
            sa.or_(is_done, is_expired),
        )
        .group_by(r.c.occurrence)
        .subquery()
    )
    still = (
        sa.select(r.c.occurrence)
        .where(
            r.c.rule == rule,
            r.c.status.in_([sa.literal_column("'pending'"), sa.literal_column("'queued'")]),
        )
        .group_by(r.c.occurrence)
        .subquery()
    )
    joined = (
        sa.select(
            sent.c.offset,
            sent.c.planned_at,
            ended.c.done_at,
            sa.case((ended.c.done_at >= sent.c.sent_at, 1), else_=0).label("done"),
            sa.case((still.c.occurrence.is_not(None), 1), else_=0).label("open"),
            sa.case((ended.c.expired_at.is_not(None), 1), else_=0).label("expired"),
        )
        .select_from(sent)
        .outerjoin(ended, ended.c.occurrence == sent.c.occurrence)
        .outerjoin(still, still.c.occurrence == sent.c.occurrence)
        .subquery()
    )
    j = joined.c
    # Counted in SQL, each occurrence in the first of: done, open, expired, no sign.
    not_done = j.done == 0
    by: dict[str, dict[str, int]] = {}
    for row in conn.execute(
        sa.select(
            j.offset,
            sa.func.count().label("reminded"),
            sa.func.sum(j.done).label("done"),
            sa.func.sum(sa.case((sa.and_(not_done, j.open == 1), 1), else_=0)).label("open"),
            sa.func.sum(
                sa.case((sa.and_(not_done, j.open == 0, j.expired == 1), 1), else_=0)
            ).label("expired"),
        ).group_by(j.offset)
    ):
        done_n, open_n, expired_n = int(row.done or 0), int(row.open or 0), int(row.expired or 0)
        by[row.offset] = {
            "reminded": int(row.reminded),
            "done": done_n,
            "done_before_due": 0,
            "open": open_n,
            "expired": expired_n,
            "no_sign": int(row.reminded) - done_n - open_n - expired_n,
        }
    # Before the due date: the due time is the planned time less the offset (a few rows).
    spans: dict[str, timedelta] = {}
    for row in conn.execute(
        sa.select(sent.c.offset, sent.c.planned_at, ended.c.done_at).join(
            ended,
            sa.and_(ended.c.occurrence == sent.c.occurrence, ended.c.done_at >= sent.c.sent_at),
        )
    ):
        span = spans.get(row.offset)
        if span is None:
            span = spans[row.offset] = _offset_span(row.offset)
        if _aware(row.done_at) < _aware(row.planned_at) - span:
            by[row.offset]["done_before_due"] += 1
    order = sorted(by, key=lambda text: _offset_span(text))
    return {
        "rule": rule,
        "since": clock.iso_utc(since),
        "offsets": [{"offset": k, **by[k]} for k in order],
    }


# -- missed ---------------------------------------------------------------------------------------


def _kind(reason: str | None) -> str:
    """A reason without its particulars (addresses, times), to group by."""
    if not reason:
        return "unknown"
    text = reason.split("; then ")[-1]
    for cut in (" (", ": +", " at 20"):
        text = text.split(cut)[0]
    return text[:120]


def missed(
    conn: Connection, config: Config, now: datetime, days: int, sample: int = 200
) -> dict[str, Any]:
    """Who should have been reminded in the last ``days`` days (send time in the period) and
    was not, and why: failed (by error), expired past grace, suppressed (opted out, turned off,
    no usable address), still due and unsent; and the rows the scans skipped (by reason)."""
    first = today(config, now) - timedelta(days=days - 1)
    lo = day_bounds(first, 1, config.tz())[0]
    period = [r.c.send_at >= lo, r.c.send_at <= now]
    rows = conn.execute(
        sa.select(*LIST_COLUMNS, r.c.updated_at)
        .where(
            *period,
            sa.or_(
                r.c.status == FAILED,
                sa.and_(r.c.status.in_(sorted(OPEN))),
                sa.and_(
                    r.c.status == CANCELED,
                    sa.or_(
                        r.c.reason.like(EXPIRED),
                        r.c.reason.like("%opted out%"),
                        r.c.reason.like("%turned off by the customer%"),
                    ),
                ),
            ),
        )
        .order_by(r.c.send_at, r.c.id)
    ).mappings()
    failed: dict[str, int] = defaultdict(int)
    counts = {"failed": 0, "expired": 0, "opted_out": 0, "off": 0, "no_address": 0, "due_unsent": 0}
    listed: list[dict[str, Any]] = []
    for row in rows:
        reason = row["reason"] or ""
        status = row["status"]
        if status == FAILED and "no usable channel" in reason:
            why = "no_address"
        elif status == FAILED:
            why = "failed"
            failed[_kind(reason)] += 1
        elif status in OPEN:
            why = "due_unsent"
        elif reason.startswith("expired"):
            why = "expired"
        elif "opted out" in reason:
            why = "opted_out"
        else:
            why = "off"
        counts[why] += 1
        if len(listed) < sample:
            listed.append({**reminder_fields(row), "why": why})
    s = scan_run
    latest = (
        sa.select(s.c.rule, sa.func.max(s.c.id).label("id"))
        .where(s.c.started_at >= lo, s.c.started_at <= now)
        .group_by(s.c.rule)
        .subquery()
    )
    skipped: dict[tuple[str, str], dict[str, Any]] = {}
    k = skipped_row
    for skip in conn.execute(
        sa.select(k.c.rule, k.c.column, k.c.reason, k.c.occurrence, k.c.row_number)
        .join(latest, latest.c.id == k.c.scan_run_id)
        .order_by(k.c.rule, k.c.row_number)
    ):
        key = (skip.rule, _skip_kind(skip.column, skip.reason))
        found = skipped.setdefault(
            key, {"rule": skip.rule, "reason": key[1], "count": 0, "examples": []}
        )
        found["count"] += 1
        if len(found["examples"]) < 3:
            found["examples"].append(
                {"row": skip.row_number, "occurrence": skip.occurrence, "reason": skip.reason}
            )
    return {
        "from": first.isoformat(),
        "to": today(config, now).isoformat(),
        "timezone": config.timezone,
        "failed": {
            "total": counts["failed"],
            "by_error": [
                {"error": k, "count": v} for k, v in sorted(failed.items(), key=lambda x: -x[1])
            ],
        },
        "expired": counts["expired"],
        "suppressed": {
            "opted_out": counts["opted_out"],
            "off": counts["off"],
            "no_address": counts["no_address"],
        },
        "due_unsent": counts["due_unsent"],
        "skipped": {
            "total": sum(x["count"] for x in skipped.values()),
            "by_reason": sorted(skipped.values(), key=lambda x: -x["count"]),
        },
        "reminders": listed,
    }


# -- a rule's own forecast, from its pending reminders --------------------------------------------


def pending_by_day(
    conn: Connection, config: Config, rule: str, channels: Sequence[str], now: datetime, days: int
) -> list[dict[str, Any]]:
    """A rule's pending reminders by send day (today: overdue too) and the channel each is to
    go by (its rule's channel at its channel index), counted in SQL: the rule page's forecast
    at a glance (:mod:`reminders.forecast` adds what would hold them back)."""
    first = today(config, now)
    bucket = _Days(conn, config, first, days)
    out: list[dict[str, Any]] = [
        {"date": (first + timedelta(days=i)).isoformat(), **dict.fromkeys(channels, 0)}
        for i in range(days)
    ]
    day = bucket.of(r.c.send_at)
    for i, index, n in conn.execute(
        sa.select(day, r.c.channel_index, sa.func.count())
        .where(
            r.c.rule == rule,
            r.c.status.in_([PENDING, QUEUED]),
            r.c.send_at < bucket.bounds[-1],
        )
        .group_by(day, r.c.channel_index)
    ):
        name = channels[min(int(index), len(channels) - 1)]
        out[bucket.index(i)][name] += n
    return out


def pending_items(
    conn: Connection, rule: str, lo: datetime, hi: datetime
) -> Iterable[tuple[datetime, int, dict[str, Any]]]:
    """(send time, channel index, row values) of a rule's pending reminders in [lo, hi)."""
    for row in conn.execute(
        sa.select(r.c.send_at, r.c.channel_index, r.c.data).where(
            r.c.rule == rule,
            r.c.status.in_([PENDING, QUEUED]),
            r.c.send_at < hi,
            r.c.send_at >= lo,
        )
    ):
        yield row.send_at, row.channel_index, codec.loads(row.data)


__all__ = [
    "attention",
    "daily",
    "missed",
    "outcomes",
    "overview",
    "reminder_detail",
    "rules",
    "scans",
    "search",
    "upcoming",
]
