"""The outbox: what must leave the engine (write-back statements, signed webhooks), never lost.

An event (a reminder sent, delivered, failed, canceled, replied to or done; a customer opted out
or back in) is written here **in the transaction of the change it reports**: one row per
destination that wants it, all with the event's one id (``evt_...``). The destinations:

- ``writeback:consent``: the config's ``writeback.when`` statements (opted_out, opted_in);
- ``writeback:<rule>``: a rule's own ``writeback:`` statements;
- ``webhook:<key>``: one endpoint of ``webhooks:`` (the key is a digest of its URL).

The scheduler enqueues one RQ job per destination whose oldest pending row is due
(:func:`enqueue_due`); a worker applies that destination's rows **in id order** and stops at the
first failure, which waits for its retry time (``next_at``, on the engine clock, with exponential
backoff) while the rows behind it wait too: an opt-in never overtakes the opt-out before it. A
write-back statement that keeps failing stays at the head, visible in ``status`` and the metrics,
until the statement or the business DB is fixed; a webhook is given up (``failed``) three days
after its event, and the endpoint's next event goes. Delivery is at least once: a worker that dies
after the business DB committed applies the statement again, so statements should be idempotent.

Sending never waits on any of this: a change costs one more INSERT (and, for reminder events, one
SELECT of the reminders' rows) only when some statement or endpoint wants that event; with no
``writeback`` and no ``webhooks`` nothing at all is read or written.

Retention, kept simple: a delivered (or skipped) row is deleted a week after delivery, a webhook
given up after 30 days; a pending row is never deleted.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import codec
from .business_db import parameters
from .config import CONSENT_EVENTS, REMINDER_EVENTS, Config, WebhookConfig
from .errors import RuntimeFailure
from .models import message, outbox, reminder

if TYPE_CHECKING:
    from .app import App
    from .rules import RuleSet

log = logging.getLogger(__name__)

QUEUE = "reminders-outbox"
JOB_FUNCTION = "reminders.jobs.deliver_outbox"
PENDING, DONE, FAILED, SKIPPED = "pending", "done", "failed", "skipped"
WRITEBACK = "writeback"
CONSENT = "consent"

# What each kind of event binds (a rule's events bind the row's columns too).
CONSENT_BINDS = ("customer_id", "channel", "address", "source", "at")
REMINDER_BINDS = (
    "reminder_id",
    "rule",
    "occurrence",
    "offset",
    "customer_id",
    "channel",
    "provider_id",
    "at",
    "reason",
    "error_code",
    "keyword",
)
# What a webhook's ``data`` carries (no row columns: they may hold personal data); the address
# only for endpoints with ``include_addresses: true``.
WEBHOOK_FIELDS = (*REMINDER_BINDS, "source")

# The event a lifecycle status change is.
EVENT_OF_STATUS = {
    "sent": "sent",
    "delivered": "delivered",
    "failed": "failed",
    "undelivered": "failed",
    "canceled": "canceled",
}
# Consent sources (consent.optout.source) as events name them: Twilio's dead-number codes are
# dead_number, its other codes (21610) provider.
DEAD_NUMBER_CODES = frozenset({"30004", "30005", "30006"})

FIRST_RETRY = timedelta(seconds=30)
WRITEBACK_MAX_BACKOFF = timedelta(hours=1)
WEBHOOK_MAX_BACKOFF = timedelta(hours=3)
WEBHOOK_GIVE_UP = timedelta(days=3)  # after its event; then the endpoint's next event goes
KEEP_DELIVERED = timedelta(days=7)
KEEP_GIVEN_UP = timedelta(days=30)
BATCH = 50  # rows read at a time by a worker
WORK_BUDGET = 60.0  # seconds a job applies rows before leaving the rest to the next job
LOCK_TTL_MS = 180_000  # a destination's lock outlives a dead worker by at most this


def unknown_binds(sql: str, allowed: Iterable[str]) -> list[str]:
    """The ``:names`` of ``sql`` that are not in ``allowed``, sorted."""
    return sorted(parameters(sql) - set(allowed))


def webhook_type(event: str) -> str:
    """``reminder.sent``, ``customer.opted_out``."""
    return f"customer.{event}" if event in CONSENT_EVENTS else f"reminder.{event}"


def hook_destination(url: str) -> str:
    """The destination of a webhook endpoint: a digest of its URL (which may hold a token)."""
    return "webhook:" + hashlib.sha256(url.encode()).hexdigest()[:16]


def consent_source(source: str) -> str:
    """An opt-out's source as the events name it: stop, unsubscribe, preferences, start,
    dead_number (Twilio 30004/30005/30006) or provider (another code, e.g. 21610)."""
    if source in DEAD_NUMBER_CODES:
        return "dead_number"
    if source.isdigit():
        return "provider"
    return source


def new_event_id() -> str:
    return f"evt_{uuid.uuid4().hex}"


@dataclass(frozen=True)
class Plan:
    """Who wants which event: read from the config and the rules once per process."""

    rules: Mapping[str, frozenset[str]] = field(default_factory=dict)
    consent: frozenset[str] = frozenset()
    hooks: tuple[tuple[str, WebhookConfig], ...] = ()
    events: frozenset[str] = frozenset()

    @classmethod
    def build(cls, config: Config, ruleset: RuleSet | None) -> Plan:
        if not config.outbox_used:
            return cls()
        rules: dict[str, frozenset[str]] = {}
        consent: frozenset[str] = frozenset()
        if config.writeback is not None:
            consent = frozenset(config.writeback.when)
            for rule in ruleset.rules if ruleset is not None else []:
                if rule.writeback:
                    rules[rule.name] = frozenset(rule.writeback)
        hooks = tuple((hook_destination(h.url), h) for h in config.webhooks)
        events = set(consent).union(*rules.values())
        for _, hook in hooks:
            events |= {
                e for e in (*CONSENT_EVENTS, *REMINDER_EVENTS) if hook.wants(webhook_type(e))
            }
        return cls(rules, consent, hooks, frozenset(events))

    def destinations(self, event: str, rule: str | None) -> list[str]:
        """Where ``event`` (of ``rule``'s reminder; None for consent) goes."""
        found = []
        if rule is None:
            if event in self.consent:
                found.append(f"{WRITEBACK}:{CONSENT}")
        elif event in self.rules.get(rule, ()):
            found.append(f"{WRITEBACK}:{rule}")
        kind = webhook_type(event)
        found += [key for key, hook in self.hooks if hook.wants(kind)]
        return found

    def hook(self, destination: str) -> WebhookConfig | None:
        for key, hook in self.hooks:
            if key == destination:
                return hook
        return None


# The plan of each state DB this process writes to, made on first use (App.state attaches it).
_plans: dict[Any, Plan | Callable[[], Plan]] = {}
_plans_lock = threading.Lock()


def attach(engine: sa.Engine, build: Callable[[], Plan]) -> None:
    """Make ``build()`` the plan of changes made through ``engine`` (built on the first change)."""
    with _plans_lock:
        _plans[engine.url] = build


def plan_for(conn: Connection) -> Plan | None:
    """The plan of ``conn``'s state DB, or None when no engine context attached one."""
    found = _plans.get(conn.engine.url)
    if found is None or isinstance(found, Plan):
        return found
    plan = found()
    with _plans_lock:
        _plans[conn.engine.url] = plan
    return plan


# -- recording, in the caller's transaction ------------------------------------------------------


def on_move(
    conn: Connection, changes: Sequence[tuple[int, str | None]], target: str, now: datetime
) -> None:
    """Record the event of reminders moved to ``target`` ((id, reason) each), if anyone wants it.

    Called by :func:`reminders.lifecycle.move` and ``move_each`` after their UPDATE."""
    event = EVENT_OF_STATUS.get(target)
    if event is None or not changes:
        return
    plan = plan_for(conn)
    if plan is None or event not in plan.events:
        return
    record_reminders(conn, plan, event, changes, now)


def on_reply(
    conn: Connection, reminder_id: int, event: str, keyword: str, reason: str, now: datetime
) -> None:
    """Record ``replied`` or ``done`` for the reminder a customer answered with ``keyword``."""
    plan = plan_for(conn)
    if plan is None or event not in plan.events:
        return
    record_reminders(conn, plan, event, [(reminder_id, reason)], now, keyword=keyword)


def on_consent(conn: Connection, event: str, row: Mapping[str, Any]) -> None:
    """Record ``opted_out`` or ``opted_in`` (a consent history row: channel, address,
    customer_id, source, reason, created_at)."""
    plan = plan_for(conn)
    if plan is None or event not in plan.events:
        return
    destinations = plan.destinations(event, None)
    if not destinations:
        return
    facts = {
        "customer_id": row["customer_id"],
        "channel": row["channel"],
        "address": row["address"],
        "source": consent_source(str(row["source"])),
        "reason": row["reason"],
        "at": row["created_at"],
    }
    payload = '{"facts":' + codec.dumps(facts) + "}"
    rows = _rows(new_event_id(), event, None, None, payload, destinations, row["created_at"])
    conn.execute(outbox.insert(), rows)


def record_reminders(
    conn: Connection,
    plan: Plan,
    event: str,
    changes: Sequence[tuple[int, str | None]],
    now: datetime,
    keyword: str | None = None,
) -> int:
    """Outbox rows for ``event`` of each reminder in ``changes`` whose rule or an endpoint wants
    it: its facts and the row its scan saw (``reminder.data``). Returns the events written."""
    reasons = dict(changes)
    ids = sorted(reasons)
    written = 0
    pending: list[dict[str, Any]] = []
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        latest = (
            sa.select(message.c.reminder_id, sa.func.max(message.c.id).label("mid"))
            .where(message.c.reminder_id.in_(chunk))
            .group_by(message.c.reminder_id)
            .subquery()
        )
        r = reminder
        rows = conn.execute(
            sa.select(
                r.c.id,
                r.c.rule,
                r.c.occurrence,
                r.c.offset,
                r.c.customer_id,
                r.c.channel,
                r.c.provider_id,
                r.c.data,
                message.c.error_code,
                message.c.to_address,
            )
            .select_from(
                r.outerjoin(latest, latest.c.reminder_id == r.c.id).outerjoin(
                    message, message.c.id == latest.c.mid
                )
            )
            .where(r.c.id.in_(chunk))
        )
        for row in rows:
            destinations = plan.destinations(event, row.rule)
            if not destinations:
                continue
            facts = {
                "reminder_id": row.id,
                "rule": row.rule,
                "occurrence": row.occurrence,
                "offset": row.offset,
                "customer_id": row.customer_id,
                "channel": row.channel,
                "provider_id": row.provider_id,
                "at": now,
                "reason": reasons.get(row.id),
                "error_code": row.error_code,
                "keyword": keyword,
                "address": row.to_address,
            }
            # The row is kept as stored (typed JSON): not decoded and encoded again.
            payload = '{"facts":' + codec.dumps(facts) + ',"row":' + row.data + "}"
            pending += _rows(new_event_id(), event, row.rule, row.id, payload, destinations, now)
            written += 1
    if pending:  # one executemany for the whole change
        conn.execute(outbox.insert(), pending)
    return written


def _rows(
    event_id: str,
    event: str,
    rule: str | None,
    reminder_id: int | None,
    payload: str,
    destinations: Sequence[str],
    now: datetime,
) -> list[dict[str, Any]]:
    """The outbox rows of one event, one a destination (all with the event's id)."""
    return [
        {
            "event_id": event_id,
            "destination": destination,
            "type": event,
            "rule": rule,
            "reminder_id": reminder_id,
            "payload": payload,
            "status": PENDING,
            "attempts": 0,
            "next_at": now,
            "created_at": now,
        }
        for destination in destinations
    ]


# -- the payload -------------------------------------------------------------------------------


def binds(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A write-back statement's parameters: the row's columns, then the event's facts."""
    return {**payload.get("row", {}), **payload["facts"]}


def webhook_data(payload: Mapping[str, Any], include_addresses: bool) -> dict[str, Any]:
    """A webhook's ``data``: the event's facts (no row columns); the address only when asked."""
    facts = payload["facts"]
    data = {k: facts[k] for k in WEBHOOK_FIELDS if k in facts and k != "at"}
    if include_addresses and "address" in facts:
        data["address"] = facts["address"]
    return data


# -- the scheduler's side ------------------------------------------------------------------------


def due_destinations(conn: Connection, now: datetime) -> list[str]:
    """Destinations whose oldest pending row is due at ``now``."""
    heads = (
        sa.select(outbox.c.destination, sa.func.min(outbox.c.id).label("head"))
        .where(outbox.c.status == PENDING)
        .group_by(outbox.c.destination)
        .subquery()
    )
    rows = conn.execute(
        sa.select(outbox.c.destination)
        .select_from(outbox.join(heads, heads.c.head == outbox.c.id))
        .where(outbox.c.next_at <= now)
        .order_by(outbox.c.id)
    )
    return [row.destination for row in rows]


def prune(conn: Connection, now: datetime) -> int:
    """Delete delivered rows a week old and given-up webhooks 30 days old; never a pending one."""
    done = conn.execute(
        outbox.delete().where(
            outbox.c.status.in_([DONE, SKIPPED]), outbox.c.done_at < now - KEEP_DELIVERED
        )
    ).rowcount
    given_up = conn.execute(
        outbox.delete().where(outbox.c.status == FAILED, outbox.c.done_at < now - KEEP_GIVEN_UP)
    ).rowcount
    return int(done or 0) + int(given_up or 0)


def job_id(destination: str) -> str:
    # RQ accepts only letters, digits, "_" and "-" in a custom job id.
    return "outbox-" + hashlib.sha256(destination.encode()).hexdigest()[:24]


def enqueue_due(app: App, connection: Any, now: datetime) -> int:
    """Enqueue a job for each destination with a due head (none while its job waits or runs);
    returns the jobs enqueued."""
    if not app.config.outbox_used:
        return 0
    from rq import Queue
    from rq.exceptions import NoSuchJobError
    from rq.job import Job, JobStatus

    with app.state.begin() as conn:
        prune(conn, now)
        destinations = due_destinations(conn, now)
    if not destinations:
        return 0
    queue = Queue(QUEUE, connection=connection)
    alive = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED}
    enqueued = 0
    for destination in destinations:
        jid = job_id(destination)
        try:
            if Job.fetch(jid, connection=connection).get_status(refresh=False) in alive:
                continue
        except NoSuchJobError:
            pass
        queue.enqueue(
            JOB_FUNCTION,
            destination,
            job_id=jid,
            job_timeout=int(WORK_BUDGET * 5),
            result_ttl=600,
            failure_ttl=7 * 86400,
        )
        enqueued += 1
    return enqueued


# -- the worker's side ---------------------------------------------------------------------------


@dataclass
class Applied:
    """What one job did for a destination."""

    delivered: int = 0
    failed: int = 0  # attempts that failed (the row waits for its retry, or was given up)
    skipped: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"delivered": self.delivered, "failed": self.failed, "skipped": self.skipped}


class Outcome(RuntimeFailure):
    """A delivery attempt that did not deliver: ``permanent`` skips the row (nothing to send it
    with any more: its statement or endpoint was removed from the config)."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def backoff(destination: str, attempts: int) -> timedelta:
    """The wait after the ``attempts``-th failed attempt: 30 s doubling, capped (1 h for a
    write-back statement, 3 h for a webhook)."""
    cap = WRITEBACK_MAX_BACKOFF if destination.startswith(WRITEBACK) else WEBHOOK_MAX_BACKOFF
    return min(FIRST_RETRY * (2 ** min(max(attempts - 1, 0), 20)), cap)


def apply(app: App, destination: str, connection: Any = None) -> Applied:
    """Apply ``destination``'s due rows in id order until one fails, none is due or the work
    budget is spent. Another worker on the same destination makes this one return at once."""
    counts = Applied()
    token = uuid.uuid4().hex
    key = f"reminders:outbox:lock:{job_id(destination)}"
    if connection is not None and not connection.set(key, token, nx=True, px=LOCK_TTL_MS):
        return counts
    try:
        _apply(app, destination, counts)
    finally:
        if connection is not None and connection.get(key) in (token, token.encode()):
            connection.delete(key)
    return counts


def _apply(app: App, destination: str, counts: Applied) -> None:
    plan = Plan.build(app.config, app.ruleset)
    started = time.monotonic()
    while time.monotonic() - started < WORK_BUDGET:
        with app.state.connect() as conn:
            rows = [
                dict(found)
                for found in conn.execute(
                    sa.select(outbox)
                    .where(outbox.c.destination == destination, outbox.c.status == PENDING)
                    .order_by(outbox.c.id)
                    .limit(BATCH)
                ).mappings()
            ]
        if not rows:
            return
        for row in rows:
            now = app.now()
            if row["next_at"] > now:
                return
            failure = _attempt(app, plan, destination, row)
            if failure is not None and failure.permanent:
                _finish(app, row, SKIPPED, str(failure), now)
                counts.skipped += 1
                continue
            if failure is not None:
                counts.failed += 1
                if not _retry_later(app, destination, row, str(failure), now):
                    return
                continue
            _finish(app, row, DONE, None, now)
            counts.delivered += 1
            if time.monotonic() - started >= WORK_BUDGET:
                return


def _attempt(app: App, plan: Plan, destination: str, row: Mapping[str, Any]) -> Outcome | None:
    """Deliver one row; None when delivered, else why not. An unexpected error is a failure
    like any other (shown in ``status``, retried), not a job that dies and comes back."""
    try:
        _deliver(app, plan, destination, row)
    except Outcome as exc:
        return exc
    except Exception as exc:
        log.exception("outbox %s: event %s", destination, row["event_id"])
        return Outcome(f"{type(exc).__name__}: {exc}")
    return None


def _deliver(app: App, plan: Plan, destination: str, row: Mapping[str, Any]) -> None:
    payload = codec.loads(row["payload"])
    if destination.startswith(f"{WRITEBACK}:"):
        from . import writeback

        writeback.apply_event(app, destination, row["type"], row["rule"], payload)
        return
    hook = plan.hook(destination)
    if hook is None:
        raise Outcome("its webhook endpoint is no longer configured", permanent=True)
    from . import webhooks

    webhooks.deliver(hook, row["event_id"], webhook_type(row["type"]), payload)


def _finish(
    app: App, row: Mapping[str, Any], status: str, error: str | None, now: datetime
) -> None:
    with app.state.begin() as conn:
        conn.execute(
            outbox.update()
            .where(outbox.c.id == row["id"], outbox.c.status == PENDING)
            .values(
                status=status,
                attempts=outbox.c.attempts + 1,
                last_attempt_at=now,
                done_at=now,
                last_error=error if error is not None else row["last_error"],
            )
        )


def _retry_later(
    app: App, destination: str, row: Mapping[str, Any], error: str, now: datetime
) -> bool:
    """Record a failed attempt; True when the row was given up (the next one may go)."""
    attempts = row["attempts"] + 1
    give_up = destination.startswith("webhook:") and now - row["created_at"] >= WEBHOOK_GIVE_UP
    values: dict[str, Any] = {
        "attempts": attempts,
        "last_error": error[:1000],
        "last_attempt_at": now,
    }
    if give_up:
        values.update(status=FAILED, done_at=now)
    else:
        values["next_at"] = now + backoff(destination, attempts)
    with app.state.begin() as conn:
        conn.execute(
            outbox.update()
            .where(outbox.c.id == row["id"], outbox.c.status == PENDING)
            .values(**values)
        )
    log.warning(
        "outbox %s: %s event %s attempt %d failed%s: %s",
        destination,
        row["type"],
        row["event_id"],
        attempts,
        " (given up after 3 days)" if give_up else f"; next at {values.get('next_at')}",
        error,
    )
    return give_up


# -- what ops see --------------------------------------------------------------------------------


def summary(conn: Connection, config: Config) -> list[dict[str, Any]]:
    """Per destination: pending, failed (given up) and delivered counts, and the head's attempts,
    retry time and last error (a statement that keeps failing shows here)."""
    counts: dict[str, dict[str, Any]] = {}
    rows = conn.execute(
        sa.select(outbox.c.destination, outbox.c.status, sa.func.count().label("n")).group_by(
            outbox.c.destination, outbox.c.status
        )
    )
    for row in rows:
        entry = counts.setdefault(row.destination, _entry(row.destination, config))
        entry[row.status] = entry.get(row.status, 0) + row.n
    heads = (
        sa.select(sa.func.min(outbox.c.id).label("head"))
        .where(outbox.c.status == PENDING)
        .group_by(outbox.c.destination)
        .subquery()
    )
    for row in conn.execute(sa.select(outbox).where(outbox.c.id.in_(sa.select(heads.c.head)))):
        entry = counts.setdefault(row.destination, _entry(row.destination, config))
        entry.update(
            oldest_type=row.type,
            oldest_created=row.created_at,
            attempts=row.attempts,
            next_at=row.next_at,
            last_error=row.last_error,
        )
    return [counts[k] for k in sorted(counts)]


def _entry(destination: str, config: Config) -> dict[str, Any]:
    name = destination
    if destination.startswith("webhook:"):
        for hook in config.webhooks:
            if hook_destination(hook.url) == destination:
                name = f"webhook {_without_query(hook.url)}"
    return {
        "destination": destination,
        "name": name,
        PENDING: 0,
        FAILED: 0,
        DONE: 0,
        SKIPPED: 0,
        "attempts": 0,
        "last_error": None,
    }


def _without_query(url: str) -> str:
    """A URL without its query string (where a token may be)."""
    return url.split("?", 1)[0]
