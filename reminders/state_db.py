"""The state DB: engines, migrations, locks and inserts that skip what exists (status changes
are :mod:`reminders.lifecycle`'s).

SQLite (the default) runs in WAL mode with a busy timeout, and every transaction begins with
``BEGIN IMMEDIATE`` so two writers queue instead of failing half-way. PostgreSQL (production)
takes a per-rule advisory lock for a scan; SQLite a lock file beside the database.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import operator
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection, Engine

from . import dberrors, models
from .engines import EngineCache
from .errors import ServiceUnavailable

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
_engines = EngineCache()


def engine_for(url: str) -> Engine:
    """The process' one engine for a state DB URL (created on first use)."""
    return _engines.get(url, lambda: create_engine(url))


def dispose_engines(matching: str | None = None) -> None:
    """Close and forget the state DB engines whose URL contains ``matching`` (all when None)."""
    _engines.dispose(matching)


def create_engine(url: str) -> Engine:
    """An engine for the state DB with the settings concurrency needs on each backend."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30})

        @sa_event.listens_for(engine, "connect")
        def _connect(dbapi: Any, _record: Any) -> None:
            dbapi.isolation_level = None  # transactions are begun below, explicitly
            cursor = dbapi.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @sa_event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


def execute_indexed_by(
    conn: Connection, query: sa.Select[Any], table: sa.FromClause, index: str
) -> sa.CursorResult[Any]:
    """Run ``query``, its FROM of ``table`` (a table or a named alias of one) reading ``index``
    on SQLite (``INDEXED BY``): for a statement SQLite's planner would otherwise read through a
    worse index (it weighs an equality on two columns above an index that covers the query).
    Elsewhere the query runs as it is: PostgreSQL's planner picks by itself.

    SQLAlchemy renders no table hint for SQLite, so the statement is rendered with its values
    inline (names quoted by SQLAlchemy, times through the column's own type) and the hint added.
    """
    if conn.dialect.name != "sqlite":
        return conn.execute(query)
    sql = str(query.compile(conn, compile_kwargs={"literal_binds": True}))
    if isinstance(table, sa.Alias):
        named = f"FROM {table.element.name} AS {table.name}"  # type: ignore[attr-defined]
    else:
        named = f"FROM {table.name}"  # type: ignore[attr-defined]
    assert sql.count(named) == 1, sql
    return conn.exec_driver_sql(sql.replace(named, f"{named} INDEXED BY {index}"))


# SQLite has JSON built in from 3.38 (and Python's builds had the JSON1 extension long before).
_SQLITE_JSON = sqlite3.sqlite_version_info >= (3, 38)


def in_values(
    bind: Connection | Engine, column: sa.ColumnElement[Any], values: list[str]
) -> sa.ColumnElement[bool]:
    """``column IN values`` as one parameter: a statement prepared once, not thousands of
    placeholders for SQLAlchemy to expand and the driver to parse each time (PostgreSQL: an
    array and ``= ANY``; SQLite: a JSON array through ``json_each``)."""
    if bind.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import ARRAY

        param = sa.bindparam(None, values, type_=ARRAY(sa.String()))
        return column == sa.any_(param)
    if bind.dialect.name == "sqlite" and _SQLITE_JSON:
        listed = sa.func.json_each(sa.bindparam(None, json.dumps(values))).table_valued("value")
        return column.in_(sa.select(listed.c.value))
    return column.in_(values)


def by_id_alone(bind: Connection | Engine, column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """``column`` for a condition beside ``id IN (...)`` that must not choose SQLite's index.

    SQLite plans without statistics: for ``id IN (a few ids) AND status = 'pending' AND send_at
    <= now`` it reads the index by (status, send_at, rule), every due pending reminder, rather
    than look the ids up. Claiming 5 reminders with a million due took 1.4 s that way. Wrapped
    in ``likely()`` (SQLite's no-op hint to its planner) the column can drive no index, so the
    ids are looked up by their rowids and the condition checked on each. Elsewhere the column as
    it is: PostgreSQL's planner weighs the two by its statistics.
    """
    if bind.dialect.name == "sqlite":
        return sa.func.likely(column, type_=column.type)
    return column


def alembic_config(url: str) -> Any:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Create or migrate the state DB's tables to ``revision``."""
    from alembic import command

    engine = engine_for(url)
    cfg = alembic_config(url)
    try:
        with engine.connect() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            conn.commit()
    except sa.exc.DBAPIError as exc:
        raise dberrors.error(exc, dberrors.STATE_DB) from None


def current_revision(url: str) -> str | None:
    """The state DB's migration revision, None when it has no tables yet.

    Read from alembic's version table with one query: importing alembic's runtime would add
    about 70 ms to the start of every command that checks it (a test compares the two).
    """
    with engine_for(url).connect() as conn:
        if not sa.inspect(conn).has_table(models.VERSION_TABLE):
            return None
        table = sa.table(models.VERSION_TABLE, sa.column("version_num", sa.String))
        found = list(conn.execute(sa.select(table.c.version_num)).scalars())
    if len(found) > 1:
        raise ServiceUnavailable(f"the state DB has several revisions: {', '.join(found)}")
    return found[0] if found else None


_REVISION = re.compile(r'^(down_)?revision\s*=\s*"?([^"\s]+)"?\s*$', re.MULTILINE)


def head_revision() -> str | None:
    """The newest migration's revision: the one no other names as its ``down_revision``.

    Read from the migration files' ``revision`` and ``down_revision`` lines, as alembic's own
    script directory would tell (a test compares the two), without importing alembic.
    """
    revisions: set[str] = set()
    downs: set[str] = set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        for down, value in _REVISION.findall(path.read_text()):
            (downs if down else revisions).add(value)
    heads = sorted(revisions - downs)
    if len(heads) > 1:
        raise ServiceUnavailable(f"the migrations have several heads: {', '.join(heads)}")
    return heads[0] if heads else None


def ensure_current(url: str) -> None:
    """Raise a clear error when the state DB is not migrated to the code's revision."""
    try:
        current = current_revision(url)
    except sa.exc.DBAPIError as exc:
        raise dberrors.error(exc, dberrors.STATE_DB) from None
    head = head_revision()
    if current != head:
        state = "has no tables yet" if current is None else f"is at revision {current}"
        raise ServiceUnavailable(
            f"the state DB {state}; run `reminders db upgrade` first (code expects {head})"
        )


@contextmanager
def rule_lock(conn: Connection, rule: str) -> Iterator[bool]:
    """Hold a per-rule lock for a scan; yields whether no other scan of the rule is running.

    PostgreSQL: an advisory lock, exclusive (a second scan of the rule waits), so the holder is
    always alone. SQLite serialises writes, so scans of a rule may overlap: each holds a shared
    lock on a file beside the database (``<db>-scan-<rule>.lock``), and is alone when it could
    have taken it exclusively. Either lock is released by the system when its process dies,
    however it dies: a scan run left ``running`` whose rule is not locked is stale (see
    :func:`scan_alive`).
    """
    if conn.dialect.name == "postgresql":
        key = _advisory_key(rule)
        conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        conn.commit()
        try:
            yield True
        finally:
            conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()
        return
    path = _lock_file(conn, rule)
    if path is None:  # an in-memory database: no other process can see it
        yield True
        return
    with open(path, "a+b") as handle:
        alone = _flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(handle, fcntl.LOCK_SH)  # others may scan the rule too; none waits on it
        try:
            yield alone
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# The error of a scan run found ``running`` while no scan of its rule is.
STALE_RUN = "no scan holds the rule's lock: its process stopped without finishing"


def scan_alive(conn: Connection, rule: str) -> bool:
    """Whether a scan of ``rule`` holds its lock (is running, in some process)."""
    if conn.dialect.name == "postgresql":
        key = _advisory_key(rule)
        free = conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar_one()
        if free:
            conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        conn.commit()
        return not free
    path = _lock_file(conn, rule)
    if path is None or not path.exists():
        return False
    with open(path, "a+b") as handle:
        return not _flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _advisory_key(rule: str) -> int:
    key = int.from_bytes(hashlib.blake2b(f"scan:{rule}".encode(), digest_size=8).digest(), "big")
    return key - (1 << 63)  # advisory keys are signed bigints


def _lock_file(conn: Connection, rule: str) -> Path | None:
    database = conn.engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(f"{database}-scan-{rule}.lock")


def _flock(handle: Any, how: int) -> bool:
    """``flock`` without waiting: True when taken."""
    try:
        fcntl.flock(handle, how)
    except BlockingIOError:
        return False
    return True


def analyze(engine: Engine, table: sa.Table) -> None:
    """Refresh PostgreSQL's statistics of ``table`` after a bulk load (a rule's first scan).

    PostgreSQL plans from statistics that autovacuum refreshes a minute or so after a big
    change. Until then a table a first scan filled with a million reminders still looks empty
    (or a new rule's name looks rare), and the next scan's lookup of 2,000 occurrences became a
    scan of every reminder of the rule: 0.35 s a batch instead of 0.03 s (1M reminders,
    measured). PostgreSQL's own advice for bulk loads is to ANALYZE after them. It samples a
    fixed number of rows (0.1-0.5 s at a million) and blocks no reads or writes.

    SQLite plans without statistics unless ANALYZE made some, and every query of the state DB
    was checked against that planner: nothing is done there. A failure (a role that may not
    analyze the table) is logged and does not fail the scan.
    """
    if engine.dialect.name != "postgresql":
        return
    name = engine.dialect.identifier_preparer.format_table(table)
    try:  # on a connection of its own: committed whatever a caller's transaction does
        with engine.begin() as conn:
            conn.exec_driver_sql(f"ANALYZE {name}")
    except sa.exc.DBAPIError as exc:
        log.warning("state DB: could not ANALYZE %s: %s", name, exc.orig)


def insert_ignoring_conflicts(conn: Connection, table: sa.Table, rows: list[dict[str, Any]]) -> int:
    """Insert rows, skipping any that would break a unique constraint; returns how many were new."""
    if not rows:
        return 0
    if conn.dialect.name == "postgresql":
        return _pg_insert_ignoring_conflicts(conn, table, rows)
    if conn.dialect.name == "sqlite":
        return _sqlite_insert_ignoring_conflicts(conn, table, rows)
    raise ServiceUnavailable(
        f"the state DB is {conn.dialect.name}: state.url must be SQLite or PostgreSQL"
    )


def copy_ignoring_conflicts(
    conn: Connection, table: sa.Table, rows: list[dict[str, Any]], *, new: bool = False
) -> int:
    """Like :func:`insert_ignoring_conflicts`, for many rows at once (a scan's batch).

    PostgreSQL: COPY (psycopg's ``cursor.copy``, the rows streamed in COPY's text format, no
    statement to parse per row), which writes rows several times faster than an executemany
    (``benchmarks/scan.py`` has the raw COPY as its PostgreSQL baseline). COPY cannot skip a
    conflict, so the rows go into a temporary table emptied at each commit, then one ``INSERT
    ... SELECT ... ON CONFLICT DO NOTHING``. With ``new`` (the caller knows none of the rows
    can exist yet: a rule's first scan, under its lock) they are copied straight into the
    table, in a savepoint: should two of them still meet (a query returning a row twice), the
    batch goes the first way. SQLite: the executemany, the cheapest path there.
    """
    if not rows or conn.dialect.name != "postgresql":
        return insert_ignoring_conflicts(conn, table, rows)
    import psycopg

    names = list(rows[0])
    preparer = conn.dialect.identifier_preparer
    quoted = ", ".join(preparer.quote(n) for n in names)
    target = preparer.format_table(table)
    raw = conn.connection.driver_connection
    assert raw is not None
    values = operator.itemgetter(*names)

    def copy(into: str) -> None:
        with raw.cursor() as cursor, cursor.copy(f"COPY {into} ({quoted}) FROM STDIN") as copy:
            write = copy.write_row
            for row in rows:
                write(values(row))

    if new:
        savepoint = conn.begin_nested()
        try:
            copy(target)
        except psycopg.errors.UniqueViolation:
            savepoint.rollback()
        else:
            savepoint.commit()
            return len(rows)
    staging = preparer.quote(f"{table.name}_copy")
    conn.exec_driver_sql(
        f"CREATE TEMPORARY TABLE IF NOT EXISTS {staging} ON COMMIT DELETE ROWS AS "
        f"SELECT {quoted} FROM {target} WITH NO DATA"
    )
    with raw.cursor() as cursor:
        cursor.execute(f"DELETE FROM {staging}")  # an earlier batch in this transaction
    copy(staging)
    with raw.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {target} ({quoted}) SELECT {quoted} FROM {staging} ON CONFLICT DO NOTHING"
        )
        return max(cursor.rowcount, 0)


_MISSING = object()


def _sqlite_insert_ignoring_conflicts(
    conn: Connection, table: sa.Table, rows: list[dict[str, Any]]
) -> int:
    """SQLite: one prepared INSERT run for every row by the driver (executemany, in C).

    The rows all have the keys of the first. Each column's own bind processing (UTC datetimes
    to SQLite's text) is SQLAlchemy's, applied once per distinct value: a scan's rows share few
    send times and one ``now``, and converting every value of every row costs more than the
    insert itself.
    """
    dialect = conn.dialect
    quote = dialect.identifier_preparer.quote
    names = list(rows[0])
    processors = [
        table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names
    ]
    processed: list[tuple[int, Any, dict[Any, Any]]] = [
        (i, p, {}) for i, p in enumerate(processors) if p is not None
    ]
    values = operator.itemgetter(*names)
    params = []
    for row in rows:
        got = values(row)
        record = list(got) if len(names) > 1 else [got]
        for index, process, cache in processed:
            value = record[index]
            try:
                done = cache.get(value, _MISSING)
                if done is _MISSING:
                    done = cache[value] = process(value)
            except TypeError:  # unhashable: not cached
                done = process(value)
            except ValueError as exc:  # a refused value (a naive datetime), as SQLAlchemy says
                raise sa.exc.StatementError(str(exc), str(table), None, exc) from None
            record[index] = done
        params.append(tuple(record))
    sql = (
        f"INSERT INTO {dialect.identifier_preparer.format_table(table)} "
        f"({', '.join(quote(n) for n in names)}) VALUES ({', '.join('?' * len(names))}) "
        "ON CONFLICT DO NOTHING"
    )
    return max(conn.exec_driver_sql(sql, params).rowcount, 0)


def _pg_insert_ignoring_conflicts(
    conn: Connection, table: sa.Table, rows: list[dict[str, Any]]
) -> int:
    """PostgreSQL: every row in one statement, the rows as one JSON parameter.

    The rows all have the keys of the first. ``json_populate_recordset`` types each value by its
    column. A multi-row VALUES (SQLAlchemy's executemany on psycopg) sends thousands of
    placeholders that the driver parses for each batch, array parameters are escaped element by
    element in Python, and psycopg reports no rowcount for an executemany; here the statement
    stays short, the batch is encoded by the C JSON encoder, and the count of rows actually
    inserted comes back from the server.
    """
    dialect = conn.dialect
    names = list(rows[0])
    decorated: list[tuple[str, Any, dict[Any, Any]]] = []
    for name in names:
        kind = table.c[name].type
        if isinstance(kind, sa.types.TypeDecorator):
            decorated.append((name, kind.process_bind_param, {}))
    records = []
    for row in rows:
        record = dict(row)
        for name, process, cache in decorated:
            value = record[name]
            done = cache.get(value, _MISSING)
            if done is _MISSING:
                try:
                    done = process(value, dialect)
                except ValueError as exc:  # a refused value (a naive datetime)
                    raise sa.exc.StatementError(str(exc), str(table), None, exc) from None
                if isinstance(done, datetime | date):
                    done = done.isoformat()
                cache[value] = done
            record[name] = done
        records.append(record)
    quoted = ", ".join(dialect.identifier_preparer.quote(n) for n in names)
    target = dialect.identifier_preparer.format_table(table)
    sql = (
        f"WITH new AS (INSERT INTO {target} ({quoted}) SELECT {quoted} "
        f"FROM json_populate_recordset(CAST(NULL AS {target}), CAST(:rows AS json)) "
        "ON CONFLICT DO NOTHING RETURNING 1) SELECT count(*) FROM new"
    )
    payload = json.dumps(records, separators=(",", ":"), default=str)
    return int(conn.execute(sa.text(sql), {"rows": payload}).scalar_one())
