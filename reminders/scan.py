"""Scanning: read a rule's rows from the business DB and bring the state DB in line with them.

For each row the rule yields an occurrence (its identity) and, for each offset, a reminder with a
planned send time (:mod:`reminders.planner` plans them). A scan creates what is new, moves open
reminders whose planned time changed, cancels open reminders whose occurrence vanished, and leaves
everything else alone. It is idempotent and safe to run concurrently: inserts skip existing (rule,
occurrence, offset) keys, and on PostgreSQL a per-rule advisory lock serialises two scans of one
rule.

How a scan stays fast and small (``benchmarks/scan.py`` measures it, up to ten million rows):

- Rows are read in batches (:data:`CHUNK` rows) as plain tuples, each batch applied in a
  transaction of its own; a dict is made only for a row to plan.
- A rule's first scan looks nothing up and records nothing: every row is new, and nothing can
  have vanished. On PostgreSQL each batch is written on a thread of its own while the next is
  read and planned (:class:`_Behind`).
- A full rescan holds the digests of the rule's open reminders in memory, about 14 bytes a
  reminder (:mod:`reminders.open_digests`): a row whose digest one carries is unchanged and
  costs a vectorised lookup, nothing else. The other rows (new, changed) are looked up in the
  state DB a batch at a time and their occurrences recorded in a temporary table (:class:`_Seen`);
  the open reminders no row matched and no recorded occurrence names have vanished, found by
  one anti-join at the end and canceled a chunk at a time. A rule with more open reminders than
  the digests may hold is compared the second way alone, in bounded memory whatever its size.
- Inserts go in one statement per batch, through COPY on PostgreSQL (see
  :func:`state_db.copy_ignoring_conflicts`).
- An incremental rule's scan reads only the rows changed since its last one (``:since``).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import operator
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from . import business_db, clock, consent, dberrors, state_db
from . import counts as reminder_counts
from .config import Config
from .errors import RemindersError, SourceError, TemplateError
from .lifecycle import CANCELED, OPEN, PENDING, move, move_each, param
from .models import OPEN_OCCURRENCE_INDEX, reminder, scan_run, skipped_row
from .planner import Planner, RowError
from .process_metrics import SCAN_PHASE_SECONDS, timed
from .rules import QUERY_PARAMETERS, Rule

if TYPE_CHECKING:
    from .app import App
    from .open_digests import OpenDigests

log = logging.getLogger(__name__)

MAX_RECORDED_SKIPS = 1000
CHUNK = 2000  # rows a transaction; the rows, lookups and cancels a scan holds at once
FULL = "full"
INCREMENTAL = "incremental"

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
    restored: int = 0  # canceled by their occurrence's absence, pending again on its return
    held: int = 0  # not canceled although their occurrence vanished: too many at once
    kind: str = FULL  # full, or incremental: only the rows changed since the last scan
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
            "restored": self.restored,
            "held": self.held,
            "kind": self.kind,
            "error": self.error,
        }


class _Seen:
    """The occurrences a full scan's rows named, kept in a temporary table of the scan's own
    state DB connection (on disk on SQLite, unlogged on PostgreSQL), never in memory: a scan of
    ten million rows holds one batch at a time. At the end one anti-join in the database finds
    the open reminders no row named (:meth:`vanished`), read back in chunks.

    For a recurring rule the stored occurrences are ``KEY@DATE``: the date is cut off in SQL
    (the characters of an ISO date or datetime trimmed from the right, then the ``@``).
    """

    TABLE = "reminders_scan_seen"
    # A full rescan's open reminders no row's digest matched (see only()): the candidates.
    UNMATCHED = "reminders_scan_unmatched"

    def __init__(self, conn: Connection, rule: Rule) -> None:
        self.conn = conn
        self.rule = rule
        self.postgresql = conn.dialect.name == "postgresql"
        self.open_reminders = reminder.alias("open_reminders")
        self.unmatched: sa.TableClause | None = None
        self.none_unnamed = False  # known without asking: no open reminder can have vanished
        for table in (self.TABLE, self.UNMATCHED):  # in the caller's transaction
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
        conn.exec_driver_sql(f"CREATE TEMPORARY TABLE {self.TABLE} (occurrence TEXT)")

    def add(self, occurrences: list[str]) -> None:
        """Record occurrences seen (in the caller's transaction)."""
        self._insert(self.TABLE, "occurrence", occurrences)

    def _insert(self, table: str, column: str, values: list[str]) -> None:
        if not values:
            return
        if self.postgresql:
            raw = self.conn.connection.driver_connection
            assert raw is not None
            with raw.cursor().copy(f"COPY {table} ({column}) FROM STDIN") as copy:
                for value in values:
                    copy.write_row((value,))
            return
        self.conn.exec_driver_sql(
            f"INSERT INTO {table} ({column}) VALUES (?)", [(v,) for v in values]
        )

    def only(self, known: OpenDigests, chunk: int) -> None:
        """Narrow the vanished to the open reminders whose digest no row matched (a full
        rescan's: a matched one's occurrence was named by its row, which was not recorded). With
        none left unmatched nothing vanished, and nothing is asked of the database; otherwise
        the unmatched digests go to a temporary table the anti-join reads."""
        if not known.unmatched_count():
            self.none_unnamed = True
            return
        self.conn.exec_driver_sql(f"CREATE TEMPORARY TABLE {self.UNMATCHED} (row_hash TEXT)")
        for digests in known.unmatched(chunk):
            self._insert(self.UNMATCHED, "row_hash", digests)
        self.conn.exec_driver_sql(f"CREATE INDEX {self.UNMATCHED}_h ON {self.UNMATCHED} (row_hash)")
        self.unmatched = sa.table(self.UNMATCHED, sa.column("row_hash", sa.Text))

    def _open(self, earliest: datetime) -> Any:
        return sa.and_(
            reminder.c.rule == self.rule.name,
            reminder.c.status.in_(OPEN),
            reminder.c.planned_at >= earliest,
        )

    def open_count(self, earliest: datetime) -> int:
        """The rule's open reminders within grace: the ones a scan may cancel."""
        query = sa.select(sa.func.count()).select_from(reminder).where(self._open(earliest))
        return int(self.conn.execute(query).scalar_one())

    def _unnamed(self, earliest: datetime, after: int = 0) -> sa.Select[Any]:
        """Ids of the rule's open reminders within grace (and past id ``after``) whose
        occurrence no row named.

        The open reminders are read from the index of open occurrences alone (rule,
        occurrence: nothing of the table is read for a reminder that was named); only the
        unnamed ones are then read for their planned time. On SQLite ``INDEXED BY`` says so
        (its planner would take the (rule, status, send_at) index and read every reminder's
        row: 7x slower at 200,000 reminders).
        """
        open_ = self.open_reminders
        occurrence: Any = open_.c.occurrence
        if self.rule.recurrence is not None:
            bare = sa.func.rtrim(occurrence, "0123456789-T:+.Z")
            occurrence = sa.func.substr(bare, 1, sa.func.length(bare) - 1)
        seen = sa.table(self.TABLE, sa.column("occurrence", sa.Text))
        named = sa.exists().where(seen.c.occurrence == occurrence)
        # The statuses in the index's own order: SQLite uses a partial index for a query
        # whose WHERE has its condition term for term.
        unnamed = sa.select(open_.c.id).where(
            open_.c.rule == self.rule.name,
            open_.c.status.in_(sorted(OPEN)),
            open_.c.id > after,
            ~named,
        )
        # Only the planned time (and a full rescan's digest) outside: any other condition on
        # the reminder there could lead SQLite to read a status index for every open reminder
        # rather than the unnamed ids.
        outside = [reminder.c.id.in_(unnamed), reminder.c.planned_at >= earliest]
        if self.unmatched is not None:
            outside.append(reminder.c.row_hash.in_(sa.select(self.unmatched.c.row_hash)))
        return sa.select(reminder.c.id).where(*outside)

    def _run(self, query: sa.Select[Any]) -> list[Any]:
        index = OPEN_OCCURRENCE_INDEX
        found = state_db.execute_indexed_by(self.conn, query, self.open_reminders, index)
        return list(found.scalars())

    def index(self) -> None:
        """Index the seen occurrences once they are all in: one sort, then a probe a reminder."""
        self.conn.exec_driver_sql(f"CREATE INDEX {self.TABLE}_o ON {self.TABLE} (occurrence)")
        if self.postgresql:
            self.conn.exec_driver_sql(f"ANALYZE {self.TABLE}")
            if self.unmatched is not None:
                self.conn.exec_driver_sql(f"ANALYZE {self.UNMATCHED}")

    def vanished_count(self, earliest: datetime) -> int:
        query = sa.select(sa.func.count()).select_from(self._unnamed(earliest).subquery())
        return int(self._run(query)[0])

    def vanished(self, earliest: datetime, chunk: int) -> Iterator[list[int]]:
        """Ids of the open reminders within grace no row named, ``chunk`` at a time (by id,
        each chunk its own query: what the caller cancels in between does not disturb it)."""
        last = 0
        while True:
            with self.conn.begin():
                query = self._unnamed(earliest, last).order_by(reminder.c.id).limit(chunk)
                ids = self._run(query)
            if not ids:
                return
            yield ids
            last = ids[-1]

    def drop(self) -> None:
        if self.conn.in_transaction():
            self.conn.rollback()
        with self.conn.begin():
            for table in (self.TABLE, self.UNMATCHED):
                self.conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")


def scan_rule(
    config: Config,
    rule: Rule,
    state: Engine,
    business: Engine,
    now: datetime,
    progress: Progress | None = None,
    *,
    allow_mass_cancel: bool = False,
    should_stop: Callable[[], str | None] | None = None,
    full: bool = False,
    chunk: int = CHUNK,
) -> ScanCounts:
    """Scan one rule. A failing query fails this rule only: the error is kept in the counts.

    A rule with ``incremental:`` is scanned incrementally (``:since`` bound to the start of its
    last successful scan minus the lookback) unless ``full`` or its last full scan is older than
    ``full_every``. An incremental scan creates and moves reminders for the rows it reads and
    cancels none whose row it did not read (it cannot tell a vanished row from an unchanged one).

    A scan that would cancel more than ``scan.max_cancel`` of the rule's open reminders because
    their rows vanished (a query suddenly returning nothing) cancels none of them and fails,
    unless ``allow_mass_cancel``; what it creates and moves stands.

    ``should_stop`` is asked after each batch: a reason (a signal's name) stops the scan there,
    between transactions, by raising ``KeyboardInterrupt``; the run is recorded as interrupted.

    ``chunk``: rows read and applied a transaction, and vanished reminders canceled a
    transaction (the scan holds no more than that in memory).
    """
    counts = ScanCounts(rule.name)
    run_id: int | None = None
    digest = rule_digest(rule, config)
    planner = Planner(rule, config, now)
    try:
        # The run is recorded under the rule's lock, so a run left ``running`` while nothing
        # holds the lock is known to be stale (its process died; see state_db.scan_alive).
        with state.connect() as conn, state_db.rule_lock(conn, rule.name) as alone:
            with conn.begin():
                if alone:
                    _end_stale_runs(conn, rule.name)
                counts.kind, since = scan_kind(conn, rule, now, digest, full=full)
                run_id = _start_run(conn, rule.name, now, counts.kind, digest)
            incremental = counts.kind == INCREMENTAL
            with conn.begin(), timed(SCAN_PHASE_SECONDS, rule.name, "load"):
                # A rule with no reminders at all (its first scan) needs no lookups per batch.
                fresh = (
                    conn.execute(
                        sa.select(reminder.c.id).where(reminder.c.rule == rule.name).limit(1)
                    ).first()
                    is None
                )
                # An incremental scan cancels nothing, and a first scan has nothing to cancel:
                # only a full rescan needs a record of what it saw.
                seen = None if incremental or fresh else _Seen(conn, rule)
                # Customers who switched this rule off get no new reminders; their open ones
                # are left to the send-time re-check (consent), which also sees a switch back on.
                off = frozenset(consent.turned_off(conn, rule.name, rule.channels))
                # A full rescan compares the rows with its open reminders' digests in memory.
                known = None
                if seen is not None and rule.recurrence is None:
                    known = _open_digests(conn, rule, planner.earliest)
            params = _query_params(rule.query, now, config, since)
            number = 0
            what = f"rule {rule.name}"
            batches = business_db.stream_rows(business, rule.query, params, what=what, batch=chunk)
            # Reading the business DB and applying its rows alternate batch by batch: each
            # phase's time is the sum of its turns.
            phases = _PhaseClock()
            # PostgreSQL only: SQLite's driver lets go of the GIL for every row it writes, and
            # taking it back from the planning thread made a first scan 10-25% slower.
            overlap = fresh and conn.dialect.name == "postgresql"
            behind = _Behind(conn, counts, now) if overlap else None
            try:
                for keys, rows in phases.each("query", batches):
                    if number == 0:
                        _check_columns(rule, keys)
                        planner.bind(keys)
                    # A first scan on PostgreSQL looks nothing up: no transaction to plan in.
                    planning = nullcontext() if behind is not None else conn.begin()
                    with planning, phases.spent("apply"):
                        number = _apply_batch(
                            conn,
                            planner,
                            rows,
                            number,
                            counts,
                            seen,
                            fresh,
                            now,
                            off,
                            known,
                            write=None if behind is None else behind.write,
                        )
                    if progress:
                        progress(len(rows))
                    if should_stop is not None and (why := should_stop()):
                        raise KeyboardInterrupt(why)
                if behind is not None:
                    with phases.spent("apply"):
                        behind.wait()
            finally:
                if behind is not None:
                    behind.close()
            phases.observe(rule.name)
            if fresh and counts.created >= ANALYZE_AFTER:
                state_db.analyze(state, reminder)
            if seen is None:  # a first or incremental scan: nothing vanished here
                _finish_run(state, run_id, counts, now, "done")
                return counts
            earliest = planner.earliest
            with conn.begin(), timed(SCAN_PHASE_SECONDS, rule.name, "compare"):
                if known is not None:
                    seen.only(known, chunk)
                vanished = 0
                if not seen.none_unnamed:
                    seen.index()
                    vanished = seen.vanished_count(earliest)
                open_count = seen.open_count(earliest) if vanished else 0
            limit = config.scan.max_cancel
            if not allow_mass_cancel and is_mass_cancel(vanished, open_count, limit):
                counts.held = vanished
                counts.error = (
                    f"rule {rule.name}: {vanished} of its {open_count} open reminders "
                    f"({vanished / open_count:.0%}) would be canceled because the query no "
                    f"longer returns their rows, more than scan.max_cancel ({limit:.0%}) allows: "
                    "none was canceled. If the rows are really gone (not a truncated table or a "
                    f"broken WHERE), run `reminders scan --rule {rule.name} --allow-mass-cancel`"
                )
            elif vanished:
                with timed(SCAN_PHASE_SECONDS, rule.name, "cancel"):
                    for ids in seen.vanished(earliest, chunk):
                        with conn.begin():
                            counts.canceled += _cancel_vanished(conn, ids, earliest, now)
            seen.drop()
    except RemindersError as exc:
        counts.error = str(exc)
    except sa.exc.SQLAlchemyError as exc:
        # The state DB failed: the database's own message, without the statement and its rows.
        counts.error = f"rule {rule.name}: state DB: {dberrors.message(exc)}"
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
            run_id = _start_run(conn, rule.name, now, counts.kind, digest)
    _finish_run(state, run_id, counts, now, "failed" if counts.error else "done")
    return counts


def rule_digest(rule: Rule, config: Config) -> str:
    """A digest of what decides a rule's rows and reminders: its query and schedule settings."""
    parts = f"{rule.fingerprint(config)}\n{rule.query}".encode()
    return hashlib.blake2b(parts, digest_size=8).hexdigest()


def scan_kind(
    conn: Connection, rule: Rule, now: datetime, digest: str, *, full: bool = False
) -> tuple[str, datetime]:
    """Which scan of ``rule`` runs at ``now``, and the ``:since`` it binds.

    Full (since the epoch) for a rule without ``incremental:``, when ``full`` is asked, when the
    rule has no successful full scan, its last one started ``full_every`` or more ago, or ran
    another query or schedule (``digest``, :func:`rule_digest`: a changed WHERE or ``at``
    concerns rows that did not change). Otherwise incremental, since the start of the rule's
    last successful scan (of either kind) minus ``lookback``: rows changed while that scan ran
    are read again, never missed.
    """
    setting = rule.incremental
    if setting is None or full:
        return FULL, business_db.EPOCH
    done = sa.and_(scan_run.c.rule == rule.name, scan_run.c.status == "done")
    last_full = conn.execute(
        sa.select(scan_run.c.started_at, scan_run.c.rule_digest)
        .where(done, scan_run.c.kind == FULL)
        .order_by(scan_run.c.started_at.desc(), scan_run.c.id.desc())
        .limit(1)
    ).first()
    if (
        last_full is None
        or last_full.rule_digest != digest
        or now - last_full.started_at >= setting.full_every
    ):
        return FULL, business_db.EPOCH
    last = conn.execute(sa.select(sa.func.max(scan_run.c.started_at)).where(done)).scalar()
    assert last is not None  # a full one at least
    return INCREMENTAL, min(last, now) - setting.lookback


def _start_run(conn: Connection, rule: str, now: datetime, kind: str, digest: str) -> int:
    inserted = conn.execute(
        scan_run.insert().values(
            rule=rule, started_at=now, status="running", kind=kind, rule_digest=digest
        )
    ).inserted_primary_key
    assert inserted is not None
    return int(inserted[0])


def _end_stale_runs(conn: Connection, rule: str) -> None:
    """Runs of ``rule`` left ``running`` by a process that died (the caller scans alone)."""
    conn.execute(
        scan_run.update()
        .where(scan_run.c.rule == rule, scan_run.c.status == "running")
        .values(status="interrupted", error=state_db.STALE_RUN)
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
                # The clock read again: finished_at - started_at is how long the scan took.
                finished_at=max(now, clock.now()),
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


T = TypeVar("T")


class _PhaseClock:
    """Seconds spent in each phase of a scan whose phases take turns."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def spent(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def each(self, phase: str, items: Iterable[T]) -> Iterator[T]:
        """``items``, the time spent producing each counted in ``phase``."""
        found = iter(items)
        while True:
            with self.spent(phase):
                try:
                    item = next(found)
                except StopIteration:
                    return
            yield item

    def observe(self, rule: str) -> None:
        for phase, seconds in self.seconds.items():
            SCAN_PHASE_SECONDS.labels(rule, phase).observe(seconds)


def _query_params(
    sql: str, now: datetime, config: Config, since: datetime = business_db.EPOCH
) -> dict[str, Any]:
    """The engine's own parameters a rule query may use: ``:now`` (UTC), ``:today`` and
    ``:since`` (UTC)."""
    unknown = business_db.parameters(sql) - set(QUERY_PARAMETERS)
    if unknown:
        raise SourceError(
            f"the query uses :{', :'.join(sorted(unknown))}; a rule query may use only :now, "
            ":today, :since"
        )
    return business_db.time_params(sql, now, config.tz(), since)


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
    planner: Planner, rows: Sequence[Sequence[Any]], numbers: Iterable[int], counts: ScanCounts
) -> tuple[list[Item], list[str]]:
    """A batch's rows identified (occurrence, customer, digest); bad rows are skipped. Also the
    occurrences the batch names, bad rows' included when they still name one: a bad row keeps
    its occurrence's reminders (reported, not vanished), like a row whose due date is bad.

    The scan's hottest loop, a million times for a million rows: :meth:`Planner.identify`
    written out inline for the usual row; ``identify`` itself for the rest (it gives the same
    key and digest, and names what is wrong with a bad row).
    """
    items: list[Item] = []
    named: list[str] = []
    key_of, id_index, hasher = planner.key_of, planner.id_index, planner.hasher
    for number, row in zip(numbers, rows, strict=True):
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
                kept = occurrence if occurrence and len(occurrence) <= 200 else None
                _skip(counts, number, kept, exc)
                if kept:
                    named.append(kept)
                continue
        else:
            digest = hasher.copy()
            digest.update(text.encode())
            raw = digest.digest()
        named.append(occurrence)
        items.append((number, row, occurrence, str(customer), raw.hex()))
    return items, named


def _unknown(
    known: OpenDigests,
    planner: Planner,
    rows: Sequence[Sequence[Any]],
    numbers: Sequence[int],
    counts: ScanCounts,
) -> tuple[Sequence[Sequence[Any]], Sequence[int]]:
    """The rows of a batch whose digest no open reminder carries, and their row numbers; the
    reminders of the others are counted unchanged. The scan's hottest loop on a rescan: the
    digest of :meth:`Planner.digest` written out inline."""
    copy = planner.hasher.copy
    digests: list[bytes] = []
    append = digests.append
    for row, text in zip(rows, [repr(tuple(row)).encode() for row in rows], strict=True):
        if b" at 0x" in text:
            append(planner.digest(row))
            continue
        digest = copy()
        digest.update(text)
        append(digest.digest())
    found, newly = known.match(b"".join(digests))
    counts.unchanged += newly
    if found.all():
        return [], []
    left = [int(i) for i in (~found).nonzero()[0]]
    return [rows[i] for i in left], [numbers[i] for i in left]


def _apply_batch(
    conn: Connection,
    planner: Planner,
    rows: Sequence[Sequence[Any]],
    number: int,
    counts: ScanCounts,
    seen: _Seen | None,
    fresh: bool,
    now: datetime,
    off: frozenset[str] = frozenset(),
    known: OpenDigests | None = None,
    write: Callable[[_Changes], None] | None = None,
) -> int:
    """Apply one batch of rows, in the caller's transaction: look up the reminders of its
    occurrences (none on a rule's first scan), then insert, move, restore, refresh and cancel
    what the rows ask for. ``seen`` (a full scan's) records the occurrences named; ``known``
    (a full rescan's, see :mod:`reminders.open_digests`) vouches for the unchanged rows, which
    then need neither. ``write`` takes the batch's changes to write them later (a first scan's:
    see :class:`_Behind`); without it they are written here."""
    rule = planner.rule
    recurring = rule.recurrence is not None
    counts.rows += len(rows)
    numbers: Sequence[int] = range(number + 1, number + 1 + len(rows))
    number += len(rows)
    if known is not None:
        rows, numbers = _unknown(known, planner, rows, numbers, counts)
        if not rows:
            return number
    absent, named = _classify(planner, rows, numbers, counts)
    if seen is not None:
        seen.add(named)
    changed: list[Item] = []
    if recurring and not fresh:
        # Each occurrence's dates come and go with now: always looked up and planned.
        changed, absent = absent, []
    existing: dict[str, Existing] | None = None
    if absent and not fresh:
        # One query for the batch: a row whose digest its reminders carry is unchanged.
        keys = [item[2] for item in absent]
        if seen is None or known is not None:
            # The rows asking are mostly changed ones (an incremental scan's, or those a full
            # rescan's digests did not vouch for): one lookup of their reminders whole tells
            # which are unchanged and holds what planning the others needs.
            existing = _existing(conn, rule, keys)
            stored = {key: _agreed(found, planner.earliest) for key, found in existing.items()}
        else:
            stored = _stored_digests(conn, rule, keys, planner.earliest)
        new = []
        for item in absent:
            kept = stored.get(item[2])
            if kept is None:
                new.append(item)
            elif kept[0] != item[4]:
                changed.append(item)
            else:  # unchanged: its open reminders within grace are (those past are not counted)
                counts.unchanged += kept[1]
        absent = new
    # Absent rows need no lookup: what they plan is inserted, and an insert that meets an
    # existing (past grace) reminder is skipped, which is what a scan does with those.
    if existing is None:
        existing = _existing(conn, rule, [item[2] for item in changed])
    identified = sorted(changed + absent, key=lambda item: item[0])
    inserts: list[dict[str, Any]] = []
    moves: list[dict[str, Any]] = []
    restores: list[dict[str, Any]] = []
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
            elif (
                current.status == CANCELED
                and current.reason == VANISHED
                and p.planned_at >= earliest
                and p.customer_id not in off
            ):
                # Canceled only because its occurrence was missing from the query (a truncated
                # table, a broken WHERE): the occurrence is back, and so is the reminder.
                restores.append(
                    {
                        "id": current.id,
                        "rule": rule.name,
                        "source": CANCELED,
                        "reason": RESTORED,
                        "planned": p.planned_at,
                        "data": p.data,
                        "hash": p.row_hash,
                    }
                )
            elif current.status not in OPEN or current.planned_at < earliest:
                continue  # sent, final, or past grace: scans leave it alone
            elif current.planned_at != p.planned_at:
                moves.append(
                    {
                        "id": current.id,
                        "rule": rule.name,
                        "source": current.status,
                        "reason": MOVED,
                        "planned": p.planned_at,
                        "data": p.data,
                        "hash": p.row_hash,
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
                            "id": current.id,
                            "rule": rule.name,
                            "source": current.status,
                            "reason": f"canceled: offset {offset} is no longer planned for it",
                        }
                    )
    changes = _Changes(rule.name, fresh, inserts, moves, restores, refreshes, cancels)
    if write is None:
        changes.write(conn, counts, now)
    else:
        write(changes)
    return number


@dataclass
class _Changes:
    """What a batch's rows ask of the state DB."""

    rule: str
    fresh: bool  # the rule's first scan: nothing can be there yet
    inserts: list[dict[str, Any]]
    moves: list[dict[str, Any]]
    restores: list[dict[str, Any]]
    refreshes: list[dict[str, Any]]
    cancels: list[dict[str, Any]]

    def write(self, conn: Connection, counts: ScanCounts, now: datetime) -> None:
        """Write them, in the caller's transaction."""
        # On a first scan nothing can be there yet (PostgreSQL: COPY straight into the table).
        created = state_db.copy_ignoring_conflicts(conn, reminder, self.inserts, new=self.fresh)
        counts.created += created
        reminder_counts.created(conn, self.rule, PENDING, created)
        replan = {
            "planned_at": param("planned"),
            "send_at": param("planned"),
            "job_id": None,
            "data": param("data"),
            "row_hash": param("hash"),
            "reason": param("reason"),
        }
        if self.moves:
            move_each(conn, self.moves, source=OPEN, target=PENDING, now=now, values=replan)
            counts.moved += len(self.moves)
        if self.restores:
            anew = {**replan, "attempts": 0, "channel_index": 0, "queued_at": None}
            move_each(conn, self.restores, source=CANCELED, target=PENDING, now=now, values=anew)
            counts.restored += len(self.restores)
        if self.refreshes:
            conn.execute(
                reminder.update()
                .where(reminder.c.id == sa.bindparam("rid"))
                .values(data=sa.bindparam("data"), row_hash=sa.bindparam("hash")),
                self.refreshes,
            )
            counts.unchanged += len(self.refreshes)
        if self.cancels:
            _cancel(conn, self.cancels, now)
            counts.canceled += len(self.cancels)


class _Behind:
    """A first scan's writes, one batch behind: each batch written in its own transaction on a
    thread of its own while the next is read and planned.

    A first scan looks nothing up, so planning a batch needs nothing of the state DB, and
    PostgreSQL writes one batch in its own process while Python plans the next: psycopg waits
    for the server without the GIL (0.46 -> 0.70 of the raw COPY's rows/s at a million rows). At
    most one batch is being written and one planned; the scan's connection is the writer's
    alone until :meth:`wait` returns.
    """

    def __init__(self, conn: Connection, counts: ScanCounts, now: datetime) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.conn, self.counts, self.now = conn, counts, now
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="scan-write")
        self._pending: Future[None] | None = None

    def write(self, changes: _Changes) -> None:
        """Write ``changes`` once the batch before is written (raising what that one raised)."""
        self.wait()
        self._pending = self._pool.submit(self._write, changes)

    def _write(self, changes: _Changes) -> None:
        with self.conn.begin():
            changes.write(self.conn, self.counts, self.now)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Let the batch being written finish (a scan stopping stops between transactions)."""
        self._pool.shutdown(wait=True)


MOVED = "moved: the due date changed"
VANISHED = "canceled: the occurrence is no longer returned by the rule's query"
RESTORED = "restored: the occurrence is returned by the rule's query again"


def _cancel(conn: Connection, cancels: list[dict[str, Any]], now: datetime) -> None:
    """Cancel open reminders (each row: ``id``, ``source`` status, ``reason``), under the scan's
    rule lock."""
    values = {"reason": param("reason"), "job_id": None}
    move_each(conn, cancels, source=OPEN, target=CANCELED, now=now, values=values)


_EXISTING_COLUMNS = (  # a _Stored
    reminder.c.id,
    reminder.c.occurrence,
    reminder.c.offset,
    reminder.c.planned_at,
    reminder.c.status,
    reminder.c.row_hash,
    reminder.c.reason,
)

# A rule's first scan that created at least this many reminders has the state DB's statistics
# refreshed (see state_db.analyze).
ANALYZE_AFTER = 10_000

# Keys a query looks up at once: a scan batch (business_db.stream's 2000) in one statement.
_LOOKUP = 5000


def _stored_digests(
    conn: Connection, rule: Rule, keys: list[str], earliest: datetime
) -> dict[str, tuple[str, int]]:
    """Occurrence -> (its reminders' row digest, how many are open within grace), for those of
    ``keys`` that have reminders.

    An occurrence whose reminders disagree gets an empty digest, so it never looks unchanged; so
    does one with a reminder its absence canceled, which its return restores.
    """
    found: dict[str, tuple[str, int]] = {}
    vanished = sa.and_(reminder.c.status == CANCELED, reminder.c.reason == VANISHED)
    within = sa.and_(reminder.c.status.in_(OPEN), reminder.c.planned_at >= earliest)
    for start in range(0, len(keys), _LOOKUP):
        chunk = keys[start : start + _LOOKUP]
        query = sa.select(reminder.c.occurrence, reminder.c.row_hash, vanished, within).where(
            reminder.c.rule == rule.name, state_db.in_values(conn, reminder.c.occurrence, chunk)
        )
        # Plain tuples from the driver: SQLAlchemy's rows cost more than the lookup itself.
        for part in business_db.batches(conn.execute(query), _LOOKUP):
            for occurrence, digest, gone, open_ in part:
                known, count = found.get(occurrence, (None, 0))
                same = not gone and (known is None or known == digest)
                found[occurrence] = (digest if same else "", count + bool(open_))
    return found


def _open_digests(conn: Connection, rule: Rule, earliest: datetime) -> OpenDigests | None:
    """The digests of the rule's open reminders within grace, in memory (a full rescan's, see
    :mod:`reminders.open_digests`); None for a rule with more open reminders than it holds.

    With one offset an occurrence has one open reminder. With several, its reminders are read
    together (in occurrence order) and those that disagree (one moved while another was with a
    worker) are ambiguous: their row is compared in the state DB, which refreshes them all.
    """
    from .open_digests import LIMIT, OpenDigests, Overflow

    open_ = sa.and_(reminder.c.rule == rule.name, reminder.c.status.in_(sorted(OPEN)))
    capacity = conn.execute(sa.select(sa.func.count()).where(open_)).scalar_one()
    if capacity > LIMIT:
        return None
    known = OpenDigests(capacity)
    try:
        _load_digests(conn, rule, open_, earliest, known)
    except Overflow:  # reminders added while it loaded: compared the other way, this time
        return None
    known.freeze()
    return known


def _load_digests(
    conn: Connection, rule: Rule, open_: Any, earliest: datetime, known: OpenDigests
) -> None:
    grouped = len(rule.offsets) > 1
    columns = (reminder.c.occurrence, reminder.c.row_hash) if grouped else (reminder.c.row_hash,)
    query = sa.select(*columns).where(open_, reminder.c.planned_at >= earliest)
    if grouped:
        query = query.order_by(reminder.c.occurrence)
    if conn.dialect.name == "postgresql" and not grouped:
        _copy_digests(conn, query, known)
        return
    if conn.dialect.name != "sqlite":
        query = query.execution_options(stream_results=True, yield_per=_LOOKUP)
    # SQLite reads the index of open occurrences, the rule's open reminders alone.
    found = state_db.execute_indexed_by(conn, query, reminder, OPEN_OCCURRENCE_INDEX)
    parts = business_db.batches(found, _LOOKUP)
    if not grouped:
        for part in parts:
            known.add_hex([digest for (digest,) in part])
    else:
        agreeing: list[str] = []
        rows = itertools.chain.from_iterable(parts)
        for _, group in itertools.groupby(rows, key=operator.itemgetter(0)):
            digests = [digest for _, digest in group]
            if len(set(digests)) > 1:
                known.add_hex(digests, ambiguous=True)
                continue
            agreeing += digests
            if len(agreeing) >= _LOOKUP:
                known.add_hex(agreeing)
                agreeing = []
        known.add_hex(agreeing)


def _copy_digests(conn: Connection, query: sa.Select[Any], known: OpenDigests) -> None:
    """PostgreSQL: the digests by ``COPY (query) TO STDOUT``, a line each, parsed a few thousand
    at a time (a result's rows would cost 3 us each)."""
    sql = query.compile(conn, compile_kwargs={"literal_binds": True})
    raw = conn.connection.driver_connection
    assert raw is not None
    lines: list[bytes] = []
    with raw.cursor() as cursor, cursor.copy(f"COPY ({sql}) TO STDOUT") as copy:
        for block in copy:  # a CopyData message: a row, its line ended
            lines.append(bytes(block))
            if len(lines) == _LOOKUP:
                known.add_lines(b"".join(lines))
                lines = []
    known.add_lines(b"".join(lines))


def _agreed(found: Existing, earliest: datetime) -> tuple[str, int]:
    """What :func:`_stored_digests` says of an occurrence, from its reminders at hand."""
    digests = {stored.row_hash for by_offset in found.values() for stored in by_offset.values()}
    gone = any(
        stored.status == CANCELED and stored.reason == VANISHED
        for by_offset in found.values()
        for stored in by_offset.values()
    )
    open_ = sum(
        stored.status in OPEN and stored.planned_at >= earliest
        for by_offset in found.values()
        for stored in by_offset.values()
    )
    return (digests.pop() if len(digests) == 1 and not gone else "", open_)


class _Stored(NamedTuple):
    """A reminder as a scan compares it with what its row now plans."""

    id: int
    occurrence: str
    offset: str
    planned_at: datetime
    status: str
    row_hash: str
    reason: str | None


Existing = dict[str, dict[str, _Stored]]  # key -> offset -> reminder


def _existing(conn: Connection, rule: Rule, keys: list[str]) -> dict[str, Existing]:
    """Existing reminders of these occurrences: occurrence -> key -> offset -> reminder.

    For a recurring rule the stored keys are ``occurrence@date``, grouped under the occurrence.
    The rows come from the driver as tuples (SQLAlchemy's rows cost more than the lookup); only
    the planned time is converted, by its column's own type.
    """
    found: dict[str, Existing] = {}
    if not keys:
        return found
    convert = reminder.c.planned_at.type.dialect_impl(conn.dialect).result_processor(
        conn.dialect, None
    )

    def add(base: str, query: sa.Select[Any]) -> None:
        for part in business_db.batches(conn.execute(query), _LOOKUP):
            for row in part:
                stored = _Stored(*row)
                if convert is not None and isinstance(stored.planned_at, str):
                    stored = stored._replace(planned_at=convert(stored.planned_at))
                key = stored.occurrence
                found.setdefault(base or key, {}).setdefault(key, {})[stored.offset] = stored

    if rule.recurrence is None:
        for start in range(0, len(keys), _LOOKUP):
            chunk = keys[start : start + _LOOKUP]
            add(
                "",
                sa.select(*_EXISTING_COLUMNS).where(
                    reminder.c.rule == rule.name,
                    state_db.in_values(conn, reminder.c.occurrence, chunk),
                ),
            )
        return found
    for base in keys:
        add(
            base,
            sa.select(*_EXISTING_COLUMNS).where(
                reminder.c.rule == rule.name,
                reminder.c.occurrence.like(f"{_escape(base)}@%", escape="\\"),
            ),
        )
    return found


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _cancel_vanished(conn: Connection, ids: list[int], earliest: datetime, now: datetime) -> int:
    """Cancel the reminders ``ids`` (whose occurrences no row named) that are still open and
    within grace: each UPDATE is conditional, so what changed meanwhile is left alone."""
    canceled = move(
        conn,
        ids,
        source=OPEN,
        target=CANCELED,
        now=now,
        reason=VANISHED,
        values={"job_id": None},
        where=[reminder.c.planned_at >= earliest],
    )
    return len(canceled)


MASS_CANCEL_FLOOR = 20  # open reminders a rule needs before the mass-cancel guard applies


def is_mass_cancel(vanished: int, open_count: int, max_cancel: float) -> bool:
    """Whether canceling ``vanished`` of a rule's ``open_count`` reminders at once is too many."""
    return open_count >= MASS_CANCEL_FLOOR and vanished > max_cancel * open_count


def scan_all(
    app: App,
    *,
    rule_name: str | None = None,
    progress: bool = False,
    allow_mass_cancel: bool = False,
    should_stop: Callable[[], str | None] | None = None,
    full: bool = False,
) -> list[ScanCounts]:
    """Scan every rule (or one), each on its own: a failing rule does not stop the others.

    ``full`` makes every incremental rule's scan a full one (see :func:`scan_rule`).

    ``should_stop``: see :func:`scan_rule`; also asked before each rule.
    """
    from tqdm import tqdm

    rules = [app.ruleset.rule(rule_name)] if rule_name else list(app.ruleset.rules)
    _check_templates(app, rules)
    state_db.ensure_current(app.config.state_url)
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
                    allow_mass_cancel=allow_mass_cancel,
                    should_stop=should_stop,
                    full=full,
                )
            )
        finally:
            bar.close()
    return results


def _check_templates(app: App, rules: list[Rule]) -> None:
    """Refuse to schedule reminders whose templates are missing or broken (nothing is written)."""
    from .validate import template_problems

    errors = [p for p in template_problems(app, rules) if not p.warning]
    if errors:
        raise TemplateError(errors)
