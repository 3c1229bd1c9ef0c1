"""Paused rules: a rule paused by ops (console or API) sends nothing until it is resumed.

A paused rule's reminders are neither dispatched (:mod:`reminders.dispatch` leaves them out of its
due query) nor sent (a worker that already holds one puts it back to ``pending`` with the reason
``paused``); they stay pending, and scans go on. On resume they go out at the next dispatch, each
still subject to its rule's grace, like any late reminder.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .models import rule_state

PAUSED_REASON = "paused"


def paused_rules(conn: Connection) -> set[str]:
    """The names of the rules paused now."""
    return {
        row.rule
        for row in conn.execute(sa.select(rule_state.c.rule).where(rule_state.c.paused.is_(True)))
    }


def paused_detail(conn: Connection) -> dict[str, tuple[datetime | None, str | None]]:
    """Each paused rule's pause time and who paused it."""
    rows = conn.execute(
        sa.select(rule_state.c.rule, rule_state.c.paused_at, rule_state.c.paused_by).where(
            rule_state.c.paused.is_(True)
        )
    )
    return {row.rule: (row.paused_at, row.paused_by) for row in rows}


def set_paused(conn: Connection, rule: str, paused: bool, *, by: str, now: datetime) -> bool:
    """Pause or resume ``rule``; returns whether this changed anything."""
    found = conn.execute(
        sa.select(rule_state.c.paused).where(rule_state.c.rule == rule)
    ).scalar_one_or_none()
    if found is not None and bool(found) == paused:
        return False
    values = {
        "paused": paused,
        "paused_at": now if paused else None,
        "paused_by": by if paused else None,
    }
    if found is None:
        conn.execute(rule_state.insert().values(rule=rule, **values))
    else:
        conn.execute(rule_state.update().where(rule_state.c.rule == rule).values(**values))
    return True
