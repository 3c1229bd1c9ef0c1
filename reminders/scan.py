"""Scanning: read a rule's rows from the business DB and bring the state DB in line with them.

For each row the rule yields an occurrence (its identity) and, for each offset, a reminder with a
planned send time. A scan creates what is new, moves open reminders whose planned time changed,
cancels open reminders whose occurrence vanished, and leaves everything else alone. It is idempotent
and safe to run concurrently: inserts skip existing (rule, occurrence, offset) keys, and on
PostgreSQL a per-rule advisory lock serialises two scans of one rule.

How a scan stays fast (a million rows in well under a minute, an unchanged rescan several times
faster than the first scan; ``benchmarks/scan.py`` measures both):

- At its start a scan loads the rule's open reminders within grace, compactly (:class:`_Known`:
  a hash of the occurrence, 8 bytes of the row digest, the id). Each row's digest covers the
  rule's schedule settings and the row's values, so a row whose digest matches is unchanged and
  costs no query and no schedule math; a rescan of unchanged rows reads, hashes, compares, and
  writes nothing. The reminders no row named are the vanished ones, found without a second pass.
- Rows are read in batches as plain tuples; a dict is made only for a row to plan.
- Inserts go in one statement per batch (see :func:`store.insert_ignoring_conflicts`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from itertools import compress, repeat
from typing import Any

import sqlalchemy as sa
from dateutil.rrule import rrulestr
from sqlalchemy.engine import Connection, Engine

from . import codec, consent, schedule, source, store
from .config import Config
from .errors import RemindersError, SourceError, TemplateError
from .models import CANCELED, OPEN, PENDING, reminder, scan_run, skipped_row
from .rules import Rule, compile_key, key_columns

log = logging.getLogger(__name__)

MAX_RECORDED_SKIPS = 1000

Progress = Callable[[int], None]


@dataclass
class ScanCounts:
    """What one rule's scan did: rows read, and reminders created, moved, canceled, found
    unchanged, or left out as too late. Reminders past grace are out of a scan's reach and are
    not counted (an unchanged rescan reports every reminder still to come as unchanged)."""

    rule: str
    rows: int = 0
    created: int = 0
    moved: int = 0
    canceled: int = 0
    unchanged: int = 0
    skipped: int = 0
    too_late: int = 0
    off: int = 0  # reminders not created: the customer turned every channel of the rule off
    error: str | None = None
    skips: list[tuple[int, str | None, str | None, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "rows": self.rows,
            "created": self.created,
            "moved": self.moved,
            "canceled": self.canceled,
            "unchanged": self.unchanged,
            "skipped": self.skipped,
            "too_late": self.too_late,
            "off": self.off,
            "error": self.error,
        }


class RowError(Exception):
    """A row from which no reminder can be computed; names the column."""

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
        self._id_column = self.columns["id"]
        self._due_column = rule.due
        # The digest of a row covers the rule and config that decide its schedule, then the row.
        self._hasher = hashlib.blake2b(self.fingerprint, digest_size=12)

    def bind(self, keys: Sequence[str]) -> None:
        """Prepare :meth:`identify` for rows as tuples of the columns ``keys``, in that order."""
        self.keys = list(keys)
        index = {name: i for i, name in enumerate(self.keys)}
        self._id_index = index.get(self._id_column, -1)
        simple = key_columns(self.rule.occurrence)
        if simple is None:
            names = self.keys
            key = self.key
            self._key_of: Callable[[Sequence[Any]], str] = lambda row: key(
                dict(zip(names, row, strict=True))
            )
            return
        literals, columns = simple
        missing = [c for c in columns if c not in index]
        if missing:

            def absent(_row: Sequence[Any]) -> str:
                raise KeyError(missing[0])

            self._key_of = absent
        elif literals == ["", ""]:
            (at,) = (index[c] for c in columns)
            column = columns[0]

            def one(row: Sequence[Any]) -> str:
                value = row[at]
                if value is None:
                    raise KeyError(column)
                return str(value)

            self._key_of = one
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

            self._key_of = several

    def identify(self, row: Sequence[Any]) -> tuple[str, str, bytes]:
        """(occurrence key, customer id, raw digest) of a row given as a tuple (see :meth:`bind`).

        Raises RowError when the row has no occurrence key or no customer. The digest covers
        the rule's schedule settings and every value of the row with its type, so an unchanged
        digest means an unchanged row: a rescan skips it without computing anything else.
        """
        try:
            occurrence = self._key_of(row)
        except KeyError as exc:
            name = exc.args[0] if exc.args else None
            raise RowError(name, f"no occurrence key: column {name} is missing or empty") from None
        except Exception as exc:  # a Jinja error in a custom occurrence template
            raise RowError(None, f"no occurrence key: {exc}") from None
        if not occurrence:
            raise RowError(None, "no occurrence key: the occurrence template gave an empty text")
        if len(occurrence) > 200:
            raise RowError(None, "the occurrence key is longer than 200 characters")
        customer = row[self._id_index] if self._id_index >= 0 else None
        if customer is None or customer == "":
            column = self._id_column
            raise RowError(column, f"no customer id: column {column} is missing or empty")
        # repr of the values is several times cheaper than JSON and as exact for what databases
        # return (str, numbers, dates, Decimal, bytes, UUID); a value whose repr is its address
        # would differ every scan, so such a row is digested as typed JSON instead.
        text = repr(tuple(row))
        if " at 0x" in text:
            text = codec.dumps(dict(zip(self.keys, row, strict=True)))
        hasher = self._hasher.copy()
        hasher.update(text.encode())
        return occurrence, str(customer), hasher.digest()

    @staticmethod
    def _span(offset: schedule.Offset) -> timedelta:
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
                tz = schedule.zone(str(tz_name))
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
                at = schedule.send_time(when, offset, tz, at=rule.at, window=self.window)
                if at < self.earliest:
                    late += 1
                    continue
                planned.append(Planned(key, offset.text, customer, at, data, digest))
        return planned, late

    def _recurring(
        self, occurrence: str, start: date | datetime, tz: Any
    ) -> Iterable[tuple[str, date | datetime]]:
        """Each recurrence date within [now - grace - longest offset, now + horizon]."""
        assert self.rule.recurrence is not None
        is_date = not isinstance(start, datetime)
        first = (
            start if isinstance(start, datetime) else datetime.combine(start, datetime.min.time())
        )
        if first.tzinfo is not None:
            first = first.astimezone(tz).replace(tzinfo=None)
        rrule = rrulestr(self.rule.recurrence, dtstart=first)
        local_now = self.now.astimezone(tz).replace(tzinfo=None)
        lo = local_now - self.rule.grace - self._max_offset
        hi = local_now + self.rule.horizon + self._max_offset
        for moment in rrule.between(lo, hi, inc=True):
            when: date | datetime = moment.date() if is_date else moment
            yield f"{occurrence}@{when.isoformat()}", when


def _hex64(prefix: str | None) -> int:
    """A stored digest's first 16 hex digits as a number (0, never a row's, when not hex)."""
    try:
        return int(prefix or "", 16)
    except ValueError:
        return 0


class _Known:
    """The open reminders of a rule within grace when its scan began (the only ones a scan may
    move or cancel), compactly.

    Per reminder, in arrays: a 64-bit hash of its occurrence (Python's own ``hash``, salted per
    process: fine, this lives for one scan; for a recurring rule, of the occurrence before its
    ``@date``), the first 8 bytes of its row digest, and its id. The rows come ordered by
    occurrence, so a key's reminders are neighbours and a dict finds the first of them. A scan
    marks what its rows name (:func:`_classify`); the reminders left unmarked at the end have
    vanished. A row whose digest matches every reminder of its occurrence here is unchanged,
    with no query.
    """

    def __init__(self) -> None:
        self.keys = array("q")
        self.digests = array("Q")
        self.ids = array("q")
        self.seen = bytearray()
        self.first: dict[int, int] = {}

    @classmethod
    def load(cls, conn: Connection, rule: Rule, earliest: datetime) -> _Known:
        found = cls()
        order: Any = reminder.c.occurrence
        if conn.dialect.name == "postgresql":
            order = order.collate("C")  # byte order: the keys with one prefix are neighbours
        prefix = sa.func.substr(reminder.c.row_hash, 1, 16)
        query = (
            sa.select(reminder.c.id, reminder.c.occurrence, prefix)
            .where(
                reminder.c.rule == rule.name,
                reminder.c.status.in_(OPEN),
                reminder.c.planned_at >= earliest,
            )
            .order_by(order)
        )
        if conn.dialect.name != "sqlite":  # a server-side cursor; SQLite's reads as it goes
            query = query.execution_options(yield_per=20_000)
        recurring = rule.recurrence is not None
        for part in source.batches(conn.execute(query), 20_000):
            ids, occurrences, prefixes = zip(*part, strict=True)
            if recurring:
                occurrences = tuple(o.rsplit("@", 1)[0] for o in occurrences)
            # Whole slices at a time through C loops (map), not a Python loop per reminder.
            found.keys.extend(map(hash, occurrences))
            try:
                found.digests.extend(map(int, prefixes, repeat(16)))
            except (ValueError, TypeError):  # not all hex: one at a time, the odd ones as 0
                del found.digests[len(found.ids) :]
                found.digests.extend(map(_hex64, prefixes))
            found.ids.extend(ids)
        size = len(found.keys)
        found.seen = bytearray(size)
        # The first index of each key: built backwards so the first one written last wins.
        found.first = dict(zip(reversed(found.keys), range(size - 1, -1, -1), strict=True))
        return found

    def __len__(self) -> int:
        return len(self.keys)

    def mark(self, occurrence: str) -> None:
        """Mark an occurrence's reminders seen (kept, not vanished)."""
        key = hash(occurrence)
        i = self.first.get(key)
        while i is not None and i < len(self.keys) and self.keys[i] == key:
            self.seen[i] = 1
            i += 1

    def vanished(self) -> list[int]:
        """Ids of the reminders no row named."""
        # 0 -> 1 and 1 -> 0 for every byte at once, then the ids where the result is 1
        unseen = self.seen.translate(_FLIP)
        return list(compress(self.ids, unseen))


_FLIP = bytes([1, 0]) + bytes(254)


def scan_rule(
    config: Config,
    rule: Rule,
    state: Engine,
    business: Engine,
    now: datetime,
    progress: Progress | None = None,
    should_stop: Callable[[], str | None] | None = None,
) -> ScanCounts:
    """Scan one rule. A failing query fails this rule only: the error is kept in the counts.

    ``should_stop`` is asked after each batch: a reason (a signal's name) stops the scan there,
    between transactions, by raising ``KeyboardInterrupt``; the run is recorded as interrupted.
    """
    counts = ScanCounts(rule.name)
    run_id: int | None = None
    planner = Planner(rule, config, now)
    try:
        # The run is recorded under the rule's lock, so a run left ``running`` while nothing
        # holds the lock is known to be stale (its process died; see store.scan_alive).
        with state.connect() as conn, store.rule_lock(conn, rule.name) as alone:
            with conn.begin():
                if alone:
                    _end_stale_runs(conn, rule.name)
                run_id = _start_run(conn, rule.name, now)
            with conn.begin():
                known = _Known.load(conn, rule, planner.earliest)
                # A rule with no reminders at all (its first scan) needs no lookups per batch.
                fresh = not known and (
                    conn.execute(
                        sa.select(reminder.c.id).where(reminder.c.rule == rule.name).limit(1)
                    ).first()
                    is None
                )
                # Customers who switched this rule off get no new reminders; their open ones
                # are left to the send-time check (consent), which also sees a switch back on.
                off = frozenset(consent.turned_off(conn, rule.name, rule.channels))
            params = _query_params(rule.query, now, config)
            number = 0
            batches = source.stream_rows(business, rule.query, params, what=f"rule {rule.name}")
            for keys, rows in batches:
                if number == 0:
                    _check_columns(rule, keys)
                    planner.bind(keys)
                with conn.begin():
                    number = _apply_batch(
                        conn, planner, rows, number, counts, known, fresh, now, off
                    )
                if progress:
                    progress(len(rows))
                if should_stop is not None and (why := should_stop()):
                    raise KeyboardInterrupt(why)
            with conn.begin():
                counts.canceled += _cancel_vanished(conn, known.vanished(), planner.earliest, now)
    except RemindersError as exc:
        counts.error = str(exc)
    except sa.exc.SQLAlchemyError as exc:
        # The state DB failed: the database's own message, without the statement and its rows.
        cause = exc.orig if isinstance(exc, sa.exc.DBAPIError) and exc.orig else exc
        counts.error = f"rule {rule.name}: state DB: {str(cause).strip().splitlines()[0]}"
    except BaseException as exc:
        # Ctrl-C, SIGTERM (the command turns it into KeyboardInterrupt), a bug: the run ends
        # with what it did and why it stopped, never left ``running``.
        if run_id is not None:
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                what = f"interrupted by {exc}" if str(exc) else "interrupted"
                counts.error = f"{what} before the scan finished; the next scan completes it"
                status = "interrupted"
            else:
                counts.error = f"rule {rule.name}: {type(exc).__name__}: {exc}"
                status = "failed"
            try:
                _finish_run(state, run_id, counts, now, status)
            except sa.exc.SQLAlchemyError as failed:  # the cause, raised below, matters more
                log.error(
                    "scan run %s of rule %s not recorded as %s: %s",
                    run_id,
                    rule.name,
                    status,
                    failed,
                )
        raise
    if run_id is None:  # the state DB failed before the run could be recorded
        with state.begin() as conn:
            run_id = _start_run(conn, rule.name, now)
    _finish_run(state, run_id, counts, now, "failed" if counts.error else "done")
    return counts


def _start_run(conn: Connection, rule: str, now: datetime) -> int:
    inserted = conn.execute(
        scan_run.insert().values(rule=rule, started_at=now, status="running")
    ).inserted_primary_key
    assert inserted is not None
    return int(inserted[0])


def _end_stale_runs(conn: Connection, rule: str) -> None:
    """Runs of ``rule`` left ``running`` by a process that died (the caller scans alone)."""
    conn.execute(
        scan_run.update()
        .where(scan_run.c.rule == rule, scan_run.c.status == "running")
        .values(status="interrupted", error=store.STALE_RUN)
    )


def _finish_run(state: Engine, run_id: int, counts: ScanCounts, now: datetime, status: str) -> None:
    """Record the end of a scan run: its counts, skipped rows, status and error."""
    counts.skips.sort(key=lambda skip: skip[0])  # in row order (a batch finds them in two passes)
    with state.begin() as conn:
        if counts.skips:
            conn.execute(
                skipped_row.insert(),
                [
                    {
                        "scan_run_id": run_id,
                        "rule": counts.rule,
                        "row_number": n,
                        "occurrence": occ,
                        "column": col,
                        "reason": why,
                    }
                    for n, occ, col, why in counts.skips
                ],
            )
        conn.execute(
            scan_run.update()
            .where(scan_run.c.id == run_id)
            .values(
                finished_at=now,
                status=status,
                rows=counts.rows,
                created=counts.created,
                moved=counts.moved,
                canceled=counts.canceled,
                unchanged=counts.unchanged,
                skipped=counts.skipped,
                too_late=counts.too_late,
                error=counts.error,
            )
        )


def _query_params(sql: str, now: datetime, config: Config) -> dict[str, Any]:
    """The engine's own parameters a rule query may use: ``:now`` (UTC) and ``:today``."""
    wanted = source.parameters(sql)
    available = {"now": now, "today": now.astimezone(config.tz()).date()}
    unknown = wanted - set(available)
    if unknown:
        raise SourceError(
            f"the query uses :{', :'.join(sorted(unknown))}; a rule query may use only :now, :today"
        )
    return {k: v for k, v in available.items() if k in wanted}


def _check_columns(rule: Rule, keys: Sequence[str]) -> None:
    missing = [c for c in (rule.due, rule.columns["id"]) if c not in keys]
    if missing:
        raise SourceError(
            f"rule {rule.name} ({rule.file}:{rule.line}): the query returns no column "
            f"{', '.join(missing)} (it returns: {', '.join(keys)})"
        )


def _skip(counts: ScanCounts, number: int, occurrence: str | None, error: RowError) -> None:
    counts.skipped += 1
    if len(counts.skips) < MAX_RECORDED_SKIPS:
        counts.skips.append((number, occurrence, error.column, error.reason))


Item = tuple[int, Sequence[Any], str, str, str]  # row number, row, occurrence, customer, digest


def _classify(
    planner: Planner, known: _Known, rows: Sequence[Sequence[Any]], number: int, counts: ScanCounts
) -> tuple[list[Item], list[Item]]:
    """Sort a batch's rows: unchanged (counted, done), changed (reminders within grace exist),
    absent (none do); bad rows are skipped. Every row's occurrence is marked seen in ``known``.

    The scan's hottest loop, a million times for a million rows: :meth:`Planner.identify` and
    :meth:`_Known.match` written out inline for the usual row, the methods themselves for the
    rest (they give the same key and digest, and name what is wrong with a bad row).
    """
    recurring = planner.rule.recurrence is not None
    changed: list[Item] = []
    absent: list[Item] = []
    key_of, id_index, hasher = planner._key_of, planner._id_index, planner._hasher
    first, keys, digests, seen = known.first, known.keys, known.digests, known.seen
    size = len(keys)
    unchanged = 0
    for row in rows:
        number += 1
        occurrence: str | None
        try:
            occurrence = key_of(row)
            customer = row[id_index]
        except Exception:
            occurrence = customer = None
        text = repr(tuple(row))
        if (
            not occurrence
            or customer is None
            or customer == ""
            or len(occurrence) > 200
            or " at 0x" in text
        ):
            try:
                occurrence, customer, raw = planner.identify(row)
            except RowError as exc:
                # A bad row that still names its occurrence keeps that occurrence's reminders
                # (reported, not vanished), like a row whose due date is bad.
                named = occurrence if occurrence and len(occurrence) <= 200 else None
                _skip(counts, number, named, exc)
                if named:
                    known.mark(named)
                continue
        else:
            digest = hasher.copy()
            digest.update(text.encode())
            raw = digest.digest()
        key = hash(occurrence)
        i = first.get(key)
        if i is None:
            absent.append((number, row, occurrence, str(customer), raw.hex()))
            continue
        wanted = int.from_bytes(raw[:8], "big")
        same = True
        n = 0
        while i < size and keys[i] == key:
            seen[i] = 1
            same = same and digests[i] == wanted
            i += 1
            n += 1
        if same and not recurring:  # a recurring rule's dates come and go: always planned
            unchanged += n
        else:
            changed.append((number, row, occurrence, str(customer), raw.hex()))
    counts.unchanged += unchanged
    return changed, absent


def _apply_batch(
    conn: Connection,
    planner: Planner,
    rows: Sequence[Sequence[Any]],
    number: int,
    counts: ScanCounts,
    known: _Known,
    fresh: bool,
    now: datetime,
    off: frozenset[str] = frozenset(),
) -> int:
    rule = planner.rule
    recurring = rule.recurrence is not None
    changed, absent = _classify(planner, known, rows, number, counts)
    number += len(rows)
    counts.rows += len(rows)
    if absent and not fresh and not recurring:
        # Reminders past grace are not known: a row whose reminders all are may be unchanged.
        stored = _stored_digests(conn, rule, [item[2] for item in absent])
        new = []
        for item in absent:
            kept = stored.get(item[2])
            if kept is None:
                new.append(item)
            elif kept != item[4]:
                changed.append(item)
            # else: unchanged, and its reminders are past grace, out of the scan's reach
        absent = new
    # Absent rows need no lookup: what they plan is inserted, and an insert that meets an
    # existing (past grace) reminder is skipped, which is what a scan does with those.
    existing = _existing(conn, rule, [item[2] for item in changed])
    identified = sorted(changed + absent, key=lambda item: item[0])
    inserts: list[dict[str, Any]] = []
    moves: list[dict[str, Any]] = []
    refreshes: list[dict[str, Any]] = []
    cancels: list[dict[str, Any]] = []
    earliest = planner.earliest
    for row_number, values, occurrence, customer, digest in identified:
        have = existing.get(occurrence, {})
        mapping = dict(zip(planner.keys, values, strict=True))
        try:
            planned, late = planner.plan(mapping, occurrence, customer, digest)
        except RowError as exc:
            _skip(counts, row_number, occurrence, exc)
            continue
        counts.too_late += late
        wanted = set()
        for p in planned:
            current = have.get(p.occurrence, {}).get(p.offset)
            wanted.add((p.occurrence, p.offset))
            if current is None:
                if p.customer_id in off:
                    counts.off += 1
                    continue
                inserts.append(
                    {
                        "rule": rule.name,
                        "occurrence": p.occurrence,
                        "offset": p.offset,
                        "customer_id": p.customer_id,
                        "planned_at": p.planned_at,
                        "send_at": p.planned_at,
                        "status": PENDING,
                        "data": p.data,
                        "row_hash": p.row_hash,
                        "created_at": now,
                        "updated_at": now,
                    }
                )
            elif current.status not in OPEN or current.planned_at < earliest:
                continue  # sent, final, or past grace: scans leave it alone
            elif current.planned_at != p.planned_at:
                moves.append(
                    {
                        "rid": current.id,
                        "planned": p.planned_at,
                        "data": p.data,
                        "hash": p.row_hash,
                        "now": now,
                        "old": current.status,
                    }
                )
            else:
                refreshes.append({"rid": current.id, "data": p.data, "hash": p.row_hash})
        for key, by_offset in have.items():
            for offset, current in by_offset.items():
                if (
                    (key, offset) not in wanted
                    and current.status in OPEN
                    and current.planned_at >= earliest
                ):
                    cancels.append(
                        {
                            "rid": current.id,
                            "now": now,
                            "old": current.status,
                            "why": f"canceled: offset {offset} is no longer planned for it",
                        }
                    )
    counts.created += store.insert_ignoring_conflicts(conn, reminder, inserts)
    if moves:
        conn.execute(
            reminder.update()
            .where(reminder.c.id == sa.bindparam("rid"), _STILL_OPEN)
            .values(
                planned_at=sa.bindparam("planned"),
                send_at=sa.bindparam("planned"),
                status=PENDING,
                job_id=None,
                data=sa.bindparam("data"),
                row_hash=sa.bindparam("hash"),
                updated_at=sa.bindparam("now"),
                reason="moved: the due date changed",
            ),
            moves,
        )
        counts.moved += len(moves)
        store.record(
            conn, [(m["rid"], m["old"], PENDING, "moved: the due date changed") for m in moves], now
        )
    if refreshes:
        conn.execute(
            reminder.update()
            .where(reminder.c.id == sa.bindparam("rid"))
            .values(data=sa.bindparam("data"), row_hash=sa.bindparam("hash")),
            refreshes,
        )
        counts.unchanged += len(refreshes)
    if cancels:
        _cancel(conn, cancels)
        counts.canceled += len(cancels)
    return number


# A condition for the many-row UPDATEs below: ``status.in_(OPEN)`` would be an "expanding"
# parameter, which SQLAlchemy refuses in an executemany.
_STILL_OPEN = sa.or_(*(reminder.c.status == s for s in OPEN))


def _cancel(conn: Connection, cancels: list[dict[str, Any]]) -> None:
    conn.execute(
        reminder.update()
        .where(reminder.c.id == sa.bindparam("rid"), _STILL_OPEN)
        .values(
            status=CANCELED, reason=sa.bindparam("why"), job_id=None, updated_at=sa.bindparam("now")
        ),
        cancels,
    )
    store.record(
        conn, [(c["rid"], c["old"], CANCELED, c["why"]) for c in cancels], cancels[0]["now"]
    )


_EXISTING_COLUMNS = (
    reminder.c.id,
    reminder.c.occurrence,
    reminder.c.offset,
    reminder.c.planned_at,
    reminder.c.status,
    reminder.c.row_hash,
)

# Keys a query looks up at once: a scan batch (source.stream's 2000) in one statement.
_LOOKUP = 5000
# SQLite has JSON built in from 3.38 (and Python's builds had the JSON1 extension long before).
_SQLITE_JSON = sqlite3.sqlite_version_info >= (3, 38)


def _occurrence_in(conn: Connection, keys: list[str]) -> sa.ColumnElement[bool]:
    """``occurrence IN keys`` as one parameter: a statement prepared once, not thousands of
    placeholders for SQLAlchemy to expand and the driver to parse for every batch."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import ARRAY

        param = sa.bindparam("keys", keys, type_=ARRAY(sa.String()))
        return reminder.c.occurrence == sa.any_(param)
    if conn.dialect.name == "sqlite" and _SQLITE_JSON:
        listed = sa.func.json_each(sa.bindparam("keys", json.dumps(keys))).table_valued("value")
        return reminder.c.occurrence.in_(sa.select(listed.c.value))
    return reminder.c.occurrence.in_(keys)


def _stored_digests(conn: Connection, rule: Rule, keys: list[str]) -> dict[str, str]:
    """Occurrence -> its reminders' row digest, for those of ``keys`` that have reminders.

    An occurrence whose reminders disagree gets an empty digest, so it never looks unchanged.
    """
    found: dict[str, str] = {}
    for start in range(0, len(keys), _LOOKUP):
        chunk = keys[start : start + _LOOKUP]
        query = sa.select(reminder.c.occurrence, reminder.c.row_hash).where(
            reminder.c.rule == rule.name, _occurrence_in(conn, chunk)
        )
        for occurrence, digest in conn.execute(query).all():
            known = found.get(occurrence)
            found[occurrence] = digest if known is None or known == digest else ""
    return found


Existing = dict[str, dict[str, Any]]  # key -> offset -> row (id, occurrence, ..., row_hash)


def _existing(conn: Connection, rule: Rule, keys: list[str]) -> dict[str, Existing]:
    """Existing reminders of these occurrences: occurrence -> key -> offset -> row.

    For a recurring rule the stored keys are ``occurrence@date``, grouped under the occurrence.
    """
    found: dict[str, Existing] = {}
    if not keys:
        return found
    if rule.recurrence is None:
        for start in range(0, len(keys), _LOOKUP):
            chunk = keys[start : start + _LOOKUP]
            rows = conn.execute(
                sa.select(*_EXISTING_COLUMNS).where(
                    reminder.c.rule == rule.name, _occurrence_in(conn, chunk)
                )
            )
            for r in rows:
                found.setdefault(r.occurrence, {}).setdefault(r.occurrence, {})[r.offset] = r
        return found
    for base in keys:
        rows = conn.execute(
            sa.select(*_EXISTING_COLUMNS).where(
                reminder.c.rule == rule.name,
                reminder.c.occurrence.like(f"{_escape(base)}@%", escape="\\"),
            )
        )
        for r in rows:
            found.setdefault(base, {}).setdefault(r.occurrence, {})[r.offset] = r
    return found


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _cancel_vanished(conn: Connection, ids: list[int], earliest: datetime, now: datetime) -> int:
    """Cancel the reminders ``ids`` (whose occurrences no row named) that are still open and
    within grace: the state DB is asked again, so what changed meanwhile is left alone."""
    why = "canceled: the occurrence is no longer returned by the rule's query"
    cancels = []
    for start in range(0, len(ids), _LOOKUP):
        chunk = ids[start : start + _LOOKUP]
        query = sa.select(reminder.c.id, reminder.c.status).where(
            reminder.c.id.in_(chunk),
            reminder.c.status.in_(OPEN),
            reminder.c.planned_at >= earliest,
        )
        for rid, status in conn.execute(query).all():
            cancels.append({"rid": rid, "now": now, "old": status, "why": why})
    if cancels:
        cancels.sort(key=lambda c: c["rid"])
        _cancel(conn, cancels)
    return len(cancels)


def scan_all(
    app: Any,
    *,
    rule_name: str | None = None,
    progress: bool = False,
    should_stop: Callable[[], str | None] | None = None,
) -> list[ScanCounts]:
    """Scan every rule (or one), each on its own: a failing rule does not stop the others.

    ``should_stop``: see :func:`scan_rule`; also asked before each rule.
    """
    from tqdm import tqdm

    rules = [app.ruleset.rule(rule_name)] if rule_name else list(app.ruleset.rules)
    _check_templates(app, rules)
    store.ensure_current(app.config.state_url)
    now = app.now()
    results = []
    for rule in rules:
        if should_stop is not None and (why := should_stop()):
            raise KeyboardInterrupt(why)
        bar = tqdm(desc=f"scan {rule.name}", unit=" rows", disable=not progress, leave=False)
        try:
            results.append(
                scan_rule(
                    app.config,
                    rule,
                    app.state,
                    app.business,
                    now,
                    progress=bar.update,  # type: ignore[arg-type]
                    should_stop=should_stop,
                )
            )
        finally:
            bar.close()
    return results


def _check_templates(app: Any, rules: list[Rule]) -> None:
    """Refuse to schedule reminders whose templates are missing or broken (nothing is written)."""
    from .validate import template_problems

    errors = [p for p in template_problems(app, rules) if not p.warning]
    if errors:
        raise TemplateError(errors)
