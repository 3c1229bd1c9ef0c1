"""Write-back: the business's own statements, run on its database through a writable connection.

``writeback.url`` is a connection of its own (a role that may UPDATE the few columns the
statements touch); the scans and checks keep the read-only ``source.url``, and this engine is
used for nothing else. SQLite is opened ``mode=rw`` (a missing file is an error, never a new
empty database); PostgreSQL and MySQL/MariaDB with a 10 s connect timeout and a 30 s statement
timeout, sessions in UTC. One statement per event, in its own transaction. Statements are run at
least once: write them idempotent (``SET x = TRUE``, ``SET last_reminded_at = :at``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from . import business_db, mysql
from .engines import EngineCache
from .errors import ServiceUnavailable
from .outbox import CONSENT, Outcome, binds

if TYPE_CHECKING:
    from .app import App

CONNECT_TIMEOUT = 10  # seconds
STATEMENT_TIMEOUT_MS = 30_000

_engines = EngineCache()


def engine_for(url: str) -> Engine:
    """The process' writable engine for the write-back database at ``url``."""
    return _engines.get(url, lambda: create_engine(url))


def create_engine(url: str) -> Engine:
    parsed = sa.engine.make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        uri = business_db.sqlite_uri(parsed.database, "rw", "writeback.url")

        def connect() -> sqlite3.Connection:
            return sqlite3.connect(uri, uri=True, timeout=CONNECT_TIMEOUT, check_same_thread=False)

        return sa.create_engine("sqlite://", creator=connect, poolclass=sa.pool.QueuePool)
    if backend == "postgresql":
        options = f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c TimeZone=UTC"
        return sa.create_engine(
            url,
            connect_args={"options": options, "connect_timeout": CONNECT_TIMEOUT},
            pool_pre_ping=True,
            pool_size=2,
        )
    if backend in mysql.BACKENDS:
        return _mysql_engine(url)
    raise ServiceUnavailable(
        f"writeback.url: {backend} is not supported (use sqlite, postgresql, mysql or mariadb)"
    )


def _mysql_engine(url: str) -> Engine:
    parsed = mysql.engine_url(url)
    connect_args: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT}
    if parsed.get_driver_name() == mysql.DRIVER:
        connect_args["multi_statements"] = False
    engine = sa.create_engine(parsed, connect_args=connect_args, pool_pre_ping=True, pool_size=2)

    @sa.event.listens_for(engine, "connect")
    def _session(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute("SET SESSION time_zone = '+00:00'")
        finally:
            cursor.close()

    return engine


def bound(values: Mapping[str, Any], dialect: str) -> dict[str, Any]:
    """Parameters as ``dialect`` takes them: aware datetimes as naive UTC where the database has
    no zone type (SQLite as ``YYYY-MM-DD HH:MM:SS`` text, as checks bind them; MySQL/MariaDB)."""
    if dialect == "sqlite":
        from .checks import bind

        return {k: bind(v, dialect) for k, v in values.items()}
    if dialect in mysql.BACKENDS:
        return {
            k: v.astimezone(UTC).replace(tzinfo=None) if isinstance(v, datetime) and v.tzinfo else v
            for k, v in values.items()
        }
    return dict(values)


def statement(app: App, destination: str, event: str, rule: str | None) -> str | None:
    """The statement configured now for ``event`` at ``destination`` (None: none any more)."""
    config = app.config
    if config.writeback is None:
        return None
    if destination.endswith(f":{CONSENT}") and rule is None:
        return config.writeback.when.get(event)  # type: ignore[call-overload]
    found = app.ruleset.get(rule or "")
    return None if found is None else found.writeback.get(event)  # type: ignore[call-overload]


def apply_event(
    app: App, destination: str, event: str, rule: str | None, payload: Mapping[str, Any]
) -> int:
    """Run the statement of ``event`` with the event's binds; returns the rows it changed.

    Raises :class:`Outcome`: permanent when no statement is configured for it any more (the
    event is skipped), else transient (the database is down, the statement fails: retried)."""
    sql = statement(app, destination, event, rule)
    if sql is None:
        raise Outcome(f"no write-back statement for {event} any more", permanent=True)
    url = app.config.writeback_url
    assert url is not None
    values = binds(payload)
    wanted = business_db.parameters(sql)
    missing = sorted(wanted - set(values))
    if missing:
        raise Outcome(f"{event}: the statement uses :{missing[0]}, which this event does not bind")
    try:
        engine = engine_for(url)
        with engine.begin() as conn:
            result = conn.execute(
                business_db.query(sql),
                bound({k: values[k] for k in wanted}, engine.dialect.name),
            )
            return int(result.rowcount or 0)
    except sa.exc.SQLAlchemyError as exc:
        raise Outcome(_first_line(exc)) from exc
    except ServiceUnavailable as exc:
        raise Outcome(str(exc)) from exc


def _first_line(exc: sa.exc.SQLAlchemyError) -> str:
    """The database's message without the statement and parameters SQLAlchemy appends (they
    may hold a customer's values)."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:500]
