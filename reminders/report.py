"""``reminders status``: what ops need at a glance."""

from __future__ import annotations

from datetime import UTC
from typing import TYPE_CHECKING, Any

import redis
import sqlalchemy as sa

from . import clock, consent, lifecycle, models, phone, redis_conn, state_db
from . import counts as reminder_counts
from .errors import ServiceUnavailable
from .metrics import oldest_due_unsent
from .pause import paused_rules

if TYPE_CHECKING:
    from .app import App

r = models.reminder
o = models.optout

# Opt-outs that are the customer's own choice: a STOP reply (ours, or Twilio's 21610: the
# recipient replied STOP to the sender) and a one-click unsubscribe. Every other source stops an
# address that cannot receive (Twilio 30004/30005/30006, a provider's refusal): suppressed.
CHOSEN = frozenset({consent.STOP, consent.UNSUBSCRIBE, "21610"})
# Why a pending reminder's send time was pushed past its planned time (its reason's prefix).
DEFERRALS = (
    ("quiet hours", "deferred: quiet hours%"),
    ("frequency cap", "deferred: frequency cap%"),
)
RECENT_SUPPRESSED = 10
RECENT_FAILED_JOBS = 5


def status_report(app: App) -> dict[str, Any]:
    """Counts by rule and status, the next due reminder, stuck sends, failures, last scans,
    deferred reminders, opt-outs and suppressed addresses."""
    now = app.now()
    with app.state.connect() as conn:
        counts: dict[str, dict[str, int]] = {}
        for (rule, status), n in sorted(reminder_counts.reminders(conn).items()):
            counts.setdefault(rule, {})[status] = n
        next_due = conn.execute(
            sa.select(r.c.id, r.c.rule, r.c.send_at)
            .where(r.c.status == lifecycle.PENDING)
            .order_by(r.c.send_at, r.c.id)
            .limit(1)
        ).first()
        overdue = conn.execute(
            sa.select(sa.func.count()).where(r.c.status == lifecycle.PENDING, r.c.send_at <= now)
        ).scalar_one()
        stuck = conn.execute(
            sa.select(r.c.id, r.c.rule, r.c.channel, r.c.updated_at, r.c.claimed_by, r.c.job_id)
            .where(r.c.status == lifecycle.SENDING)
            .order_by(r.c.updated_at)
            .limit(20)
        ).all()
        unknown = conn.execute(
            sa.select(r.c.id, r.c.rule, r.c.channel, r.c.provider_id, r.c.reason, r.c.updated_at)
            .where(r.c.status == lifecycle.UNKNOWN)
            .order_by(r.c.updated_at, r.c.id)
            .limit(20)
        ).all()
        failures = conn.execute(
            sa.select(r.c.id, r.c.rule, r.c.channel, r.c.reason, r.c.updated_at)
            .where(r.c.status == lifecycle.FAILED)
            .order_by(r.c.updated_at.desc(), r.c.id.desc())
            .limit(10)
        ).all()
        s = models.scan_run
        latest = sa.select(s.c.rule, sa.func.max(s.c.id).label("id")).group_by(s.c.rule).subquery()
        scans = [
            _alive_or_stale(conn, dict(x))
            for x in conn.execute(
                sa.select(s).join(latest, s.c.id == latest.c.id).order_by(s.c.rule)
            ).mappings()
        ]
        extra = {
            **_consent(conn),
            "deferred": _deferred(conn),
            "paused_rules": sorted(paused_rules(conn)),
            "outbox": _outbox(conn, app.config),
        }
        _by_rule, oldest = oldest_due_unsent(conn, now)
    extra["failed_jobs"] = failed_jobs(app.config)
    return {
        "now": clock.iso_utc(now),
        "counts": counts,
        "totals": _totals(counts),
        "next_due": None
        if next_due is None
        else {"id": next_due.id, "rule": next_due.rule, "send_at": clock.iso_utc(next_due.send_at)},
        "due_now": overdue,
        # What reminders_oldest_due_unsent_seconds says: the alert that matters.
        "oldest_due_unsent_seconds": oldest,
        "stuck_sending": [
            {
                "id": x.id,
                "rule": x.rule,
                "channel": x.channel,
                "since": clock.iso_utc(x.updated_at),
                "cause": cause,
            }
            for x, cause in zip(stuck, _causes(app, stuck), strict=True)
        ],
        "unknown": [
            {
                "id": x.id,
                "rule": x.rule,
                "channel": x.channel,
                "provider_id": x.provider_id,
                "reason": x.reason,
                "since": clock.iso_utc(x.updated_at),
            }
            for x in unknown
        ],
        "recent_failures": [
            {
                "id": x.id,
                "rule": x.rule,
                "channel": x.channel,
                "reason": x.reason,
                "at": clock.iso_utc(x.updated_at),
            }
            for x in failures
        ],
        "last_scans": [
            {
                "rule": x["rule"],
                "at": clock.iso_utc(x["started_at"]),
                "kind": x["kind"],
                "status": x["status"],
                "rows": x["rows"],
                "created": x["created"],
                "moved": x["moved"],
                "canceled": x["canceled"],
                "skipped": x["skipped"],
                "error": x["error"],
            }
            for x in scans
        ],
        **extra,
    }


def _alive_or_stale(conn: Any, run: dict[str, Any]) -> dict[str, Any]:
    """A scan run, shown ``interrupted`` when it says ``running`` but no scan of its rule is
    (its process was killed before it could say so; the next scan records it)."""
    if run["status"] == "running" and not state_db.scan_alive(conn, run["rule"]):
        run.update(status="interrupted", error=state_db.STALE_RUN)
    return run


# Why a reminder is in sending (the ``cause`` of ``stuck_sending``).
SENDING_NOW = "sending (its worker is alive)"
WORKER_GONE = "its worker died mid-send: the next dispatch reconciles it with the provider"
NOT_RECORDED = (
    "recording failed (the state DB did not answer; its worker left the outcome in Redis): "
    "the next dispatch records it"
)
NO_WORKER = "its worker is not known: check the provider's log, then `reminders retry`"


def _causes(app: Any, stuck: Any) -> list[str]:
    """For each ``sending`` reminder: is its worker sending, dead, or did recording fail?"""
    if not stuck:
        return []
    if not app.config.redis.url:  # the embedded Redis is not started just to look
        return [NO_WORKER for _ in stuck]
    from . import redis_conn
    from .errors import ServiceUnavailable
    from .reconcile import _alive, _workers, unrecorded_ids

    try:
        connection = redis_conn.connect(app.config)
        left = unrecorded_ids(connection)
        names = _workers(connection, stuck)
        alive = _alive(connection, {n for n in names.values() if n})
    except (ServiceUnavailable, redis.RedisError) as exc:
        return [f"unknown: Redis did not answer ({exc})" for _ in stuck]
    causes = []
    for row in stuck:
        name = names.get(row.id)
        if row.id in left:
            causes.append(NOT_RECORDED)
        elif not name:
            causes.append(NO_WORKER)
        elif alive.get(name, False):
            causes.append(SENDING_NOW)
        else:
            causes.append(WORKER_GONE)
    return causes


def _consent(conn: Any) -> dict[str, Any]:
    """Opt-outs by channel and source, and the suppressed addresses (the most recent listed)."""
    opt_outs: dict[str, dict[str, int]] = {}
    for channel, source, n in conn.execute(
        sa.select(o.c.channel, o.c.source, sa.func.count())
        .group_by(o.c.channel, o.c.source)
        .order_by(o.c.channel, o.c.source)
    ):
        opt_outs.setdefault(channel, {})[source] = n
    by_source: dict[str, int] = {}
    for by in opt_outs.values():
        for source, n in by.items():
            if source not in CHOSEN:
                by_source[source] = by_source.get(source, 0) + n
    recent = conn.execute(
        sa.select(o.c.channel, o.c.address, o.c.source, o.c.reason, o.c.created_at)
        .where(o.c.source.not_in(sorted(CHOSEN)))
        .order_by(o.c.created_at.desc(), o.c.id.desc())
        .limit(RECENT_SUPPRESSED)
    ).all()
    return {
        "opt_outs": opt_outs,
        "suppressed": {
            "total": sum(by_source.values()),
            "by_source": dict(sorted(by_source.items())),
            "recent": [
                {
                    "channel": x.channel,
                    "address": phone.mask_address(x.channel, x.address),
                    "source": x.source,
                    "reason": x.reason,
                    "at": clock.iso_utc(x.created_at),
                }
                for x in recent
            ],
        },
    }


def _outbox(conn: Any, config: Any) -> list[dict[str, Any]]:
    """Write-back and webhooks per destination: what waits, what was given up, the head's
    attempts and last error (a statement that keeps failing shows here until it is fixed)."""
    from . import outbox

    if not config.outbox_used:
        return []
    found = []
    for entry in outbox.summary(conn, config):
        for key in ("oldest_created", "next_at"):
            if entry.get(key) is not None:
                entry[key] = clock.iso_utc(entry[key])
        found.append(entry)
    return found


def _deferred(conn: Any) -> dict[str, Any]:
    """Pending reminders whose send time quiet hours or frequency caps pushed past their planned
    time, by reason, and the earliest of their new send times."""
    kind = sa.case(
        *(
            (r.c.reason.like(sa.literal_column(f"'{like}'")), sa.literal_column(f"'{name}'"))
            for name, like in DEFERRALS
        ),
        else_=sa.null(),
    )
    pushed = (
        sa.select(kind.label("kind"), r.c.send_at)
        .where(r.c.status == lifecycle.PENDING, r.c.send_at > r.c.planned_at)
        .subquery()
    )
    by_reason: dict[str, int] = {}
    first = None
    for name, n, earliest in conn.execute(
        sa.select(pushed.c.kind, sa.func.count(), sa.func.min(pushed.c.send_at))
        .where(pushed.c.kind.is_not(None))
        .group_by(pushed.c.kind)
        .order_by(pushed.c.kind)
    ):
        by_reason[name] = n
        first = earliest if first is None or earliest < first else first
    return {
        "total": sum(by_reason.values()),
        "by_reason": by_reason,
        "next": None if first is None else clock.iso_utc(first),
    }


def failed_jobs(config: Any) -> dict[str, Any]:
    """The jobs RQ moved to its failed registries, by queue, and the latest few with their error.

    A job that fails on something the state DB never records (a worker that cannot open a
    channel, a crash loop) shows only here. Without ``redis.url``, an embedded server that is not
    running has no jobs: none is started to say so. An unreachable Redis is reported, not raised:
    the rest of the status comes from the state DB.
    """
    from rq.job import Job
    from rq.registry import FailedJobRegistry

    from .dispatch import queue_names

    none: dict[str, Any] = {"total": 0, "by_queue": {}, "recent": []}
    if not config.redis.url and not redis_conn.embedded(config).running():
        return none
    try:
        connection = redis_conn.connect(config)
        by_queue: dict[str, int] = {}
        recent: list[tuple[float, dict[str, Any]]] = []
        for queue in queue_names(config):
            registry = FailedJobRegistry(queue, connection=connection)
            count = registry.count
            if not count:
                continue
            by_queue[queue] = count
            ids = registry.get_job_ids(0, RECENT_FAILED_JOBS - 1, desc=True)
            for job in Job.fetch_many(ids, connection=connection):
                if job is not None:
                    recent.append(_failed_job(job, queue))
    except (redis.RedisError, ServiceUnavailable) as exc:
        return {**none, "total": None, "error": f"Redis: {exc}"}
    recent.sort(key=lambda item: item[0], reverse=True)
    return {
        "total": sum(by_queue.values()),
        "by_queue": by_queue,
        "recent": [item for _, item in recent[:RECENT_FAILED_JOBS]],
    }


def _failed_job(job: Any, queue: str) -> tuple[float, dict[str, Any]]:
    """(when it ended, as a sort key; the job as the report shows it)."""
    ended = job.ended_at
    if ended is not None and ended.tzinfo is None:
        ended = ended.replace(tzinfo=UTC)  # RQ keeps UTC, naive
    result = job.latest_result()
    error = ((result.exc_string if result else None) or "").strip().splitlines()
    return (
        ended.timestamp() if ended else 0.0,
        {
            "id": job.id,
            "queue": queue,
            "function": job.func_name,
            "error": error[-1] if error else None,
            "at": clock.iso_utc(ended) if ended else None,
        },
    )


def _totals(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for by_status in counts.values():
        for status, n in by_status.items():
            totals[status] = totals.get(status, 0) + n
    return totals


def format_status(report: dict[str, Any]) -> str:
    """The report as a readable page."""
    lines = [f"now {report['now']}"]
    statuses = [s for s in lifecycle.STATUSES if s in report["totals"]]
    if not statuses:
        lines.append("no reminders yet (run reminders scan)")
    else:
        width = max(len(rule) for rule in report["counts"]) + 2
        lines.append("rule".ljust(width) + "".join(s.rjust(12) for s in statuses))
        for rule, by_status in sorted(report["counts"].items()):
            lines.append(
                rule.ljust(width) + "".join(str(by_status.get(s, 0)).rjust(12) for s in statuses)
            )
        lines.append(
            "total".ljust(width) + "".join(str(report["totals"][s]).rjust(12) for s in statuses)
        )
    nd = report["next_due"]
    lines.append(
        f"next due: {nd['send_at']} ({nd['rule']} #{nd['id']})" if nd else "next due: none"
    )
    lines.append(f"due now (pending, send time passed): {report['due_now']}")
    if report["paused_rules"]:
        lines.append(f"paused (nothing sent until resumed): {', '.join(report['paused_rules'])}")
    if report["stuck_sending"]:
        lines.append("stuck in sending:")
        for x in report["stuck_sending"]:
            lines.append(
                f"  #{x['id']} {x['rule']} {x['channel'] or '-'} since {x['since']}: {x['cause']}"
            )
    if report["unknown"]:
        lines.append(
            "unknown (the provider may have it; SMS is reconciled with Twilio's records, an "
            "email waits for ops: find its Message-ID in the mail server's log, then "
            "`reminders retry --status unknown` only if it was not sent):"
        )
        for x in report["unknown"]:
            mid = f" {x['provider_id']}" if x["provider_id"] else ""
            lines.append(
                f"  #{x['id']} {x['rule']} {x['channel']}{mid} since {x['since']}: {x['reason']}"
            )
    if report["recent_failures"]:
        lines.append("recent failures:")
        for x in report["recent_failures"]:
            lines.append(f"  #{x['id']} {x['rule']} {x['channel'] or '-'} {x['at']}: {x['reason']}")
    deferred = report["deferred"]
    if deferred["total"]:
        reasons = ", ".join(f"{k} {v}" for k, v in deferred["by_reason"].items())
        lines.append(
            f"deferred (pending past their planned time): {deferred['total']} ({reasons}), "
            f"the next at {deferred['next']}"
        )
    else:
        lines.append("deferred (pending past their planned time): none")
    if report["opt_outs"]:
        parts = []
        for channel, by_source in report["opt_outs"].items():
            detail = ", ".join(f"{k} {v}" for k, v in by_source.items())
            parts.append(f"{channel} {sum(by_source.values())} ({detail})")
        lines.append(f"opt-outs: {'; '.join(parts)}")
    else:
        lines.append("opt-outs: none")
    suppressed = report["suppressed"]
    if suppressed["total"]:
        detail = ", ".join(f"{k} {v}" for k, v in suppressed["by_source"].items())
        lines.append(f"suppressed (cannot receive): {suppressed['total']} ({detail}); latest:")
        for x in suppressed["recent"]:
            lines.append(f"  {x['channel']} {x['address']} {x['at']}: {x['reason'] or x['source']}")
    for x in report.get("outbox", []):
        line = (
            f"outbox {x['name']}: {x['pending']} pending, {x['done']} delivered, "
            f"{x['failed']} given up"
        )
        if x["pending"] and x["attempts"]:
            line += (
                f"; the oldest ({x['oldest_type']}, {x['oldest_created']}) failed "
                f"{x['attempts']} times, next try {x['next_at']}: {x['last_error']}"
            )
        lines.append(line)
    jobs = report["failed_jobs"]
    if jobs.get("error"):
        lines.append(f"failed jobs (RQ): unknown, {jobs['error']}")
    elif jobs["total"]:
        detail = ", ".join(f"{k} {v}" for k, v in jobs["by_queue"].items())
        lines.append(f"failed jobs (RQ): {jobs['total']} ({detail}); latest:")
        for x in jobs["recent"]:
            lines.append(f"  {x['at'] or '-'} {x['queue']} {x['id']}: {x['error']}")
    else:
        lines.append("failed jobs (RQ): none")
    if report["last_scans"]:
        lines.append("last scans:")
        for x in report["last_scans"]:
            tail = f" ERROR {x['error']}" if x["error"] else ""
            lines.append(
                f"  {x['rule']} {x['at']} {x['status']} ({x['kind']} scan): {x['rows']} rows, "
                f"{x['created']} created, "
                f"{x['moved']} moved, {x['canceled']} canceled, {x['skipped']} skipped{tail}"
            )
    return "\n".join(lines)
