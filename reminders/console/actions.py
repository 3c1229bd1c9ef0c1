"""What operators change from the console or its API: retry, cancel, pause, resume.

Each change goes through the lifecycle (:func:`reminders.lifecycle.move`, or ops' own
:func:`reminders.dispatch.retry`) and is written to the audit log with who did it.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from werkzeug.exceptions import Conflict, NotFound

from reminders import audit, lifecycle, pause
from reminders.accounts import Principal
from reminders.app import App
from reminders.dispatch import retry as ops_retry
from reminders.models import reminder

RETRYABLE = (lifecycle.FAILED, lifecycle.SENDING)
CANCELABLE = tuple(sorted(lifecycle.OPEN))


def _status(app: App, rid: int) -> str:
    with app.state.connect() as conn:
        found = conn.execute(
            sa.select(reminder.c.status).where(reminder.c.id == rid)
        ).scalar_one_or_none()
    if found is None:
        raise NotFound(f"no reminder #{rid}")
    return str(found)


def retry(app: App, who: Principal, rid: int) -> dict[str, Any]:
    """Put a failed or stuck (``sending``) reminder back to pending, due now."""
    status = _status(app, rid)
    if status not in RETRYABLE:
        raise Conflict(f"reminder #{rid} is {status}: only failed or sending reminders are retried")
    done = ops_retry(app, status, ids=[rid])
    if not done:
        raise Conflict(f"reminder #{rid} changed meanwhile: reload")
    with app.state.begin() as conn:
        audit.record(
            conn,
            actor=who.actor,
            action=audit.RETRY,
            target=f"reminder {rid}",
            detail=f"was {status}",
            now=app.now(),
        )
    return {"id": rid, "status": lifecycle.PENDING.value}


def cancel(app: App, who: Principal, rid: int) -> dict[str, Any]:
    """Cancel a pending or queued reminder."""
    status = _status(app, rid)
    if status not in CANCELABLE:
        raise Conflict(
            f"reminder #{rid} is {status}: only pending or queued reminders can be canceled"
        )
    now = app.now()
    with app.state.begin() as conn:
        done = lifecycle.move(
            conn,
            [rid],
            source=status,
            target=lifecycle.CANCELED,
            now=now,
            reason=f"canceled by {who.actor} from the console",
            values={"job_id": None},
        )
        if not done:
            raise Conflict(f"reminder #{rid} changed meanwhile: reload")
        audit.record(conn, actor=who.actor, action=audit.CANCEL, target=f"reminder {rid}", now=now)
    return {"id": rid, "status": lifecycle.CANCELED.value}


def set_paused(app: App, who: Principal, rule: str, paused: bool) -> dict[str, Any]:
    """Pause or resume a rule (a configured one); recorded when it changes anything."""
    if rule not in {r.name for r in app.ruleset.rules}:
        raise NotFound(f"no rule {rule}")
    now = app.now()
    with app.state.begin() as conn:
        if pause.set_paused(conn, rule, paused, by=who.actor, now=now):
            audit.record(
                conn,
                actor=who.actor,
                action=audit.PAUSE if paused else audit.RESUME,
                target=f"rule {rule}",
                now=now,
            )
    return {"rule": rule, "paused": paused}
