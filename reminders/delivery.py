"""Delivery: what a worker does with a batch of queued reminders, each on its own.

For every reminder of the batch that still carries the job's id:

1. **re-check** at send time: the rule still exists; then the send-time policies, in order
   (:mod:`reminders.policies`, a module each): the send time is within grace (else canceled as
   expired); the channel: the rule's channel at ``channel_index`` or the next one, skipping a
   channel without a usable address (an invalid phone number, no email), an opted-out address
   (``optout``) or a channel the customer turned off (``preference``); quiet hours in the
   recipient's zone (deferred to their end, a new send time); the rule's ``check`` query (no row:
   canceled);
2. **render** the template (a template error fails the reminder, naming the template and line);
3. **claim**: ``queued -> sending`` in one conditional update (``status = 'queued' AND job_id =
   this job``), just before calling the provider, so a second worker or a second copy of the job
   gets nothing; a worker that dies after this leaves ``sending``, which ops see (``status``) and
   resend only on purpose (``reminders retry``); the frequency caps are counted in the claim's
   transaction, and what they do not allow is deferred instead (:mod:`reminders.caps`);
4. **send** (``Channel.send_many``: requests in flight together; paced by the sender's rate limit);
5. **record**: ``sent`` with a ``message`` row; an ambiguous outcome (no answer: the provider may
   have it) goes to ``unknown``, which :mod:`reminders.reconcile` decides from the provider's own
   records, never by sending blind; a transient error goes back to ``pending`` with
   exponential backoff and jitter until ``retries.max_attempts``, then ``failed``; a permanent one
   falls back to the rule's next channel while within grace (back to ``pending``, reason kept),
   else ``failed`` (:mod:`reminders.fallback`); Twilio 21610 also records the opt-out.

The claim writes the attempt on the reminder in the same UPDATE (when it began on the real clock,
the worker, the channel, the SHA-256 of the text), so reconciliation can match the provider's
records without an extra write on a send that answered. The record step outlives the state DB
going away: it retries its transaction (``state.record_patience``, default 60 s, each attempt
logged), and past that leaves what it knows in Redis for reconciliation
(``reminders.reconcile.UNRECORDED``).

Every status change is conditional on the state the worker saw, and is recorded with its reason.
A reminder moved to another channel (a skipped channel, a fallback) is enqueued on that channel's
queue at once, so a worker serving every queue sends it in the same burst.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import redis
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import caps, clock, codec, consent, dberrors, fallback, pause, phone, policies, state_db
from . import counts as reminder_counts
from .channels.base import Channel, body_digest
from .compose import (
    RecheckFailed,
    Rendered,
    customer_of,
    open_channel,
    render,
    template_context,
)
from .config import Config
from .dispatch import release
from .errors import AmbiguousError, ChannelError, InputError, RuntimeFailure, TemplateError
from .lifecycle import (
    CANCELED,
    FAILED,
    PENDING,
    QUEUED,
    SENDING,
    SENT,
    UNKNOWN,
    Status,
    move,
    move_each,
    param,
)
from .models import message, reminder
from .process_metrics import RENDER_SECONDS, timed
from .ratelimit import RateLimiter, paced
from .rules import Rule

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger(__name__)

ROUND_SECONDS = 2.0  # a rate-limited batch is claimed and sent about this many seconds at a time
TIME_BUDGET = 0.5  # share of the job timeout after which a job stops claiming and lets go
# The record step retries its transaction while the state DB does not answer (for
# ``state.record_patience``, waits doubling from RECORD_FIRST_WAIT up to RECORD_MAX_WAIT); past
# it, see _unrecorded.
RECORD_FIRST_WAIT = 0.25
RECORD_MAX_WAIT = 5.0
UNRECORDED_TTL = 7 * 86400  # seconds Redis keeps what a worker could not record


@dataclass
class Counts:
    """What one batch did, reminder by reminder."""

    sent: int = 0
    unknown: int = 0  # no answer from the provider: reconciled before any resend
    retried: int = 0
    failed: int = 0
    canceled: int = 0
    deferred: int = 0
    moved: int = 0  # to another channel (skipped channel or fallback)
    released: int = 0  # let go unsent when the job ran out of time
    not_claimed: int = 0  # another worker or a newer job had them
    digests: int = 0  # messages that carried several reminders (reminders.digest)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


# -- the batch ----------------------------------------------------------------------------------


@dataclass
class _Change:
    """A status change out of ``queued`` decided before sending."""

    rid: int
    status: Status
    reason: str
    values: dict[str, Any] = field(default_factory=dict)
    kind: str = ""  # the Counts field it adds to
    enqueue: bool = False  # send_at is now: enqueue on the new channel's queue at once

    def columns(self) -> dict[str, Any]:
        """The reminder's columns this change writes besides its status and reason (back to
        pending: off its job, too)."""
        values = dict(self.values)
        if self.status == PENDING:
            values.update(job_id=None, queued_at=None)
        return values

    def apply(
        self, conn: Connection, source: Status, now: datetime, where: Sequence[Any] = ()
    ) -> bool:
        """Make this change to a reminder still in ``source`` (and ``where``); whether it was."""
        moved = move(
            conn,
            [self.rid],
            source=source,
            target=self.status,
            now=now,
            reason=self.reason,
            values=self.columns(),
            where=where,
        )
        return bool(moved)


@dataclass
class _Ready:
    row: Any
    rule: Rule
    index: int
    channel: str
    address: str
    rendered: Rendered


# A reminder for its policies: its row, rule, values, customer, and the channels to try with the
# customer's address on each (or why there is none).
_Plan = tuple[
    Mapping[str, Any], Rule, dict[str, Any], dict[str, Any], tuple[policies.Candidate, ...]
]


def backoff(config: Config, attempt: int, rng: random.Random | None = None) -> timedelta:
    """The wait before retry number ``attempt`` (1 = the first retry), with jitter.

    ``retries.backoff`` doubles each attempt up to ``retries.max_backoff``; the wait is drawn
    between half that and all of it ("equal jitter"), so retries of a failed burst spread out.
    """
    base = config.retries.backoff.total_seconds()
    cap = config.retries.max_backoff.total_seconds()
    full = min(cap, base * 2 ** max(0, attempt - 1))
    draw = (rng or random).uniform(full / 2, full)
    return timedelta(seconds=draw)


class Delivery:
    """Delivers batches for one engine (``App``); channels and limits are opened once a process.

    ``connection`` is the Redis the queues live in (for moving reminders to another channel's
    queue and for rate limits).
    """

    def __init__(self, app: App, connection: redis.Redis) -> None:
        self.app = app
        self.config: Config = app.config
        self.connection = connection
        self._channels: dict[str, Channel] = {}
        self._limiters: dict[str, RateLimiter | None] = {}

    def channel(self, name: str) -> Channel:
        found = self._channels.get(name)
        if found is None:
            found = self._channels[name] = open_channel(self.config, name)
        return found

    def limiter(self, name: str) -> RateLimiter | None:
        """The sender's shared rate limit on ``name`` (SMS only), or None."""
        if name not in self._limiters:
            cfg = getattr(self.config.channels, name, None)
            rate = getattr(cfg, "rate_limit", None)
            limiter = None
            if rate:
                sender = cfg.from_ or getattr(cfg, "messaging_service_sid", None) or "default"  # type: ignore[union-attr]
                limiter = RateLimiter(self.connection, f"{name}:{sender}", rate)
            self._limiters[name] = limiter
        return self._limiters[name]

    def open(self) -> None:
        """Open every configured channel now, so a configuration error shows at start."""
        for name in self.config.channel_names:
            self.channel(name)

    def close(self) -> None:
        for found in self._channels.values():
            found.close()
        self._channels.clear()

    # -- one batch ------------------------------------------------------------------------------

    def deliver(
        self,
        channel: str,
        ids: Sequence[int],
        job_id: str,
        *,
        deadline: float | None = None,
        heartbeat: Callable[[], None] | None = None,
        worker: str | None = None,
    ) -> Counts:
        """Deliver the reminders ``ids`` queued under ``job_id`` on ``channel``.

        ``deadline`` (a ``time.monotonic()`` value) is when to stop claiming: reminders not yet
        claimed by then go back to pending for the next dispatch. ``heartbeat`` is called between
        rounds (a long rate-limited batch tells RQ its worker is alive). ``worker`` is the RQ
        worker's name, written on each claimed reminder: reconciliation leaves a ``sending``
        reminder alone while that worker is alive.
        """
        counts = Counts()
        state = self.app.state
        r = reminder
        with state.connect() as conn:
            status = state_db.by_id_alone(conn, r.c.status)  # the ids pick the rows
            rows = (
                conn.execute(
                    sa.select(r).where(
                        r.c.id.in_(list(ids)), status == QUEUED, r.c.job_id == job_id
                    )
                )
                .mappings()
                .all()
            )
        counts.not_claimed += len(ids) - len(rows)
        if not rows:
            return counts
        now = self.app.now()
        changes, ready = self._prepare(channel, rows, now)
        moved = self._apply(changes, job_id, now, counts)
        if ready and self.app.ruleset.digests:  # several of a customer's in one message
            from .digest import deliver_digests

            ready, gathered = deliver_digests(self, channel, ready, job_id, counts, worker)
            moved |= gathered
        limiter = self.limiter(channel)
        size = max(1, len(ready))  # every reminder may have moved to another channel
        if limiter is not None:
            size = max(1, math.ceil(limiter.rate * ROUND_SECONDS))
        for start in range(0, len(ready), size):
            chunk = ready[start : start + size]
            if start and deadline is not None and time.monotonic() > deadline:
                self._release(ready[start:], job_id, counts)
                break
            if heartbeat is not None:
                heartbeat()
            claimed = self._claim(chunk, job_id, counts, worker)
            if claimed:
                results = self._send(channel, claimed, limiter)
                moved |= self._record(claimed, results, counts, heartbeat)
        if moved:
            from .dispatch import DispatchCounts, Dispatcher

            dispatcher = Dispatcher(self.config, self.app.ruleset, state, self.connection)
            dispatcher.enqueue_due(self.app.now(), DispatchCounts(), ids=sorted(moved))
        log.info(
            "job %s: %s: %s",
            job_id,
            channel,
            _summary(counts),
            extra={"job_id": job_id, "channel": channel},
        )
        return counts

    # -- before sending ---------------------------------------------------------------------

    def _prepare(
        self, channel: str, rows: Sequence[Mapping[Any, Any]], now: datetime
    ) -> tuple[list[_Change], list[_Ready]]:
        """Decide, for each reminder, a change (cancel, defer, fail, move) or a rendered message.

        The send-time policies (:mod:`reminders.policies`) decide; what they let through is
        rendered. Consent is read and the business DB opened once for the batch.
        """
        config = self.config
        changes: list[_Change] = []
        ready: list[_Ready] = []
        plans: list[_Plan] = []
        with self.app.state.connect() as conn:
            paused = pause.paused_rules(conn)
        for row in rows:
            if row["rule"] in paused:  # back to pending, nothing decided (pause.py)
                changes.append(_Change(row["id"], PENDING, pause.PAUSED_REASON, kind="released"))
                continue
            rule = self.app.ruleset.get(row["rule"])
            if rule is None:
                changes.append(
                    _Change(row["id"], CANCELED, f"canceled: rule {row['rule']} no longer exists")
                )
                continue
            values = codec.loads(row["data"])
            customer = customer_of(rule, values)
            channels = policies.candidates(config, rule, row["channel_index"], customer)
            plans.append((row, rule, values, customer, channels))
        customers = {str(row["customer_id"]) for row, *_ in plans}
        addresses = {(c.channel, c.address) for *_, cs in plans for c in cs}
        with self.app.state.connect() as conn:
            view = consent.View.load(
                conn, customers, {(n, a) for n, a in addresses if isinstance(a, str)}
            )
        business = _Business(self._business)
        batch = policies.Batch(config, now, channel, view, business)
        try:
            for row, rule, values, customer, channels in plans:
                try:
                    context = policies.Context(batch, row, rule, values, customer, channels)
                    decision, context = policies.decide(context)
                    if decision is None:
                        decided: _Change | _Ready = self._render(context)
                    else:
                        decided = self._change(context, decision)
                except TemplateError as exc:
                    decided = _Change(row["id"], FAILED, f"template error: {_problems(exc)}")
                except InputError:
                    raise  # a configuration mistake fails the job, visibly; nothing is lost
                except Exception as exc:  # one reminder's surprise must not sink the batch
                    log.exception(
                        "reminder %s: unexpected error before sending",
                        row["id"],
                        extra={"reminder_id": row["id"], "rule": row["rule"]},
                    )
                    decided = _Change(
                        row["id"], FAILED, f"internal error: {type(exc).__name__}: {exc}"
                    )
                if isinstance(decided, _Ready):
                    ready.append(decided)
                else:
                    changes.append(decided)
        finally:
            business.close()
        return changes, ready

    def _business(self) -> Connection:
        """A connection to the business DB for re-check queries; unreachable is transient."""
        try:
            return self.app.business.connect()
        except (sa.exc.DBAPIError, RuntimeFailure) as exc:
            raise RecheckFailed(f"business DB unreachable: {dberrors.message(exc)}") from None

    def _change(self, context: policies.Context, decision: policies.Decision) -> _Change:
        """The status change a policy's decision makes."""
        row = context.row
        rid = row["id"]
        if isinstance(decision, policies.Cancel):
            return _Change(rid, CANCELED, decision.reason)
        if isinstance(decision, policies.Fail):
            return _Change(rid, FAILED, decision.reason)
        if isinstance(decision, policies.Retry):
            return self._retry_change(row, context.rule, decision.reason, context.now)
        if isinstance(decision, policies.Move):
            where = {"channel_index": decision.index, "channel": decision.channel}
            return _Change(rid, PENDING, decision.reason, where, kind="moved", enqueue=True)
        assert isinstance(decision, policies.Defer) and context.candidate is not None
        index, name, _address = context.candidate
        values = {"send_at": decision.until, "channel_index": index, "channel": name}
        return _Change(rid, PENDING, decision.reason, values, kind="deferred")

    def _render(self, context: policies.Context) -> _Ready:
        """The message for the channel the policies let through."""
        assert context.candidate is not None
        index, name, address = context.candidate
        assert isinstance(address, str)
        row, rule, values = context.row, context.rule, context.values
        variables = template_context(self.config, rule, row, values, context.now, name, address)
        with timed(RENDER_SECONDS, name):
            rendered = render(self.app.renderer, self.config, rule, row, variables, name, address)
        return _Ready(row, rule, index, name, address, rendered)

    def _retry_change(self, row: Mapping[str, Any], rule: Rule, why: str, now: datetime) -> _Change:
        attempt = int(row["attempts"]) + 1
        limit = self.config.retries.max_attempts
        if attempt >= limit:
            return _Change(
                row["id"],
                FAILED,
                f"failed after {attempt} attempts: {why}",
                {"attempts": attempt},
                kind="failed",
            )
        at = now + backoff(self.config, attempt)
        return _Change(
            row["id"],
            PENDING,
            f"retry {attempt}/{limit - 1} at {clock.iso_utc(at)}: {why}",
            {"attempts": attempt, "send_at": at},
            kind="retried",
        )

    def _apply(
        self, changes: list[_Change], job_id: str, now: datetime, counts: Counts
    ) -> set[int]:
        """Apply the decided changes, each only if the reminder is still queued under this job."""
        if not changes:
            return set()
        moved: set[int] = set()
        with self.app.state.begin() as conn:
            for change in changes:
                if not change.apply(conn, QUEUED, now, where=[reminder.c.job_id == job_id]):
                    counts.not_claimed += 1
                    continue
                kind = change.kind or {FAILED: "failed", CANCELED: "canceled"}[change.status]
                setattr(counts, kind, getattr(counts, kind) + 1)
                if change.enqueue:
                    moved.add(change.rid)
                if change.status == FAILED:
                    log.warning(
                        "reminder %s failed: %s",
                        change.rid,
                        change.reason,
                        extra={"reminder_id": change.rid, "job_id": job_id},
                    )
        return moved

    # -- claim, send, record ------------------------------------------------------------------

    def _claim(
        self, chunk: list[_Ready], job_id: str, counts: Counts, worker: str | None = None
    ) -> list[_Ready]:
        """``queued -> sending`` for this job's reminders; returns those this call won.

        The same UPDATE writes the attempt: when it began (the real clock: the provider's records
        are on it), the worker, the channel, and the SHA-256 of each message's text.
        """
        now = self.app.now()
        by_id = {item.row["id"]: item for item in chunk}
        digests = {rid: body_digest(item.rendered.message.body) for rid, item in by_id.items()}
        attempt: dict[str, Any] = {"attempt_at": datetime.now(UTC), "claimed_by": worker}
        if digests:
            ids = reminder.c.id
            attempt["body_digest"] = sa.case(digests, value=ids)
            for column, field_ in (("channel", "channel"), ("channel_index", "index")):
                each = {rid: getattr(item, field_) for rid, item in by_id.items()}
                distinct = set(each.values())  # usually one: a plain value, no CASE
                attempt[column] = distinct.pop() if len(distinct) == 1 else sa.case(each, value=ids)
        with self.app.state.begin() as conn:
            # A rule paused since they were prepared: back to pending, unsent (pause.py).
            paused = pause.paused_rules(conn)
            held_back = [rid for rid, item in by_id.items() if item.rule.name in paused]
            if held_back:
                counts.released += len(
                    move(
                        conn,
                        held_back,
                        source=QUEUED,
                        target=PENDING,
                        now=now,
                        reason=pause.PAUSED_REASON,
                        values={"job_id": None, "queued_at": None},
                        where=[reminder.c.job_id == job_id],
                    )
                )
                by_id = {rid: item for rid, item in by_id.items() if rid not in held_back}
            # Frequency caps are counted and claimed in one transaction (see caps.lock).
            batch = [(item.row, item.rule) for item in chunk if item.row["id"] in by_id]
            held = caps.enforce(conn, self.config, self.app.ruleset, batch, job_id, now)
            counts.deferred += len(held)
            by_id = {rid: item for rid, item in by_id.items() if rid not in held}
            won = set(
                move(
                    conn,
                    list(by_id),
                    source=QUEUED,
                    target=SENDING,
                    now=now,
                    values=attempt,
                    where=[reminder.c.job_id == job_id],
                )
            )
        counts.not_claimed += len(by_id) - len(won)
        return [item for item in chunk if item.row["id"] in won]

    def _release(self, rest: list[_Ready], job_id: str, counts: Counts) -> None:
        """Give unclaimed reminders back to pending (the job ran out of time)."""
        now = self.app.now()
        why = "released: the job ran out of time; the next dispatch enqueues it again"
        with self.app.state.begin() as conn:
            back = release(conn, [item.row["id"] for item in rest], job_id, now, why)
        counts.released += len(back)

    def _send(
        self, name: str, items: list[_Ready], limiter: RateLimiter | None
    ) -> list[str | ChannelError]:
        """Send, in order; with a rate limit, each message waits for its reserved slot."""
        provider = self.channel(name)
        messages = [item.rendered.message for item in items]
        if limiter is None:
            return provider.send_many(messages)
        concurrency = int(getattr(getattr(self.config.channels, name, None), "concurrency", 8))
        return paced(provider.send_many, messages, limiter, concurrency)

    def _record(
        self,
        items: list[_Ready],
        results: list[str | ChannelError],
        counts: Counts,
        heartbeat: Callable[[], None] | None = None,
    ) -> set[int]:
        """Record each claimed reminder's outcome; returns those moved to their next channel.

        The state DB not answering (a restart, a failover) does not lose what was sent: the
        transaction is tried again, with waits doubling up to ``RECORD_MAX_WAIT``, for
        ``state.record_patience``, each attempt logged; a retry records only the reminders
        still in ``sending`` (a commit whose answer was lost is not recorded twice). Past the
        patience, what was sent is left in Redis (:meth:`_unrecorded`) and the error raised.
        """
        waited = 0.0
        wait = RECORD_FIRST_WAIT
        pending = items
        pending_results = results
        while True:
            try:
                done = Counts()
                moved = self._write(pending, pending_results, done)
            except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
                detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
                if waited >= self.config.state.record_patience.total_seconds():
                    log.error(
                        "could not record %d sent reminder(s) for %.0f s (%s): left in Redis "
                        "for reconciliation",
                        len(pending),
                        waited,
                        detail,
                    )
                    self._unrecorded(pending, pending_results)
                    raise
                log.warning(
                    "state DB did not answer while recording %d reminder(s) (%s); again in %.2f s",
                    len(pending),
                    detail,
                    wait,
                )
                time.sleep(wait)
                waited += wait
                wait = min(wait * 2, RECORD_MAX_WAIT)
                if heartbeat is not None:
                    heartbeat()
                try:
                    still = self._still_sending([item.row["id"] for item in pending])
                except (sa.exc.OperationalError, sa.exc.InterfaceError):
                    continue  # still down: try the whole write again after the next wait
                kept = [
                    (i, r)
                    for i, r in zip(pending, pending_results, strict=True)
                    if i.row["id"] in still
                ]
                pending = [i for i, _ in kept]
                pending_results = [r for _, r in kept]
                continue
            for key, value in done.as_dict().items():
                setattr(counts, key, getattr(counts, key) + value)
            return moved

    def _still_sending(self, ids: list[int]) -> set[int]:
        r = reminder
        with self.app.state.connect() as conn:
            return {
                row.id
                for row in conn.execute(
                    sa.select(r.c.id).where(r.c.id.in_(ids), r.c.status == SENDING)
                )
            }

    def _unrecorded(self, items: list[_Ready], results: list[str | ChannelError]) -> None:
        """Leave each outcome the state DB would not take in Redis for reconciliation: the
        provider's id of a sent message, or null (not sent, or unknown: reconciliation asks the
        provider). A reminder listed there is reconciled though its worker is alive."""
        from .reconcile import UNRECORDED

        mapping: dict[Any, Any] = {
            str(item.row["id"]): json.dumps(
                {
                    "provider_id": result if isinstance(result, str) else None,
                    "channel": item.channel,
                }
            )
            for item, result in zip(items, results, strict=True)
        }
        try:
            with self.connection.pipeline() as pipe:
                pipe.hset(UNRECORDED, mapping=mapping)
                pipe.expire(UNRECORDED, UNRECORDED_TTL)
                pipe.execute()
        except redis.RedisError as exc:
            log.error("Redis did not take the unrecorded outcomes either: %s", exc)

    def _write(
        self, items: list[_Ready], results: list[str | ChannelError], counts: Counts
    ) -> set[int]:
        """One transaction recording the outcomes (see :meth:`_record`)."""
        now = self.app.now()
        sent: list[dict[str, Any]] = []
        messages: list[dict[str, Any]] = []
        other: list[tuple[_Ready, _Change]] = []
        dead: list[tuple[_Ready, str, dict[str, Any]]] = []  # permanent errors: fall back
        optouts: list[dict[str, Any]] = []
        unknown: list[tuple[_Ready, AmbiguousError]] = []
        for item, result in zip(items, results, strict=True):
            row = item.row
            if isinstance(result, str):
                keep = row["reason"] if item.index and row["reason"] else None
                sent.append(
                    {
                        "id": row["id"],
                        "rule": row["rule"],
                        "source": SENDING,
                        "reason": f"sent by {item.channel}",
                        "provider": result,
                        "channel": item.channel,
                        "index": item.index,
                        "kept": keep,
                    }
                )
                messages.append(
                    {
                        "reminder_id": row["id"],
                        "channel": item.channel,
                        "rule": row["rule"],
                        "to_address": item.address,
                        "provider_id": result,
                        "status": SENT,
                        "segments": item.rendered.segments,
                        "locale": item.rendered.locale,
                        "created_at": now,
                        "updated_at": now,
                    }
                )
                continue
            where = f"{item.channel} to {phone.mask_address(item.channel, item.address)}"
            log.warning(
                "reminder %s: %s failed: %s",
                row["id"],
                where,
                result.message,
                extra={
                    "reminder_id": row["id"],
                    "rule": row["rule"],
                    "channel": item.channel,
                    "customer_id": str(row["customer_id"]),
                    "attempt": int(row["attempts"]) + 1,
                    "error_code": result.code,
                },
            )
            base = {"channel": item.channel, "channel_index": item.index}
            if isinstance(result, AmbiguousError):
                unknown.append((item, result))
                continue
            if not result.permanent:
                change = self._retry_change(row, item.rule, f"{item.channel}: {result}", now)
                change.values.update(base)
                other.append((item, change))
                continue
            attempts = {"attempts": int(row["attempts"]) + 1}
            if result.opt_out:
                optouts.append(
                    {
                        "channel": item.channel,
                        "address": item.address,
                        "customer_id": str(row["customer_id"]),
                        "source": result.code or "provider",
                        "reason": str(result),
                    }
                )
            earlier = f"{row['reason']}; then " if item.index and row["reason"] else ""
            why = f"{earlier}{item.channel} failed: {result}"
            dead.append((item, why, {**attempts, **base}))
        moved: set[int] = set()
        with self.app.state.begin() as conn:
            if sent:
                # Claimed by this worker (sending): one executemany for the whole batch. Or, if
                # its heartbeat was late and reconciliation took it for dead, unknown: what the
                # provider answered still decides it.
                move_each(
                    conn,
                    sent,
                    source=(SENDING, UNKNOWN),
                    target=SENT,
                    now=now,
                    values={
                        "sent_at": now,
                        "provider_id": param("provider"),
                        "channel": param("channel"),
                        "channel_index": param("index"),
                        "reason": param("kept"),
                        "attempts": reminder.c.attempts + 1,
                    },
                )
                conn.execute(message.insert(), messages)
                reminder_counts.message_added(conn, messages)
                counts.sent += len(sent)
            for item, error in unknown:
                move(
                    conn,
                    [item.row["id"]],
                    source=SENDING,
                    target=UNKNOWN,
                    now=now,
                    reason=f"unknown: {item.channel}: {error}",
                    values={
                        "provider_id": error.provider_id,
                        "channel": item.channel,
                        "channel_index": item.index,
                        "attempts": reminder.c.attempts + 1,
                    },
                )
                counts.unknown += 1
            for stop in optouts:
                consent.opt_out(conn, now=now, **stop)
            for _item, change in other:
                change.apply(conn, SENDING, now)
                setattr(counts, change.kind, getattr(counts, change.kind) + 1)
                if change.enqueue:
                    moved.add(change.rid)
            for item, why, values in dead:
                rem = {**item.row, "channel_index": item.index}
                new = fallback.fall_back(
                    conn, rem, item.rule, why, now, status=SENDING, otherwise=FAILED, values=values
                )
                if new == PENDING:
                    counts.moved += 1
                    moved.add(item.row["id"])
                elif new == FAILED:
                    counts.failed += 1
        return moved


# -- helpers ------------------------------------------------------------------------------------


def _problems(exc: InputError) -> str:
    return "; ".join(str(p) for p in exc.problems)


class _Business:
    """A batch's business DB connection for check queries: opened on first use, closed after.

    Opening it may raise ``CheckFailed`` (unreachable: retried); the next reminder tries again.
    """

    def __init__(self, connect: Callable[[], Connection]) -> None:
        self._connect = connect
        self._conn: Connection | None = None

    def __call__(self) -> Connection:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def _summary(counts: Counts) -> str:
    return ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.as_dict().items() if v) or (
        "nothing to do"
    )
