"""Quiet hours per channel, per rule and in the recipient's zone, across DST changes.

A rule may set its own ``quiet_hours`` (one range for all its channels, or one per channel) or
be exempt (``quiet_hours: false``, a fraud alert); without one, the channel's apply (SMS
21:00-08:00 by default, email none unless configured). The worker defers a message in quiet
hours to their end in the recipient's zone: the right UTC instant on the nights the clocks change.
"""

from __future__ import annotations

import pytest

from reminders import clock
from tests.caps_fixtures import Notices, caps_redis, lite_notices, notices, rules_yaml

__all__ = ["caps_redis", "lite_notices", "notices"]


def test_a_rule_gives_email_quiet_hours_of_its_own(lite_notices: Notices) -> None:
    rules = rules_yaml(refill='    priority: 5\n    quiet_hours: "21:00-09:00"\n')
    p = lite_notices.configure(rules=rules)
    p.notice(1, 7, "refill", "2027-03-12 22:00")  # Friday 22:00 EST = 03:00Z Saturday
    p.notice(2, 7, "payment", "2027-03-12 22:00")  # email's own: no quiet hours
    p.scan("2027-03-12T12:00:00Z")
    p.send("2027-03-13T03:00:00Z")
    assert p.sent_notices() == [2]
    refill = p.by_occurrence()["1"]
    assert refill["status"] == "pending"
    assert clock.iso_utc(refill["send_at"]) == "2027-03-13T14:00:00Z"  # Saturday 09:00 EST
    assert refill["reason"] == (
        "deferred: quiet hours 21:00-09:00 in America/New_York for email; "
        "send at 2027-03-13T14:00:00Z"
    )
    p.send("2027-03-13T14:00:00Z")
    assert p.sent_notices() == [2, 1]


def test_quiet_hours_false_exempts_a_rule_from_the_sms_default(lite_notices: Notices) -> None:
    rules = rules_yaml(channels="sms", fraud="    caps: false\n    quiet_hours: false\n")
    p = lite_notices.configure(rules=rules)
    p.notice(1, 7, "fraud", "2027-03-13 03:00")  # 03:00 EST: inside the SMS 21:00-08:00
    p.notice(2, 7, "payment", "2027-03-13 03:00")
    p.scan("2027-03-12T12:00:00Z")
    p.send("2027-03-13T08:00:00Z")
    assert p.sent_notices() == [1]
    payment = p.by_occurrence()["2"]
    assert payment["reason"].startswith("deferred: quiet hours 21:00-08:00 in America/New_York")
    assert clock.iso_utc(payment["send_at"]) == "2027-03-13T13:00:00Z"  # 08:00 EST


def test_quiet_hours_per_channel_of_a_rule(lite_notices: Notices) -> None:
    """``{sms: ..., email: ...}``: each channel its own; a channel not named keeps its default."""
    rules = rules_yaml(
        channels={"payment": "sms", "refill": "email", "fraud": "sms"},
        payment='    quiet_hours: {sms: "20:00-09:00", email: false}\n',
        refill="    priority: 5\n    quiet_hours: {sms: false}\n",  # email: none, as before
        fraud="    caps: false\n    quiet_hours: {email: false}\n",  # sms: the default
    )
    p = lite_notices.configure(rules=rules)
    p.notice(1, 7, "payment", "2027-03-12 20:30")  # 01:30Z Saturday
    p.notice(2, 7, "refill", "2027-03-12 20:30")
    p.notice(3, 7, "fraud", "2027-03-12 20:30")
    p.scan("2027-03-12T12:00:00Z")
    p.send("2027-03-13T01:30:00Z")
    rows = p.by_occurrence()
    assert sorted(p.sent_notices()) == [2, 3]  # 20:30 is outside the SMS default (21:00-08:00)
    assert clock.iso_utc(rows["1"]["send_at"]) == "2027-03-13T14:00:00Z"  # 09:00 EST
    assert "quiet hours 20:00-09:00" in rows["1"]["reason"]


NIGHTS = pytest.mark.parametrize(
    ("zone", "due", "now", "until"),
    [
        # Spring forward: 01:30 EST; 09:00 that morning is EDT.
        ("America/New_York", "2027-03-14 01:30", "2027-03-14T06:30:00Z", "2027-03-14T13:00:00Z"),
        # Fall back: 01:30 EDT (the first one); 09:00 that morning is EST.
        ("America/New_York", "2027-11-07 01:30", "2027-11-07T05:30:00Z", "2027-11-07T14:00:00Z"),
        # The recipient's zone decides: the same night in Los Angeles.
        ("America/Los_Angeles", "2027-03-14 01:30", "2027-03-14T09:30:00Z", "2027-03-14T16:00:00Z"),
        # Berlin changes two weeks later (28 March): 09:00 CEST is 07:00Z.
        ("Europe/Berlin", "2027-03-28 01:30", "2027-03-28T00:30:00Z", "2027-03-28T07:00:00Z"),
    ],
    ids=["new-york-spring", "new-york-fall", "los-angeles-spring", "berlin-spring"],
)


@NIGHTS
def test_per_rule_quiet_hours_end_at_the_right_instant_on_dst_nights(
    notices: Notices, zone: str, due: str, now: str, until: str
) -> None:
    rules = rules_yaml(channels="sms", payment='    quiet_hours: "21:00-09:00"\n')
    p = notices.configure(rules=rules)
    p.customer(7, zone)
    p.notice(1, 7, "payment", due)
    p.scan("2027-03-01T12:00:00Z" if due < "2027-11" else "2027-11-01T12:00:00Z")
    p.send(now)
    row = p.by_occurrence()["1"]
    assert clock.iso_utc(row["planned_at"]) == now
    assert (row["status"], clock.iso_utc(row["send_at"])) == ("pending", until)
    assert f"quiet hours 21:00-09:00 in {zone} for sms" in row["reason"]
    p.send(until)
    assert p.sent_notices() == [1]
