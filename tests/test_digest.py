"""Digests: a customer's reminders of several rules due within a window, sent as one message.

Driven through the real command line (scan, dispatch, worker) against real Redis, on SQLite and
PostgreSQL, with the notices business of the caps tests (rules ``payment``, ``refill``,
``fraud``; each notice one ``0m`` reminder at its local ``due_at``; New York). The window math is a
pure function, tested with a table across a DST change.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from reminders import replies, sendtime
from reminders.digest import window_end
from reminders.models import message
from reminders.rules import Digest
from tests.caps_fixtures import Notices, caps_redis, lite_notices, notices, rules_yaml

__all__ = ["caps_redis", "lite_notices", "notices"]

NY = sendtime.zone("America/New_York")

DIGEST = """\
digests:
  - name: daily
    rules: [payment, refill]
    window: {window}
    max_items: {max_items}
    template: daily
"""
DAILY_SMS = """\
Hi {{ customer.first_name }}, {{ digest.count }} notices:
{% for item in items %}- {{ item.rule }} {{ item.notice_id }}: {{ item.text }}
{% endfor %}"""
DAILY_EMAIL = """\
{% block subject %}{{ items | length }} notices{% endblock %}
{% block text %}{% for item in items %}{{ item.reminder.rule }}: {{ item.text }}
{% endfor %}{% endblock %}
"""
CHECK = "    check: SELECT 1 FROM notices WHERE id = :notice_id\n"


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def with_digest(
    project: Notices,
    *,
    channels: str = "sms",
    window: str = "1d",
    max_items: int = 10,
    caps: str = "",
    batch_size: int = 100,
    **extra: str,
) -> Notices:
    project.configure(caps=caps, batch_size=batch_size, rules=rules_yaml(channels, **extra)
        + DIGEST.format(window=window, max_items=max_items))  # fmt: skip
    project.write("templates/daily.sms.j2", DAILY_SMS)
    project.write("templates/daily.email.j2", DAILY_EMAIL)
    return project


def outbox(project: Notices) -> list[dict[str, Any]]:
    path = project.root / "outbox.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- the window ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "start", "end"),
    [
        ("1d", "2027-03-13T15:00:00Z", "2027-03-14T15:00:00Z"),
        ("12h", "2027-03-13T15:00:00Z", "2027-03-14T03:00:00Z"),
        # the same local day: Saturday 13 March ends at midnight EST ...
        ("day", "2027-03-13T15:00:00Z", "2027-03-14T04:59:59.999999Z"),
        # ... Sunday 14 March (23 hours: spring forward) at midnight EDT
        ("day", "2027-03-14T15:00:00Z", "2027-03-15T03:59:59.999999Z"),
        ("day", "2027-03-14T04:30:00Z", "2027-03-14T04:59:59.999999Z"),  # 23:30 on the 13th
    ],
)
def test_the_window_ends_after_its_duration_or_with_the_local_day(
    window: str, start: str, end: str
) -> None:
    digest = Digest.model_validate({"name": "d", "rules": ["a"], "window": window})
    assert window_end(digest, utc(start), NY) == utc(end)


# -- sending ------------------------------------------------------------------------------------


def test_three_reminders_of_two_rules_go_as_one_message_each_sent_once(notices: Notices) -> None:
    project = with_digest(notices)
    project.notice(1, 1, "payment", "2027-03-10 10:00")
    project.notice(2, 1, "refill", "2027-03-10 14:00")
    project.notice(3, 1, "payment", "2027-03-11 09:30")  # within 1d of the first
    project.notice(4, 1, "payment", "2027-03-11 11:00")  # past it: a later message
    project.notice(5, 1, "fraud", "2027-03-10 10:00")  # not in the digest: its own message
    project.notice(6, 2, "refill", "2027-03-10 12:00")  # another customer
    project.scan("2027-03-10T12:00:00Z")
    project.send("2027-03-10T15:00:00Z")  # 10:00 in New York
    lines = outbox(project)
    assert len(lines) == 2
    digest = next(line for line in lines if line["rule"] == "payment")
    assert digest["body"].splitlines() == [
        "Hi C1, 3 notices:",
        "- payment 1: Hi C1, notice 1.",
        "- refill 2: Hi C1, notice 2.",
        "- payment 3: Hi C1, notice 3.",
    ]
    assert next(line for line in lines if line["rule"] == "fraud")["body"] == "Hi C1, notice 5."
    rems = project.by_occurrence()
    sent = [rems[o] for o in ("1", "2", "3")]
    assert {r["status"] for r in sent} == {"sent"}
    assert len({r["provider_id"] for r in sent}) == 1
    assert {r["digest_id"] for r in sent} == {rems["1"]["id"]}
    assert rems["4"]["status"] == "pending" and rems["6"]["status"] == "pending"
    rows = project.rows(message)
    same = sorted(m["reminder_id"] for m in rows if m["provider_id"] == sent[0]["provider_id"])
    assert same == sorted(r["id"] for r in sent)
    # Sent once: a second pass (the queued ones' old jobs, a rescan) sends nothing more.
    project.scan("2027-03-10T15:01:00Z")
    project.send("2027-03-10T15:01:00Z")
    assert len(outbox(project)) == 2
    # The next day, the rest goes in its own time.
    project.send("2027-03-11T16:00:00Z")
    assert len(outbox(project)) == 4
    assert project.by_occurrence()["4"]["status"] == "sent"


def test_a_reminder_another_job_holds_goes_in_one_digest_only(notices: Notices) -> None:
    project = with_digest(notices, batch_size=1)  # one reminder a job: two jobs
    project.notice(1, 1, "payment", "2027-03-10 10:00")
    project.notice(2, 1, "refill", "2027-03-10 10:00")
    project.scan("2027-03-10T12:00:00Z")
    project.ok("dispatch", now="2027-03-10T15:00:00Z")
    jobs = {r["job_id"] for r in project.by_occurrence().values()}
    assert len(jobs) == 2
    project.ok("worker", "--burst", now="2027-03-10T15:00:00Z")
    (line,) = outbox(project)  # the first job took both; the second found nothing to claim
    assert line["body"].splitlines()[0] == "Hi C1, 2 notices:"
    rems = project.by_occurrence()
    assert {r["status"] for r in rems.values()} == {"sent"}
    assert len({r["provider_id"] for r in rems.values()}) == 1


def test_one_reminder_left_goes_with_its_own_template(lite_notices: Notices) -> None:
    project = with_digest(lite_notices)
    project.notice(1, 1, "payment", "2027-03-10 10:00")
    project.notice(2, 1, "payment", "2027-03-12 10:00")  # outside the window
    project.scan("2027-03-10T12:00:00Z")
    project.send("2027-03-10T15:00:00Z")
    assert [line["body"] for line in outbox(project)] == ["Hi C1, notice 1."]
    assert project.by_occurrence()["1"]["digest_id"] is None


def test_an_item_whose_check_finds_no_row_is_canceled_and_left_out(notices: Notices) -> None:
    project = with_digest(notices, refill=CHECK)
    project.notice(1, 1, "payment", "2027-03-10 10:00")
    project.notice(2, 1, "refill", "2027-03-10 11:00")
    project.notice(3, 1, "refill", "2027-03-10 12:00")
    project.scan("2027-03-10T12:00:00Z")
    project.sql("DELETE FROM notices WHERE id = 2")  # done meanwhile
    project.send("2027-03-10T15:00:00Z")
    (line,) = outbox(project)
    assert line["body"].splitlines()[1:] == [
        "- payment 1: Hi C1, notice 1.",
        "- refill 3: Hi C1, notice 3.",
    ]
    rems = project.by_occurrence()
    assert rems["2"]["status"] == "canceled"
    assert rems["2"]["reason"] == "canceled: the rule's check query returned no row"
    assert rems["1"]["status"] == rems["3"]["status"] == "sent"


def test_when_the_check_leaves_one_item_it_goes_with_its_own_template(
    lite_notices: Notices,
) -> None:
    project = with_digest(lite_notices, refill=CHECK)
    project.notice(1, 1, "payment", "2027-03-10 10:00")
    project.notice(2, 1, "refill", "2027-03-10 11:00")
    project.scan("2027-03-10T12:00:00Z")
    project.sql("DELETE FROM notices WHERE id = 2")
    project.send("2027-03-10T15:00:00Z")
    assert [line["body"] for line in outbox(project)] == ["Hi C1, notice 1."]
    assert project.by_occurrence()["2"]["status"] == "canceled"


def test_a_reminder_the_customer_snoozed_is_not_sent_earlier_in_a_digest(
    notices: Notices,
) -> None:
    project = with_digest(notices)
    project.notice(1, 1, "payment", "2027-03-10 10:00")
    project.notice(2, 1, "refill", "2027-03-10 09:00")
    project.scan("2027-03-10T12:00:00Z")
    # The customer answered LATER to the refill notice: five hours later.
    with project.state.begin() as conn:
        moved = replies.snooze_occurrence(
            conn, "refill", "2", timedelta(hours=5), f"{replies.SNOOZED}replied LATER",
            utc("2027-03-10T14:00:00Z"),
        )  # fmt: skip
    assert moved == utc("2027-03-10T19:00:00Z")
    project.send("2027-03-10T15:00:00Z")
    assert [line["body"] for line in outbox(project)] == ["Hi C1, notice 1."]
    assert project.by_occurrence()["2"]["status"] == "pending"
    project.send("2027-03-10T19:00:00Z")  # when the customer asked for it
    assert [line["body"] for line in outbox(project)][1:] == ["Hi C1, notice 2."]


def test_max_items_caps_the_digest_and_the_rest_waits(lite_notices: Notices) -> None:
    project = with_digest(lite_notices, max_items=2)
    for nid, hour in ((1, 10), (2, 11), (3, 12)):
        project.notice(nid, 1, "payment", f"2027-03-10 {hour}:00")
    project.scan("2027-03-10T12:00:00Z")
    project.send("2027-03-10T15:00:00Z")
    (line,) = outbox(project)
    assert line["body"].splitlines()[0] == "Hi C1, 2 notices:"
    rems = project.by_occurrence()
    assert [rems[o]["status"] for o in ("1", "2", "3")] == ["sent", "sent", "pending"]


def test_a_digest_due_in_quiet_hours_waits_for_their_end_and_goes_once(notices: Notices) -> None:
    project = with_digest(notices, window="day", refill="    quiet_hours: false\n")
    project.notice(1, 1, "payment", "2027-03-10 21:30")  # SMS quiet hours: 21:00-08:00
    project.notice(2, 1, "payment", "2027-03-11 07:30")
    project.notice(3, 1, "refill", "2027-03-11 11:00")
    project.scan("2027-03-10T12:00:00Z")
    project.send("2027-03-11T02:30:00Z")  # 21:30: deferred to 08:00, nothing sent
    assert outbox(project) == []
    first = project.by_occurrence()["1"]
    assert first["status"] == "pending" and first["send_at"] == utc("2027-03-11T13:00:00Z")
    project.send("2027-03-11T12:30:00Z")  # 07:30: the second, deferred to 08:00 as well
    assert outbox(project) == []
    project.send("2027-03-11T13:00:00Z")  # 08:00: one message, the same day's third too
    (line,) = outbox(project)
    assert line["body"].splitlines()[0] == "Hi C1, 3 notices:"
    assert {r["status"] for r in project.by_occurrence().values()} == {"sent"}


def test_the_caps_count_a_digest_as_one_message(notices: Notices) -> None:
    project = with_digest(notices, caps="caps:\n  per_day: 2\n")
    project.notice(1, 1, "payment", "2027-03-10 10:00")
    project.notice(2, 1, "refill", "2027-03-10 10:30")
    project.notice(3, 1, "payment", "2027-03-10 11:00")
    project.notice(4, 1, "fraud", "2027-03-10 12:00")  # exempt, not in the digest
    project.notice(5, 1, "payment", "2027-03-11 12:00")  # the second message of the day
    project.notice(6, 1, "payment", "2027-03-11 13:00")  # with it
    project.scan("2027-03-10T12:00:00Z")
    project.send("2027-03-10T15:00:00Z")
    project.send("2027-03-10T17:00:00Z")
    # Day one: one digest of three, and the fraud notice outside the caps.
    assert len(outbox(project)) == 2
    project.send("2027-03-11T17:00:00Z")
    # Day two: the second message of the local day goes (a cap of 2 a day, the digest of day
    # one counted once ... and the 10th's digest is not today's anyway).
    assert len(outbox(project)) == 3
    rems = project.by_occurrence()
    assert {rems[o]["status"] for o in ("5", "6")} == {"sent"}


def test_the_caps_count_each_digest_once_within_a_day(lite_notices: Notices) -> None:
    project = with_digest(lite_notices, window="2h", caps="caps:\n  per_day: 2\n")
    project.notice(1, 1, "payment", "2027-03-10 10:00")
    project.notice(2, 1, "refill", "2027-03-10 10:30")  # digest one: two items
    project.notice(3, 1, "payment", "2027-03-10 13:00")
    project.notice(4, 1, "refill", "2027-03-10 13:30")  # digest two: two items
    project.notice(5, 1, "payment", "2027-03-10 16:00")  # a third message: over the cap
    project.scan("2027-03-10T12:00:00Z")
    for at in ("2027-03-10T15:00:00Z", "2027-03-10T18:00:00Z", "2027-03-10T21:00:00Z"):
        project.send(at)
    # Four reminders sent in two messages; a count of reminders would have held digest two.
    assert len(outbox(project)) == 2
    rems = project.by_occurrence()
    assert [rems[o]["status"] for o in "1234"] == ["sent"] * 4
    assert rems["5"]["status"] == "pending"
    assert rems["5"]["reason"].startswith("deferred: frequency cap (2 a day)")


@pytest.mark.parametrize(
    ("kinds", "template"),
    [
        (("fraud", "fraud"), DAILY_SMS),  # a rule outside any digest: alone, as before
        (("payment", "refill"), "{{ items[5].text }}\n"),  # the digest fails: each alone
    ],
)
def test_reminders_without_a_digest_go_alone_in_the_same_burst(
    lite_notices: Notices, kinds: tuple[str, str], template: str
) -> None:
    project = with_digest(lite_notices)
    project.write("templates/daily.sms.j2", template)
    for nid, kind in enumerate(kinds, 1):
        project.notice(nid, 1, kind, "2027-03-10 10:00")
    project.scan("2027-03-10T12:00:00Z")
    project.send("2027-03-10T15:00:00Z")
    assert sorted(line["body"] for line in outbox(project)) == [
        "Hi C1, notice 1.",
        "Hi C1, notice 2.",
    ]
    assert {r["status"] for r in project.by_occurrence().values()} == {"sent"}


def test_an_email_digest_has_its_subject_and_items(lite_notices: Notices) -> None:
    project = with_digest(lite_notices, channels="email")
    project.notice(1, 1, "payment", "2027-03-10 10:00")
    project.notice(2, 1, "refill", "2027-03-10 12:00")
    project.scan("2027-03-10T12:00:00Z")
    project.send("2027-03-10T15:00:00Z")
    (line,) = outbox(project)
    assert line["subject"] == "2 notices"
    assert line["body"].splitlines() == ["payment: Hi C1, notice 1.", "refill: Hi C1, notice 2."]


# -- validate, preview, forecast ------------------------------------------------------------------


def test_validate_accepts_a_digest_and_names_the_place_of_each_mistake(
    lite_notices: Notices,
) -> None:
    project = with_digest(lite_notices)
    assert project.run("validate", "--offline").code == 0
    bad = DIGEST.format(window="1d", max_items=10).replace("[payment, refill]", "[payment, refil]")
    project.write("rules/notices.yaml", rules_yaml("sms") + bad)
    result = project.run("validate", "--offline")
    assert result.code == 2
    assert (
        'rules/notices.yaml:42: digest daily: no rule named "refil" (rules: fraud, payment, refill)'
        in result.err
    )
    twice = DIGEST.format(window="1d", max_items=10) + (
        "  - name: other\n    rules: [refill]\n    window: day\n    template: daily\n"
    )
    project.write("rules/notices.yaml", rules_yaml("sms") + twice)
    result = project.run("validate", "--offline")
    assert "digest other: rule refill is already in digest daily (rules/notices.yaml:41)" in (
        result.err
    )
    wrong = DIGEST.format(window="a week", max_items=1)
    project.write("rules/notices.yaml", rules_yaml("sms") + wrong)
    result = project.run("validate", "--offline")
    assert 'rules/notices.yaml:43: digest daily: window: "a week" is not a duration' in result.err
    assert "or day (the same local day)" in result.err
    assert "max_items: 1 is not allowed (max_items: a whole number, 2 or more)" in result.err


def test_validate_names_what_a_digest_template_reads_that_it_will_not_have(
    lite_notices: Notices,
) -> None:
    project = with_digest(lite_notices)
    project.write("templates/daily.sms.j2", "Hi {{ first_name }}\n{{ items | length }}\n")
    project.write("templates/daily.es.sms.j2", "Hola {{ customer.first_name }} {{ notice_id }}\n")
    result = project.run("validate", "--offline")
    assert result.code == 2
    assert "templates/daily.sms.j2:1: first_name is not a name digest daily's template has" in (
        result.err
    )
    assert "templates/daily.es.sms.j2:1: notice_id is not a name" in result.err
    assert "item.notice_id" in result.err
    (project.root / "templates/daily.email.j2").unlink()
    result = project.run("validate", "--offline")
    assert "templates/daily.email.j2: template file is missing" not in result.err  # sms only
    project.write(
        "rules/notices.yaml", rules_yaml("email") + DIGEST.format(window="1d", max_items=3)
    )
    result = project.run("validate", "--offline")
    assert "templates/daily.email.j2: template file is missing" in result.err


def test_preview_shows_a_digest_for_pending_reminders_and_sends_nothing(
    lite_notices: Notices,
) -> None:
    project = with_digest(lite_notices)
    project.notice(1, 1, "payment", "2027-03-10 10:00")
    project.notice(2, 1, "refill", "2027-03-10 14:00")
    project.notice(3, 2, "payment", "2027-03-10 10:00")  # alone: no digest to show
    project.scan("2027-03-10T12:00:00Z")
    shown = project.ok("preview", "--digest", "daily", now="2027-03-10T12:00:00Z").out
    assert "== digest daily (customer 1) sms, 2 reminders from 2027-03-10T15:00:00Z" in shown
    assert "items: payment 1 0m; refill 2 0m" in shown
    assert "- refill 2: Hi C1, notice 2." in shown
    assert "customer 2" not in shown
    assert outbox(project) == []
    (item,) = project.ok("preview", "--digest", "daily", "--json").json_lines()
    assert item["digest"] == "daily" and item["segments"] == 1
    unknown = project.run("preview", "--digest", "weekly")
    assert unknown.code == 2 and 'no digest named "weekly" (digests: daily)' in unknown.err
    assert project.run("preview").code == 2


def test_forecast_counts_what_would_go_inside_a_digest(lite_notices: Notices) -> None:
    project = with_digest(lite_notices)
    project.notice(1, 1, "payment", "2027-03-10 10:00")
    project.notice(2, 1, "refill", "2027-03-10 09:30")  # leads: the payment goes inside it
    project.notice(3, 2, "payment", "2027-03-10 10:00")
    project.notice(4, 2, "payment", "2027-03-10 11:00")  # inside customer 2's first
    project.scan("2027-03-10T12:00:00Z")
    got = project.ok("forecast", "payment", "--days", "2", "--json").json_lines()[0]
    assert got["digest"] == "daily"
    first = got["days"][0]
    assert (first["sms"], first["digest"]) == (1, 2)
    table = project.ok("forecast", "payment", "--days", "2").out
    assert "in digest daily" in table
    plain = project.ok("forecast", "fraud", "--days", "2", "--json").json_lines()[0]
    assert plain["digest"] is None and "digest" not in plain["days"][0]


def test_the_rules_may_be_several_places_and_a_missing_one_is_named(
    lite_notices: Notices,
) -> None:
    project = with_digest(lite_notices)
    text = project.read("rules/notices.yaml")
    rules, digest = text.split("digests:\n")
    project.write("rules/notices.yaml", rules)
    project.write("extra/digest.yaml", "digests:\n" + digest)
    config = project.read("config.yaml")
    project.write(
        "config.yaml", config.replace("rules: rules/", "rules: [rules/, extra/digest.yaml]")
    )
    assert "1 digest(s)" in project.ok("validate", "--offline").out
    project.write("config.yaml", config.replace("rules: rules/", "rules: [rules/, nowhere/]"))
    missing = project.run("validate", "--offline")
    assert missing.code == 2 and "no rules at nowhere (config key rules)" in missing.err
