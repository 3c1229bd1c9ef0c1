"""The engine's one clock.

Every schedule decision asks :func:`now`. ``REMINDERS_NOW`` (or the command line's ``--now``) fixes
it for tests and back-fills; an ISO 8601 value without a zone is UTC. Rate limits are the exception:
they are timed by Redis' own clock, never by this one.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

ENV = "REMINDERS_NOW"


def parse_instant(text: str) -> datetime:
    """Parse an ISO 8601 instant; a value without a zone is UTC. Returns an aware UTC datetime."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def now() -> datetime:
    """The current instant as an aware UTC datetime, honouring ``REMINDERS_NOW``."""
    fixed = os.environ.get(ENV)
    if fixed:
        return parse_instant(fixed)
    return datetime.now(UTC)


def iso_utc(moment: datetime) -> str:
    """Format an aware datetime as ``2027-03-14T14:00:00Z`` (UTC, second precision)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
