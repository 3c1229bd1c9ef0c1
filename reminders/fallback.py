"""Channel fallback, in one place: a channel that failed for good hands the reminder to the next.

A permanent error, at send time (the worker, :mod:`reminders.delivery`) or reported later by the
provider (a delivery report, :mod:`reminders.receipts`), moves the reminder to its rule's next
channel while one is left and the reminder is within its grace: back to ``pending`` on that
channel, due at once (its send time is kept, so its grace is not extended), the reason kept
(``...; trying email``). Otherwise it ends in the status the caller names (``failed`` at send time,
``undelivered`` after a delivery report).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Connection

from . import sendtime
from .lifecycle import PENDING, move
from .rules import Rule


def next_channel(
    rule: Rule | None, index: int, send_at: datetime, now: datetime
) -> tuple[int, str] | None:
    """The channel after ``index`` of ``rule`` (its index and name), or None when none is left,
    the rule is gone, or the reminder planned for ``send_at`` is past its grace at ``now``."""
    following = index + 1
    if rule is None or following >= len(rule.channels):
        return None
    if not sendtime.within_grace(send_at, now, rule.grace):
        return None
    return following, rule.channels[following]


def fall_back(
    conn: Connection,
    rem: Mapping[Any, Any],
    rule: Rule | None,
    why: str,
    now: datetime,
    *,
    status: str,
    otherwise: str,
    values: Mapping[str, Any] | None = None,
) -> str | None:
    """Move the reminder ``rem`` (its ``id``, ``channel_index``, ``send_at``), now in ``status``,
    to its next channel, or else to ``otherwise``; returns the new status.

    ``why`` says what failed; ``values`` are more columns to set either way (the attempt count).
    The change is conditional on ``status`` and recorded; None when the reminder was no longer
    in that status (another process moved it first), and nothing changed.
    """
    following = next_channel(rule, rem["channel_index"], rem["send_at"], now)
    changes: dict[str, Any] = dict(values or {})
    if following is None:
        new, reason = otherwise, why
    else:
        index, name = following
        new, reason = PENDING, f"{why}; trying {name}"
        changes.update(channel_index=index, channel=name, job_id=None, queued_at=None)
    done = move(
        conn, [rem["id"]], source=status, target=new, now=now, reason=reason, values=changes
    )
    return new if done else None
