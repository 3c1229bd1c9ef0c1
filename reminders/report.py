"""``reminders status``: what ops need at a glance."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from . import clock, models

r = models.reminder


def status_report(app: Any) -> dict[str, Any]:
    """Counts by rule and status, the next due reminder, stuck sends, failures, last scans."""
    now = app.now()
    with app.state.connect() as conn:
        counts: dict[str, dict[str, int]] = {}
        for rule, status, n in conn.execute(
            sa.select(r.c.rule, r.c.status, sa.func.count()).group_by(r.c.rule, r.c.status)
        ):
            counts.setdefault(rule, {})[status] = n
        next_due = conn.execute(
            sa.select(r.c.id, r.c.rule, r.c.send_at)
            .where(r.c.status == models.PENDING)
            .order_by(r.c.send_at, r.c.id)
            .limit(1)
        ).first()
        overdue = conn.execute(
            sa.select(sa.func.count()).where(r.c.status == models.PENDING, r.c.send_at <= now)
        ).scalar_one()
        stuck = conn.execute(
            sa.select(r.c.id, r.c.rule, r.c.channel, r.c.updated_at)
            .where(r.c.status == models.SENDING)
            .order_by(r.c.updated_at)
            .limit(20)
        ).all()
        failures = conn.execute(
            sa.select(r.c.id, r.c.rule, r.c.channel, r.c.reason, r.c.updated_at)
            .where(r.c.status == models.FAILED)
            .order_by(r.c.updated_at.desc(), r.c.id.desc())
            .limit(10)
        ).all()
        s = models.scan_run
        latest = sa.select(s.c.rule, sa.func.max(s.c.id).label("id")).group_by(s.c.rule).subquery()
        scans = (
            conn.execute(sa.select(s).join(latest, s.c.id == latest.c.id).order_by(s.c.rule))
            .mappings()
            .all()
        )
    return {
        "now": clock.iso_utc(now),
        "counts": counts,
        "totals": _totals(counts),
        "next_due": None
        if next_due is None
        else {"id": next_due.id, "rule": next_due.rule, "send_at": clock.iso_utc(next_due.send_at)},
        "due_now": overdue,
        "stuck_sending": [
            {"id": x.id, "rule": x.rule, "channel": x.channel, "since": clock.iso_utc(x.updated_at)}
            for x in stuck
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
    }


def _totals(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for by_status in counts.values():
        for status, n in by_status.items():
            totals[status] = totals.get(status, 0) + n
    return totals


def format_status(report: dict[str, Any]) -> str:
    """The report as a readable page."""
    lines = [f"now {report['now']}"]
    statuses = [s for s in models.STATUSES if s in report["totals"]]
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
    if report["stuck_sending"]:
        lines.append(
            "stuck in sending (a worker died mid-send; check the provider, then "
            "`reminders retry --status sending`):"
        )
        for x in report["stuck_sending"]:
            lines.append(f"  #{x['id']} {x['rule']} {x['channel']} since {x['since']}")
    if report["recent_failures"]:
        lines.append("recent failures:")
        for x in report["recent_failures"]:
            lines.append(f"  #{x['id']} {x['rule']} {x['channel'] or '-'} {x['at']}: {x['reason']}")
    if report["last_scans"]:
        lines.append("last scans:")
        for x in report["last_scans"]:
            tail = f" ERROR {x['error']}" if x["error"] else ""
            lines.append(
                f"  {x['rule']} {x['at']} {x['status']}: {x['rows']} rows, {x['created']} created, "
                f"{x['moved']} moved, {x['canceled']} canceled, {x['skipped']} skipped{tail}"
            )
    return "\n".join(lines)
