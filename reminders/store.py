"""The state DB: engines, migrations, locks and recorded status changes.

SQLite (the default) runs in WAL mode with a busy timeout, and every transaction begins with
``BEGIN IMMEDIATE`` so two writers queue instead of failing half-way. PostgreSQL (production)
takes a per-rule advisory lock for a scan.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection, Engine

from . import models
from .errors import ServiceUnavailable

MIGRATIONS = Path(__file__).parent / "migrations"
_engines: dict[str, Engine] = {}


def engine_for(url: str) -> Engine:
    """The process' one engine for a state DB URL (created on first use)."""
    engine = _engines.get(url)
    if engine is None:
        engine = _engines[url] = create_engine(url)
    return engine


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
    except sa.exc.OperationalError as exc:
        raise ServiceUnavailable(f"state DB unreachable: {exc.orig}") from None


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine_for(url).connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": models.VERSION_TABLE})
        return ctx.get_current_revision()


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def ensure_current(url: str) -> None:
    """Raise a clear error when the state DB is not migrated to the code's revision."""
    try:
        current = current_revision(url)
    except sa.exc.OperationalError as exc:
        raise ServiceUnavailable(f"state DB unreachable: {exc.orig}") from None
    head = head_revision()
    if current != head:
        state = "has no tables yet" if current is None else f"is at revision {current}"
        raise ServiceUnavailable(
            f"the state DB {state}; run `reminders db upgrade` first (code expects {head})"
        )


@contextmanager
def rule_lock(conn: Connection, rule: str) -> Iterator[None]:
    """Hold a per-rule lock for a scan (PostgreSQL advisory lock; SQLite serialises writes)."""
    if conn.dialect.name != "postgresql":
        yield
        return
    key = int.from_bytes(hashlib.blake2b(f"scan:{rule}".encode(), digest_size=8).digest(), "big")
    key -= 1 << 63  # advisory keys are signed bigints
    conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": key})
    conn.commit()
    try:
        yield
    finally:
        conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        conn.commit()


def record(
    conn: Connection,
    changes: Iterable[tuple[int, str | None, str, str | None]],
    at: datetime,
) -> None:
    """Record status changes: (reminder id, from status, to status, reason), all at ``at``."""
    rows = [
        {"reminder_id": rid, "at": at, "from_status": old, "to_status": new, "reason": why}
        for rid, old, new, why in changes
    ]
    if rows:
        conn.execute(models.event.insert(), rows)


def insert_ignoring_conflicts(conn: Connection, table: sa.Table, rows: list[dict[str, Any]]) -> int:
    """Insert rows, skipping any that would break a unique constraint; returns how many were new."""
    if not rows:
        return 0
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        # psycopg reports no rowcount for an executemany (-1): count the rows RETURNING gives
        # back instead, one per row actually inserted (SQLAlchemy batches them as multi-row
        # VALUES, "insertmanyvalues").
        key = next(iter(table.primary_key.columns))
        stmt: Any = pg_insert(table).on_conflict_do_nothing().returning(key)
        return len(conn.execute(stmt, rows).all())
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    stmt = sqlite_insert(table).on_conflict_do_nothing()
    result = conn.execute(stmt, rows)
    return max(result.rowcount, 0)
