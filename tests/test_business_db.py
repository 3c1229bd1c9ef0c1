"""The business DB, opened read-only: streamed rows, clear errors, and no way to write."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from reminders import business_db, mysql
from reminders.errors import ServiceUnavailable, SourceError
from tests import services


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def business(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, sa.Engine]]:
    """A business DB with a table of 5 rows: (its URL, a writable engine for the test)."""

    def fill(url: str) -> tuple[str, sa.Engine]:
        writable = sa.create_engine(url)
        with writable.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
            conn.execute(
                sa.text("INSERT INTO items (id, name) VALUES (:id, :name)"),
                [{"id": i, "name": f"item {i}"} for i in range(1, 6)],
            )
        return url, writable

    if request.param == "sqlite":
        url, writable = fill(f"sqlite:///{tmp_path / 'business.db'}")
        yield url, writable
    else:
        with services.business_database(request.param) as server:
            url, writable = fill(server)
            yield url, writable
            writable.dispose()
            return
    writable.dispose()


def _count(writable: sa.Engine) -> int:
    with writable.connect() as conn:
        return int(conn.exec_driver_sql("SELECT count(*) FROM items").scalar_one())


def _run(engine: sa.Engine, sql: str, batch: int = 2000) -> list[list[dict[str, object]]]:
    batches = business_db.stream(engine, sql, {}, what="rule t", batch=batch)
    return [[dict(r) for r in b] for b in batches]


def test_rows_come_in_batches_of_mappings(business: tuple[str, sa.Engine]) -> None:
    engine = business_db.create_engine(business[0])
    try:
        batches = _run(engine, "SELECT id, name FROM items ORDER BY id", batch=2)
    finally:
        engine.dispose()
    assert [len(b) for b in batches] == [2, 2, 1]
    assert batches[0][0] == {"id": 1, "name": "item 1"}


@pytest.mark.parametrize(
    "write",
    [
        "INSERT INTO items (id, name) VALUES (9, 'x') RETURNING id",
        "UPDATE items SET name = 'x' RETURNING id",
        "DELETE FROM items RETURNING id",
        "WITH gone AS (DELETE FROM items RETURNING id) SELECT id FROM gone",
        "CREATE TABLE sneaky (id INTEGER)",
        "DROP TABLE items",
    ],
)
def test_a_query_that_writes_fails_and_writes_nothing(
    business: tuple[str, sa.Engine], write: str
) -> None:
    url, writable = business
    engine = business_db.create_engine(url)
    try:
        with pytest.raises(SourceError, match=r"^rule t: the query failed: "):
            _run(engine, write)
    finally:
        engine.dispose()
    assert _count(writable) == 5
    with writable.connect() as conn:
        assert conn.execute(sa.text("SELECT name FROM items WHERE id = 1")).scalar() == "item 1"
        names = sa.inspect(conn).get_table_names()
    assert "sneaky" not in names


def test_sqlite_says_the_database_is_read_only(tmp_path: Path) -> None:
    path = tmp_path / "business.db"
    writable = sa.create_engine(f"sqlite:///{path}")
    with writable.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE items (id INTEGER PRIMARY KEY)")
    writable.dispose()
    engine = business_db.create_engine(f"sqlite:///{path}")
    try:
        with pytest.raises(SourceError, match=r"not authorized: .* read-only"):
            _run(engine, "INSERT INTO items (id) VALUES (1) RETURNING id")
    finally:
        engine.dispose()


@pytest.fixture
def pg_writer(pg_url: str) -> Iterator[sa.Engine]:
    """A PostgreSQL business DB with a function that writes when a SELECT calls it."""
    writable = sa.create_engine(pg_url)
    with writable.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
        conn.exec_driver_sql(
            "CREATE FUNCTION write_it() RETURNS integer LANGUAGE sql AS "
            "$$ INSERT INTO items (id, name) VALUES (1, 'x') RETURNING id $$"
        )
    yield writable
    writable.dispose()


def _pg_items(writable: sa.Engine) -> int:
    with writable.connect() as conn:
        return int(conn.exec_driver_sql("SELECT count(*) FROM items").scalar_one())


def test_postgresql_refuses_a_select_that_writes(pg_url: str, pg_writer: sa.Engine) -> None:
    engine = business_db.create_engine(pg_url)
    try:
        with pytest.raises(SourceError, match="cannot execute INSERT in a read-only transaction"):
            _run(engine, "SELECT write_it() AS id")
    finally:
        engine.dispose()
    assert _pg_items(pg_writer) == 0


def test_a_query_cannot_turn_read_only_off_for_later_queries(
    pg_url: str, pg_writer: sa.Engine
) -> None:
    """A rule's query that switches the session's default back to read-write changes nothing:
    the next query, on the very same pooled connection, is still read-only."""
    engine = business_db.create_engine(pg_url)
    try:
        _run(engine, "SELECT set_config('default_transaction_read_only', 'off', false) AS x")
        with pytest.raises(SourceError, match="read-only transaction"):
            _run(engine, "SELECT write_it() AS id")
        assert engine.pool.checkedin() == 1  # one connection served both queries
    finally:
        engine.dispose()
    assert _pg_items(pg_writer) == 0


def test_a_failing_query_names_the_rule_and_gives_the_databases_message(
    business: tuple[str, sa.Engine],
) -> None:
    engine = business_db.create_engine(business[0])
    try:
        with pytest.raises(SourceError, match=r"^rule t: the query failed: .*no_such_table"):
            _run(engine, "SELECT * FROM no_such_table")
    finally:
        engine.dispose()


def test_parameters_finds_named_parameters_but_not_casts_or_literals() -> None:
    sql = "SELECT a::date, ':not_me' AS b FROM t WHERE due >= :today AND at < :now AND x = ':x'"
    assert business_db.parameters(sql) == {"today", "now"}


def test_a_colon_word_inside_a_quoted_string_is_text_not_a_parameter(
    business: tuple[str, sa.Engine],
) -> None:
    engine = business_db.create_engine(business[0])
    sql = (
        "SELECT 'due at :noon' AS a, 'at 10:30, a::b' AS b, 'it''s :late' AS c, "
        "'escaped \\:word' AS d, name FROM items WHERE id = :id"
    )
    try:
        batches = business_db.stream(engine, sql, {"id": 2}, what="rule t")
        rows = [dict(r) for b in batches for r in b]
    finally:
        engine.dispose()
    assert rows == [
        {
            "a": "due at :noon",
            "b": "at 10:30, a::b",
            "c": "it's :late",
            "d": "escaped :word",  # SQLAlchemy's own escape, \: -> :, still works
            "name": "item 2",
        }
    ]


def test_a_missing_sqlite_file_is_reported_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    with pytest.raises(ServiceUnavailable, match="no database file at"):
        business_db.create_engine(f"sqlite:///{missing}")
    assert not missing.exists()


def test_an_in_memory_business_db_is_refused() -> None:
    with pytest.raises(ServiceUnavailable, match="must be a file"):
        business_db.create_engine("sqlite://")


def test_an_unreachable_postgresql_is_a_service_failure() -> None:
    port = services.free_port()
    engine = business_db.create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/x")
    try:
        with pytest.raises(ServiceUnavailable, match="rule t: business DB unreachable"):
            _run(engine, "SELECT 1")
    finally:
        engine.dispose()


def test_an_unsupported_database_is_named() -> None:
    with pytest.raises(ServiceUnavailable, match="oracle is not supported"):
        business_db.create_engine("oracle://u:p@h/db")


def test_time_params_bind_what_the_query_uses_today_in_the_configs_zone() -> None:
    now = datetime(2026, 3, 8, 3, 30, tzinfo=UTC)  # still the 7th in Chicago
    chicago = ZoneInfo("America/Chicago")
    assert business_db.time_params("SELECT 1 WHERE :today > d", now, chicago) == {
        "today": date(2026, 3, 7)
    }
    assert business_db.time_params("SELECT :now, ':today'", now, chicago) == {"now": now}
    assert business_db.time_params("SELECT 1", now, chicago) == {}


def test_columns_reads_the_names_without_rows(business: tuple[str, sa.Engine]) -> None:
    engine = business_db.create_engine(business[0])
    try:
        sql = "SELECT id AS rx_id, name FROM items"
        names = business_db.columns(engine, sql, {}, what="rule t")
    finally:
        engine.dispose()
    assert names == ["rx_id", "name"]


@pytest.mark.parametrize(
    "statement",
    [
        "ATTACH DATABASE '{elsewhere}' AS elsewhere",
        "VACUUM INTO '{elsewhere}'",
        "PRAGMA query_only = OFF",
    ],
)
def test_sqlite_denies_attach_vacuum_into_and_pragma_settings(
    tmp_path: Path, statement: str
) -> None:
    path = tmp_path / "business.db"
    writable = sa.create_engine(f"sqlite:///{path}")
    with writable.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE items (id INTEGER PRIMARY KEY)")
    writable.dispose()
    before = path.read_bytes()
    elsewhere = tmp_path / "elsewhere" / "copy.db"
    elsewhere.parent.mkdir()
    engine = business_db.create_engine(f"sqlite:///{path}")
    try:
        with pytest.raises(SourceError, match=r"^rule t: the query failed: not authorized: not "):
            _run(engine, statement.format(elsewhere=elsewhere))
        assert _run(engine, "SELECT count(*) AS n FROM items") == [[{"n": 0}]]
    finally:
        engine.dispose()
    assert list(elsewhere.parent.iterdir()) == []
    assert path.read_bytes() == before


def test_a_statement_that_returns_no_rows_is_the_business_queries_fault(tmp_path: Path) -> None:
    path = tmp_path / "business.db"
    sa.create_engine(f"sqlite:///{path}").dispose()
    path.touch()
    engine = business_db.create_engine(f"sqlite:///{path}")
    try:
        with pytest.raises(SourceError, match=r"^rule t: the query returns no rows"):
            _run(engine, "PRAGMA no_such_pragma")  # allowed (it sets nothing), and returns nothing
    finally:
        engine.dispose()


# --- MySQL and MariaDB ----------------------------------------------------------------------------


@pytest.fixture
def maria(tmp_path: Path) -> Iterator[tuple[str, sa.Engine]]:
    """A MariaDB business DB with the items table of ``business``: (its URL, a writable engine)."""
    with services.mariadb_database() as url:
        writable = sa.create_engine(url)
        with writable.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
            conn.exec_driver_sql("INSERT INTO items VALUES (1, 'item 1')")
        yield url, writable
        writable.dispose()


def test_mysql_values_arrive_as_the_types_postgresql_gives(
    maria: tuple[str, sa.Engine], pg_url: str
) -> None:
    """DATE, DATETIME (naive: customer-local), TIMESTAMP (an instant: aware UTC, as timestamptz)
    and DECIMAL, written in another session zone than the engine's."""
    url, _ = maria
    kinds = {
        "mariadb": "d DATE, local_at DATETIME, at TIMESTAMP NULL, amount DECIMAL(10, 2)",
        "postgresql": "d DATE, local_at TIMESTAMP, at TIMESTAMPTZ, amount NUMERIC(10, 2)",
    }
    found = {}
    for backend, server in (("mariadb", url), ("postgresql", pg_url)):
        engine = sa.create_engine(server)
        with engine.begin() as conn:
            zone = "time_zone = '-05:00'" if backend == "mariadb" else "timezone = 'Etc/GMT+5'"
            conn.exec_driver_sql(f"SET {zone}")  # the writer's own zone: UTC-5
            conn.exec_driver_sql(f"CREATE TABLE typed (id INTEGER PRIMARY KEY, {kinds[backend]})")
            conn.exec_driver_sql(
                "INSERT INTO typed VALUES "
                "(1, '2027-03-17', '2027-03-17 10:30:00', '2027-03-17 05:30:00', 12.50)"
            )
        engine.dispose()
        reader = business_db.create_engine(server)
        try:
            (rows,) = _run(reader, "SELECT d, local_at, at, amount FROM typed")
        finally:
            reader.dispose()
        found[backend] = rows[0]
    assert (
        found["mariadb"]
        == found["postgresql"]
        == {
            "d": date(2027, 3, 17),
            "local_at": datetime(2027, 3, 17, 10, 30),
            "at": datetime(2027, 3, 17, 10, 30, tzinfo=UTC),
            "amount": Decimal("12.50"),
        }
    )
    assert found["mariadb"]["at"].tzinfo is UTC


def test_mysql_binds_now_as_its_utc_time_and_today_as_a_date(maria: tuple[str, sa.Engine]) -> None:
    url, writable = maria
    with writable.begin() as conn:
        conn.exec_driver_sql("SET time_zone = '+00:00'")
        conn.exec_driver_sql("CREATE TABLE visits (id INTEGER PRIMARY KEY, at TIMESTAMP, d DATE)")
        conn.exec_driver_sql(
            "INSERT INTO visits VALUES (1, '2026-03-08 03:00:00', '2026-03-07'), "
            "(2, '2026-03-08 04:00:00', '2026-03-08')"
        )
    now = datetime(2026, 3, 8, 3, 30, tzinfo=UTC)  # 21:30 on the 7th in Chicago
    chicago = ZoneInfo("America/Chicago")
    sql = "SELECT id, CAST(:now AS DATETIME) AS bound FROM visits WHERE at <= :now AND d = :today"
    params = business_db.time_params(sql, now.astimezone(chicago), chicago)  # :now in any zone
    engine = business_db.create_engine(url)
    try:
        rows = [r for b in business_db.stream(engine, sql, params, what="rule t") for r in b]
    finally:
        engine.dispose()
    assert rows == [{"id": 1, "bound": datetime(2026, 3, 8, 3, 30)}]


def test_a_mysql_query_cannot_turn_read_only_off_for_later_queries(
    maria: tuple[str, sa.Engine],
) -> None:
    """The session's default is read-only and each transaction starts READ ONLY: a query that
    sets the session back to read-write does not let the next one, on the same connection,
    write."""
    url, writable = maria
    engine = business_db.create_engine(url)
    try:
        with pytest.raises(SourceError, match="returns no rows"):
            _run(engine, "SET SESSION TRANSACTION READ WRITE")
        with pytest.raises(SourceError, match="READ ONLY transaction"):
            _run(engine, "INSERT INTO items (id, name) VALUES (9, 'x') RETURNING id")
        assert engine.pool.checkedin() == 1  # one connection served both queries
    finally:
        engine.dispose()
    assert _count(writable) == 1


def test_a_mysql_connection_lost_mid_query_is_an_error_naming_the_rule(
    maria: tuple[str, sa.Engine],
) -> None:
    url, writable = maria
    engine = business_db.create_engine(url)
    rows = business_db.stream(engine, "SELECT id, SLEEP(1) AS s FROM items", {}, what="rule t")
    try:
        with ThreadPoolExecutor(1) as pool:
            reading = pool.submit(list, rows)
            with writable.connect() as conn:
                for _ in range(100):  # until the query runs (its SLEEP is its first second)
                    running = conn.execute(
                        sa.text(
                            "SELECT id FROM information_schema.processlist WHERE info LIKE "
                            ":query AND id <> connection_id()"
                        ),
                        {"query": "%SLEEP(1) AS s%"},
                    ).scalar()
                    if running is not None:
                        break
                    time.sleep(0.01)
                assert running is not None
                conn.exec_driver_sql(f"KILL CONNECTION {int(running)}")
            with pytest.raises(ServiceUnavailable) as raised:
                reading.result()
    finally:
        engine.dispose()
    assert str(raised.value).startswith("rule t: business DB unreachable: Lost connection")


def test_an_unreachable_mysql_is_a_service_failure() -> None:
    port = services.free_port()
    engine = business_db.create_engine(f"mysql://root@127.0.0.1:{port}/x")
    try:
        with pytest.raises(ServiceUnavailable, match="rule t: business DB unreachable: Can't"):
            _run(engine, "SELECT 1")
    finally:
        engine.dispose()


def test_mysql_and_mariadb_urls_use_mysqlclient_unless_they_name_a_driver() -> None:
    assert str(mysql.engine_url("mysql://u@h/db")) == "mysql+mysqldb://u@h/db"
    assert str(mysql.engine_url("mariadb://u@h/db")) == "mariadb+mysqldb://u@h/db"
    assert str(mysql.engine_url("mysql+pymysql://u@h/db")) == "mysql+pymysql://u@h/db"


def test_a_mysql_driver_not_installed_is_named() -> None:
    driver = r"^source.url: mysql\+mariadbconnector: its driver is not installed"
    with pytest.raises(ServiceUnavailable, match=driver):
        business_db.create_engine("mysql+mariadbconnector://root@127.0.0.1/x")


def test_mysql_runs_one_statement_a_query(maria: tuple[str, sa.Engine]) -> None:
    """Rule loading refuses ``;``-chained statements; the connection refuses them too."""
    url, writable = maria
    engine = business_db.create_engine(url)
    try:
        with pytest.raises(SourceError, match="error in your SQL syntax"):
            _run(engine, "SELECT id FROM items; DROP TABLE items")
    finally:
        engine.dispose()
    assert _count(writable) == 1
