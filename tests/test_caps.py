"""Frequency caps: counted in the customer's local days and weeks, the extra messages deferred to
the next allowed day's opening (never dropped), higher priorities first, exempt rules untouched,
and never exceeded by workers running at once.

The calendar and the allotment are pure functions, tested with tables in America/New_York across
the 2027 DST changes (spring forward on Sunday 14 March: a 23-hour day; fall back on Sunday 7
November: a 25-hour day). The rest drives the real command line (scan, dispatch, worker) against
real Redis, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from reminders import caps, clock, sendtime
from reminders.config import CapsConfig
from reminders.models import reminder
from tests.caps_fixtures import Notices, caps_redis, lite_notices, notices, rules_yaml
from tests.delivery_fixtures import finish

__all__ = ["caps_redis", "lite_notices", "notices"]

NY = sendtime.zone("America/New_York")
WINDOW = sendtime.parse_window("09:00-20:00")


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


# -- the calendar -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("day", "zone", "expected"),
    [
        (date(2027, 3, 13), "America/New_York", "2027-03-13T05:00:00Z"),  # EST
        (date(2027, 3, 14), "America/New_York", "2027-03-14T05:00:00Z"),  # a 23-hour day ...
        (date(2027, 3, 15), "America/New_York", "2027-03-15T04:00:00Z"),  # ... EDT after it
        (date(2027, 11, 7), "America/New_York", "2027-11-07T04:00:00Z"),  # a 25-hour day ...
        (date(2027, 11, 8), "America/New_York", "2027-11-08T05:00:00Z"),  # ... EST after it
        # Havana springs forward at midnight: the day begins at 01:00 CDT.
        (date(2027, 3, 14), "America/Havana", "2027-03-14T05:00:00Z"),
        (date(2027, 3, 14), "Europe/Berlin", "2027-03-13T23:00:00Z"),
    ],
)
def test_a_local_day_begins_at_its_midnight_in_utc(day: date, zone: str, expected: str) -> None:
    assert clock.iso_utc(caps.start_of(day, sendtime.zone(zone))) == expected


@pytest.mark.parametrize(
    ("day", "window", "expected"),
    [
        (date(2027, 3, 13), "09:00-20:00", "2027-03-13T14:00:00Z"),
        (date(2027, 3, 14), "09:00-20:00", "2027-03-14T13:00:00Z"),  # EDT from 03:00
        (date(2027, 11, 6), "09:00-20:00", "2027-11-06T13:00:00Z"),
        (date(2027, 11, 7), "09:00-20:00", "2027-11-07T14:00:00Z"),  # EST from 02:00
        (date(2027, 3, 14), "02:30-20:00", "2027-03-14T07:30:00Z"),  # in the gap: 03:30 EDT
        (date(2027, 11, 7), "01:30-20:00", "2027-11-07T05:30:00Z"),  # ambiguous: the first
    ],
)
def test_the_next_opening_is_the_window_start_that_local_day(
    day: date, window: str, expected: str
) -> None:
    assert clock.iso_utc(caps.opening(day, NY, sendtime.parse_window(window))) == expected


@pytest.mark.parametrize(
    ("moment", "unit", "week_starts", "first", "following"),
    [
        # Saturday 23:30 EST is still Saturday in New York, though Sunday in UTC.
        ("2027-03-14T04:30:00Z", "day", "monday", date(2027, 3, 13), date(2027, 3, 14)),
        ("2027-03-15T03:59:00Z", "day", "monday", date(2027, 3, 14), date(2027, 3, 15)),
        ("2027-11-08T04:30:00Z", "day", "monday", date(2027, 11, 7), date(2027, 11, 8)),
        ("2027-03-13T15:00:00Z", "week", "monday", date(2027, 3, 8), date(2027, 3, 15)),
        ("2027-03-13T15:00:00Z", "week", "sunday", date(2027, 3, 7), date(2027, 3, 14)),
        ("2027-03-14T15:00:00Z", "week", "sunday", date(2027, 3, 14), date(2027, 3, 21)),
        ("2027-03-15T03:30:00Z", "week", "monday", date(2027, 3, 8), date(2027, 3, 15)),
    ],
)
def test_days_and_weeks_are_the_customers_local_ones(
    moment: str, unit: str, week_starts: str, first: date, following: date
) -> None:
    assert caps.period(utc(moment), NY, unit, week_starts) == first
    assert caps.next_period(utc(moment), NY, unit, week_starts) == following


# -- the allotment --------------------------------------------------------------------------------


def due(rid: int, priority: int = 0, at: str = "2027-03-13T15:00:00Z", customer: str = "7") -> Any:
    return caps.Due(rid, customer, priority, utc(at), NY, WINDOW)


def test_higher_priority_first_then_earlier_send_time_then_older() -> None:
    now = utc("2027-03-13T15:00:00Z")  # Saturday 10:00 EST
    mine = [
        due(1, at="2027-03-13T15:00:00Z"),
        due(2, at="2027-03-13T14:30:00Z"),  # earlier: before 1
        due(3, priority=5, at="2027-03-13T15:00:00Z"),  # higher: before all
        due(4, at="2027-03-13T15:00:00Z"),  # same as 1, younger: after it
    ]
    held = caps.allot(CapsConfig(per_day=2), now, mine, [], {})
    # Sunday 09:00 EDT: the spring-forward morning, 13:00Z (not 14:00Z, as in EST).
    assert [(h.id, clock.iso_utc(h.send_at)) for h in held] == [
        (1, "2027-03-14T13:00:00Z"),
        (4, "2027-03-14T13:00:00Z"),
    ]
    assert held[0].reason == "deferred: frequency cap (2 a day); send at 2027-03-14T13:00:00Z"


def test_what_was_sent_counts_within_the_local_day_even_a_25_hour_one() -> None:
    # Sunday 7 November: 00:30 EDT is 04:30Z; 23:30 EST is 04:30Z the next UTC day, 24 hours on
    # the clock later, still Sunday in New York.
    now = utc("2027-11-08T04:30:00Z")
    config = CapsConfig(per_day=1)
    sent_that_morning = {"7": [utc("2027-11-07T04:30:00Z")]}
    (held,) = caps.allot(config, now, [due(1, at="2027-11-08T04:30:00Z")], [], sent_that_morning)
    assert clock.iso_utc(held.send_at) == "2027-11-08T14:00:00Z"  # Monday 09:00 EST
    # The evening before (Saturday 23:59 EDT) was another day.
    saturday = {"7": [utc("2027-11-07T03:59:00Z")]}
    assert caps.allot(config, now, [due(1, at="2027-11-08T04:30:00Z")], [], saturday) == []


def test_the_short_spring_day_counts_from_its_own_midnight() -> None:
    now = utc("2027-03-15T03:59:00Z")  # Sunday 23:59 EDT
    config = CapsConfig(per_day=1)
    at_midnight = {"7": [utc("2027-03-14T05:00:00Z")]}  # Sunday 00:00 EST
    (held,) = caps.allot(config, now, [due(1, at="2027-03-15T03:59:00Z")], [], at_midnight)
    assert clock.iso_utc(held.send_at) == "2027-03-15T13:00:00Z"  # Monday 09:00 EDT
    before = {"7": [utc("2027-03-14T04:59:00Z")]}  # Saturday 23:59 EST
    assert caps.allot(config, now, [due(1, at="2027-03-15T03:59:00Z")], [], before) == []


def test_a_weekly_cap_defers_to_the_next_week_and_the_later_cap_wins() -> None:
    now = utc("2027-03-13T15:00:00Z")  # Saturday
    this_week = {"7": [utc("2027-03-09T15:00:00Z"), utc("2027-03-10T15:00:00Z")]}
    config = CapsConfig(per_day=1, per_week=3)
    (held,) = caps.allot(config, now, [due(1), due(2)], [], this_week)
    # One more fits the week (and the day); the next is over both: Monday's opening.
    assert held.id == 2
    assert held.reason == "deferred: frequency cap (3 a week); send at 2027-03-15T13:00:00Z"
    sunday_weeks = CapsConfig(per_week=3, week_starts="sunday")
    (held,) = caps.allot(sunday_weeks, now, [due(1), due(2)], [], this_week)
    assert clock.iso_utc(held.send_at) == "2027-03-14T13:00:00Z"
    # Last week's messages do not count.
    last_week = {"7": [utc("2027-03-07T15:00:00Z")] * 3}
    assert caps.allot(config, now, [due(1)], [], last_week) == []


def test_a_higher_ranked_reminder_held_elsewhere_keeps_its_place() -> None:
    now = utc("2027-03-13T15:00:00Z")
    config = CapsConfig(per_day=1)
    elsewhere = [caps.Due(9, "7", 5, utc("2027-03-13T15:00:00Z"))]
    (held,) = caps.allot(config, now, [due(1)], elsewhere, {})
    # Not deferred to tomorrow: #9 may yet not be sent (quiet hours, an opt-out).
    assert held.send_at == now + caps.WAIT
    assert held.reason == (
        "deferred: frequency cap (1 a day): reminder #9 goes first; send at 2027-03-13T15:01:00Z"
    )
    lower = [caps.Due(9, "7", 0, utc("2027-03-13T15:00:00Z"))]  # younger, same rank otherwise
    assert caps.allot(config, now, [due(1)], lower, {}) == []
    # Other customers' reminders compete for nothing.
    theirs = [caps.Due(9, "8", 5, utc("2027-03-13T15:00:00Z"))]
    assert caps.allot(config, now, [due(1)], theirs, {}) == []


# -- end to end -----------------------------------------------------------------------------------

WEEKENDS = pytest.mark.parametrize(
    ("saturday", "scan_at", "send_at", "sunday_opening"),
    [
        ("2027-03-13", "2027-03-13T12:00:00Z", "2027-03-13T15:00:00Z", "2027-03-14T13:00:00Z"),
        ("2027-11-06", "2027-11-06T11:00:00Z", "2027-11-06T14:00:00Z", "2027-11-07T14:00:00Z"),
    ],
    ids=["spring-forward", "fall-back"],
)


@WEEKENDS
def test_three_due_with_two_a_day_sends_two_and_defers_the_third_to_sundays_opening(
    notices: Notices, saturday: str, scan_at: str, send_at: str, sunday_opening: str
) -> None:
    p = notices.configure(caps="caps: {per_day: 2}\n")
    p.notice(1, 7, "payment", f"{saturday} 09:30")
    p.notice(2, 7, "payment", f"{saturday} 10:00")
    p.notice(3, 7, "refill", f"{saturday} 10:00")  # priority 5
    p.notice(4, 7, "fraud", f"{saturday} 10:00")  # caps: false
    p.notice(5, 8, "payment", f"{saturday} 10:00")  # another customer: a cap of their own
    p.scan(scan_at)
    p.send(send_at)
    assert sorted(p.sent_notices()) == [1, 3, 4, 5]
    rows = p.by_occurrence()
    later = rows["2"]
    assert later["status"] == "pending"
    assert clock.iso_utc(later["send_at"]) == sunday_opening
    assert later["reason"] == f"deferred: frequency cap (2 a day); send at {sunday_opening}"
    assert clock.iso_utc(later["planned_at"]) == send_at  # a rescan compares this, not send_at
    assert p.reasons("2")[-1] == later["reason"]
    # A rescan leaves the deferral alone; nothing more goes out before Sunday's opening.
    p.ok("scan", now=send_at)
    before = utc(sunday_opening) - timedelta(seconds=1)
    p.send(clock.iso_utc(before))
    assert sorted(p.sent_notices()) == [1, 3, 4, 5]
    p.send(sunday_opening)
    assert p.sent_notices()[-1] == 2
    assert p.by_occurrence()["2"]["status"] == "sent"


def test_an_exempt_rule_is_neither_deferred_nor_counted(lite_notices: Notices) -> None:
    p = lite_notices.configure(caps="caps: {per_day: 1}\n")
    for nid in (1, 2, 3):
        p.notice(nid, 7, "fraud", "2027-03-13 10:00")
    p.notice(4, 7, "payment", "2027-03-13 10:00")
    p.notice(5, 7, "payment", "2027-03-13 10:05")
    p.scan("2027-03-13T12:00:00Z")
    p.send("2027-03-13T15:05:00Z")
    # Three fraud alerts at once, and still one payment notice: the fraud alerts do not count.
    assert sorted(p.sent_notices()) == [1, 2, 3, 4]
    rows = p.by_occurrence()
    assert rows["5"]["reason"].startswith("deferred: frequency cap (1 a day)")
    assert all(not (r or "").startswith("deferred") for n in "123" for r in p.reasons(n))


def test_a_send_with_no_answer_counts_against_the_cap(lite_notices: Notices) -> None:
    p = lite_notices.configure(caps="caps: {per_day: 1}\n")
    p.notice(1, 7, "payment", "2027-03-13 10:00")
    p.notice(2, 7, "payment", "2027-03-13 10:05")
    p.scan("2027-03-13T12:00:00Z")
    with p.state.begin() as conn:  # as a send that got no answer leaves it: it may have arrived
        conn.execute(
            reminder.update()
            .where(reminder.c.occurrence == "1")
            .values(status="unknown", updated_at=utc("2027-03-13T15:00:00Z"))
        )
    p.send("2027-03-13T15:05:00Z")
    assert p.sent_notices() == []
    assert p.by_occurrence()["2"]["reason"].startswith("deferred: frequency cap (1 a day)")


@pytest.mark.parametrize(
    ("week_starts", "opening"),
    [("monday", "2027-03-15T13:00:00Z"), ("sunday", "2027-03-14T13:00:00Z")],
)
def test_a_weekly_cap_defers_to_the_next_local_week(
    lite_notices: Notices, week_starts: str, opening: str
) -> None:
    p = lite_notices.configure(caps=f"caps: {{per_week: 2, week_starts: {week_starts}}}\n")
    p.notice(1, 7, "payment", "2027-03-11 10:00")  # Thursday
    p.notice(2, 7, "payment", "2027-03-13 10:00")  # Saturday
    p.notice(3, 7, "payment", "2027-03-13 10:05")
    p.scan("2027-03-11T12:00:00Z")
    p.send("2027-03-11T15:00:00Z")
    p.send("2027-03-13T15:05:00Z")
    assert p.sent_notices() == [1, 2]
    third = p.by_occurrence()["3"]
    assert third["reason"] == f"deferred: frequency cap (2 a week); send at {opening}"
    p.send(opening)
    assert p.sent_notices() == [1, 2, 3]


def test_priority_holds_across_channels_and_jobs(lite_notices: Notices) -> None:
    """The worker serves the SMS queue first; the email's higher priority still goes first."""
    rules = rules_yaml(channels={"payment": "sms", "refill": "email"})
    p = lite_notices.configure(caps="caps: {per_day: 1}\n", rules=rules)
    p.notice(1, 7, "payment", "2027-03-13 10:00")  # sms, priority 0, the older
    p.notice(2, 7, "refill", "2027-03-13 10:00")  # email, priority 5
    p.scan("2027-03-13T12:00:00Z")
    p.send("2027-03-13T15:00:00Z")
    assert p.sent_notices() == [2]
    reasons = p.reasons("1")
    refill_id = p.by_occurrence()["2"]["id"]
    assert reasons[-1] == (
        f"deferred: frequency cap (1 a day): reminder #{refill_id} goes first; "
        "send at 2027-03-13T15:01:00Z"
    )
    p.send("2027-03-13T15:01:00Z")  # decided again: the day is full now
    assert p.sent_notices() == [2]
    assert p.by_occurrence()["1"]["reason"] == (
        "deferred: frequency cap (1 a day); send at 2027-03-14T13:00:00Z"
    )
    p.send("2027-03-14T13:00:00Z")
    assert p.sent_notices() == [2, 1]


def test_two_workers_at_once_never_exceed_the_cap(notices: Notices) -> None:
    """Thirty customers with three due each, one reminder a job, two worker processes."""
    p = notices.configure(caps="caps: {per_day: 2}\n", batch_size=1)
    customers = range(1, 31)
    for c in customers:
        p.notice(c * 10 + 1, c, "payment", "2027-03-13 09:30")
        p.notice(c * 10 + 2, c, "payment", "2027-03-13 10:00")
        p.notice(c * 10 + 3, c, "refill", "2027-03-13 10:00")
    p.scan("2027-03-13T12:00:00Z")
    now = "2027-03-13T15:00:00Z"
    p.ok("dispatch", now=now)
    workers = [p.spawn("worker", "--burst", now=now) for _ in range(2)]
    for process in workers:
        code, _out, err = finish(process)
        assert code == 0, err
    # A reminder that found a higher-ranked one still queued waited a minute; decide those.
    p.send("2027-03-13T15:01:00Z")
    sent = p.sent_notices()
    assert len(sent) == len(set(sent)) == 60
    assert sorted(sent) == sorted(n for c in customers for n in (c * 10 + 1, c * 10 + 3))
    with p.state.connect() as conn:
        per_customer = dict(
            conn.execute(
                sa.select(reminder.c.customer_id, sa.func.count())
                .where(reminder.c.status == "sent")
                .group_by(reminder.c.customer_id)
            ).all()
        )
    assert set(per_customer.values()) == {2}
    for c in customers:
        third = p.by_occurrence()[str(c * 10 + 2)]
        assert (third["status"], clock.iso_utc(third["send_at"])) == (
            "pending",
            "2027-03-14T13:00:00Z",
        )


def test_postgresql_claims_of_one_customer_wait_for_each_other() -> None:
    """The advisory lock: a second claim for the same customer waits for the first to commit;
    one for another customer does not."""
    from tests import services

    with services.postgres_database() as url:
        engine = sa.create_engine(url)
        try:
            holder = engine.connect()
            holder.begin()
            caps.lock(holder, ["7"])
            with engine.begin() as other:
                caps.lock(other, ["8"])  # another customer: at once
            done = threading.Event()

            def second() -> None:
                with engine.begin() as conn:
                    caps.lock(conn, ["7"])
                done.set()

            thread = threading.Thread(target=second)
            thread.start()
            waiting = sa.text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            )
            with engine.connect() as probe:
                deadline = datetime.now() + timedelta(seconds=60)
                while probe.execute(waiting).scalar_one() == 0:
                    assert datetime.now() < deadline, "the second claim never waited"
                    probe.rollback()
            assert not done.is_set()
            holder.commit()
            thread.join(60)
            assert done.is_set()
            holder.close()
        finally:
            engine.dispose()


# -- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caps_yaml", "message"),
    [
        ("caps: {per_day: 0}\n", "caps.per_day: Input should be greater than or equal to 1"),
        ("caps: {}\n", "caps needs per_day or per_week (e.g. caps: {per_day: 2, per_week: 5})"),
        ("caps: {per_day: 3, per_week: 2}\n", "per_week (2) is less than per_day (3)"),
        ("caps: {per_month: 2}\n", "caps.per_month: unknown key"),
        ("caps: {per_day: 2, week_starts: friday}\n", "caps.week_starts: Input should be"),
    ],
)
def test_bad_caps_are_config_errors_with_their_line(
    lite_notices: Notices, caps_yaml: str, message: str
) -> None:
    p = lite_notices.configure(caps=caps_yaml)
    result = p.run("validate")
    assert result.code == 2
    line = p.read("config.yaml").splitlines().index(caps_yaml.strip()) + 1
    assert f"config.yaml:{line}: " in result.err and message in result.err, result.err


@pytest.mark.parametrize(
    ("added", "message"),
    [
        ("    priority: high\n", "'high' is not a priority (a whole number; higher goes first"),
        ("    caps: 5\n", "5 is not allowed (caps: true, the default, counts this rule's"),
        ("    quiet_hours: true\n", 'True is not quiet hours (a local range ("21:00-08:00")'),
        ('    quiet_hours: "9pm-8am"\n', '"9pm-8am" is not a time window'),
        ("    quiet_hours: {fax: false}\n", '"fax" is not a channel (allowed: sms, email)'),
    ],
)
def test_bad_rule_settings_are_errors_with_their_line(
    lite_notices: Notices, added: str, message: str
) -> None:
    p = lite_notices.configure(rules=rules_yaml(payment=added))
    result = p.run("validate")
    assert result.code == 2
    line = p.read("rules/notices.yaml").splitlines().index(added.rstrip("\n")) + 1
    assert f"rules/notices.yaml:{line}: rule payment: " in result.err, result.err
    assert message in result.err, result.err


def test_priority_and_exemption_without_caps_are_warned_about(lite_notices: Notices) -> None:
    p = lite_notices.configure()  # no caps; the refill rule has a priority, fraud is exempt
    result = p.run("validate")
    assert result.code == 0, str(result)
    lines = p.read("rules/notices.yaml").splitlines()
    priority = lines.index("    priority: 5") + 1
    exempt = lines.index("    caps: false") + 1
    assert (
        f"rules/notices.yaml:{priority}: warning: rule refill: priority has no effect without "
        "frequency caps (config key caps, e.g. caps: {per_day: 2, per_week: 5})"
    ) in result.err, result.err
    assert f"rules/notices.yaml:{exempt}: warning: rule fraud: caps has no effect" in result.err
    capped = p.configure(caps="caps: {per_day: 2}\n").run("validate")
    assert capped.code == 0 and "warning" not in capped.err
