"""Frequency caps: at most so many messages to one customer a day and a week, across every rule.

``caps: {per_day: 2, per_week: 5}`` in config.yaml (unset: no caps). Days and weeks are the
customer's local ones (their zone, else the config's), so a cap holds across DST changes: a
25-hour autumn Sunday is one day. What counts is what was actually sent: ``message`` rows that
went out (``sent`` or ``delivered``; an undelivered one never reached the customer), plus the
reminders another worker has claimed and is sending right now. A rule with ``caps: false`` (a
fraud alert) is outside the caps: never held back by them, and not counted.

The messages beyond a cap are **deferred, not dropped**: back to ``pending`` with a new send time
at the opening of the customer's next allowed local day (the next day for a daily cap, the first
day of the next week for a weekly one), at the rule's send window opening, and a recorded reason
(``deferred: frequency cap (2 a day); send at ...``). When a customer has more due than the caps
allow, the **higher priority** (``priority:`` on a rule, default 0) goes first, then the earlier
send time, then the older reminder. Priorities hold across batches and channels: a due reminder
of a higher rank that another job holds (an email while this job sends texts) keeps its place;
the lower one waits a minute (:data:`WAIT`) and is decided again once the higher one went out
(then it is deferred to the next day) or did not (then it goes).

Enforced by the worker at the claim (``queued -> sending``), in the claim's own transaction, so
that two workers never both send a customer's third message of a day: see :func:`lock`.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import clock, codec, sendtime
from .compose import customer_of, customer_zone
from .config import CapsConfig, Config
from .lifecycle import DELIVERED, PENDING, QUEUED, SENDING, SENT, UNKNOWN, move
from .models import message, reminder
from .rules import Rule, RuleSet

DAY, WEEK = "day", "week"
WAIT = timedelta(minutes=1)  # a reminder held for a higher-ranked one is decided again this soon
_WEEKDAY = {"monday": 0, "sunday": 6}
_MIDNIGHT = time(0)
_CUSTOMERS_PER_QUERY = 300  # each query names them three times (SQLite allows 32,766 parameters)


# -- the calendar (pure) --------------------------------------------------------------------------


def period(moment: datetime, tz: ZoneInfo, unit: str, week_starts: str = "monday") -> date:
    """The first local date of the day or week (``unit``) that contains ``moment`` in ``tz``."""
    day = moment.astimezone(tz).date()
    if unit == DAY:
        return day
    return day - timedelta(days=(day.weekday() - _WEEKDAY[week_starts]) % 7)


def next_period(moment: datetime, tz: ZoneInfo, unit: str, week_starts: str = "monday") -> date:
    """The first local date of the day or week after the one that contains ``moment``."""
    return period(moment, tz, unit, week_starts) + timedelta(days=1 if unit == DAY else 7)


def start_of(day: date, tz: ZoneInfo) -> datetime:
    """The instant (UTC) a local date begins: its midnight, or when a DST gap at midnight ends."""
    return sendtime.localize(datetime.combine(day, _MIDNIGHT), tz).astimezone(UTC)


def opening(day: date, tz: ZoneInfo, window: sendtime.Window) -> datetime:
    """The send window's opening on a local date, as UTC (a time in a DST gap moves forward)."""
    return sendtime.localize(datetime.combine(day, window.start), tz).astimezone(UTC)


# -- who goes first (pure) -------------------------------------------------------------------------


@dataclass(frozen=True)
class Due:
    """A capped reminder that is due: one of the batch being claimed (with its customer's zone and
    send window, to count days and defer in) or a competitor held elsewhere (without)."""

    id: int
    customer_id: str
    priority: int
    send_at: datetime
    zone: ZoneInfo | None = None
    window: sendtime.Window | None = None

    @property
    def rank(self) -> tuple[int, datetime, int]:
        """Sort key: higher priority first, then earlier send time, then older reminder."""
        return (-self.priority, self.send_at, self.id)


@dataclass(frozen=True)
class Held:
    """A reminder the caps hold back: its new send time and the recorded reason."""

    id: int
    send_at: datetime
    reason: str


def limits(caps: CapsConfig) -> list[tuple[str, int]]:
    """The configured caps as (unit, most messages), the day's first."""
    found = [(DAY, caps.per_day), (WEEK, caps.per_week)]
    return [(unit, n) for unit, n in found if n is not None]


def allot(
    caps: CapsConfig,
    now: datetime,
    mine: Sequence[Due],
    others: Iterable[Due],
    used: Mapping[str, Sequence[datetime]],
) -> list[Held]:
    """Which of ``mine`` (the batch about to be claimed) the caps hold back, and until when.

    ``others``: the customers' other capped reminders that are due and held by other jobs, which
    keep their rank. ``used``: per customer, when each counted message went out (or was claimed).
    Per customer, the places left are the fewest any cap leaves today (this week); the best
    ranked take them. One of ``mine`` left out is deferred to its next allowed day's opening when
    the places go to this batch alone (after this claim the cap is reached), and waits
    :data:`WAIT` when a competitor holds one (it may yet not be sent).
    """
    caps_list = limits(caps)
    if not caps_list:
        return []
    competing: dict[str, list[Due]] = defaultdict(list)
    for other in others:
        competing[other.customer_id].append(other)
    by_customer: dict[str, list[Due]] = defaultdict(list)
    for item in mine:
        by_customer[item.customer_id].append(item)
    held: list[Held] = []
    for customer, items in by_customer.items():
        items.sort(key=lambda d: d.rank)
        tz = items[0].zone or ZoneInfo("UTC")
        times = used.get(customer, ())
        counted: list[tuple[str, int, int]] = []  # (unit, cap, counted so far this day/week)
        for unit, most in caps_list:
            start = start_of(period(now, tz, unit, caps.week_starts), tz)
            counted.append((unit, most, sum(1 for t in times if t >= start)))
        places = max(0, min(most - n for _, most, n in counted))
        ranked = sorted([*items, *competing.get(customer, ())], key=lambda d: d.rank)
        taken = ranked[:places]
        mine_ids = {d.id for d in items}
        ahead = next((d for d in taken if d.id not in mine_ids), None)
        # The caps this batch's own claims fill (at least the tightest one, when none is ahead).
        goes = sum(1 for d in taken if d.id in mine_ids)
        reached = [(unit, most) for unit, most, n in counted if n + goes >= most]
        for item in items[goes:]:  # the batch's best ranked ``goes`` are taken
            zone, window = item.zone, item.window
            if zone is None or window is None:
                raise ValueError(
                    f"reminder {item.id}: a batch's reminder needs its zone and window"
                )
            if ahead is None:
                # The places all go to this batch: the cap is reached; its next allowed day.
                unit, most = max(
                    reached, key=lambda c: next_period(now, zone, c[0], caps.week_starts)
                )
                day = next_period(now, zone, unit, caps.week_starts)
                at = opening(day, zone, window)
                why = f"deferred: frequency cap ({most} a {unit}); send at {clock.iso_utc(at)}"
            else:
                unit, most, _n = min(counted, key=lambda c: c[1] - c[2])
                at = now + WAIT
                why = (
                    f"deferred: frequency cap ({most} a {unit}): reminder #{ahead.id} goes "
                    f"first; send at {clock.iso_utc(at)}"
                )
            held.append(Held(item.id, at, why))
    return held


# -- the state DB ---------------------------------------------------------------------------------


def lock(conn: Connection, customers: Iterable[str]) -> None:
    """Serialise the claims of these customers' messages until the transaction ends.

    Counting what a customer was sent and claiming the next message must be one step, or two
    workers could each count two texts today and both send a third. So the worker counts and
    claims in one transaction and holds, until it commits, a lock per customer:

    - PostgreSQL: a transaction-level advisory lock per customer (``pg_advisory_xact_lock``),
      taken in key order so two workers with overlapping customers cannot deadlock. Row locks
      would not do: there is no customer row, and ``SELECT ... FOR UPDATE`` on the customer's
      reminders misses the ones a concurrent scan inserts. Workers claiming for other customers
      do not wait for each other, and each count runs after the lock, in a fresh snapshot (READ
      COMMITTED), so it sees the claim the previous holder committed.
    - SQLite: nothing more to take. Every state DB transaction begins with ``BEGIN IMMEDIATE``
      (see :mod:`reminders.state_db`), which holds the database's one write lock from the start:
      claims are already one at a time, and each counts after the previous one committed.

    A claimed reminder (``sending``) counts at once, so the lock need not last while the message
    is handed to the provider.
    """
    if conn.dialect.name != "postgresql":
        return
    keys = sorted({_lock_key(c) for c in customers})
    if keys:
        conn.execute(
            sa.text(
                "SELECT pg_advisory_xact_lock(k) "
                "FROM unnest(CAST(:keys AS bigint[])) WITH ORDINALITY AS t(k, n) ORDER BY n"
            ),
            {"keys": keys},
        )


def _lock_key(customer_id: str) -> int:
    digest = hashlib.blake2b(f"caps:{customer_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") - (1 << 63)  # advisory keys are signed bigints


def usage(
    conn: Connection,
    customers: Sequence[str],
    since: datetime,
    now: datetime,
    ruleset: RuleSet,
) -> tuple[dict[str, list[datetime]], list[Due]]:
    """What counts against these customers' caps since ``since``, and their capped due reminders.

    One statement per few hundred customers: the messages sent (``sent``/``delivered``), the
    reminders being sent now or whose send had no answer (``sending``, ``unknown``: at their last
    change), and the open reminders already due
    (``pending``/``queued``). Reminders of an exempt rule count for nothing; a due one of a rule
    that is gone or past its grace competes for nothing (it will not be sent).
    """
    r, m = reminder, message
    used: dict[str, list[datetime]] = defaultdict(list)
    due: list[Due] = []
    # A digest is one message for several reminders: its items share a provider id (sent) or a
    # digest id (being sent), and count once.
    seen: set[tuple[str, str, str]] = set()
    for start in range(0, len(customers), _CUSTOMERS_PER_QUERY):
        chunk = list(customers[start : start + _CUSTOMERS_PER_QUERY])
        sent = (
            sa.select(
                sa.literal_column("'sent'").label("kind"),
                r.c.customer_id,
                r.c.id,
                r.c.rule,
                m.c.created_at.label("at"),
                m.c.provider_id.label("one"),
            )
            .select_from(m.join(r, r.c.id == m.c.reminder_id))
            .where(
                r.c.customer_id.in_(chunk),
                m.c.status.in_((SENT, DELIVERED)),
                m.c.created_at >= since,
            )
        )
        sending = sa.select(
            sa.literal_column("'sending'"),
            r.c.customer_id,
            r.c.id,
            r.c.rule,
            r.c.updated_at,
            sa.cast(r.c.digest_id, sa.String(128)),
        ).where(
            r.c.customer_id.in_(chunk),
            r.c.status.in_((SENDING, UNKNOWN)),  # may have reached the customer
            r.c.updated_at >= since,
        )
        waiting = sa.select(
            sa.literal_column("'due'"),
            r.c.customer_id,
            r.c.id,
            r.c.rule,
            r.c.send_at,
            sa.cast(sa.null(), sa.String(128)),
        ).where(r.c.customer_id.in_(chunk), r.c.status.in_((PENDING, QUEUED)), r.c.send_at <= now)
        for kind, customer, rid, rule_name, at, one in conn.execute(
            sa.union_all(sent, sending, waiting)
        ):
            rule = ruleset.get(rule_name)
            if one is not None:
                if (kind, customer, one) in seen:
                    continue
                seen.add((kind, customer, one))
            if kind != "due":
                if rule is None or rule.caps:
                    used[customer].append(at)
            elif rule is not None and rule.caps and sendtime.within_grace(at, now, rule.grace):
                due.append(Due(rid, customer, rule.priority, at))
    return used, due


def enforce(
    conn: Connection,
    config: Config,
    ruleset: RuleSet,
    batch: Sequence[tuple[Mapping[str, Any], Rule]],
    job_id: str,
    now: datetime,
) -> set[int]:
    """Hold back what the caps do not allow of a batch about to be claimed; returns their ids.

    Runs inside the claim's transaction (see :func:`lock`), before the ``queued -> sending``
    update. ``batch``: the queued reminder rows (as read by the worker) with their rules. The
    held ones go back to ``pending`` with their new send time and reason, recorded, if they are
    still queued under ``job_id``. Without caps, or with only exempt rules, nothing is read.
    """
    caps = config.caps
    if caps is None:
        return set()
    capped = [(row, rule) for row, rule in batch if rule.caps]
    if not capped:
        return set()
    mine = []
    for row, rule in capped:
        zone = customer_zone(config, customer_of(rule, codec.loads(row["data"])))
        window = rule.send_window or config.send_window
        mine.append(
            Due(row["id"], str(row["customer_id"]), rule.priority, row["send_at"], zone, window)
        )
    customers = sorted({d.customer_id for d in mine})
    lock(conn, customers)
    widest = WEEK if caps.per_week is not None else DAY
    since = min(start_of(period(now, d.zone, widest, caps.week_starts), d.zone) for d in mine)  # type: ignore[arg-type]
    used, due = usage(conn, customers, since, now, ruleset)
    in_batch = {row["id"] for row, _ in batch}
    others = [d for d in due if d.id not in in_batch]
    held = allot(caps, now, mine, others, used)
    if not held:
        return set()
    done: set[int] = set()
    for item in held:  # each its own send time and reason
        done.update(
            move(
                conn,
                [item.id],
                source=QUEUED,
                target=PENDING,
                now=now,
                reason=item.reason,
                values={"send_at": item.send_at, "job_id": None, "queued_at": None},
                where=[reminder.c.job_id == job_id],
            )
        )
    return done
