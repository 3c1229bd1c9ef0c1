"""Scanning: read a rule's rows from the business DB and bring the state DB in line with them.

For each row the rule yields an occurrence (its identity) and, for each offset, a reminder with a
planned send time. A scan creates what is new, moves open reminders whose planned time changed,
cancels open reminders whose occurrence vanished, and leaves everything else alone. It is idempotent
and safe to run concurrently: inserts skip existing (rule, occurrence, offset) keys, and on
PostgreSQL a per-rule advisory lock serialises two scans of one rule.

A row whose values have not changed since the last scan (same digest of values and rule) is not
recomputed, so an unchanged rescan reads, hashes and compares, and writes nothing.
"""

from __future__ import annotations

import hashlib
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from dateutil.rrule import rrulestr
from sqlalchemy.engine import Connection, Engine

from . import codec, schedule, source, store
from .config import Config
from .errors import RemindersError, SourceError, TemplateError
from .models import CANCELED, OPEN, PENDING, reminder, scan_run, skipped_row
from .rules import Rule, compile_key

BATCH = 5000
MAX_RECORDED_SKIPS = 1000

Progress = Callable[[int], None]


@dataclass
class ScanCounts:
    """What one rule's scan did."""

    rule: str
    rows: int = 0
    created: int = 0
    moved: int = 0
    canceled: int = 0
    unchanged: int = 0
    skipped: int = 0
    too_late: int = 0
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

    @staticmethod
    def _span(offset: schedule.Offset) -> timedelta:
        per = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "mo": 31 * 86400, "y": 366 * 86400}
        return timedelta(seconds=abs(offset.amount) * per[offset.unit])

    def identity(self, row: Mapping[str, Any]) -> tuple[str, str, str]:
        """(occurrence key, customer id, row digest) of a row; raises RowError."""
        try:
            occurrence = self.key(row)
        except KeyError as exc:
            name = exc.args[0] if exc.args else None
            raise RowError(name, f"no occurrence key: column {name} is missing or empty") from None
        except Exception as exc:  # a Jinja error in a custom occurrence template
            raise RowError(None, f"no occurrence key: {exc}") from None
        if not occurrence:
            raise RowError(None, "no occurrence key: the occurrence template gave an empty text")
        if len(occurrence) > 200:
            raise RowError(None, "the occurrence key is longer than 200 characters")
        id_column = self.columns["id"]
        customer = row.get(id_column)
        if customer is None or customer == "":
            raise RowError(id_column, f"no customer id: column {id_column} is missing or empty")
        data = codec.dumps(dict(row))
        digest = hashlib.blake2b(self.fingerprint + data.encode(), digest_size=12).hexdigest()
        return occurrence, str(customer), digest

    def plan(
        self, row: Mapping[str, Any], occurrence: str, customer: str, digest: str
    ) -> tuple[list[Planned], int]:
        """The reminders a row asks for, and how many were left out as already too late."""
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
        values = dict(row)
        values[rule.due] = due
        data = codec.dumps(values)
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


def _hash64(text: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(text.encode(), digest_size=8).digest(), "big", signed=True
    )


class _Seen:
    """The occurrence keys a scan saw, as sorted 64-bit digests (8 bytes a key, not a str set)."""

    def __init__(self) -> None:
        self.values = array("q")

    def add(self, key: str) -> None:
        self.values.append(_hash64(key))

    def freeze(self) -> None:
        self.values = array("q", sorted(self.values))

    def __contains__(self, key: str) -> bool:
        h = _hash64(key)
        i = bisect_left(self.values, h)
        return i < len(self.values) and self.values[i] == h


def scan_rule(
    config: Config,
    rule: Rule,
    state: Engine,
    business: Engine,
    now: datetime,
    progress: Progress | None = None,
) -> ScanCounts:
    """Scan one rule. A failing query fails this rule only: the error is kept in the counts."""
    counts = ScanCounts(rule.name)
    with state.begin() as conn:
        inserted = conn.execute(
            scan_run.insert().values(rule=rule.name, started_at=now, status="running")
        ).inserted_primary_key
        assert inserted is not None
        run_id = inserted[0]
    planner = Planner(rule, config, now)
    seen = _Seen()
    try:
        with state.connect() as conn, store.rule_lock(conn, rule.name):
            params = _query_params(rule.query, now, config)
            number = 0
            for batch in source.stream(business, rule.query, params, what=f"rule {rule.name}"):
                if number == 0 and batch:
                    _check_columns(rule, batch[0])
                with conn.begin():
                    number = _apply_batch(conn, planner, batch, number, counts, seen, now)
                if progress:
                    progress(len(batch))
            seen.freeze()
            with conn.begin():
                counts.canceled += _cancel_vanished(conn, rule, seen, now)
    except RemindersError as exc:
        counts.error = str(exc)
    except sa.exc.SQLAlchemyError as exc:
        # The state DB failed: the database's own message, without the statement and its rows.
        cause = exc.orig if isinstance(exc, sa.exc.DBAPIError) and exc.orig else exc
        counts.error = f"rule {rule.name}: state DB: {str(cause).strip().splitlines()[0]}"
    counts.skips.sort(key=lambda skip: skip[0])  # in row order (a batch finds them in two passes)
    with state.begin() as conn:
        if counts.skips:
            conn.execute(
                skipped_row.insert(),
                [
                    {
                        "scan_run_id": run_id,
                        "rule": rule.name,
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
                status="failed" if counts.error else "done",
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
    return counts


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


def _check_columns(rule: Rule, row: Mapping[str, Any]) -> None:
    missing = [c for c in (rule.due, rule.columns["id"]) if c not in row]
    if missing:
        raise SourceError(
            f"rule {rule.name} ({rule.file}:{rule.line}): the query returns no column "
            f"{', '.join(missing)} (it returns: {', '.join(row.keys())})"
        )


def _skip(counts: ScanCounts, number: int, occurrence: str | None, error: RowError) -> None:
    counts.skipped += 1
    if len(counts.skips) < MAX_RECORDED_SKIPS:
        counts.skips.append((number, occurrence, error.column, error.reason))


def _apply_batch(
    conn: Connection,
    planner: Planner,
    rows: list[Mapping[str, Any]],
    number: int,
    counts: ScanCounts,
    seen: _Seen,
    now: datetime,
) -> int:
    rule = planner.rule
    identified: list[tuple[int, Mapping[str, Any], str, str, str]] = []
    for row in rows:
        number += 1
        counts.rows += 1
        try:
            occurrence, customer, digest = planner.identity(row)
        except RowError as exc:
            _skip(counts, number, None, exc)
            continue
        seen.add(occurrence)
        identified.append((number, row, occurrence, customer, digest))
    existing = _existing(conn, rule, [item[2] for item in identified])
    inserts: list[dict[str, Any]] = []
    moves: list[dict[str, Any]] = []
    refreshes: list[dict[str, Any]] = []
    cancels: list[dict[str, Any]] = []
    for row_number, row, occurrence, customer, digest in identified:
        have = existing.get(occurrence, {})
        if (
            have
            and rule.recurrence is None
            and all(r["row_hash"] == digest for r in have[occurrence].values())
        ):
            counts.unchanged += len(have[occurrence])
            continue
        try:
            planned, late = planner.plan(row, occurrence, customer, digest)
        except RowError as exc:
            _skip(counts, row_number, occurrence, exc)
            continue
        counts.too_late += late
        wanted = set()
        for p in planned:
            current = have.get(p.occurrence, {}).get(p.offset)
            wanted.add((p.occurrence, p.offset))
            if current is None:
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
            elif current["status"] not in OPEN or current["planned_at"] < planner.earliest:
                continue  # sent, final, or past grace: scans leave it alone
            elif current["planned_at"] != p.planned_at:
                moves.append(
                    {
                        "rid": current["id"],
                        "planned": p.planned_at,
                        "data": p.data,
                        "hash": p.row_hash,
                        "now": now,
                        "old": current["status"],
                    }
                )
            else:
                refreshes.append({"rid": current["id"], "data": p.data, "hash": p.row_hash})
        for key, by_offset in have.items():
            for offset, current in by_offset.items():
                if (
                    (key, offset) not in wanted
                    and current["status"] in OPEN
                    and (current["planned_at"] >= planner.earliest)
                ):
                    cancels.append(
                        {
                            "rid": current["id"],
                            "now": now,
                            "old": current["status"],
                            "why": f"canceled: offset {offset} is no longer planned for it",
                        }
                    )
    counts.created += store.insert_ignoring_conflicts(conn, reminder, inserts)
    if moves:
        result = conn.execute(
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
        del result
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


Existing = dict[str, dict[str, dict[str, dict[str, Any]]]]


def _existing(conn: Connection, rule: Rule, keys: list[str]) -> Existing:
    """Existing reminders of these occurrences: occurrence -> key -> offset -> columns.

    For a recurring rule the stored keys are ``occurrence@date``, grouped under the occurrence.
    """
    found: Existing = {}
    if not keys:
        return found
    if rule.recurrence is None:
        for start in range(0, len(keys), 900):
            chunk = keys[start : start + 900]
            rows = conn.execute(
                sa.select(*_EXISTING_COLUMNS).where(
                    reminder.c.rule == rule.name, reminder.c.occurrence.in_(chunk)
                )
            ).mappings()
            for r in rows:
                key = r["occurrence"]
                found.setdefault(key, {}).setdefault(key, {})[r["offset"]] = dict(r)
        return found
    for base in keys:
        rows = conn.execute(
            sa.select(*_EXISTING_COLUMNS).where(
                reminder.c.rule == rule.name,
                reminder.c.occurrence.like(f"{_escape(base)}@%", escape="\\"),
            )
        ).mappings()
        for r in rows:
            found.setdefault(base, {}).setdefault(r["occurrence"], {})[r["offset"]] = dict(r)
    return found


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _cancel_vanished(conn: Connection, rule: Rule, seen: _Seen, now: datetime) -> int:
    """Cancel open reminders whose occurrence the query no longer returns (within grace)."""
    earliest = now - rule.grace
    rows = conn.execute(
        sa.select(reminder.c.id, reminder.c.occurrence, reminder.c.status).where(
            reminder.c.rule == rule.name,
            reminder.c.status.in_(OPEN),
            reminder.c.planned_at >= earliest,
        )
    ).all()
    why = "canceled: the occurrence is no longer returned by the rule's query"
    cancels = []
    for rid, occurrence, status in rows:
        base = occurrence.rsplit("@", 1)[0] if rule.recurrence else occurrence
        if base not in seen:
            cancels.append({"rid": rid, "now": now, "old": status, "why": why})
    if cancels:
        _cancel(conn, cancels)
    return len(cancels)


def scan_all(app: Any, *, rule_name: str | None = None, progress: bool = False) -> list[ScanCounts]:
    """Scan every rule (or one), each on its own: a failing rule does not stop the others."""
    from tqdm import tqdm

    rules = [app.ruleset.rule(rule_name)] if rule_name else list(app.ruleset.rules)
    _check_templates(app, rules)
    store.ensure_current(app.config.state_url)
    now = app.now()
    results = []
    for rule in rules:
        bar = tqdm(desc=f"scan {rule.name}", unit=" rows", disable=not progress, leave=False)
        try:
            results.append(
                scan_rule(app.config, rule, app.state, app.business, now, progress=bar.update)  # type: ignore[arg-type]
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
