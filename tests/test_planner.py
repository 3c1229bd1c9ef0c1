"""The planner, pure: which reminders a row asks for and when, and which rows are bad.

Tables in non-UTC zones and across DST changes (New York starts DST on 14 March 2027, Berlin on 28
March), with a real rule and config loaded from YAML (``tests/rule_objects.py``). The scan that
writes what is planned is tested end to end in ``tests/test_scan.py``.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from reminders.planner import Planner, RowError, parse_due
from tests.rule_objects import load_rule

NOW = datetime(2027, 3, 10, 12, tzinfo=UTC)

VISITS = """\
rules:
  - name: visit
    query: SELECT ref, customer_id, due, tz AS timezone, phone, email FROM visits
    occurrence: "{{ ref }}"
    due: due
    offsets: [OFFSETS]
    at: "10:00"
    channels: [sms, email]
    template: visit
"""

WEEKLY = """\
rules:
  - name: class
    query: SELECT id AS member_id, id AS customer_id, joined_on FROM members
    occurrence: "member-{{ member_id }}"
    due: joined_on
    recurrence: FREQ=WEEKLY;BYDAY=MO
    horizon: 3w
    offsets: [-1d]
    at: "10:00"
    channels: [email]
    template: class
"""


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def planner(tmp_path: Path, rules: str, now: datetime = NOW) -> Planner:
    config, rule = load_rule(tmp_path, rules)
    return Planner(rule, config, now)


def visit(due: Any, tz: str | None = None, ref: Any = "v1", customer: Any = "c1") -> dict[str, Any]:
    return {"ref": ref, "customer_id": customer, "due": due, "timezone": tz, "phone": None}


def plan(p: Planner, row: dict[str, Any]) -> tuple[list[tuple[str, str, str]], int]:
    """(occurrence, offset, planned time as ISO UTC) of each planned reminder, and how many were
    too late."""
    occurrence, customer, digest = p.identity(row)
    planned, late = p.plan(row, occurrence, customer, digest)
    shown = [
        (x.occurrence, x.offset, x.planned_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%MZ"))
        for x in planned
    ]
    return shown, late


@pytest.mark.parametrize(
    ("offsets", "due", "tz", "expected"),
    [
        # a date: the day offset lands at ``at`` (10:00) local time, EDT from 14 March
        (
            "-3d, 0d",
            "2027-03-17",
            None,
            [("-3d", "2027-03-14T14:00Z"), ("0d", "2027-03-17T14:00Z")],
        ),
        # the row's zone decides, and Berlin is not on DST yet
        ("-3d", "2027-03-25", "Europe/Berlin", [("-3d", "2027-03-22T09:00Z")]),
        ("-3d", date(2027, 3, 20), "America/Chicago", [("-3d", "2027-03-17T15:00Z")]),
        # a naive datetime is the customer's local time; a day offset still lands at 10:00
        ("-1d", "2027-03-20T16:30:00", "Europe/Paris", [("-1d", "2027-03-19T09:00Z")]),
        # hours are exact, across the DST gap and outside the send window: 03:30 EDT - 2h
        ("-2h", "2027-03-14T03:30:00", None, [("-2h", "2027-03-14T05:30Z")]),
        # an aware datetime keeps its instant (SQLite's ISO text with Z)
        ("-30m", "2027-03-20T15:00:00Z", None, [("-30m", "2027-03-20T14:30Z")]),
        # 08:00 is before the 09:00-20:00 window: a day reminder moves to its opening
        ("-1w", datetime(2027, 3, 24, 8, 0), None, [("-1w", "2027-03-17T13:00Z")]),
    ],
)
def test_planned_times(
    tmp_path: Path, offsets: str, due: Any, tz: str | None, expected: list[tuple[str, str]]
) -> None:
    rules = VISITS.replace("OFFSETS", offsets)
    if "w" in offsets:  # a week before the due time itself, not at 10:00
        rules = rules.replace('    at: "10:00"\n', "")
    p = planner(tmp_path, rules)
    assert plan(p, visit(due, tz)) == ([("v1", o, t) for o, t in expected], 0)


@pytest.mark.parametrize(
    ("now", "expected", "late"),
    [
        # -3d is at 2027-03-14T14:00Z: within the 1d grace until 2027-03-15T14:00Z
        ("2027-03-15T13:59:00Z", ["-3d", "0d"], 0),
        ("2027-03-15T14:01:00Z", ["0d"], 1),
        ("2027-03-18T15:00:00Z", [], 2),
    ],
)
def test_a_reminder_past_grace_is_left_out_and_counted(
    tmp_path: Path, now: str, expected: list[str], late: int
) -> None:
    p = planner(tmp_path, VISITS.replace("OFFSETS", "-3d, 0d"), utc(now))
    planned, too_late = plan(p, visit("2027-03-17"))
    assert ([offset for _, offset, _ in planned], too_late) == (expected, late)


@pytest.mark.parametrize(
    ("row", "column", "reason"),
    [
        (visit(None), "due", "due is empty: no due date"),
        (visit(""), "due", "due is empty: no due date"),
        (visit("next tuesday"), "due", "due = 'next tuesday' is not a date or datetime"),
        (visit(17), "due", "due = 17 is not a date or datetime"),
        (
            visit("2027-03-20", "Mars/Olympus"),
            "timezone",
            'timezone = "Mars/Olympus" is not an IANA time zone',
        ),
        (visit("2027-03-20", ref=None), "ref", "no occurrence key: column ref is missing or empty"),
        (
            visit("2027-03-20", customer=None),
            "customer_id",
            "no customer id: column customer_id is missing or empty",
        ),
        (
            visit("2027-03-20", customer=""),
            "customer_id",
            "no customer id: column customer_id is missing or empty",
        ),
        (
            visit("2027-03-20", ref="x" * 201),
            None,
            "the occurrence key is longer than 200 characters",
        ),
    ],
)
def test_a_bad_row_names_its_column_and_reason(
    tmp_path: Path, row: dict[str, Any], column: str | None, reason: str
) -> None:
    p = planner(tmp_path, VISITS.replace("OFFSETS", "-1d"))
    with pytest.raises(RowError) as raised:
        plan(p, row)
    assert (raised.value.column, raised.value.reason) == (column, reason)


def test_an_occurrence_template_that_gives_nothing_is_a_bad_row(tmp_path: Path) -> None:
    rules = VISITS.replace("OFFSETS", "-1d").replace('"{{ ref }}"', '"{{ ref | trim }}"')
    p = planner(tmp_path, rules)
    with pytest.raises(RowError, match="the occurrence template gave an empty text"):
        p.identity(visit("2027-03-20", ref="  "))


def test_the_digest_changes_with_any_value_and_with_the_schedule_settings(tmp_path: Path) -> None:
    rules = VISITS.replace("OFFSETS", "-1d")
    p = planner(tmp_path / "a", rules)
    row = visit("2027-03-20")
    digest = p.identity(row)[2]
    assert p.identity(dict(row))[2] == digest  # the same values: the same digest
    assert p.identity({**row, "phone": "+12125550100"})[2] != digest
    assert p.identity({**row, "due": date(2027, 3, 20)})[2] != digest  # the type counts too
    later = planner(tmp_path / "b", rules.replace('at: "10:00"', 'at: "11:00"'))
    assert later.identity(row)[2] != digest
    # The tuple form the scan uses gives the same key and digest.
    p.bind(list(row))
    occurrence, customer, raw = p.identify(tuple(row.values()))
    assert (occurrence, customer, raw.hex()) == p.identity(row)


def test_the_row_is_kept_as_typed_json_with_its_due_parsed(tmp_path: Path) -> None:
    from reminders import codec

    p = planner(tmp_path, VISITS.replace("OFFSETS", "-1d"))
    (planned,), _ = p.plan(visit("2027-03-20"), "v1", "c1", "d")
    assert codec.loads(planned.data)["due"] == date(2027, 3, 20)
    assert (planned.customer_id, planned.row_hash) == ("c1", "d")


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        # Wednesday 10 March; 3 weeks ahead (and the longest offset): the Mondays 15, 22 and 29
        # March, each a day before at 10:00 in New York, EDT from the 14th
        (
            "2027-03-10T12:00:00Z",
            {
                "2027-03-15": "2027-03-14T14:00Z",
                "2027-03-22": "2027-03-21T14:00Z",
                "2027-03-29": "2027-03-28T14:00Z",
            },
        ),
        # Monday 29 March, 08:00 EDT: today's is still within grace (its -1d was 22 hours ago)
        (
            "2027-03-29T12:00:00Z",
            {
                "2027-03-29": "2027-03-28T14:00Z",
                "2027-04-05": "2027-04-04T14:00Z",
                "2027-04-12": "2027-04-11T14:00Z",
                "2027-04-19": "2027-04-18T14:00Z",
            },
        ),
    ],
)
def test_a_recurring_rule_plans_each_date_within_the_horizon(
    tmp_path: Path, now: str, expected: dict[str, str]
) -> None:
    p = planner(tmp_path, WEEKLY, utc(now))
    planned, late = plan(p, {"member_id": 7, "customer_id": 7, "joined_on": "2027-01-04"})
    wanted = [(f"member-7@{day}", "-1d", at) for day, at in expected.items()]
    assert (planned, late) == (wanted, 0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (date(2027, 3, 20), date(2027, 3, 20)),
        (datetime(2027, 3, 20, 9, 30), datetime(2027, 3, 20, 9, 30)),
        ("2027-03-20", date(2027, 3, 20)),
        (" 2027-03-20 ", date(2027, 3, 20)),
        ("2027-03-20T09:30:00", datetime(2027, 3, 20, 9, 30)),
        ("2027-03-20 09:30:00", datetime(2027, 3, 20, 9, 30)),
        ("2027-03-20T09:30:00Z", datetime(2027, 3, 20, 9, 30, tzinfo=UTC)),
    ],
)
def test_parse_due(value: Any, expected: date | datetime) -> None:
    assert parse_due(value, "due") == expected


@pytest.mark.parametrize("value", [None, "", "2027-13-01", "20.3.2027", 20270320, b"2027-03-20"])
def test_parse_due_rejects(value: Any) -> None:
    with pytest.raises(RowError) as raised:
        parse_due(value, "due")
    assert raised.value.column == "due"
