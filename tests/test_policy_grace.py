"""Grace at send time (:mod:`reminders.policies.grace`): a reminder more than its rule's grace
past its send time is canceled as expired; exactly the grace is still in time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reminders.policies import Cancel, grace
from tests.rule_objects import context, load_rule, refills_with
from tests.rules_fixtures import REFILLS

# 01:30 EST on the night New York's clocks go forward: grace is a duration, not a local time.
NOW = datetime(2027, 3, 14, 6, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("setting", "late", "expected"),
    [
        (None, timedelta(0), None),
        (None, -timedelta(hours=1), None),  # ahead of its time (a retry's jitter): in time
        (None, timedelta(days=1), None),  # exactly the default grace (1d)
        (
            None,
            timedelta(days=1, seconds=1),
            "expired: send time 2027-03-13T06:29:59Z is more than 1d ago",
        ),
        ("90m", timedelta(minutes=90), None),
        (
            "90m",
            timedelta(minutes=91),
            "expired: send time 2027-03-14T04:59:00Z is more than 90m ago",
        ),
        ("2h", timedelta(hours=3), "expired: send time 2027-03-14T03:30:00Z is more than 2h ago"),
        (
            "45s",
            timedelta(minutes=1),
            "expired: send time 2027-03-14T06:29:00Z is more than 45s ago",
        ),
        # weeks are written as days
        ("2w", timedelta(days=15), "expired: send time 2027-02-27T06:30:00Z is more than 14d ago"),
    ],
)
def test_grace(tmp_path: Path, setting: str | None, late: timedelta, expected: str | None) -> None:
    config, rule = load_rule(tmp_path, refills_with(grace=setting) if setting else REFILLS)
    decision = grace.policy(context(config, rule, NOW, reminder={"send_at": NOW - late}))
    assert decision == (None if expected is None else Cancel(expected))
