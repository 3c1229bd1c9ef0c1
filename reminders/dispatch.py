"""Dispatch: hand the reminders that are due to RQ, one queue per channel, a batch per job.

The state DB comes first. A batch is marked ``queued`` with its job id (and ``queued_at``) and
committed before the job is pushed to Redis, so a worker never meets a job whose reminders are
not yet queued, and Redis never holds the only copy of anything: a queued reminder whose job is
gone (Redis restarted empty, a flushed database) is enqueued again once ``requeue_after`` has
passed on the engine clock; one whose job was abandoned (started by a worker that is gone: its RQ
key expires ``jobs.LIVENESS_TTL`` seconds after its death) is enqueued again at once. Each pass
first reconciles the sends whose outcome is unknown (:mod:`reminders.reconcile`), so a reminder
decided "not sent" is enqueued in the same pass. Enqueueing twice is harmless: a job
claims only the reminders that carry its own job id, so a stale or duplicated job gets nothing.

One RQ job carries up to ``batch_size`` reminders: RQ costs some 30 Redis round trips a job,
which caps one-job-per-message delivery near 250 messages a second per worker.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import redis
import sqlalchemy as sa
from rq import Queue
from rq.job import Job, JobStatus
from rq.worker import Worker
from sqlalchemy.engine import Connection

from . import counts as reminder_counts
from . import redis_conn, state_db
from .config import Config
from .errors import ServiceUnavailable
from .lifecycle import FAILED, PENDING, QUEUED, SENDING, UNKNOWN, move
from .models import reminder
from .pause import paused_rules
from .rules import RuleSet

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger(__name__)

QUEUE_PREFIX = "reminders-"
JOB_FUNCTION = "reminders.jobs.deliver"
JOB_TIMEOUT = 3600  # seconds; a job also stops claiming on its own well before (see delivery)
RESULT_TTL = 600  # seconds a finished job's counts stay readable in Redis
FAILURE_TTL = 7 * 86400
SELECT_CHUNK = 5000  # reminders read per query
RATE_LIMITED_BATCH_SECONDS = 30  # a rate-limited batch holds about this many seconds of sending

ABANDONED = "was abandoned (its worker is gone)"

# RQ job statuses under which the job will still run, or is running.
_ALIVE = {JobStatus.QUEUED.value, JobStatus.DEFERRED.value, JobStatus.SCHEDULED.value}


def queue_name(channel: str) -> str:
    """The RQ queue of a channel: ``reminders-sms``, ``reminders-email``."""
    return QUEUE_PREFIX + channel


def queue_names(config: Config) -> list[str]:
    """Every configured channel's queue, and the outbox's when write-back or webhooks are set."""
    from .outbox import QUEUE

    names = [queue_name(c) for c in config.channel_names]
    return [*names, QUEUE] if config.outbox_used else names


def batch_size(config: Config, channel: str) -> int:
    """Reminders per job on ``channel``: ``batch_size``, fewer when a rate limit slows sending."""
    size = config.batch_size
    cfg = getattr(config.channels, channel, None)
    rate = getattr(cfg, "rate_limit", None)
    if rate:
        size = min(size, max(1, int(rate * RATE_LIMITED_BATCH_SECONDS)))
    return size


def new_job_id(channel: str) -> str:
    # RQ accepts only letters, digits, "_" and "-" in a custom job id.
    return f"rem-{channel}-{uuid.uuid4().hex}"


@dataclass
class DispatchCounts:
    """What one dispatch did."""

    enqueued: int = 0
    requeued: int = 0
    jobs: int = 0
    reconciled: int = 0  # unknown or stuck sends decided (see reminders.reconcile)

    def as_dict(self) -> dict[str, int]:
        return {
            "enqueued": self.enqueued,
            "requeued": self.requeued,
            "jobs": self.jobs,
            "reconciled": self.reconciled,
        }


def _channel_of(ruleset: RuleSet, config: Config, rule: str, index: int) -> str:
    """The queue a reminder goes to: its rule's channel at ``index``.

    A reminder whose rule is gone or whose index is past the rule's channels still goes to a
    queue: the worker records why it cannot be sent, so nothing stays pending without a reason.
    """
    found = ruleset.get(rule)
    if found is None:
        return config.channel_names[0]
    if 0 <= index < len(found.channels):
        return found.channels[index]
    return found.channels[-1]


class Dispatcher:
    """Enqueues due reminders for one config, rule set, state DB and Redis."""

    def __init__(
        self, config: Config, ruleset: RuleSet, state: sa.Engine, connection: redis.Redis
    ) -> None:
        self.config = config
        self.ruleset = ruleset
        self.state = state
        self.connection = connection
        self._queues: dict[str, Queue] = {}

    def queue(self, channel: str) -> Queue:
        found = self._queues.get(channel)
        if found is None:
            found = self._queues[channel] = Queue(
                queue_name(channel), connection=self.connection, default_timeout=JOB_TIMEOUT
            )
        return found

    # -- the whole pass ---------------------------------------------------------------------

    def run(self, now: datetime) -> DispatchCounts:
        """Reconcile unknown sends, re-enqueue lost jobs' reminders, enqueue every pending
        reminder that is due, then fold the counts."""
        counts = DispatchCounts()
        self.reconcile(now, counts)
        self.requeue_lost(now, counts)
        self.enqueue_due(now, counts)
        self.fold_counts()
        return counts

    def fold_counts(self) -> None:
        """Fold the counts by rule and status the changes since the last pass added
        (:func:`reminders.counts.fold`), so reading them stays a few dozen rows."""
        with self.state.begin() as conn:
            reminder_counts.fold(conn)

    def reconcile(self, now: datetime, counts: DispatchCounts) -> None:
        """Decide the sends whose outcome is unknown (see :mod:`reminders.reconcile`)."""
        from .reconcile import Reconciler

        reconciler = Reconciler(self.config, self.ruleset, self.state, self.connection)
        try:
            done = reconciler.run(now)
        finally:
            reconciler.close()
        counts.reconciled += sum(done.as_dict().values())

    def enqueue_due(self, now: datetime, counts: DispatchCounts, ids: Sequence[int] = ()) -> None:
        """Enqueue pending reminders whose send time has come (only ``ids`` when given).

        Read in chunks, oldest first. Each chunk leaves ``pending`` (queued here, or taken by a
        concurrent dispatch or scan), so the same query reads the next chunk; it stops when a
        chunk yields nothing to take.
        """
        r = reminder
        with self.state.connect() as conn:
            paused = sorted(paused_rules(conn))  # a paused rule's reminders wait (pause.py)
        # Given ids pick the rows: SQLite must not read the status's index instead (state_db).
        status = state_db.by_id_alone(self.state, r.c.status) if ids else r.c.status
        while True:
            query = (
                sa.select(r.c.id, r.c.rule, r.c.channel_index)
                .where(status == PENDING, r.c.send_at <= now)
                .order_by(r.c.send_at, r.c.id)
                .limit(SELECT_CHUNK)
            )
            if paused:
                query = query.where(r.c.rule.not_in(paused))
            if ids:
                query = query.where(r.c.id.in_(list(ids)))
            with self.state.connect() as conn:
                rows = conn.execute(query).all()
            if not rows:
                return
            taken = self._enqueue(
                [(row.id, row.rule, row.channel_index) for row in rows],
                now,
                counts,
                old_status=PENDING,
                reason=None,
            )
            if not taken or len(rows) < SELECT_CHUNK:
                return

    def requeue_lost(self, now: datetime, counts: DispatchCounts) -> None:
        """Enqueue again the queued reminders whose job is gone or abandoned.

        A job is abandoned when it was started by a worker that no longer exists: its reminders
        are enqueued again at once. A job is gone when Redis no longer has it, or ended (failed,
        stopped, canceled, or finished without claiming them): its reminders are enqueued again
        once queued at least ``requeue_after`` ago (engine clock; a job just committed may not
        be in Redis yet). A job still waiting in its queue is left alone: it will run. The jobs
        are looked up once each (a backlog of queued reminders is a few jobs per thousand).
        """
        r = reminder
        cutoff = now - self.config.requeue_after
        with self.state.connect() as conn:
            queued = {
                row.job_id: row.since
                for row in conn.execute(
                    sa.select(r.c.job_id, sa.func.min(r.c.queued_at).label("since"))
                    .where(r.c.status == QUEUED)
                    .group_by(r.c.job_id)
                )
            }
        if not queued:
            return
        found = self._lost_jobs([j for j in queued if j])
        if None in queued:
            found[None] = "is unknown"
        lost = {
            job_id: why
            for job_id, why in found.items()
            if why == ABANDONED or (queued[job_id] is not None and queued[job_id] <= cutoff)
        }
        for job_id, why in lost.items():
            job_filter = r.c.job_id.is_(None) if job_id is None else r.c.job_id == job_id
            with self.state.connect() as conn:
                batch = conn.execute(
                    sa.select(r.c.id, r.c.rule, r.c.channel_index).where(
                        r.c.status == QUEUED, job_filter
                    )
                ).all()
            counts.requeued += self._enqueue(
                [(row.id, row.rule, row.channel_index) for row in batch],
                now,
                counts,
                old_status=QUEUED,
                old_job=job_id,
                reason=f"enqueued again: job {job_id} {why}",
            )

    def _lost_jobs(self, job_ids: list[str]) -> dict[str | None, str]:
        """Which of these jobs will never claim their reminders, and why (one round trip each)."""
        if not job_ids:
            return {}
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.hmget(Job.key_for(job_id), "status", "worker_name")
                states = pipe.execute()
            started: dict[str, str] = {}
            for job_id, (status, worker) in zip(job_ids, states, strict=True):
                name = _text(worker)
                if _text(status) == JobStatus.STARTED.value and name:
                    started[job_id] = name
            alive: dict[str, bool] = {}
            if started:
                workers = sorted(set(started.values()))
                with self.connection.pipeline(transaction=False) as pipe:
                    for name in workers:
                        pipe.exists(Worker.redis_worker_namespace_prefix + name)
                    alive = dict(zip(workers, map(bool, pipe.execute()), strict=True))
        except redis.RedisError as exc:
            raise ServiceUnavailable(f"Redis did not answer: {exc}") from None
        lost: dict[str | None, str] = {}
        for job_id, (status, _worker) in zip(job_ids, states, strict=True):
            state = _text(status)
            if state is None:
                lost[job_id] = "is gone from Redis"
            elif state in _ALIVE:
                continue
            elif state == JobStatus.STARTED.value:
                worker = started.get(job_id)
                if worker is None or not alive.get(worker, False):
                    lost[job_id] = ABANDONED
            else:
                lost[job_id] = f"ended ({state}) without sending them"
        return lost

    # -- the common step --------------------------------------------------------------------

    def _enqueue(
        self,
        items: Iterable[tuple[int, str, int]],
        now: datetime,
        counts: DispatchCounts,
        *,
        old_status: str,
        reason: str | None,
        old_job: str | None = None,
    ) -> int:
        """Mark reminders queued under new job ids, commit, then push the jobs to Redis.

        Returns how many were taken (the others were changed meanwhile by someone else).
        """
        by_channel: dict[str, list[int]] = defaultdict(list)
        for rid, rule, index in items:
            by_channel[_channel_of(self.ruleset, self.config, rule, index)].append(rid)
        jobs: list[tuple[str, str, list[int]]] = []
        r = reminder
        with self.state.begin() as conn:
            for channel, ids in by_channel.items():
                size = batch_size(self.config, channel)
                for start in range(0, len(ids), size):
                    job_id = new_job_id(channel)
                    if old_status == PENDING:
                        condition = r.c.send_at <= now
                    else:
                        condition = (
                            r.c.job_id.is_(None) if old_job is None else r.c.job_id == old_job
                        )
                    batch = ids[start : start + size]
                    values = {"job_id": job_id, "queued_at": now}
                    taken = move(
                        conn, batch, source=old_status, target=QUEUED, now=now, reason=reason,
                        keep_reason=True, values=values, where=[condition],
                    )  # fmt: skip
                    if taken:  # else a concurrent dispatch or scan got there first
                        jobs.append((channel, job_id, taken))
        if not jobs:
            return 0
        try:
            self._push(jobs)
        except redis.RedisError as exc:
            self._release(jobs, now, f"Redis did not answer: {exc}")
            raise ServiceUnavailable(
                f"Redis did not answer while enqueueing; the reminders stay pending: {exc}"
            ) from None
        counts.jobs += len(jobs)
        taken_count = sum(len(ids) for _, _, ids in jobs)
        if old_status == PENDING:
            counts.enqueued += taken_count
        return taken_count

    def _push(self, jobs: list[tuple[str, str, list[int]]]) -> None:
        """Push every job to its queue in one round trip."""
        by_channel: dict[str, list[Any]] = defaultdict(list)
        for channel, job_id, ids in jobs:
            by_channel[channel].append(
                Queue.prepare_data(
                    JOB_FUNCTION,
                    args=(channel, ids),
                    job_id=job_id,
                    timeout=JOB_TIMEOUT,
                    result_ttl=RESULT_TTL,
                    failure_ttl=FAILURE_TTL,
                    description=f"deliver {len(ids)} {channel} reminder(s), ids {_span(ids)}",
                )
            )
        with self.connection.pipeline() as pipe:
            for channel, datas in by_channel.items():
                self.queue(channel).enqueue_many(datas, pipeline=pipe)
            pipe.execute()

    def _release(self, jobs: list[tuple[str, str, list[int]]], now: datetime, why: str) -> None:
        """Put reminders whose job never reached Redis back to pending."""
        with self.state.begin() as conn:
            for _channel, job_id, ids in jobs:
                release(conn, ids, job_id, now, why)


def release(
    conn: Connection, ids: Sequence[int], job_id: str, now: datetime, why: str
) -> list[int]:
    """Put reminders still queued under ``job_id`` back to pending (their job will not send
    them); the reminder keeps its reason, the event says ``why``. Returns the ids released."""
    return move(
        conn,
        ids,
        source=QUEUED,
        target=PENDING,
        now=now,
        reason=why,
        keep_reason=True,
        values={"job_id": None, "queued_at": None},
        where=[reminder.c.job_id == job_id],
    )


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _span(ids: list[int]) -> str:
    return f"{ids[0]}" if len(ids) == 1 else f"{ids[0]}..{ids[-1]}"


def dispatcher(app: App) -> Dispatcher:
    """A dispatcher for a running engine (``reminders.app.App``)."""
    return Dispatcher(app.config, app.ruleset, app.state, redis_conn.connect(app.config))


def dispatch(app: App, now: datetime | None = None) -> DispatchCounts:
    """Enqueue what is due now (engine clock) and re-enqueue lost jobs' reminders."""
    return dispatcher(app).run(app.now() if now is None else now)


def retry(
    app: App,
    from_status: str,
    *,
    rule: str | None = None,
    ids: Sequence[int] = (),
    dry_run: bool = False,
) -> list[int]:
    """Ops: put ``failed``, stuck ``sending`` or ``unknown`` reminders back to pending, due now;
    returns ids.

    Deliberate and recorded: the attempt count and channel start over, and the reason names
    what the reminder was. A ``sending`` or ``unknown`` reminder may already have reached the
    customer (no answer came back from the provider): check the provider's log (an email's
    Message-ID is shown by ``status``) before retrying it.
    """
    if from_status not in (FAILED, SENDING, UNKNOWN):
        raise ValueError(f"retry takes failed, sending or unknown reminders, not {from_status}")
    r = reminder
    now = app.now()
    # Given ids pick the rows: SQLite must not read the status's index instead (state_db).
    status = state_db.by_id_alone(app.state, r.c.status) if ids else r.c.status
    query = sa.select(r.c.id, r.c.reason).where(status == from_status).order_by(r.c.id)
    if rule:
        app.ruleset.rule(rule)  # an unknown name is a usage error naming the rules
        query = query.where(r.c.rule == rule)
    if ids:
        query = query.where(r.c.id.in_(list(ids)))
    with app.state.begin() as conn:
        rows = conn.execute(query).all()
        if dry_run or not rows:
            return [row.id for row in rows]
        done: list[int] = []
        for row in rows:  # each keeps what it was in its reason
            was = f"was {from_status}" + (f": {row.reason}" if row.reason else "")
            done += move(
                conn,
                [row.id],
                source=from_status,
                target=PENDING,
                now=now,
                reason=f"retry requested by ops ({was})",
                values={
                    "send_at": now,
                    "attempts": 0,
                    "channel_index": 0,
                    "job_id": None,
                    "queued_at": None,
                },
            )
    return done
