"""MySQL and MariaDB as the business's database: read-only sessions in UTC, typed values.

``source.url: mysql://user@host/db`` (or ``mariadb://``) is opened with mysqlclient (``MySQLdb``),
the C driver: it reads a scan's rows with a third of PyMySQL's CPU (README, Performance). An
explicit driver in the URL (``mysql+pymysql://``) is used as given. One statement a query, as on
the other databases.

Every connection is made read-only at connect (``SET SESSION TRANSACTION READ ONLY``) and every
transaction is begun ``START TRANSACTION READ ONLY``, so a query that switched the session back to
read-write still cannot write in the next one. The session's ``time_zone`` is UTC: a ``TIMESTAMP``
column (an instant) arrives as an aware UTC datetime, as PostgreSQL's ``timestamptz`` does; a
``DATETIME`` arrives naive (customer-local, as everywhere); ``DATE`` as a date, ``DECIMAL`` as a
Decimal. An aware datetime bound as a parameter (``:now``) is sent as its UTC wall time.

Only the business DB: the engine's own tables (``state.url``) are not supported on MySQL.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine

from .errors import ServiceUnavailable

BACKENDS = ("mysql", "mariadb")
# mysqlclient: C, the faster of the two (see the module's docstring).
DRIVER = "mysqldb"
# ER_STATEMENT_TIMEOUT (MariaDB's max_statement_time) and ER_QUERY_TIMEOUT (MySQL's
# MAX_EXECUTION_TIME): the query was stopped at its time limit, the connection is fine.
TIMEOUT_CODES = frozenset({1969, 3024})
# The wire protocol's type code of a TIMESTAMP column (FIELD_TYPE.TIMESTAMP in both drivers).
_TIMESTAMP = 7

STATE_UNSUPPORTED = (
    "MySQL and MariaDB can hold the business DB (source.url) but not the engine's own tables: "
    "use SQLite or PostgreSQL for state.url"
)


def is_mysql(url: str | URL) -> bool:
    """Whether ``url`` names a MySQL or MariaDB database."""
    return sa.engine.make_url(url).get_backend_name() in BACKENDS


def engine_url(url: str | URL) -> URL:
    """``url`` with the engine's driver when it names none (``mariadb://`` would otherwise ask
    SQLAlchemy for MariaDB's own connector)."""
    parsed = sa.engine.make_url(url)
    if "+" not in parsed.drivername:
        parsed = parsed.set(drivername=f"{parsed.get_backend_name()}+{DRIVER}")
    return parsed


def create_engine(url: str | URL, statement_timeout: timedelta | None, pre_ping: bool) -> Engine:
    """A read-only engine on a MySQL or MariaDB business DB, its sessions in UTC.

    ``statement_timeout``: the server stops a statement running longer (MariaDB's
    ``max_statement_time``, MySQL's ``MAX_EXECUTION_TIME``, for SELECTs), with an error whose
    code is in :data:`TIMEOUT_CODES`.
    """
    parsed = engine_url(url)
    try:
        conv = _conversions(parsed)
    except ImportError as exc:
        if parsed.get_driver_name() == DRIVER:
            how = (
                "pip install 'reminders[mysql]' (mysqlclient; on Debian "
                "apt-get install libmariadb-dev pkg-config first)"
            )
        else:
            how = f"install the package of {parsed.get_driver_name()}"
        raise ServiceUnavailable(
            f"source.url: {parsed.drivername}: its driver is not installed ({exc}): {how}"
        ) from None
    connect_args: dict[str, Any] = {"conv": conv}
    if parsed.get_driver_name() == "mysqldb":
        # One statement per query, as on the other databases: mysqlclient would otherwise run
        # "SELECT ...; DELETE ..." whole (PyMySQL does not ask the server for several).
        connect_args["multi_statements"] = False
    engine = sa.create_engine(
        parsed,
        connect_args=connect_args,
        pool_pre_ping=pre_ping,
        pool_size=10,
    )

    @sa.event.listens_for(engine, "connect")
    def _session(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute("SET SESSION TRANSACTION READ ONLY")
            cursor.execute("SET SESSION time_zone = '+00:00'")
            if statement_timeout is not None:
                cursor.execute(timeout_statement(_is_mariadb(dbapi_conn), statement_timeout))
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        # The dialect begins implicitly; this makes the transaction read-only whatever a
        # previous query did to the session's default (SQLAlchemy's documented way to issue
        # one's own BEGIN; a dropped connection fails here as it would in the query).
        conn.exec_driver_sql("START TRANSACTION READ ONLY")

    return engine


def timeout_statement(mariadb: bool, timeout: timedelta) -> str:
    """The SET statement limiting the session's statements to ``timeout``."""
    if mariadb:
        return f"SET SESSION max_statement_time = {max(0.001, timeout.total_seconds()):.3f}"
    return f"SET SESSION MAX_EXECUTION_TIME = {max(1, round(timeout.total_seconds() * 1000))}"


def limited(sql: str, mariadb: bool, timeout: timedelta) -> str:
    """``sql`` (a SELECT the engine wrote) stopped by the server past ``timeout``: MariaDB's
    ``SET STATEMENT ... FOR``, MySQL's optimizer hint (which must follow the SELECT)."""
    if mariadb:
        return f"SET STATEMENT max_statement_time = {timeout.total_seconds():.3f} FOR {sql}"
    millis = max(1, round(timeout.total_seconds() * 1000))
    assert sql.startswith("SELECT ")
    return f"SELECT /*+ MAX_EXECUTION_TIME({millis}) */ {sql.removeprefix('SELECT ')}"


def _is_mariadb(dbapi_conn: Any) -> bool:
    return "mariadb" in str(dbapi_conn.get_server_info()).lower()


def _conversions(url: URL) -> dict[Any, Any]:
    """The driver's conversions, with TIMESTAMP columns read as aware UTC datetimes and aware
    datetimes written as their UTC time (both drivers take ``conv``; their own formatting of a
    datetime drops its zone)."""
    driver = url.get_dialect().import_dbapi()
    converters = importlib.import_module(f"{driver.__name__}.converters")
    conv = dict(converters.conversions)
    read: Callable[[Any], Any] = conv[_TIMESTAMP]
    write: Callable[[Any, Any], Any] = conv[datetime]

    def read_timestamp(value: Any) -> Any:
        found = read(value)
        return found.replace(tzinfo=UTC) if isinstance(found, datetime) else found

    def write_datetime(value: datetime, mapping: Any = None) -> Any:
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return write(value, mapping)

    conv[_TIMESTAMP] = read_timestamp
    conv[datetime] = write_datetime
    return conv
