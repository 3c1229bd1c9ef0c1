"""Grace at send time: a reminder more than its rule's ``grace`` past its send time is canceled
as expired (a late reminder can do more harm than none: a refill reminder after the refill)."""

from __future__ import annotations

from datetime import timedelta

from .. import clock, sendtime
from .base import Cancel, Context


def policy(context: Context) -> Cancel | None:
    """Cancel the reminder when ``now`` is more than the rule's grace past its send time."""
    send_at = context.row["send_at"]
    grace = context.rule.grace
    if sendtime.within_grace(send_at, context.now, grace):
        return None
    at = clock.iso_utc(send_at)
    return Cancel(f"expired: send time {at} is more than {_duration(grace)} ago")


def _duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
