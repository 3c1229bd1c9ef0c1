"""Table tests for the schedule math, in non-UTC zones and across both DST changes of 2024.

The 2024 transitions used below (local wall times):
- America/New_York: Mar 10 02:00 EST -> 03:00 EDT (gap); Nov 3 02:00 EDT -> 01:00 EST (01:xx twice).
- Europe/Berlin: Mar 31 02:00 CET -> 03:00 CEST; Oct 27 03:00 CEST -> 02:00 CET (02:xx twice).
- Australia/Sydney (southern): Apr 7 03:00 AEDT -> 02:00 AEST; Oct 6 02:00 AEST -> 03:00 AEDT.
- Pacific/Auckland (southern): Apr 7 03:00 NZDT -> 02:00 NZST; Sep 29 02:00 NZST -> 03:00 NZDT.
- Asia/Kolkata: +05:30 all year.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta

import pytest
from dateutil.relativedelta import relativedelta

from reminders import sendtime
from reminders.sendtime import (
    Offset,
    Window,
    localize,
    parse_clock,
    parse_duration,
    parse_offset,
    parse_window,
    quiet_until,
    send_time,
    within_grace,
    zone,
)

NY = "America/New_York"
BERLIN = "Europe/Berlin"
SYDNEY = "Australia/Sydney"
KOLKATA = "Asia/Kolkata"
AUCKLAND = "Pacific/Auckland"

DAY = Window(time(9), time(20))  # the config's usual send window, 09:00-20:00
NIGHT = Window(time(21), time(8))  # the SMS quiet hours, 21:00-08:00


def utc(text: str) -> datetime:
    """An aware UTC instant written out, e.g. ``utc("2024-03-10T07:30")``."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# --- parse_offset ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "amount", "unit", "written"),
    [
        ("-3d", -3, "d", "-3d"),
        ("0d", 0, "d", "0d"),
        ("+2h", 2, "h", "+2h"),
        ("30m", 30, "m", "30m"),
        ("-90m", -90, "m", "-90m"),
        ("1w", 1, "w", "1w"),
        ("-1mo", -1, "mo", "-1mo"),
        ("+12mo", 12, "mo", "+12mo"),
        ("1y", 1, "y", "1y"),
        ("-0d", 0, "d", "-0d"),
        ("  -3d\n", -3, "d", "-3d"),
        ("0", 0, "d", "0"),  # YAML's integer 0, passed on as "0": the due day itself
        ("1000y", 1000, "y", "1000y"),
    ],
)
def test_parse_offset(text: str, amount: int, unit: str, written: str) -> None:
    offset = parse_offset(text)
    assert (offset.amount, offset.unit, offset.text) == (amount, unit, written)


@pytest.mark.parametrize(
    "text",
    ["", " ", "3", "-3", "d", "3 d", "3D", "3days", "-1.5d", "--3d", "+-3d", "1mo2d", "1M", "３d"],
)
def test_parse_offset_rejects(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_offset(text)
    assert str(caught.value) == f'"{text}" is not an offset (examples: -3d, 2w, -1mo, 0d)'


def test_parse_offset_rejects_absurd_sizes() -> None:
    with pytest.raises(ValueError, match=r'^"-1001y" is too large an offset'):
        parse_offset("-1001y")
    with pytest.raises(ValueError, match=r'^"99999999999d" is too large an offset'):
        parse_offset("99999999999d")


def test_offset_equality_ignores_precomputed_steps() -> None:
    assert parse_offset("-3d") == Offset(-3, "d", "-3d")
    assert parse_offset("-3d") != Offset(-3, "d", "-72h")
    assert {parse_offset("1mo"), Offset(1, "mo", "1mo")} == {Offset(1, "mo", "1mo")}
    assert repr(parse_offset("-1mo")) == "Offset(amount=-1, unit='mo', text='-1mo')"


def test_offset_rejects_unknown_unit() -> None:
    with pytest.raises(
        ValueError, match=r'^"s" is not an offset unit \(allowed: m, h, d, w, mo, y\)$'
    ):
        Offset(3, "s", "3s")


# --- parse_duration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("200ms", timedelta(milliseconds=200)),
        ("30s", timedelta(seconds=30)),
        ("15m", timedelta(minutes=15)),
        ("12h", timedelta(hours=12)),
        ("1d", timedelta(days=1)),
        ("2w", timedelta(days=14)),
        ("0s", timedelta(0)),
        ("0", timedelta(0)),
        (" 5m ", timedelta(minutes=5)),
        ("90m", timedelta(hours=1, minutes=30)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text", ["", "5", "-1d", "+1d", "1mo", "1y", "1.5h", "m", "10 m", "1H", "1d2h", "1 day"]
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration(text)
    assert str(caught.value) == (
        f'"{text}" is not a duration (a whole number and a unit: ms, s, m, h, d or w; '
        "examples: 30s, 15m, 1d)"
    )


def test_parse_duration_rejects_overflow() -> None:
    with pytest.raises(ValueError, match=r'^"99999999999w" is too long a duration$'):
        parse_duration("99999999999w")


# --- parse_clock, parse_window, Window.contains ---------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10:00", time(10, 0)),
        ("9:30", time(9, 30)),
        ("09:30", time(9, 30)),
        ("10:00:00", time(10, 0)),
        ("23:59:59", time(23, 59, 59)),
        ("00:00", time(0, 0)),
        (" 7:05 ", time(7, 5)),
    ],
)
def test_parse_clock(text: str, expected: time) -> None:
    assert parse_clock(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "10", "1000", "10:0", "10.00", "24:00", "10:60", "10:00:60", "100:00", "-1:00", "10am"],
)
def test_parse_clock_rejects(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_clock(text)
    assert str(caught.value) == (
        f'"{text}" is not a time of day (expected HH:MM or HH:MM:SS, e.g. 10:00)'
    )


@pytest.mark.parametrize(
    ("text", "start", "end"),
    [
        ("09:00-20:00", time(9), time(20)),
        ("21:00-08:00", time(21), time(8)),
        (" 9:00 - 17:30 ", time(9), time(17, 30)),
        ("08:00:30-08:00:45", time(8, 0, 30), time(8, 0, 45)),
        ("09:00-24:00", time(9), time(0)),  # "until midnight": the end is 00:00, wrapping
    ],
)
def test_parse_window(text: str, start: time, end: time) -> None:
    assert parse_window(text) == Window(start, end)


@pytest.mark.parametrize(
    "text", ["", "09:00", "09:00-", "9-17", "09:00-20:00-21:00", "25:00-08:00", "24:00-08:00"]
)
def test_parse_window_rejects(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_window(text)
    assert str(caught.value) == (
        f'"{text}" is not a time window (expected HH:MM-HH:MM, e.g. 09:00-20:00)'
    )


@pytest.mark.parametrize("text", ["09:00-09:00", "00:00-24:00", "8:00-08:00:00"])
def test_parse_window_rejects_empty(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_window(text)
    assert str(caught.value) == (
        f'"{text}" is not a time window: it starts and ends at the same time'
    )


@pytest.mark.parametrize(
    ("window", "t", "inside"),
    [
        (DAY, time(8, 59, 59), False),
        (DAY, time(9), True),  # the opening is inside
        (DAY, time(19, 59, 59), True),
        (DAY, time(20), False),  # the close is not
        (DAY, time(0), False),
        (NIGHT, time(20, 59, 59), False),
        (NIGHT, time(21), True),
        (NIGHT, time(23, 59, 59), True),
        (NIGHT, time(0), True),
        (NIGHT, time(7, 59, 59), True),
        (NIGHT, time(8), False),
        (NIGHT, time(12), False),
        (Window(time(9), time(0)), time(23, 59), True),
        (Window(time(9), time(0)), time(0), False),
        (Window(time(9), time(0)), time(8, 59), False),
    ],
)
def test_window_contains(window: Window, t: time, inside: bool) -> None:
    assert window.contains(t) is inside


# --- zone, localize -------------------------------------------------------------------------


@pytest.mark.parametrize("name", [NY, BERLIN, SYDNEY, KOLKATA, AUCKLAND, "UTC"])
def test_zone_is_cached(name: str) -> None:
    tz = zone(name)
    assert tz.key == name
    assert zone(name) is tz


@pytest.mark.parametrize("name", ["", "Mars/Olympus_Mons", "America", "../etc/passwd", "EST5"])
def test_zone_rejects(name: str) -> None:
    with pytest.raises(ValueError) as caught:
        zone(name)
    assert str(caught.value) == f'unknown time zone "{name}"'


@pytest.mark.parametrize(
    ("name", "naive", "local", "instant"),
    [
        # A time in the spring-forward gap moves forward by the gap (one hour here).
        (NY, datetime(2024, 3, 10, 2, 30), "2024-03-10T03:30:00-04:00", "2024-03-10T07:30"),
        (BERLIN, datetime(2024, 3, 31, 2, 30), "2024-03-31T03:30:00+02:00", "2024-03-31T01:30"),
        (SYDNEY, datetime(2024, 10, 6, 2, 30), "2024-10-06T03:30:00+11:00", "2024-10-05T16:30"),
        (AUCKLAND, datetime(2024, 9, 29, 2, 0), "2024-09-29T03:00:00+13:00", "2024-09-28T14:00"),
        # A time repeated by the fall-back takes its first occurrence (still on summer time).
        (NY, datetime(2024, 11, 3, 1, 30), "2024-11-03T01:30:00-04:00", "2024-11-03T05:30"),
        (NY, datetime(2024, 11, 3, 1, 30, fold=1), "2024-11-03T01:30:00-04:00", "2024-11-03T05:30"),
        (BERLIN, datetime(2024, 10, 27, 2, 30), "2024-10-27T02:30:00+02:00", "2024-10-27T00:30"),
        (SYDNEY, datetime(2024, 4, 7, 2, 30), "2024-04-07T02:30:00+11:00", "2024-04-06T15:30"),
        (AUCKLAND, datetime(2024, 4, 7, 2, 59), "2024-04-07T02:59:00+13:00", "2024-04-06T13:59"),
        # Just outside the transitions nothing moves.
        (NY, datetime(2024, 3, 10, 1, 59), "2024-03-10T01:59:00-05:00", "2024-03-10T06:59"),
        (NY, datetime(2024, 3, 10, 3, 0), "2024-03-10T03:00:00-04:00", "2024-03-10T07:00"),
        (NY, datetime(2024, 11, 3, 2, 0), "2024-11-03T02:00:00-05:00", "2024-11-03T07:00"),
        (KOLKATA, datetime(2024, 3, 10, 2, 30), "2024-03-10T02:30:00+05:30", "2024-03-09T21:00"),
        # An aware datetime is converted.
        (
            KOLKATA,
            datetime(2024, 3, 10, 2, 30, tzinfo=UTC),
            "2024-03-10T08:00:00+05:30",
            "2024-03-10T02:30",
        ),
    ],
)
def test_localize(name: str, naive: datetime, local: str, instant: str) -> None:
    result = localize(naive, zone(name))
    assert result.isoformat() == local
    assert result.tzinfo is zone(name)
    assert result.astimezone(UTC) == utc(instant)


# --- send_time ------------------------------------------------------------------------------

TEN = time(10)

SEND_TIMES = [
    # (id, zone, due, offset, at, window, expected UTC)
    # Day and week offsets land at `at` local time, whatever the UTC offset is that day.
    ("ny -3d at 10:00 EDT", NY, date(2024, 3, 15), "-3d", TEN, DAY, "2024-03-12T14:00"),
    ("ny -3d back into EST", NY, date(2024, 3, 12), "-3d", TEN, DAY, "2024-03-09T15:00"),
    ("berlin -3d still CET", BERLIN, date(2024, 4, 2), "-3d", TEN, DAY, "2024-03-30T09:00"),
    ("berlin -3d on DST day", BERLIN, date(2024, 4, 3), "-3d", TEN, DAY, "2024-03-31T08:00"),
    ("sydney -3d AEST", SYDNEY, date(2024, 4, 10), "-3d", TEN, DAY, "2024-04-07T00:00"),
    ("sydney -3d AEDT", SYDNEY, date(2024, 4, 9), "-3d", TEN, DAY, "2024-04-05T23:00"),
    ("kolkata 0d half hour", KOLKATA, date(2024, 6, 15), "0d", TEN, DAY, "2024-06-15T04:30"),
    ("auckland -1d NZDT", AUCKLAND, date(2024, 9, 30), "-1d", TEN, DAY, "2024-09-28T21:00"),
    ("ny +1w over fall back", NY, date(2024, 11, 1), "+1w", TEN, DAY, "2024-11-08T15:00"),
    ("berlin -2w at 09:30", BERLIN, date(2024, 11, 5), "-2w", time(9, 30), DAY, "2024-10-22T07:30"),
    # Default `at`: the window's opening for a date, else midnight; the due's own time for a
    # datetime; a given `at` wins.
    ("date, window opening", NY, date(2024, 7, 4), "-1d", None, DAY, "2024-07-03T13:00"),
    ("date, midnight", NY, date(2024, 7, 4), "-1d", None, None, "2024-07-03T04:00"),
    ("naive, its time", NY, datetime(2024, 7, 4, 14, 30), "-1d", None, DAY, "2024-07-03T18:30"),
    ("naive, at wins", NY, datetime(2024, 7, 4, 14, 30), "-1d", TEN, DAY, "2024-07-03T14:00"),
    # An aware due counts in the customer's local date: 02:00Z on Jul 5 is 22:00 on Jul 4 in New
    # York; a day before is Jul 3 22:00, after the close, so Jul 4 09:00.
    ("aware, local date", NY, utc("2024-07-05T02:00"), "-1d", None, DAY, "2024-07-04T13:00"),
    ("aware, no window", NY, utc("2024-07-05T02:00"), "-1d", None, None, "2024-07-04T02:00"),
    ("aware, kolkata date", KOLKATA, utc("2024-01-10T20:00"), "0d", TEN, DAY, "2024-01-11T04:30"),
    (
        "aware in another zone",
        NY,
        datetime(2024, 7, 4, 9, 0, tzinfo=zone(BERLIN)),  # 07:00Z, 03:00 in New York
        "-1d",
        None,
        DAY,
        "2024-07-03T13:00",
    ),
    # The send window: before the opening -> the opening that day; at or after the close -> the
    # next day's opening; inside (opening included) -> unchanged.
    ("before opening", NY, date(2024, 7, 4), "-1d", time(7), DAY, "2024-07-03T13:00"),
    ("at opening", NY, date(2024, 7, 4), "-1d", time(9), DAY, "2024-07-03T13:00"),
    ("just before close", NY, date(2024, 7, 4), "-1d", time(19, 59), DAY, "2024-07-03T23:59"),
    ("at close", NY, date(2024, 7, 4), "-1d", time(20), DAY, "2024-07-04T13:00"),
    ("after close", NY, date(2024, 7, 4), "-1d", time(21, 30), DAY, "2024-07-04T13:00"),
    (
        "late datetime due",
        BERLIN,
        datetime(2024, 5, 10, 22, 15),
        "-2d",
        None,
        DAY,
        "2024-05-09T07:00",
    ),
    # Moved to the next day's opening across the spring-forward night: Mar 9 21:00 EST -> Mar 10
    # 09:00 EDT.
    ("moved across DST", NY, date(2024, 3, 10), "-1d", time(21), DAY, "2024-03-10T13:00"),
    # A window that wraps midnight (inside = evening or early morning): outside is before the
    # opening the same day.
    ("wrap, outside", NY, date(2024, 7, 4), "-1d", TEN, NIGHT, "2024-07-04T01:00"),
    ("wrap, at end", NY, date(2024, 7, 4), "-1d", time(8), NIGHT, "2024-07-04T01:00"),
    ("wrap, evening", NY, date(2024, 7, 4), "-1d", time(23), NIGHT, "2024-07-04T03:00"),
    ("wrap, morning", NY, date(2024, 7, 4), "-1d", time(2), NIGHT, "2024-07-03T06:00"),
    (
        "until midnight",
        NY,
        date(2024, 7, 4),
        "-1d",
        time(23, 30),
        parse_window("09:00-24:00"),
        "2024-07-04T03:30",
    ),
    # A window opening in the DST gap moves forward by the gap like any other local time.
    (
        "opening in gap",
        NY,
        date(2024, 3, 11),
        "-1d",
        None,
        Window(time(2, 30), time(20)),
        "2024-03-10T07:30",
    ),
    # Months and years clamp to the month's end.
    ("mo to leap feb", NY, date(2024, 3, 31), "-1mo", TEN, DAY, "2024-02-29T15:00"),
    ("mo to feb", NY, date(2023, 3, 31), "-1mo", TEN, DAY, "2023-02-28T15:00"),
    ("mo to 30 days", BERLIN, date(2024, 5, 31), "-1mo", TEN, DAY, "2024-04-30T08:00"),
    ("mo forward to feb", BERLIN, date(2024, 1, 31), "+1mo", TEN, DAY, "2024-02-29T09:00"),
    ("mo over new year", NY, date(2024, 1, 15), "-1mo", TEN, DAY, "2023-12-15T15:00"),
    ("-10mo", AUCKLAND, date(2024, 12, 31), "-10mo", TEN, DAY, "2024-02-28T21:00"),
    ("+13mo", KOLKATA, date(2025, 1, 31), "+13mo", TEN, DAY, "2026-02-28T04:30"),
    ("y from feb 29", SYDNEY, date(2024, 2, 29), "1y", TEN, DAY, "2025-02-27T23:00"),
    ("-y from feb 29", SYDNEY, date(2024, 2, 29), "-1y", TEN, DAY, "2023-02-27T23:00"),
    ("-12mo = -1y", SYDNEY, date(2024, 2, 29), "-12mo", TEN, DAY, "2023-02-27T23:00"),
    ("mo, datetime due", NY, datetime(2024, 3, 31, 16, 45), "-1mo", None, DAY, "2024-02-29T21:45"),
    # Both DST changes in each zone: a gap time moves forward, an ambiguous one takes the first.
    ("ny gap", NY, date(2024, 3, 11), "-1d", time(2, 30), None, "2024-03-10T07:30"),
    ("ny ambiguous", NY, date(2024, 11, 4), "-1d", time(1, 30), None, "2024-11-03T05:30"),
    ("berlin gap", BERLIN, date(2024, 4, 1), "-1d", time(2, 30), None, "2024-03-31T01:30"),
    ("berlin ambiguous", BERLIN, date(2024, 10, 28), "-1d", time(2, 30), None, "2024-10-27T00:30"),
    ("sydney gap", SYDNEY, date(2024, 10, 7), "-1d", time(2, 30), None, "2024-10-05T16:30"),
    ("sydney ambiguous", SYDNEY, date(2024, 4, 8), "-1d", time(2, 30), None, "2024-04-06T15:30"),
    ("auckland gap", AUCKLAND, date(2024, 9, 30), "-1d", time(2, 30), None, "2024-09-28T14:30"),
    (
        "auckland ambiguous",
        AUCKLAND,
        date(2024, 4, 8),
        "-1d",
        time(2, 30),
        None,
        "2024-04-06T13:30",
    ),
    ("kolkata no DST", KOLKATA, date(2024, 3, 11), "-1d", time(2, 30), None, "2024-03-09T21:00"),
    ("naive due in gap", NY, datetime(2024, 3, 10, 2, 30), "0d", None, None, "2024-03-10T07:30"),
    # An aware due in the repeated hour (01:30 EST, the second one): a calendar offset recomputes
    # the wall time 01:30, which takes the first occurrence like any other ambiguous time.
    ("aware second 01:30", NY, utc("2024-11-03T06:30"), "0d", None, None, "2024-11-03T05:30"),
    # Minutes and hours are exact durations from the due instant: across a DST change the local
    # wall-clock difference is not the offset, and the window never moves them.
    ("ny -12h over gap", NY, datetime(2024, 3, 10, 12, 0), "-12h", None, DAY, "2024-03-10T04:00"),
    ("ny -24h over fall", NY, datetime(2024, 11, 3, 12, 0), "-24h", None, DAY, "2024-11-02T17:00"),
    (
        "berlin -2h over gap",
        BERLIN,
        datetime(2024, 3, 31, 3, 30),
        "-2h",
        None,
        DAY,
        "2024-03-30T23:30",
    ),
    (
        "auckland -6h over fall",
        AUCKLAND,
        datetime(2024, 4, 7, 5, 0),
        "-6h",
        None,
        DAY,
        "2024-04-06T11:00",
    ),
    (
        "sydney +90m over gap",
        SYDNEY,
        datetime(2024, 10, 6, 1, 0),
        "+90m",
        None,
        DAY,
        "2024-10-05T16:30",
    ),
    ("not window-moved", NY, datetime(2024, 7, 4, 8, 0), "-2h", TEN, DAY, "2024-07-04T10:00"),
    (
        "kolkata aware +2h",
        KOLKATA,
        datetime(2024, 6, 15, 10, 0, tzinfo=zone(KOLKATA)),
        "+2h",
        None,
        DAY,
        "2024-06-15T06:30",
    ),
    ("aware second 01:30 -0m", NY, utc("2024-11-03T06:30"), "0m", None, None, "2024-11-03T06:30"),
    (
        "naive fold=1 takes first",
        NY,
        datetime(2024, 11, 3, 1, 30, fold=1),
        "-0h",
        None,
        None,
        "2024-11-03T05:30",
    ),
    ("naive in gap +0m", NY, datetime(2024, 3, 10, 2, 30), "0m", None, None, "2024-03-10T07:30"),
    # For a date due, m/h count from the window's opening that day, else `at`, else midnight.
    ("date m/h window", SYDNEY, date(2024, 10, 6), "-30m", TEN, DAY, "2024-10-05T21:30"),
    ("date m/h at", NY, date(2024, 7, 4), "-2h", TEN, None, "2024-07-04T12:00"),
    ("date m/h midnight", NY, date(2024, 7, 4), "-90m", None, None, "2024-07-04T02:30"),
    ("date m/h window beats at", NY, date(2024, 7, 4), "+1h", TEN, DAY, "2024-07-04T14:00"),
]


@pytest.mark.parametrize(
    ("name", "due", "offset", "at", "window", "expected"),
    [row[1:] for row in SEND_TIMES],
    ids=[row[0] for row in SEND_TIMES],
)
def test_send_time(
    name: str,
    due: date | datetime,
    offset: str,
    at: time | None,
    window: Window | None,
    expected: str,
) -> None:
    result = send_time(due, parse_offset(offset), zone(name), at=at, window=window)
    assert result == utc(expected)
    assert result.tzinfo is UTC


def test_send_time_accepts_a_hand_built_offset() -> None:
    tz = zone(BERLIN)
    assert send_time(date(2024, 4, 3), Offset(-3, "d", "-3d"), tz, at=TEN) == utc(
        "2024-03-31T08:00"
    )
    assert send_time(date(2024, 3, 31), Offset(-1, "y", "-1y"), tz, at=TEN) == utc(
        "2023-03-31T08:00"
    )


@pytest.mark.parametrize("months", [-25, -13, -12, -11, -1, 1, 2, 11, 12, 13, 25])
def test_month_steps_clamp_like_relativedelta(months: int) -> None:
    # Month steps are computed by hand for speed; relativedelta is the reference.
    offset = Offset(months, "mo", f"{months}mo")
    tz = zone("UTC")
    day = date(2023, 1, 1)
    while day < date(2025, 1, 1):
        expected = datetime.combine(day + relativedelta(months=months), time(0), UTC)
        assert send_time(day, offset, tz) == expected, day
        day += timedelta(days=1)


@pytest.mark.parametrize(
    ("due", "offset"),
    [
        (date(9999, 12, 31), "+1d"),
        (date(9999, 12, 31), "+1y"),
        (date(1, 1, 1), "-1mo"),
        (datetime(9999, 12, 31, 23, 0), "0d"),  # 23:00 in New York is already year 10000 in UTC
        (datetime(9999, 12, 31, 23, 0), "+2h"),
    ],
)
def test_send_time_off_the_calendar(due: date, offset: str) -> None:
    with pytest.raises(ValueError, match=rf"^{offset.replace('+', '[+]')} from .* falls outside"):
        send_time(due, parse_offset(offset), zone(NY))


# --- quiet_until ----------------------------------------------------------------------------

QUIET = [
    # (id, zone, moment, quiet hours, expected UTC end or None)
    ("evening", NY, utc("2024-07-04T02:00"), NIGHT, "2024-07-04T12:00"),  # 22:00 EDT
    ("after midnight", NY, utc("2024-07-04T05:00"), NIGHT, "2024-07-04T12:00"),  # 01:00 EDT
    ("at start", NY, utc("2024-07-04T01:00"), NIGHT, "2024-07-04T12:00"),  # 21:00 EDT
    ("just before start", NY, utc("2024-07-04T00:59:59"), NIGHT, None),
    ("just before end", NY, utc("2024-07-04T11:59:59"), NIGHT, "2024-07-04T12:00"),
    ("at end", NY, utc("2024-07-04T12:00"), NIGHT, None),  # 08:00 EDT is allowed
    ("midday", NY, utc("2024-07-04T16:00"), NIGHT, None),
    (
        "aware local moment",
        NY,
        datetime(2024, 7, 3, 22, 0, tzinfo=zone(NY)),
        NIGHT,
        "2024-07-04T12:00",
    ),
    # Local evening on one UTC date ends on the next local morning.
    ("kolkata", KOLKATA, utc("2024-07-04T16:00"), NIGHT, "2024-07-05T02:30"),  # 21:30 IST
    ("kolkata morning", KOLKATA, utc("2024-07-04T02:00"), NIGHT, "2024-07-04T02:30"),  # 07:30
    # The night of a DST change: the end takes that morning's offset.
    ("sydney spring", SYDNEY, utc("2024-10-05T12:00"), NIGHT, "2024-10-05T21:00"),
    ("auckland fall", AUCKLAND, utc("2024-04-06T10:00"), NIGHT, "2024-04-06T20:00"),
    ("berlin fall", BERLIN, utc("2024-10-26T20:00"), NIGHT, "2024-10-27T07:00"),
    ("ny spring", NY, utc("2024-03-10T03:00"), NIGHT, "2024-03-10T12:00"),  # 22:00 EST
    # Quiet hours that do not wrap midnight.
    (
        "lunch inside",
        BERLIN,
        utc("2024-07-04T10:30"),
        Window(time(12), time(14)),
        "2024-07-04T12:00",
    ),
    ("lunch end", BERLIN, utc("2024-07-04T12:00"), Window(time(12), time(14)), None),
    # An end in the DST gap moves forward by the gap.
    ("end in gap", NY, utc("2024-03-10T06:00"), Window(time(22), time(2, 30)), "2024-03-10T07:30"),
    # An ambiguous end: the first 01:30 while in the first pass of the repeated hour, the second
    # one once the first has passed (never an end before the moment).
    (
        "ambiguous end, first",
        NY,
        utc("2024-11-03T05:15"),
        Window(time(21), time(1, 30)),
        "2024-11-03T05:30",
    ),
    (
        "ambiguous end, second",
        NY,
        utc("2024-11-03T06:15"),
        Window(time(21), time(1, 30)),
        "2024-11-03T06:30",
    ),
    ("between the two ends", NY, utc("2024-11-03T05:45"), Window(time(21), time(1, 30)), None),
]


@pytest.mark.parametrize(
    ("name", "moment", "quiet", "expected"),
    [row[1:] for row in QUIET],
    ids=[row[0] for row in QUIET],
)
def test_quiet_until(name: str, moment: datetime, quiet: Window, expected: str | None) -> None:
    result = quiet_until(moment, zone(name), quiet)
    if expected is None:
        assert result is None
    else:
        assert result == utc(expected)
        assert result is not None and result.tzinfo is UTC
        assert result > moment


# --- within_grace ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("send_at", "now", "grace", "expected"),
    [
        (utc("2024-07-04T12:00"), utc("2024-07-04T12:00"), timedelta(days=1), True),
        (utc("2024-07-04T13:00"), utc("2024-07-04T12:00"), timedelta(0), True),  # future
        (utc("2024-07-03T12:00"), utc("2024-07-04T12:00"), timedelta(days=1), True),  # exactly
        (utc("2024-07-03T11:59:59"), utc("2024-07-04T12:00"), timedelta(days=1), False),
        (utc("2024-07-04T11:59:59"), utc("2024-07-04T12:00"), timedelta(0), False),
        # Zones do not matter: 08:00 EDT is 12:00Z.
        (
            datetime(2024, 7, 4, 8, 0, tzinfo=zone(NY)),
            utc("2024-07-04T14:00"),
            timedelta(hours=2),
            True,
        ),
        (
            datetime(2024, 7, 4, 8, 0, tzinfo=zone(NY)),
            utc("2024-07-04T14:00:01"),
            timedelta(hours=2),
            False,
        ),
    ],
)
def test_within_grace(send_at: datetime, now: datetime, grace: timedelta, expected: bool) -> None:
    assert within_grace(send_at, now, grace) is expected


# --- recurrences ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rrule",
    [
        "FREQ=MONTHLY;BYMONTHDAY=1",
        "FREQ=MONTHLY;BYMONTHDAY=-1",
        "FREQ=MONTHLY;BYDAY=-1FR",
        "FREQ=WEEKLY;BYDAY=MO,WE;INTERVAL=2",
        "FREQ=YEARLY;UNTIL=20280101T000000Z",
        "FREQ=YEARLY;UNTIL=20280101",
        "RRULE:FREQ=DAILY;COUNT=3",
    ],
)
def test_recurrences_the_engine_expands_are_accepted(rrule: str) -> None:
    sendtime.check_recurrence(rrule)


@pytest.mark.parametrize(
    ("rrule", "message"),
    [
        ("FREQ=MONTHLY;BYMONTHDAY=32", "BYMONTHDAY=32 is out of range (1 to 31, or -31 to -1"),
        ("FREQ=MONTHLY;BYMONTHDAY=0", "BYMONTHDAY=0 is out of range"),
        ("FREQ=YEARLY;BYMONTH=13", "BYMONTH=13 is out of range (1 to 12)"),
        ("FREQ=YEARLY;BYWEEKNO=54", "BYWEEKNO=54 is out of range"),
        ("FREQ=MONTHLY;INTERVAL=0", "INTERVAL=0 is out of range"),
        ("FREQ=MONTHLY;BYDAY=+60MO", "BYDAY=+60MO is out of range"),  # dateutil: IndexError
        ("FREQ=MONTHLY;BYDAY=+6MO", "never yields a date"),
        ("FREQ=YEARLY;BYMONTH=2;BYMONTHDAY=30", "never yields a date"),
        ("FREQ=MONTHLY;BYMONTHDAY=x", "BYMONTHDAY=x is not a whole number"),
    ],
)
def test_recurrences_the_engine_cannot_expand_say_why(rrule: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        sendtime.check_recurrence(rrule)


def test_a_utc_until_becomes_the_customers_local_time() -> None:
    ny = sendtime.zone("America/New_York")
    assert sendtime.recurrence_in("FREQ=DAILY;UNTIL=20270501T030000Z", ny) == (
        "FREQ=DAILY;UNTIL=20270430T230000"
    )
    # Winter: UTC-5, the day before.
    assert sendtime.recurrence_in("FREQ=DAILY;UNTIL=20270101T030000Z", ny) == (
        "FREQ=DAILY;UNTIL=20261231T220000"
    )
    assert sendtime.recurrence_in("FREQ=DAILY;UNTIL=20270501", ny) == "FREQ=DAILY;UNTIL=20270501"
