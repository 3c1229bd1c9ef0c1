"""Quiet hours at send time (:mod:`reminders.policies.quiet_hours`): the rule's own for the
channel, else the channel's (SMS 21:00-08:00 by default, email none), in the recipient's zone,
deferring to their end: the right UTC instant on the nights the clocks change."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from reminders.policies import Defer, quiet_hours
from tests.rule_objects import context, load_rule, refills_with
from tests.rules_fixtures import REFILLS


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def rules_with(setting: str | None) -> str:
    return REFILLS if setting is None else refills_with(quiet_hours=setting)


ON = "2027-03-13T"  # the night of Friday 12 March in New York (EST, UTC-5); times UTC


@pytest.mark.parametrize(
    ("setting", "channel", "zone", "now", "until", "window"),
    [
        # SMS by default: Friday 22:00 EST is quiet until Saturday 08:00 EST
        (None, "sms", None, "03:00", "13:00", "21:00-08:00"),
        (None, "sms", None, "02:00", "13:00", "21:00-08:00"),  # 21:00 EST: they start
        (None, "sms", None, "01:59", None, None),
        (None, "sms", None, "13:00", None, None),  # 08:00 EST: over
        # email has none unless the rule or the config says
        (None, "email", None, "03:00", None, None),
        ('"21:00-09:00"', "email", None, "03:00", "14:00", "21:00-09:00"),
        # exempt (a fraud alert)
        ("false", "sms", None, "03:00", None, None),
        # per channel: SMS its own range, email exempt; a channel not named keeps its default
        ('{sms: "20:00-09:00", email: false}', "sms", None, "01:30", "14:00", "20:00-09:00"),
        ('{sms: "20:00-09:00", email: false}', "email", None, "01:30", None, None),
        ("{email: false}", "sms", None, "03:00", "13:00", "21:00-08:00"),
        # the recipient's zone decides: 03:00Z is 19:00 in Los Angeles, 04:00 in Berlin
        (None, "sms", "America/Los_Angeles", "03:00", None, None),
        (None, "sms", "Europe/Berlin", "03:00", "07:00", "21:00-08:00"),
        # an unknown zone on the row: the config's (New York)
        (None, "sms", "Mars/Olympus", "03:00", "13:00", "21:00-08:00"),
    ],
)
def test_quiet_hours(
    tmp_path: Path,
    setting: str | None,
    channel: str,
    zone: str | None,
    now: str,
    until: str | None,
    window: str | None,
) -> None:
    config, rule = load_rule(tmp_path, rules_with(setting))
    index = rule.channels.index(channel)
    found = context(
        config,
        rule,
        utc(f"{ON}{now}:00Z"),
        queue=channel,
        values={"timezone": zone},
        reminder={"channel_index": index},
    )
    expected = None
    if until is not None:
        shown = "America/New_York" if zone in (None, "Mars/Olympus") else zone
        at = f"{ON}{until}:00Z"
        expected = Defer(
            utc(at), f"deferred: quiet hours {window} in {shown} for {channel}; send at {at}"
        )
    assert quiet_hours.policy(found) == expected


@pytest.mark.parametrize(
    ("zone", "now", "until"),
    [
        # Spring forward: 01:30 EST; 09:00 that morning is EDT.
        ("America/New_York", "2027-03-14T06:30:00Z", "2027-03-14T13:00:00Z"),
        # Fall back: 01:30 EDT (the first one); 09:00 that morning is EST.
        ("America/New_York", "2027-11-07T05:30:00Z", "2027-11-07T14:00:00Z"),
        # The same spring night in Los Angeles.
        ("America/Los_Angeles", "2027-03-14T09:30:00Z", "2027-03-14T16:00:00Z"),
        # Berlin changes two weeks later (28 March): 09:00 CEST is 07:00Z.
        ("Europe/Berlin", "2027-03-28T00:30:00Z", "2027-03-28T07:00:00Z"),
    ],
    ids=["new-york-spring", "new-york-fall", "los-angeles-spring", "berlin-spring"],
)
def test_quiet_hours_end_at_the_right_instant_on_dst_nights(
    tmp_path: Path, zone: str, now: str, until: str
) -> None:
    config, rule = load_rule(tmp_path, rules_with('"21:00-09:00"'))
    decision = quiet_hours.policy(context(config, rule, utc(now), values={"timezone": zone}))
    assert decision == Defer(
        utc(until), f"deferred: quiet hours 21:00-09:00 in {zone} for sms; send at {until}"
    )
