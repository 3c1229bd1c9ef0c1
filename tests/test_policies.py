"""The send-time policies in order (:mod:`reminders.policies`): the first decision wins, and a
skipped channel is asked about again from the first policy. Each policy has its own tests in
``tests/test_policy_<name>.py``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from reminders.consent import View
from reminders.policies import (
    POLICIES,
    Cancel,
    Candidate,
    Context,
    Defer,
    Move,
    Skip,
    consent,
    decide,
    grace,
    quiet_hours,
    recheck,
)
from tests.rule_objects import context, load_rule, refills_with

NIGHT = datetime(2027, 3, 13, 3, tzinfo=UTC)  # Friday 22:00 in New York: SMS quiet hours
DAY = datetime(2027, 3, 13, 15, tzinfo=UTC)  # Saturday 10:00


def test_the_order() -> None:
    assert (grace.policy, consent.policy, quiet_hours.policy, recheck.policy) == POLICIES


def test_nothing_against_it_sends_by_the_queues_channel(tmp_path: Path) -> None:
    config, rule = load_rule(tmp_path)
    decision, found = decide(context(config, rule, DAY))
    assert decision is None
    assert found.candidate == Candidate(0, "sms", "+12125550100")


def test_the_first_decision_wins(tmp_path: Path) -> None:
    config, rule = load_rule(tmp_path, refills_with(check="SELECT 1"))
    # Expired and in quiet hours: expired. Its business DB is never asked (it would raise).
    late = context(config, rule, NIGHT, reminder={"send_at": NIGHT - timedelta(days=2)})
    decision, _ = decide(late)
    assert decision == Cancel("expired: send time 2027-03-11T03:00:00Z is more than 1d ago")
    decision, _ = decide(context(config, rule, NIGHT))
    assert isinstance(decision, Defer)


def test_a_skipped_channel_moves_on_and_every_policy_is_asked_again(tmp_path: Path) -> None:
    config, rule = load_rule(tmp_path, refills_with(quiet_hours='"21:00-09:00"'))
    stopped = View(stopped={("sms", "+12125550100"): "stop"})
    # On the email queue (a retry found it there): SMS is skipped, email is in quiet hours.
    found = context(config, rule, NIGHT, queue="email", consent=stopped)
    decision, where = decide(found)
    assert decision == Defer(
        datetime(2027, 3, 13, 14, tzinfo=UTC),
        "deferred: quiet hours 21:00-09:00 in America/New_York for email; "
        "send at 2027-03-13T14:00:00Z",
    )
    assert where.candidate == Candidate(1, "email", "ann@example.com")
    assert where.skipped == (Skip("opted out of sms (stop)"),)
    # On the SMS queue it moves to email's, where quiet hours are asked.
    decision, _ = decide(context(config, rule, NIGHT, consent=stopped))
    assert decision == Move(1, "email", "opted out of sms (stop); sending by email")


def test_a_policy_is_a_function_of_the_context(tmp_path: Path) -> None:
    config, rule = load_rule(tmp_path)
    asked: list[str] = []

    def note(found: Context) -> None:
        asked.append(found.candidate.channel if found.candidate else "-")

    def no_sms(found: Context) -> Skip | None:
        sms = found.candidate is not None and found.candidate.channel == "sms"
        return Skip("no sms today") if sms else None

    decision, _ = decide(context(config, rule, DAY, queue="email"), [note, no_sms, note])
    assert decision is None
    assert asked == ["sms", "email", "email"]
