"""Typed JSON: row values keep their types on the way through the state DB."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal

import pytest

from reminders import codec


@pytest.mark.parametrize(
    "value",
    [
        date(2027, 3, 17),
        datetime(2027, 3, 17, 10, 30),
        datetime(2027, 3, 17, 10, 30, 15, 250000, tzinfo=UTC),
        datetime(2027, 3, 17, 10, 30, tzinfo=timezone(timedelta(hours=-5))),
        time(10, 30),
        Decimal("12.50"),
        Decimal("-0.000001"),
        b"\x00\xffbytes",
        'text with ünïcode and "quotes"',
        12,
        1.5,
        True,
        None,
        [1, "two", None],
        {"$date": "not one key"} | {"other": 1},
    ],
)
def test_values_round_trip_with_their_types(value: object) -> None:
    back = codec.loads(codec.dumps({"v": value}))["v"]
    assert back == value
    assert type(back) is type(value)


def test_a_datetime_keeps_its_offset_and_a_date_stays_a_date() -> None:
    eastern = datetime(2027, 3, 17, 10, 0, tzinfo=timezone(timedelta(hours=-4)))
    back = codec.loads(codec.dumps({"at": eastern, "due": date(2027, 3, 17)}))
    assert back["at"].utcoffset() == timedelta(hours=-4)
    assert not isinstance(back["due"], datetime)


def test_a_uuid_is_kept_as_its_text() -> None:
    value = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert codec.loads(codec.dumps({"id": value})) == {"id": str(value)}


def test_the_text_is_compact_json() -> None:
    text = codec.dumps({"due": date(2027, 3, 17), "n": 1, "name": "Zoë"})
    assert text == '{"due":{"$date":"2027-03-17"},"n":1,"name":"Zoë"}'
    assert json.loads(text)["n"] == 1


def test_a_value_that_cannot_be_kept_is_named() -> None:
    with pytest.raises(TypeError, match="a value of type object cannot be kept"):
        codec.dumps({"x": object()})
