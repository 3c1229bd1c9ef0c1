"""The state DB: engines, migrations, locks, on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from reminders import lifecycle, models, state_db
from reminders.errors import ServiceUnavailable

T0 = datetime(2027, 3, 10, 12, 0, tzinfo=UTC)


def _reminder(occurrence: str, offset: str = "-3d", **extra: object) -> dict[str, object]:
    row: dict[str, object] = {
        "rule": "refill-due",
        "occurrence": occurrence,
        "offset": offset,
        "customer_id": "7",
        "planned_at": T0,
        "send_at": T0,
        "status": lifecycle.PENDING,
        "data": "{}",
        "row_hash": "h",
        "created_at": T0,
        "updated_at": T0,
    }
    row.update(extra)
    return row


def test_engine_for_gives_one_engine_per_url(state_url: str) -> None:
    assert state_db.engine_for(state_url) is state_db.engine_for(state_url)


def test_ensure_current_names_the_command_to_run_before_upgrade(state_url: str) -> None:
    with pytest.raises(ServiceUnavailable, match=r"has no tables yet; run `reminders db upgrade`"):
        state_db.ensure_current(state_url)


def test_upgrade_creates_every_table_with_the_prefix_and_is_repeatable(state_url: str) -> None:
    state_db.upgrade(state_url)
    state_db.upgrade(state_url)  # a second upgrade is a no-op, not an error
    state_db.ensure_current(state_url)
    assert state_db.current_revision(state_url) == state_db.head_revision()
    names = set(sa.inspect(state_db.engine_for(state_url)).get_table_names())
    expected = {t.name for t in models.metadata.sorted_tables} | {models.VERSION_TABLE}
    assert expected <= names
    assert all(n.startswith(models.PREFIX) for n in expected)


def test_migrations_build_exactly_the_models(state: sa.Engine) -> None:
    """The migrated schema matches the tables the code uses (no missing column or index)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with state.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "version_table": models.VERSION_TABLE}
        )
        diff = compare_metadata(context, models.metadata)
    assert diff == []


def test_insert_ignoring_conflicts_counts_only_new_rows(state: sa.Engine) -> None:
    with state.begin() as conn:
        first = state_db.insert_ignoring_conflicts(
            conn, models.reminder, [_reminder("1"), _reminder("2")]
        )
    with state.begin() as conn:
        second = state_db.insert_ignoring_conflicts(
            conn, models.reminder, [_reminder("2"), _reminder("3"), _reminder("3", "0d")]
        )
        none = state_db.insert_ignoring_conflicts(conn, models.reminder, [])
    assert (first, second, none) == (2, 2, 0)
    with state.connect() as conn:
        keys = conn.execute(
            sa.select(models.reminder.c.occurrence, models.reminder.c.offset).order_by(
                models.reminder.c.id
            )
        ).all()
    assert [tuple(k) for k in keys] == [("1", "-3d"), ("2", "-3d"), ("3", "-3d"), ("3", "0d")]


def test_times_are_stored_and_returned_as_aware_utc(state: sa.Engine) -> None:
    berlin_noon = datetime(2027, 3, 10, 13, 0, tzinfo=timezone(timedelta(hours=1)))
    with state.begin() as conn:
        state_db.insert_ignoring_conflicts(
            conn, models.reminder, [_reminder("1", planned_at=berlin_noon, send_at=berlin_noon)]
        )
    with state.connect() as conn:
        planned = conn.execute(sa.select(models.reminder.c.planned_at)).scalar_one()
    assert planned == T0
    assert planned.tzinfo is not None and planned.utcoffset() == timedelta(0)


def test_a_naive_time_is_refused(state: sa.Engine) -> None:
    with pytest.raises(sa.exc.StatementError, match="naive datetime"), state.begin() as conn:
        state_db.insert_ignoring_conflicts(
            conn, models.reminder, [_reminder("1", planned_at=datetime(2027, 3, 10, 12))]
        )


def test_sqlite_runs_in_wal_mode_and_takes_the_write_lock_at_begin(tmp_path: Path) -> None:
    """BEGIN IMMEDIATE: a second writer queues at its BEGIN instead of failing half-way."""
    path = tmp_path / "reminders.db"
    url = f"sqlite:///{path}"
    state_db.upgrade(url)
    engine = state_db.engine_for(url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        with engine.begin():
            # Nothing written yet, but the transaction already holds the write lock.
            other = sqlite3.connect(path, timeout=0, isolation_level=None)
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
            other.close()
    finally:
        state_db.dispose_engines(url)


def test_rule_lock_is_held_per_rule_on_postgresql(pg_url: str) -> None:
    state_db.upgrade(pg_url)
    engine = state_db.engine_for(pg_url)
    other = sa.create_engine(pg_url)

    def free(rule: str) -> bool:
        import hashlib

        key = int.from_bytes(hashlib.blake2b(f"scan:{rule}".encode(), digest_size=8).digest())
        key -= 1 << 63
        with other.connect() as conn:
            query = sa.text("SELECT pg_try_advisory_lock(:k)")
            got = bool(conn.execute(query, {"k": key}).scalar())
            if got:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            return got

    try:
        with engine.connect() as conn:
            with state_db.rule_lock(conn, "refill-due"):
                assert not free("refill-due")
                assert free("other-rule")
            assert free("refill-due")
    finally:
        other.dispose()
        state_db.dispose_engines(pg_url)


def test_dispose_engines_lets_go_of_the_matching_ones_only(tmp_path: Path) -> None:
    first, second = (f"sqlite:///{tmp_path / name / 'reminders.db'}" for name in ("a", "b"))
    engine = state_db.engine_for(first)
    kept = state_db.engine_for(second)
    try:
        state_db.dispose_engines(str(tmp_path / "a"))
        assert state_db.engine_for(first) is not engine
        assert state_db.engine_for(second) is kept
    finally:
        state_db.dispose_engines(str(tmp_path))


def test_revisions_read_without_alembic_agree_with_alembic(state_url: str) -> None:
    """current_revision and head_revision read the version table and the migration files
    themselves (importing alembic would slow every command's start): alembic says the same."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(state_db.alembic_config("sqlite://"))
    assert state_db.head_revision() == scripts.get_current_head()

    def alembic_current() -> str | None:
        with state_db.engine_for(state_url).connect() as conn:
            options = {"version_table": models.VERSION_TABLE}
            return MigrationContext.configure(conn, opts=options).get_current_revision()

    assert state_db.current_revision(state_url) is None and alembic_current() is None
    for revision in ("0001", "0007", "head"):
        state_db.upgrade(state_url, revision)
        assert state_db.current_revision(state_url) == alembic_current() is not None
    assert state_db.current_revision(state_url) == state_db.head_revision()


def test_sqlite_partial_indexes_on_the_status_are_written_with_or(tmp_path: Path) -> None:
    """SQLite checks a partial index's ``status IN (3+ values)`` through a temporary table each
    time a row's indexed column changes (migration 0013): the two such indexes are ORs there,
    migrated from 0012 and back. Migration 0014 drops the unsent one and gives it back, as 0013
    left it, on the way down."""
    from alembic import command

    url = f"sqlite:///{tmp_path / 'state.db'}"
    names = ("ix_reminders_reminder_final_updated_at", "ix_reminders_reminder_unsent_send_at")

    def conditions() -> list[str]:
        with state_db.engine_for(url).connect() as conn:
            found = conn.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE type = 'index' AND name IN (?, ?) "
                "ORDER BY name",
                names,
            )
            return [sql.split(" WHERE ", 1)[1] for (sql,) in found]

    def downgrade(revision: str) -> None:
        with state_db.engine_for(url).connect() as conn:
            cfg = state_db.alembic_config(url)
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, revision)
            conn.commit()

    ors = [models.FINAL_SQL, "(status = 'pending' OR status = 'queued' OR status = 'sending')"]
    state_db.upgrade(url, "0012")
    assert all(" IN (" in where and " OR " not in where for where in conditions())
    state_db.upgrade(url, "0013")
    assert conditions() == ors
    state_db.upgrade(url)
    assert conditions() == [models.FINAL_SQL]
    downgrade("0013")
    assert conditions() == ors
    downgrade("0012")
    assert all(" IN (" in where and " OR " not in where for where in conditions())
    state_db.dispose_engines(url)
