"""The audit log: who did what, and when (log-ins, retries, cancels, pauses, keys, users).

Written in the same transaction as the change it records. It never holds a password or a key.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import clock
from .models import audit

# The actions recorded.
LOGIN = "login"
LOGIN_FAILED = "login.failed"
LOGOUT = "logout"
RETRY = "retry"
CANCEL = "cancel"
PAUSE = "pause"
RESUME = "resume"
KEY_CREATED = "key.created"
KEY_REVOKED = "key.revoked"
USER_ADDED = "user.added"
USER_REMOVED = "user.removed"


def record(
    conn: Connection,
    *,
    actor: str,
    action: str,
    target: str | None = None,
    detail: str | None = None,
    now: datetime,
) -> None:
    """Write one audit row."""
    conn.execute(
        audit.insert().values(at=now, actor=actor, action=action, target=target, detail=detail)
    )


def recent(conn: Connection, limit: int = 100, before: int | None = None) -> list[dict[str, Any]]:
    """The newest ``limit`` rows, newest first (``before``: only rows with a smaller id)."""
    query = sa.select(audit).order_by(audit.c.id.desc()).limit(limit)
    if before is not None:
        query = query.where(audit.c.id < before)
    return [
        {
            "id": row.id,
            "at": clock.iso_utc(row.at),
            "actor": row.actor,
            "action": row.action,
            "target": row.target,
            "detail": row.detail,
        }
        for row in conn.execute(query)
    ]


def failures_since(conn: Connection, actor: str, since: datetime) -> tuple[int, datetime | None]:
    """How many failed log-ins ``actor`` had since ``since``, and the time of the last."""
    row = conn.execute(
        sa.select(sa.func.count(), sa.func.max(audit.c.at)).where(
            audit.c.action == LOGIN_FAILED, audit.c.actor == actor, audit.c.at >= since
        )
    ).one()
    last = row[1]
    if isinstance(last, str):  # SQLite's max() of a stored text loses the column type
        last = clock.parse_instant(last)
    return int(row[0]), last
