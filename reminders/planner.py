"""Planning: which reminders a row of a rule asks for, and when; pure (row, rule and ``now``).

A row gives an occurrence (its identity: the rule's ``occurrence`` template), a customer, and a
digest of its values; for each offset (and, for a recurring rule, each date within the horizon) a
planned send time by the order in DESIGN.md "Time". Nothing here reads or writes a database:
:mod:`reminders.scan` brings the state DB in line with what is planned, ``reminders preview``
shows it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from dateutil.rrule import rrulestr

from . import codec, sendtime
from .config import Config
from .errors import InputError
from .rules import Rule, compile_key, key_columns


class RowError(InputError):
    """A row from which no reminder can be computed; names the column. The scan skips the row
    and records why."""

    def __init__(self, column: str | None, reason: str) -> None:
        super().__init__(reason)
        self.column = column
        self.reason = reason


@dataclass
class Planned:
    """One reminder the rule asks for."""

    occurrence: str
    offset: str
    customer_id: str
    planned_at: datetime
    data: str
    row_hash: str


def parse_due(value: Any, column: str) -> date | datetime:
    """A due value from the business DB: a date or datetime, or ISO text of one (SQLite)."""
    if isinstance(value, datetime | date):
        return value
    if value is None or value == "":
        raise RowError(column, f"{column} is empty: no due date")
    if isinstance(value, str):
        text = value.strip()
        try:
            if len(text) == 10:
                return date.fromisoformat(text)
            return datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            pass
    raise RowError(column, f"{column} = {value!r} is not a date or datetime")


class Planner:
    """Turns a rule's rows into planned reminders (pure: no I/O; ``now`` is given)."""

    def __init__(self, rule: Rule, config: Config, now: datetime) -> None:
        self.rule = rule
        self.now = now
        self.key = compile_key(rule.occurrence)
        self.columns = rule.columns
        self.default_tz = config.tz()
        self.window = rule.send_window or config.send_window
        self.fingerprint = rule.fingerprint(config).encode()
        self.earliest = now - rule.grace
        self.recurrence = rrulestr(rule.recurrence) if rule.recurrence else None
        self._max_offset = max((self._span(o) for o in rule.offsets), default=timedelta(0))
        # Where a date's first reminder is, from its due date (negative: before it). A date
        # enters the horizon with its first reminder (README, "horizon").
        self._first = min(
            (self._span(o) if o.amount > 0 else -self._span(o) for o in rule.offsets),
            default=timedelta(0),
        )
        self._id_column = self.columns["id"]
        self._due_column = rule.due
        # The digest of a row covers the rule and config that decide its schedule, then the row.
        self.hasher = hashlib.blake2b(self.fingerprint, digest_size=12)

    def bind(self, keys: Sequence[str]) -> None:
        """Prepare :meth:`identify` for rows as tuples of the columns ``keys``, in that order.

        Its parts (``key_of``, ``id_index``, ``hasher``) are public for the scan's hottest loop,
        which writes :meth:`identify` out inline for the usual row.
        """
        self.keys = list(keys)
        index = {name: i for i, name in enumerate(self.keys)}
        self.id_index = index.get(self._id_column, -1)
        simple = key_columns(self.rule.occurrence)
        if simple is None:
            names = self.keys
            key = self.key
            self.key_of: Callable[[Sequence[Any]], str] = lambda row: key(
                dict(zip(names, row, strict=True))
            )
            return
        literals, columns = simple
        missing = [c for c in columns if c not in index]
        if missing:

            def absent(_row: Sequence[Any]) -> str:
                raise KeyError(missing[0])

            self.key_of = absent
        elif literals == ["", ""]:
            (at,) = (index[c] for c in columns)
            column = columns[0]

            def one(row: Sequence[Any]) -> str:
                value = row[at]
                if value is None:
                    raise KeyError(column)
                return str(value)

            self.key_of = one
        else:
            positions = [(index[c], c) for c in columns]

            def several(row: Sequence[Any]) -> str:
                out = [literals[0]]
                for (at, column), literal in zip(positions, literals[1:], strict=True):
                    value = row[at]
                    if value is None:
                        raise KeyError(column)
                    out.append(str(value))
                    out.append(literal)
                return "".join(out)

            self.key_of = several

    def identify(self, row: Sequence[Any]) -> tuple[str, str, bytes]:
        """(occurrence key, customer id, raw digest) of a row given as a tuple (see :meth:`bind`).

        Raises RowError when the row has no occurrence key or no customer. The digest covers
        the rule's schedule settings and every value of the row with its type, so an unchanged
        digest means an unchanged row: a rescan skips it without computing anything else.
        """
        try:
            occurrence = self.key_of(row)
        except KeyError as exc:
            name = exc.args[0] if exc.args else None
            raise RowError(name, f"no occurrence key: column {name} is missing or empty") from None
        except Exception as exc:  # a Jinja error in a custom occurrence template
            raise RowError(None, f"no occurrence key: {exc}") from None
        if not occurrence:
            raise RowError(None, "no occurrence key: the occurrence template gave an empty text")
        if len(occurrence) > 200:
            raise RowError(None, "the occurrence key is longer than 200 characters")
        customer = row[self.id_index] if self.id_index >= 0 else None
        if customer is None or customer == "":
            column = self._id_column
            raise RowError(column, f"no customer id: column {column} is missing or empty")
        return occurrence, str(customer), self.digest(row)

    def digest(self, row: Sequence[Any]) -> bytes:
        """The raw digest of a row given as a tuple (see :meth:`bind`)."""
        # repr of the values is several times cheaper than JSON and as exact for what databases
        # return (str, numbers, dates, Decimal, bytes, UUID); a value whose repr is its address
        # would differ every scan, so such a row is digested as typed JSON instead.
        text = repr(tuple(row))
        if " at 0x" in text:
            text = codec.dumps(dict(zip(self.keys, row, strict=True)))
        hasher = self.hasher.copy()
        hasher.update(text.encode())
        return hasher.digest()

    @staticmethod
    def _span(offset: sendtime.Offset) -> timedelta:
        per = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "mo": 31 * 86400, "y": 366 * 86400}
        return timedelta(seconds=abs(offset.amount) * per[offset.unit])

    def identity(self, row: Mapping[str, Any]) -> tuple[str, str, str]:
        """(occurrence key, customer id, row digest) of a row given as a mapping.

        The same key and digest as :meth:`identify` gives the row as a tuple; raises RowError.
        """
        keys = list(row)
        if getattr(self, "keys", None) != keys:
            self.bind(keys)
        occurrence, customer, digest = self.identify(tuple(row.values()))
        return occurrence, customer, digest.hex()

    def plan(
        self,
        row: Mapping[str, Any],
        occurrence: str,
        customer: str,
        digest: str,
    ) -> tuple[list[Planned], int]:
        """The reminders a row asks for, and how many were left out as already too late.

        The row's values are kept as typed JSON, the due value parsed (ISO text from SQLite
        becomes a date or datetime, so a template formats it as one).
        """
        rule = self.rule
        due = parse_due(row.get(rule.due), rule.due)
        tz_column = self.columns["timezone"]
        tz_name = row.get(tz_column)
        if tz_name:
            try:
                tz = sendtime.zone(str(tz_name))
            except ValueError:
                raise RowError(
                    tz_column, f'{tz_column} = "{tz_name}" is not an IANA time zone'
                ) from None
        else:
            tz = self.default_tz
        data = codec.dumps({**row, rule.due: due})
        dues: Iterable[tuple[str, date | datetime]]
        if self.recurrence is None:
            dues = ((occurrence, due),)
        else:
            dues = self._recurring(occurrence, due, tz)
        planned: list[Planned] = []
        late = 0
        for key, when in dues:
            for offset in rule.offsets:
                at = sendtime.send_time(when, offset, tz, at=rule.at, window=self.window)
                if at < self.earliest:
                    late += 1
                    continue
                planned.append(Planned(key, offset.text, customer, at, data, digest))
        return planned, late

    def _recurring(
        self, occurrence: str, start: date | datetime, tz: Any
    ) -> Iterable[tuple[str, date | datetime]]:
        """Each recurrence date with a reminder within [now - grace, now + horizon].

        A date comes in once its first reminder (``due`` + the smallest offset) is within the
        horizon; months and years count as their longest (31, 366 days). The window reaches
        back by grace and the longest offset; reminders already too late are left out by the
        caller."""
        assert self.rule.recurrence is not None
        is_date = not isinstance(start, datetime)
        first = (
            start if isinstance(start, datetime) else datetime.combine(start, datetime.min.time())
        )
        if first.tzinfo is not None:
            first = first.astimezone(tz).replace(tzinfo=None)
        rrule = rrulestr(sendtime.recurrence_in(self.rule.recurrence, tz), dtstart=first)
        local_now = self.now.astimezone(tz).replace(tzinfo=None)
        lo = local_now - self.rule.grace - self._max_offset
        hi = local_now + self.rule.horizon - self._first
        for moment in rrule.between(lo, hi, inc=True):
            when: date | datetime = moment.date() if is_date else moment
            yield f"{occurrence}@{when.isoformat()}", when
