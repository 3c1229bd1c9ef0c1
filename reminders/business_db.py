"""The business's database, opened read-only.

SQLite through a ``mode=ro`` URI; PostgreSQL with ``default_transaction_read_only=on`` set at
connect; MySQL and MariaDB in read-only sessions and transactions (:mod:`reminders.mysql`). Rows
are streamed (a server-side cursor on PostgreSQL and MySQL), never loaded whole. The engine runs
one statement per query; rule loading already refuses ``;``-chained statements.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta, tzinfo
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from . import dberrors, mysql
from .engines import EngineCache
from .errors import ServiceUnavailable, SourceError

_engines = EngineCache()


def engine_for(url: str, query_timeout: timedelta | None = None) -> Engine:
    """The process' read-only engine for the business DB at ``url``, whose statements the
    database stops past ``query_timeout`` (``source.query_timeout``; no limit when None)."""
    limit = None if query_timeout is None else millis(query_timeout)
    return _engines.get(
        url, lambda: create_engine(url, query_timeout, sqlite_every=_PROGRESS_EVERY), limit
    )


def dispose_engines(matching: str | None = None) -> None:
    """Close and forget the business DB engines whose URL contains ``matching`` (all when None)."""
    _engines.dispose(matching)


def create_engine(
    url: str,
    statement_timeout: timedelta | None = None,
    pre_ping: bool = True,
    *,
    sqlite_every: int | None = None,
) -> Engine:
    """A read-only engine: writes through it fail at the database.

    ``statement_timeout``: the server stops a statement running longer (PostgreSQL's
    ``statement_timeout``, MySQL's and MariaDB's own limits). SQLite has no server: with
    ``sqlite_every`` a progress handler, called every that many virtual-machine instructions,
    interrupts a statement (its execution and the reading of its rows) past the limit, and the
    driver says "interrupted" (:func:`reminders.dberrors.interrupted`). ``pre_ping``: test each
    pooled connection with a round trip before use (a server restarted since is noticed before
    the query). Callers that retry a query on a dropped connection themselves, as checks do, turn
    it off and save the round trip.
    """
    parsed = sa.engine.make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        uri = sqlite_uri(parsed.database, "ro", "source.url")

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False)
            conn.execute("PRAGMA query_only=ON")
            conn.set_authorizer(_authorize)
            return conn

        # QueuePool, as for any SQLite file: the default for "sqlite://" (SingletonThreadPool)
        # closes other threads' connections past 5 threads, in use or not (a segfault).
        engine = sa.create_engine("sqlite://", creator=connect, poolclass=sa.pool.QueuePool)
        if statement_timeout is not None and sqlite_every is not None:
            _limit_sqlite(engine, statement_timeout, sqlite_every)
        return engine
    if backend == "postgresql":
        options = "-c default_transaction_read_only=on"
        if statement_timeout is not None:
            options += f" -c statement_timeout={int(statement_timeout.total_seconds() * 1000)}"
        return sa.create_engine(
            url, connect_args={"options": options}, pool_pre_ping=pre_ping, pool_size=10
        )
    if backend in mysql.BACKENDS:
        return mysql.create_engine(parsed, statement_timeout, pre_ping)
    raise ServiceUnavailable(
        f"source.url: {backend} is not supported (use sqlite, postgresql, mysql or mariadb)"
    )


def sqlite_uri(database: str | None, mode: str, key: str) -> str:
    """The ``file:`` URI opening an existing SQLite file in ``mode`` (ro, rw): never a new one."""
    if not database or database == ":memory:":
        raise ServiceUnavailable(f"{key}: a SQLite business DB must be a file")
    path = Path(database)
    if not path.exists():
        raise ServiceUnavailable(f"{key}: no database file at {path}")
    return f"file:{quote(str(path))}?mode={mode}"


def millis(duration: timedelta) -> int:
    """``duration`` in whole milliseconds, at least 1 (what the databases' limits take)."""
    return max(1, round(duration.total_seconds() * 1000))


# A rule query's progress handler on SQLite: every this many virtual-machine instructions (well
# under a millisecond of work).
_PROGRESS_EVERY = 10_000


def _limit_sqlite(engine: Engine, timeout: timedelta, every: int) -> None:
    """Interrupt each statement on ``engine``'s connections ``timeout`` after it starts."""
    seconds = timeout.total_seconds()

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _start(conn: Any, *_args: Any) -> None:
        deadline = time.monotonic() + seconds
        raw = conn.connection.dbapi_connection
        raw.set_progress_handler(lambda: int(time.monotonic() > deadline), every)


# What a business query may do on SQLite: read. ``mode=ro`` and ``query_only`` keep the file
# itself unchanged, but ATTACH (and VACUUM INTO, which attaches its target first) opens or
# creates any other file, writable; the authorizer refuses it when the statement is prepared.
_ALLOWED = frozenset(
    {
        sqlite3.SQLITE_SELECT,
        sqlite3.SQLITE_READ,
        sqlite3.SQLITE_FUNCTION,
        sqlite3.SQLITE_RECURSIVE,
        sqlite3.SQLITE_TRANSACTION,  # BEGIN/COMMIT/ROLLBACK the driver itself issues
    }
)
# Reading a pragma is allowed; setting one only for these, which the engine sets itself on a
# connection (a check's wait for a lock) and which change nothing but how long it waits.
_SETTABLE_PRAGMAS = frozenset({"busy_timeout"})


def _authorize(action: int, arg1: str | None, arg2: str | None, *_where: str | None) -> int:
    """SQLite authorizer of business connections: reading is allowed, anything else denied."""
    if action in _ALLOWED:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and (arg2 is None or arg1 in _SETTABLE_PRAGMAS):
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_][A-Za-z0-9_]*)")


_LITERAL = re.compile(r"'(?:[^']|'')*'")
_COLON_WORD = re.compile(r"(?<![\\:]):(?=\w)")


@lru_cache(maxsize=512)
def parameters(sql: str) -> frozenset[str]:
    """The ``:name`` parameters a query uses (``::type`` casts and literals excluded).

    Cached: a rule's ``check`` query is asked about for every message sent.
    """
    stripped = _LITERAL.sub("''", sql)
    return frozenset(_PARAM.findall(stripped))


@lru_cache(maxsize=512)
def query(sql: str) -> sa.TextClause:
    """A business's query for SQLAlchemy: ``:name`` is a parameter, except inside a quoted
    string (``'due at :noon'`` stays text, where ``sa.text`` alone would ask for a value).

    Cached, as the same few queries run for every check and every message sent."""
    return sa.text(_LITERAL.sub(lambda m: _COLON_WORD.sub(r"\\:", m.group(0)), sql))


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # ``:since`` of a full scan: every row


def time_params(sql: str, now: datetime, zone: tzinfo, since: datetime = EPOCH) -> dict[str, Any]:
    """The engine's own parameters ``sql`` uses: ``:now`` (UTC), ``:today`` (the date in
    ``zone``, the config's) and, in an incremental rule's query, ``:since`` (UTC, bound like
    ``:now``; the epoch unless given), the same way in rules' queries, their checks and checks."""
    used = parameters(sql)
    found: dict[str, Any] = {}
    if "now" in used:
        found["now"] = now
    if "today" in used:
        found["today"] = now.astimezone(zone).date()
    if "since" in used:
        found["since"] = since
    return found


def stream(
    engine: Engine, sql: str, params: Mapping[str, Any], *, what: str, batch: int = 2000
) -> Iterator[list[dict[str, Any]]]:
    """Run one read-only query and yield its rows in batches of dicts (column -> value).

    Each row is a fresh dict the caller may change. ``what`` names the query in errors
    ("rule refill-due"). A database error becomes a :class:`SourceError` with the database's own
    message.
    """
    for keys, rows in stream_rows(engine, sql, params, what=what, batch=batch):
        yield [dict(zip(keys, row, strict=True)) for row in rows]


def stream_rows(
    engine: Engine, sql: str, params: Mapping[str, Any], *, what: str, batch: int = 2000
) -> Iterator[tuple[list[str], Sequence[Sequence[Any]]]]:
    """Like :func:`stream`, rows as tuples: yields (column names, a batch of rows).

    The scan reads millions of rows and builds a dict only for the few that changed.
    """
    try:
        with engine.connect() as conn:
            if engine.dialect.name != "sqlite":  # SQLite has no server-side cursors to ask for
                conn = conn.execution_options(stream_results=True, yield_per=batch)
            result = conn.execute(query(sql), dict(params))
            keys = list(result.keys())
            for rows in batches(result, batch):
                yield keys, rows
    except sa.exc.DBAPIError as exc:
        raise dberrors.error(exc, dberrors.BUSINESS_DB, what) from None
    except sa.exc.ArgumentError as exc:
        raise SourceError(f"{what}: {exc}") from None
    except sa.exc.StatementError as exc:
        raise SourceError(f"{what}: {dberrors.message(exc)}") from None
    except sa.exc.ResourceClosedError:
        # A statement that returns no rows (not a SELECT): said here, against the business DB,
        # not left to a caller to mistake for its own database's failure.
        raise SourceError(f"{what}: the query returns no rows (write a SELECT)") from None
    except sa.exc.SQLAlchemyError as exc:
        raise SourceError(f"{what}: the query failed: {exc}") from None


def batches(result: sa.CursorResult[Any], size: int) -> Iterator[Sequence[Sequence[Any]]]:
    """A result's rows, ``size`` at a time, for reading millions of them.

    On SQLite straight from the driver's cursor as plain tuples: making SQLAlchemy's rows costs
    more than the query itself, and SQLite's results are never prefetched or typed by
    SQLAlchemy for text queries and plain columns. Elsewhere SQLAlchemy's own partitions (a
    server-side cursor's result holds a prefetched row).
    """
    from sqlalchemy.engine.cursor import CursorFetchStrategy

    # Only a plain fetch strategy leaves every row in the cursor (a buffered one has read ahead).
    if result.dialect.name != "sqlite" or type(result.cursor_strategy) is not CursorFetchStrategy:
        yield from result.partitions(size)
        return
    cursor = result.cursor
    try:
        while True:
            try:
                rows = cursor.fetchmany(size)
            except sqlite3.Error as exc:  # a row that fails half way: as SQLAlchemy says it
                raise sa.exc.DBAPIError.instance(None, None, exc, sqlite3.Error) from None
            if not rows:
                return
            yield rows
    finally:
        result.close()


def columns(
    engine: Engine,
    sql: str,
    params: Mapping[str, Any],
    *,
    what: str,
    timeout: timedelta = timedelta(seconds=10),
) -> list[str]:
    """The column names a query returns, from the database preparing it: no row is read.

    The query runs as ``SELECT * FROM (<query>) AS q WHERE 1=0`` (every dialect here plans a
    constant false filter without reading its input), so a misspelt table or column, a syntax
    error or a parameter of the wrong type fails here as it would in a scan. On PostgreSQL it runs
    in the engine's read-only transaction with a ``statement_timeout`` of ``timeout``; on MySQL
    and MariaDB with their own statement time limit. Raises
    :class:`SourceError` (or :class:`ServiceUnavailable`) naming ``what``.
    """
    wrapped = f"SELECT * FROM ({sql}\n) AS q WHERE 1=0"  # the newline ends a trailing -- comment
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                millis = max(1, int(timeout.total_seconds() * 1000))
                conn.exec_driver_sql(f"SET LOCAL statement_timeout = {millis}")
            elif engine.dialect.name in mysql.BACKENDS:
                mariadb = bool(getattr(engine.dialect, "is_mariadb", False))
                wrapped = mysql.limited(wrapped, mariadb, timeout)
            result = conn.execute(query(wrapped), dict(params))
            names = list(result.keys())
            result.close()
            conn.rollback()
            return names
    except sa.exc.DBAPIError as exc:
        raise dberrors.error(exc, dberrors.BUSINESS_DB, what) from None
    except sa.exc.SQLAlchemyError as exc:
        raise SourceError(f"{what}: the query failed: {dberrors.message(exc)}") from None
