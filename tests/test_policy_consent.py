"""Address and consent at send time (:mod:`reminders.policies.consent`): the channel a reminder
goes by, from its ``channel_index`` on. An unusable address, an opt-out or a preference turned
off skips a channel; the first one left is used, on its own queue; with none left the reminder
fails when an address was unusable and is canceled when the customer said no.

The policy itself answers about one channel; :func:`reminders.policies.decide` asks it again
about the next one after a skip, which is what the second table shows.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from reminders.consent import View
from reminders.policies import Cancel, Decision, Fail, Move, Skip, consent, decide
from tests.rule_objects import context, load_rule

NOW = datetime(2027, 3, 13, 15, tzinfo=UTC)  # Saturday 10:00 in New York: no quiet hours
PHONE = "+12125550100"
SMS_STOPPED = View(stopped={("sms", PHONE): "stop"})
EMAIL_STOPPED = View(stopped={("email", "ann@example.com"): "unsubscribe"})
SMS_OFF = View(choices={"7": {("refill-due", "sms"): False}})
EMAIL_OFF = View(choices={"7": {("*", "email"): False}})
ALL_OFF = View(choices={"7": {("*", "*"): False}})
MOVED = {"channel_index": 1, "reason": "sms: no phone number; sending by email"}


def ask(
    tmp_path: Path,
    *,
    queue: str = "sms",
    values: dict[str, Any] | None = None,
    reminder: dict[str, Any] | None = None,
    view: View | None = None,
    chain: bool = False,
) -> Decision | None:
    config, rule = load_rule(tmp_path)
    found = context(config, rule, NOW, queue=queue, values=values, reminder=reminder, consent=view)
    if chain:
        return decide(found, [consent.policy])[0]
    return consent.policy(found)


@pytest.mark.parametrize(
    ("values", "view", "expected"),
    [
        ({}, None, None),
        ({"phone": None}, None, Skip("sms: no phone number", unusable=True)),
        ({"phone": "  "}, None, Skip("sms: no phone number", unusable=True)),
        (
            {"phone": "555-0100"},
            None,
            Skip("sms: phone number ****100 is not a valid number for US", unusable=True),
        ),
        ({"phone": "(212) 555-0100"}, None, None),  # national format, the config's region
        ({}, SMS_STOPPED, Skip("opted out of sms (stop)")),
        ({"phone": "+1 212-555-0100"}, SMS_STOPPED, Skip("opted out of sms (stop)")),
        ({}, EMAIL_STOPPED, None),  # another channel's opt-out
        ({}, SMS_OFF, Skip("refill-due by sms turned off by the customer")),
        ({}, EMAIL_OFF, None),
        ({}, ALL_OFF, Skip("refill-due by sms turned off by the customer")),
        ({"customer_id": 8}, SMS_OFF, None),  # another customer's choice
    ],
)
def test_one_channel(
    tmp_path: Path, values: dict[str, Any], view: View | None, expected: Decision | None
) -> None:
    assert ask(tmp_path, values=values, view=view) == expected


@pytest.mark.parametrize(
    ("queue", "values", "reminder", "view", "expected"),
    [
        ("sms", {}, {}, None, None),
        (
            "sms",
            {"phone": None},
            {},
            None,
            Move(1, "email", "sms: no phone number; sending by email"),
        ),
        ("sms", {}, {}, SMS_STOPPED, Move(1, "email", "opted out of sms (stop); sending by email")),
        (
            "sms",
            {},
            {},
            SMS_OFF,
            Move(1, "email", "refill-due by sms turned off by the customer; sending by email"),
        ),
        # email addresses match whatever their case
        (
            "sms",
            {"phone": None, "email": "Ann@Example.COM"},
            {},
            EMAIL_STOPPED,
            Fail(
                "failed: no usable channel (sms: no phone number; opted out of email (unsubscribe))"
            ),
        ),
        (
            "sms",
            {"phone": None, "email": None},
            {},
            None,
            Fail("failed: no usable channel (sms: no phone number; email: no email address)"),
        ),
        (
            "sms",
            {},
            {},
            ALL_OFF,
            Cancel(
                "canceled: refill-due by sms turned off by the customer; "
                "refill-due by email turned off by the customer"
            ),
        ),
        # already moved to email: sent there, or the earlier reason kept in front
        ("email", {"phone": None}, MOVED, None, None),
        (
            "email",
            {"phone": None},
            MOVED,
            EMAIL_OFF,
            Cancel(
                "sms: no phone number; sending by email; then canceled: "
                "refill-due by email turned off by the customer"
            ),
        ),
        # the rule lost a channel since: none left after its last
        ("email", {}, {"channel_index": 2}, None, Fail("failed: no channel left after email")),
        # a reminder on another channel's queue goes back to its own
        ("email", {}, {}, None, Move(0, "sms", "sending by sms")),
    ],
)
def test_the_channel_it_goes_by(
    tmp_path: Path,
    queue: str,
    values: dict[str, Any],
    reminder: dict[str, Any],
    view: View | None,
    expected: Decision | None,
) -> None:
    found = ask(tmp_path, queue=queue, values=values, reminder=reminder, view=view, chain=True)
    assert found == expected
