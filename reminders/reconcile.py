"""Reconciliation: decide the sends whose outcome is unknown from the provider's own records.

A send is ambiguous when the request went out and no answer came back (a read timeout, the
connection closed before an answer, HTTP 5xx / Twilio 20500), or when its worker died between
claiming the reminder and recording the answer. Sending again blind could text the customer
twice; never sending again could drop the reminder. So the reminder waits in ``unknown`` and is
decided here, by the ordinary processes (dispatch runs this first, the scheduler every
``scheduler.dispatch_every``), on the real clock:

- **SMS** (Twilio): the Messages list (``GET /2010-04-01/Accounts/{sid}/Messages.json`` with
  ``To`` and ``From``, newest first, paged until older than the attempt) is searched for a message
  from this sender whose text has the attempt's SHA-256 and that was created after the attempt
  began (less a clock skew), and whose SID no other reminder recorded. Found: the reminder is
  ``sent`` with that SID (a ``message`` row, so its status callbacks find it), and a final status
  in the list (delivered, undelivered, failed: its status callback may have come and gone while
  the send was unknown) is applied as that callback would have been. Not found once
  ``channels.sms.reconcile_after`` (default 1m: Twilio's own processing window) has passed since
  the attempt: it was not sent, and goes back to ``pending`` due now, to be sent once more (its
  attempt counted; ``failed`` once ``retries.max_attempts`` are used). Twilio's list not
  answering leaves it for the next pass.
- **Email** (SMTP has no list API): an unknown email stays ``unknown`` for ops, with its
  Message-ID to look up in the mail server's log (at most once), unless
  ``channels.email.resend_unknown`` is true: then it goes back to ``pending`` once
  ``reconcile_after`` has passed (at least once).
- **Stuck ``sending``**: a reminder whose worker is gone (its RQ worker key expired: see
  :mod:`reminders.jobs`) is moved to ``unknown`` and decided as above. One whose worker is alive
  is never touched (a slow batch would be sent twice), except when that worker left its outcome
  in Redis (``UNRECORDED``) because the state DB did not take it in time: then the SID it left
  is recorded (``sent``), or, without one, the reminder is decided as above.

A reminder whose attempt cannot be matched (no ``attempt_at`` or digest: claimed before this
version; its rule or address gone) stays where it is for ops (``reminders status``, then
``reminders retry --status sending|unknown``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
import sqlalchemy as sa
from rq.job import Job
from rq.worker import Worker

from . import codec, receipts
from . import counts as counts_of
from .compose import address_for, customer_of
from .config import Config, EmailConfig, SmsConfig
from .errors import PermanentError, ServiceUnavailable
from .lifecycle import FAILED, PENDING, SENDING, SENT, UNKNOWN, move
from .models import message, reminder
from .rules import RuleSet

log = logging.getLogger(__name__)

# Redis hash: reminder id -> {"provider_id": sid or null, "channel": ...}, what a worker sent
# but could not record (the state DB did not answer for state.record_patience).
UNRECORDED = "reminders:unrecorded"
BATCH = 200  # reminders decided per pass at most, each kind (the next pass takes the rest)
# A sending reminder whose worker nobody knows (claimed by a process that named none) is
# taken for abandoned once its attempt is older than the longest a job may run.
NAMELESS_AFTER = timedelta(hours=1)


@dataclass
class ReconcileCounts:
    """What one pass decided."""

    found: int = 0  # unknown -> sent: in the provider's records
    resend: int = 0  # unknown -> pending: not in them, sent once more
    failed: int = 0  # unknown -> failed: not sent, and its attempts are used up
    worker_gone: int = 0  # sending -> unknown: its worker died mid-send
    unrecorded: int = 0  # taken from what a worker could not record

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class Reconciler:
    """Decides unknown sends for one config, rule set, state DB and Redis."""

    def __init__(
        self,
        config: Config,
        ruleset: RuleSet,
        state: sa.Engine,
        connection: redis.Redis,
        channels: Any = None,
    ) -> None:
        self.config = config
        self.ruleset = ruleset
        self.state = state
        self.connection = connection
        self._channels: dict[str, Any] = {}
        self._open = channels  # a callable(name) -> Channel; compose.open_channel by default

    def channel(self, name: str) -> Any:
        found = self._channels.get(name)
        if found is None:
            from .compose import open_channel

            opener = self._open or (lambda n: open_channel(self.config, n))
            found = self._channels[name] = opener(name)
        return found

    def close(self) -> None:
        for found in self._channels.values():
            found.close()
        self._channels.clear()

    def run(self, now: datetime) -> ReconcileCounts:
        """One pass: what workers left unrecorded, stuck sends of dead workers, then the unknown
        ones. ``now`` is the engine clock (for the events); waits are on the real clock."""
        counts = ReconcileCounts()
        try:
            self.take_unrecorded(now, counts)
            self.abandoned_sends(now, counts)
        except redis.RedisError as exc:
            raise ServiceUnavailable(f"Redis did not answer: {exc}") from None
        self.decide_unknown(now, counts)
        if any(counts.as_dict().values()):
            log.info("reconciled: %s", counts.as_dict())
        return counts

    # -- sending --------------------------------------------------------------------------

    def take_unrecorded(self, now: datetime, counts: ReconcileCounts) -> None:
        """Record what workers sent but could not record (see ``UNRECORDED``)."""
        left = self.connection.hgetall(UNRECORDED)
        if not left:
            return
        outcomes = {int(k): json.loads(v) for k, v in left.items()}
        r = reminder
        with self.state.begin() as conn:
            rows = {
                row.id: row
                for row in conn.execute(
                    sa.select(r).where(r.c.id.in_(list(outcomes)), r.c.status == SENDING)
                )
            }
            for rid, outcome in sorted(outcomes.items()):
                row = rows.get(rid)
                if row is None:
                    continue  # recorded after all, or decided already
                sid = outcome.get("provider_id")
                if sid:
                    self._sent(conn, row, sid, now, "sent (recorded late: the state DB was away)")
                else:
                    move(
                        conn,
                        [rid],
                        source=SENDING,
                        target=UNKNOWN,
                        now=now,
                        reason="unknown: its worker could not record the outcome",
                    )
                counts.unrecorded += 1
        self.connection.hdel(UNRECORDED, *[str(k) for k in outcomes])

    def abandoned_sends(self, now: datetime, counts: ReconcileCounts) -> None:
        """``sending -> unknown`` for reminders whose worker is gone; live workers' are left."""
        r = reminder
        with self.state.connect() as conn:
            rows = conn.execute(
                sa.select(r.c.id, r.c.claimed_by, r.c.job_id, r.c.attempt_at)
                .where(r.c.status == SENDING)
                .order_by(r.c.id)
                .limit(BATCH * 5)
            ).all()
        if not rows:
            return
        names = _workers(self.connection, rows)
        alive = _alive(self.connection, {n for n in names.values() if n})
        real_now = datetime.now(UTC)
        gone: dict[str, list[int]] = {}
        for row in rows:
            name = names.get(row.id)
            if name:
                if alive.get(name, False):
                    continue
                why = f"unknown: its worker {name} is gone (no heartbeat) since it claimed it"
            else:
                if row.attempt_at is not None and real_now - row.attempt_at < NAMELESS_AFTER:
                    continue
                why = "unknown: claimed by a worker nobody knows, too long ago"
            gone.setdefault(why, []).append(row.id)
        with self.state.begin() as conn:
            for why, ids in gone.items():
                counts.worker_gone += len(
                    move(conn, ids, source=SENDING, target=UNKNOWN, now=now, reason=why)
                )

    # -- unknown ----------------------------------------------------------------------------

    def decide_unknown(self, now: datetime, counts: ReconcileCounts) -> None:
        r = reminder
        kinds = []
        sms = self.config.channels.sms
        if isinstance(sms, SmsConfig) and sms.provider == "twilio":
            kinds.append(r.c.channel == "sms")
        email = self.config.channels.email
        if isinstance(email, EmailConfig) and email.resend_unknown:
            kinds.append(r.c.channel == "email")
        if not kinds:
            return
        with self.state.connect() as conn:
            rows = (
                conn.execute(
                    sa.select(r)
                    .where(r.c.status == UNKNOWN, sa.or_(*kinds))
                    .order_by(r.c.attempt_at, r.c.id)
                    .limit(BATCH)
                )
                .mappings()
                .all()
            )
        real_now = datetime.now(UTC)
        for found in rows:
            row: Mapping[str, Any] = dict(found)
            if row["attempt_at"] is None:
                continue  # nothing to match on: for ops
            if row["channel"] == "email":
                assert isinstance(email, EmailConfig)
                if real_now - row["attempt_at"] >= email.reconcile_after:
                    why = (
                        f"resending once (channels.email.resend_unknown): {row['provider_id']} "
                        "got no answer from the SMTP server"
                    )
                    self._again(row, why, now, counts)
                continue
            assert isinstance(sms, SmsConfig)
            self._decide_sms(row, sms, now, real_now, counts)

    def _decide_sms(
        self,
        row: Mapping[str, Any],
        sms: SmsConfig,
        now: datetime,
        real_now: datetime,
        counts: ReconcileCounts,
    ) -> None:
        from .channels.twilio import LookupFailed

        to = self._address(row)
        if to is None or not row["body_digest"]:
            return
        group = _digest(row)
        with self.state.connect() as conn:
            known = frozenset(
                p
                for (p,) in conn.execute(
                    sa.select(message.c.provider_id).where(
                        message.c.to_address == to,
                        message.c.channel == "sms",
                        message.c.reminder_id.not_in(group),
                    )
                )
                if p
            )
        try:
            found = self.channel("sms").lookup(to, row["body_digest"], row["attempt_at"], known)
        except LookupFailed as exc:
            log.warning("reminder %s: Twilio's records could not be read: %s", row["id"], exc)
            return
        if found is not None:
            with self.state.begin() as conn:
                # A digest's items were one message: found for one, found for all of them.
                for one in self._same_message(conn, row):
                    self._sent(
                        conn,
                        one,
                        found.sid,
                        now,
                        f"sent: found in Twilio's records ({found.status or 'no status'})",
                        source=UNKNOWN,
                        to=to,
                    )
                    counts.found += 1
                if found.status in receipts.FINAL_REPORTS:
                    # Its delivery report may have come while the send was unknown (and found
                    # no message then): the status in the list is applied as that report.
                    receipts.apply_report(
                        conn, self.ruleset, found.sid, found.status, found.error_code, now
                    )
            return
        if real_now - row["attempt_at"] >= sms.reconcile_after:
            since = row["attempt_at"].strftime("%Y-%m-%dT%H:%M:%SZ")
            self._again(
                row, f"not sent: no such message in Twilio's records since {since}", now, counts
            )

    def _same_message(self, conn: sa.Connection, row: Mapping[str, Any]) -> list[Any]:
        """The unknown reminders whose attempt was the message of ``row``'s: itself, and the
        other items of its digest (the same digest id and attempt)."""
        if row.get("digest_id") is None:
            return [row]
        r = reminder
        found = conn.execute(
            sa.select(r).where(
                r.c.digest_id == row["digest_id"],
                r.c.attempt_at == row["attempt_at"],
                r.c.status == UNKNOWN,
            )
        )
        return [dict(one._mapping) for one in found] or [row]

    def _again(
        self, row: Mapping[str, Any], why: str, now: datetime, counts: ReconcileCounts
    ) -> None:
        """``unknown -> pending`` due now (sent once more), or ``failed`` past max_attempts."""
        attempts = int(row["attempts"])
        limit = self.config.retries.max_attempts
        values: dict[str, Any] | None = None
        if attempts < limit:
            target, why = PENDING, f"{why}; sending it again"
            values = {"send_at": now, "job_id": None, "queued_at": None, "provider_id": None}
        else:
            target, why = FAILED, f"failed after {attempts} attempts: {why}"
        with self.state.begin() as conn:
            done = move(
                conn, [row["id"]], source=UNKNOWN, target=target, now=now, reason=why, values=values
            )
        if target == PENDING:
            counts.resend += len(done)
        else:
            counts.failed += len(done)

    def _sent(
        self,
        conn: sa.Connection,
        row: Any,
        sid: str,
        now: datetime,
        why: str,
        *,
        source: str = SENDING,
        to: str | None = None,
    ) -> None:
        values = row._mapping if hasattr(row, "_mapping") else row
        to = to or self._address(values)
        done = move(
            conn,
            [values["id"]],
            source=source,
            target=SENT,
            now=now,
            reason=why,
            values={"sent_at": now, "provider_id": sid},
        )
        recorded = conn.execute(
            sa.select(message.c.id).where(
                message.c.reminder_id == values["id"], message.c.provider_id == sid
            )
        ).first()
        if done and to is not None and recorded is None:
            found = {
                "reminder_id": values["id"],
                "channel": values["channel"],
                "rule": values["rule"],
                "to_address": to,
                "provider_id": sid,
                "status": SENT,
                "created_at": now,
                "updated_at": now,
            }
            conn.execute(message.insert(), found)
            counts_of.message_added(conn, [found])

    def _address(self, row: Mapping[str, Any]) -> str | None:
        """The address the reminder's attempt went to (its rule's channel, the customer's)."""
        rule = self.ruleset.get(row["rule"])
        if rule is None or not row["channel"]:
            return None
        customer = customer_of(rule, codec.loads(row["data"]))
        try:
            address = address_for(self.config, row["channel"], customer)
        except PermanentError:
            return None
        return address if isinstance(address, str) else None


def _digest(row: Mapping[str, Any]) -> sa.Select[Any] | list[int]:
    """The reminders that were one message with ``row``: its digest's items, or itself."""
    if row.get("digest_id") is None:
        return [row["id"]]
    r = reminder
    return sa.select(r.c.id).where(
        r.c.digest_id == row["digest_id"], r.c.attempt_at == row["attempt_at"]
    )


def _workers(connection: redis.Redis, rows: Sequence[Any]) -> dict[int, str | None]:
    """Each sending reminder's worker: the one it names, else its RQ job's."""
    names: dict[int, str | None] = {row.id: row.claimed_by for row in rows}
    ask = sorted({row.job_id for row in rows if not row.claimed_by and row.job_id})
    if ask:
        with connection.pipeline(transaction=False) as pipe:
            for job_id in ask:
                pipe.hget(Job.key_for(job_id), "worker_name")
            by_job = dict(zip(ask, pipe.execute(), strict=True))
        for row in rows:
            if not row.claimed_by and row.job_id:
                name = by_job.get(row.job_id)
                names[row.id] = name.decode() if isinstance(name, bytes) else (name or None)
    return names


def _alive(connection: redis.Redis, names: set[str]) -> dict[str, bool]:
    """Whether each worker's RQ key still exists (it expires ``LIVENESS_TTL`` after a death)
    without the ``death`` RQ writes on it when the worker stops on its own."""
    ordered = sorted(names)
    if not ordered:
        return {}
    with connection.pipeline(transaction=False) as pipe:
        for name in ordered:
            pipe.hmget(Worker.redis_worker_namespace_prefix + name, "last_heartbeat", "death")
        found = pipe.execute()
    return {
        name: beat is not None and death is None
        for name, (beat, death) in zip(ordered, found, strict=True)
    }


def unrecorded_ids(connection: redis.Redis) -> set[int]:
    """The reminders a worker sent but could not record (for ``status``)."""
    return {int(k) for k in connection.hkeys(UNRECORDED)}
