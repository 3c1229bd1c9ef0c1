"""Checks: the checkout's duplicate-purchase question, from Python and the command line.

The web answers are in ``test_checks_web.py``; both use the shop built here. At ``NOW``
(2027-03-20 12:00 UTC) the shop's paid orders are:

| order | customer | sku | title                 | kind     | status   | placed_at (UTC)     |
| ----- | -------- | --- | --------------------- | -------- | -------- | ------------------- |
| 101   | 7        | B01 | The Hobbit (e-book)   | digital  | paid     | 2027-03-03 10:00:00 |
| 102   | 7        | P01 | Garden Gloves         | physical | paid     | 2027-01-10 09:30:00 |
| 103   | 7        | P02 | Coffee Beans          | physical | paid     | 2027-03-15 08:00:00 |
| 104   | 8        | B01 | The Hobbit (e-book)   | digital  | refunded | 2027-03-01 10:00:00 |
| 105   | 9        | B02 | Dune (e-book)         | digital  | paid     | 2026-05-05 18:45:00 |
| 106   | 9        | B02 | Dune (e-book)         | digital  | paid     | 2027-03-19 07:00:00 |

Order 106 is a duplicate that went through anyway: the ``bought-twice`` reminder rule finds it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from reminders import checks
from reminders.app import App
from reminders.checks import CheckParamError, run_check
from reminders.config import load_config
from reminders.errors import InputError, RuleError
from tests import services

NOW = "2027-03-20T12:00:00Z"

ORDERS = [
    (101, 7, "B01", "The Hobbit (e-book)", "digital", "paid", "2027-03-03 10:00:00"),
    (102, 7, "P01", "Garden Gloves", "physical", "paid", "2027-01-10 09:30:00"),
    (103, 7, "P02", "Coffee Beans", "physical", "paid", "2027-03-15 08:00:00"),
    (104, 8, "B01", "The Hobbit (e-book)", "digital", "refunded", "2027-03-01 10:00:00"),
    (105, 9, "B02", "Dune (e-book)", "digital", "paid", "2026-05-05 18:45:00"),
    (106, 9, "B02", "Dune (e-book)", "digital", "paid", "2027-03-19 07:00:00"),
]

# What the business means by "owned": a paid order. Both the checkout's checks and the
# bought-twice reminder rule read this one view, so they agree on what a duplicate is.
OWNED_VIEW = """
CREATE VIEW owned AS
SELECT o.id AS order_id, o.customer_id, o.sku, o.title, o.kind, o.placed_at
FROM orders o WHERE o.status = 'paid'
"""

SLOW = {
    # Counts to a billion: minutes, unless the check's timeout stops it.
    "sqlite": "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
    "WHERE i < 1000000000) SELECT order_id FROM owned WHERE customer_id = :customer_id "
    "AND (SELECT max(i) FROM n) > 0",
    "postgresql": "SELECT order_id FROM owned, pg_sleep(30) WHERE customer_id = :customer_id",
    "mariadb": "SELECT order_id FROM owned WHERE customer_id = :customer_id AND SLEEP(30) = 0",
}

RULES = """\
checks:
  - name: already-owned
    description: Refuse to charge twice for something the customer already owns.
    query: |
      SELECT order_id, placed_at, title FROM owned
      WHERE customer_id = :customer_id AND sku = :sku
      ORDER BY placed_at LIMIT 1
    params: {{customer_id: int, sku: str}}
    message: already-owned
    timeout: 200ms
  - name: recently-bought
    description: E-books are owned for ever; physical goods count as a duplicate for 30 days.
    query: |
      SELECT order_id, placed_at, title, kind FROM owned
      WHERE customer_id = :customer_id AND sku = :sku
        AND (kind = 'digital' OR placed_at >= :since)
      ORDER BY placed_at DESC LIMIT 1
    params: {{customer_id: int, sku: str}}
    window: 30d
  - name: typed
    query: |
      SELECT order_id, placed_at FROM owned
      WHERE customer_id = :customer_id AND placed_at >= :after AND placed_at < :before
        AND (:digital_only = FALSE OR kind = 'digital') AND order_id > :min_id
      ORDER BY placed_at LIMIT 1
    params: {{customer_id: int, after: date, before: datetime, digital_only: bool, min_id: float}}
  - name: bought-today
    query: |
      SELECT order_id FROM owned
      WHERE customer_id = :customer_id AND placed_at >= :today AND placed_at <= :now
    params: {{customer_id: int}}
  - name: slow
    query: {slow}
    params: {{customer_id: int}}
    timeout: {slow_timeout}
  - name: broken
    query: SELECT no_such_column FROM owned WHERE customer_id = :customer_id
    params: {{customer_id: int}}
"""

BOUGHT_TWICE = """\
rules:
  - name: bought-twice
    description: After a duplicate purchase went through anyway, offer the refund.
    query: |
      SELECT later.order_id, later.customer_id, later.title, later.placed_at,
             earlier.placed_at AS first_bought_at, c.email
      FROM owned later
      JOIN owned earlier ON earlier.customer_id = later.customer_id
        AND earlier.sku = later.sku AND earlier.placed_at < later.placed_at
      JOIN customers c ON c.id = later.customer_id
    occurrence: "{{ order_id }}"
    due: placed_at
    offsets: [1h]
    grace: 7d
    channels: [email]
    template: bought-twice
"""

TEMPLATE = (
    "You already bought {{ title }} on {{ placed_at|date }} (order {{ order_id }}). Buy it again?"
)

CONFIG = """\
timezone: UTC
source:
  url: {source}
state:
  url: sqlite:///state.db
rules: rules/
templates: templates/
channels:
  email:
    provider: outbox
    path: outbox.jsonl
web:
  public_url: https://shop.example.com
"""


@dataclass
class Shop:
    """A business folder: its DB (``url``), config.yaml, rules and templates."""

    root: Path
    url: str
    backend: str

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    def app(self) -> App:
        return App(self.config_path)

    def writable(self) -> sa.Engine:
        return sa.create_engine(self.url)


def build_shop(root: Path, url: str, *, slow_timeout: str = "100ms") -> Shop:
    """Write the shop's tables, config, rules and templates under ``root`` (DB at ``url``)."""
    backend = sa.engine.make_url(url).get_backend_name()
    if backend == "mysql":
        backend = "mariadb"
    timestamp = {"sqlite": "TEXT", "postgresql": "TIMESTAMPTZ", "mariadb": "TIMESTAMP"}[backend]
    sku = "VARCHAR(16)" if backend == "mariadb" else "TEXT"  # MariaDB indexes no TEXT whole
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        if backend == "mariadb":  # TIMESTAMP values are read and written in the session's zone
            conn.exec_driver_sql("SET time_zone = '+00:00'")
        conn.exec_driver_sql(
            "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL, "
            f"sku {sku} NOT NULL, title TEXT NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL, "
            f"placed_at {timestamp} NOT NULL)"
        )
        conn.exec_driver_sql("CREATE INDEX orders_customer_sku ON orders (customer_id, sku)")
        conn.exec_driver_sql("CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT)")
        conn.execute(
            sa.text("INSERT INTO orders VALUES (:i, :c, :s, :t, :k, :st, :p)"),
            [
                dict(zip(("i", "c", "s", "t", "k", "st", "p"), row, strict=True))
                | {"p": _timestamp(row[6], backend)}
                for row in ORDERS
            ],
        )
        conn.execute(
            sa.text("INSERT INTO customers VALUES (:i, :e)"),
            [{"i": i, "e": f"c{i}@example.com"} for i in (7, 8, 9)],
        )
        conn.exec_driver_sql(OWNED_VIEW)
        if backend == "postgresql":  # dates bound as :today compare at midnight in this zone
            conn.exec_driver_sql(f"ALTER DATABASE \"{engine.url.database}\" SET timezone = 'UTC'")
    engine.dispose()
    (root / "rules").mkdir()
    (root / "templates").mkdir()
    slow = json.dumps(SLOW[backend])
    (root / "rules" / "checks.yaml").write_text(RULES.format(slow=slow, slow_timeout=slow_timeout))
    (root / "rules" / "bought-twice.yaml").write_text(BOUGHT_TWICE)
    (root / "templates" / "already-owned.check.j2").write_text(TEMPLATE + "\n")
    (root / "templates" / "bought-twice.email.j2").write_text(
        "{% block subject %}You bought {{ title }} twice{% endblock %}\n"
        "{% block text %}Reply for a refund of order {{ order_id }}.{% endblock %}\n"
    )
    shown = url if backend != "sqlite" else "sqlite:///shop.db"
    (root / "config.yaml").write_text(CONFIG.format(source=shown))
    return Shop(root, url, backend)


def _timestamp(text: str, backend: str) -> Any:
    if backend == "sqlite":
        return text
    from datetime import UTC, datetime

    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def shop(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Shop]:
    """The shop on SQLite, PostgreSQL and MariaDB, at ``NOW``."""
    monkeypatch.setenv("REMINDERS_NOW", NOW)
    if request.param == "sqlite":
        yield build_shop(tmp_path, f"sqlite:///{tmp_path / 'shop.db'}")
    else:
        with services.business_database(request.param) as url:
            try:
                yield build_shop(tmp_path, url)
            finally:
                checks.dispose_engines()
            return
    checks.dispose_engines()


@pytest.fixture
def sqlite_shop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shop]:
    monkeypatch.setenv("REMINDERS_NOW", NOW)
    yield build_shop(tmp_path, f"sqlite:///{tmp_path / 'shop.db'}")
    checks.dispose_engines()


# --- answers, from Python -------------------------------------------------------------------------


def test_an_item_already_owned_is_a_duplicate_with_the_earlier_order(shop: Shop) -> None:
    answer = run_check(shop.app(), "already-owned", {"customer_id": 7, "sku": "B01"})
    assert answer["duplicate"] is True
    match = answer["match"]
    assert match["order_id"] == 101
    assert match["title"] == "The Hobbit (e-book)"
    assert match["placed_at"].replace("T", " ").startswith("2027-03-03 10:00:00")
    assert answer["message"] == (
        "You already bought The Hobbit (e-book) on Mar 3, 2027 (order 101). Buy it again?"
    )
    assert set(answer) == {"duplicate", "match", "message"}


@pytest.mark.parametrize(
    ("customer", "sku", "why"),
    [(7, "B02", "never bought"), (8, "B01", "refunded"), (1234, "B01", "unknown customer")],
)
def test_an_item_not_owned_is_not_a_duplicate(
    shop: Shop, customer: int, sku: str, why: str
) -> None:
    answer = run_check(shop.app(), "already-owned", {"customer_id": customer, "sku": sku})
    assert answer == {"duplicate": False}, why


@pytest.mark.parametrize(
    ("customer", "sku", "duplicate"),
    [
        (7, "B01", True),  # digital, 17 days ago
        (9, "B02", True),  # digital, bought twice already: the latest order is the match
        (7, "P02", True),  # physical, 5 days ago: within the 30-day window
        (7, "P01", False),  # physical, 69 days ago: outside the window
    ],
)
def test_a_window_and_a_product_type_decide_in_the_query(
    shop: Shop, customer: int, sku: str, duplicate: bool
) -> None:
    answer = run_check(shop.app(), "recently-bought", {"customer_id": customer, "sku": sku})
    assert answer["duplicate"] is duplicate
    if customer == 9:
        assert answer["match"]["order_id"] == 106
    if duplicate:
        assert answer["message"] is None  # the check names no message template


def test_the_window_moves_with_the_engine_clock(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = {"customer_id": 7, "sku": "P02"}
    monkeypatch.setenv("REMINDERS_NOW", "2027-04-14T07:59:59Z")  # 29 days 23:59:59 later
    assert run_check(shop.app(), "recently-bought", params)["duplicate"] is True
    monkeypatch.setenv("REMINDERS_NOW", "2027-04-14T08:00:01Z")  # 30 days and a second
    assert run_check(shop.app(), "recently-bought", params)["duplicate"] is False


def test_the_engine_binds_now_and_today_on_its_clock(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = {"customer_id": 9}
    monkeypatch.setenv("REMINDERS_NOW", "2027-03-19T09:00:00Z")  # order 106 was at 07:00
    assert run_check(shop.app(), "bought-today", params)["match"] == {"order_id": 106}
    monkeypatch.setenv("REMINDERS_NOW", "2027-03-19T06:59:59Z")  # not yet
    assert run_check(shop.app(), "bought-today", params) == {"duplicate": False}
    monkeypatch.setenv("REMINDERS_NOW", "2027-03-20T00:00:00Z")  # the next day
    assert run_check(shop.app(), "bought-today", params) == {"duplicate": False}


def test_dates_datetimes_bools_and_floats_bind_as_their_types(shop: Shop) -> None:
    app = shop.app()
    base = {"customer_id": 7, "digital_only": False, "min_id": 0}
    march = base | {"after": "2027-03-01", "before": "2027-03-10T00:00:00Z"}
    assert run_check(app, "typed", march)["match"]["order_id"] == 101
    # the datetime's zone counts: 2027-03-03 05:00-05:00 is 10:00 UTC, after order 101
    late = base | {"after": "2027-03-03", "before": "2027-03-03T05:00:00-05:00"}
    assert run_check(app, "typed", late) == {"duplicate": False}
    early = base | {"after": "2027-03-03", "before": "2027-03-03T05:00:01-05:00"}
    assert run_check(app, "typed", early)["match"]["order_id"] == 101
    physical = march | {"after": "2027-01-01", "digital_only": True}
    assert run_check(app, "typed", physical)["match"]["order_id"] == 101
    everything = physical | {"digital_only": False}
    assert run_check(app, "typed", everything)["match"]["order_id"] == 102
    assert run_check(app, "typed", everything | {"min_id": 102.5}) == {"duplicate": False}


def test_python_values_of_the_declared_types_are_accepted(shop: Shop) -> None:
    from datetime import UTC, date, datetime

    answer = run_check(
        shop.app(),
        "typed",
        {
            "customer_id": 7,
            "after": date(2027, 3, 1),
            "before": datetime(2027, 3, 10, tzinfo=UTC),
            "digital_only": False,
            "min_id": 1.5,
        },
    )
    assert answer["match"]["order_id"] == 101


def test_run_check_takes_an_app_a_config_or_a_config_path(sqlite_shop: Shop) -> None:
    params = {"customer_id": 7, "sku": "B01"}
    config = load_config(sqlite_shop.config_path)
    for target in (
        sqlite_shop.app(),
        config,
        sqlite_shop.config_path,
        str(sqlite_shop.config_path),
    ):
        assert run_check(target, "already-owned", params)["match"]["order_id"] == 101
    # rules are loaded once per config, not once per question
    assert checks._app_for(config) is checks._app_for(config)
    assert checks._app_for(sqlite_shop.config_path) is checks._app_for(str(sqlite_shop.config_path))


def test_a_timeout_answers_unknown_and_the_connection_still_works(shop: Shop) -> None:
    app = shop.app()
    answer = run_check(app, "slow", {"customer_id": 7})
    assert answer == {
        "duplicate": None,
        "status": "unknown",
        "reason": "the query took longer than 100 ms",
    }
    assert run_check(app, "already-owned", {"customer_id": 7, "sku": "B01"})["duplicate"] is True


def _drop_connections(admin: sa.Engine, backend: str, running: str = "") -> int:
    """Have the server drop every other connection to the shop's database (only those running a
    query containing ``running``, when given); returns how many it dropped."""
    with admin.connect() as conn:
        if backend == "postgresql":
            return int(
                conn.execute(
                    sa.text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                        "AND query LIKE :running"
                    ),
                    {"running": f"%{running}%"},
                ).scalar_one()
            )
        ids = conn.execute(
            sa.text(
                "SELECT id FROM information_schema.processlist WHERE db = database() "
                "AND id <> connection_id() AND coalesce(info, '') LIKE :running"
            ),
            {"running": f"%{running}%"},
        ).scalars()
        killed = 0
        for connection_id in list(ids):
            conn.exec_driver_sql(f"KILL CONNECTION {int(connection_id)}")
            killed += 1
        return killed


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_connections_dropped_by_the_server_are_replaced_without_a_wrong_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    # Checks skip the pool's ping before each query; a dropped connection is retried instead.
    monkeypatch.setenv("REMINDERS_NOW", NOW)
    owned = {"customer_id": 7, "sku": "B01"}
    with services.business_database(backend) as url:
        shop = build_shop(tmp_path, url)
        app = shop.app()
        try:
            with ThreadPoolExecutor(4) as pool:  # several pooled connections, all to be dropped
                list(pool.map(lambda _: run_check(app, "already-owned", owned), range(16)))
            admin = shop.writable()
            killed = _drop_connections(admin, backend)
            admin.dispose()
            assert killed >= 1
            for _ in range(3):
                assert run_check(app, "already-owned", owned)["duplicate"] is True
            assert run_check(app, "already-owned", {"customer_id": 7, "sku": "B02"}) == {
                "duplicate": False
            }
        finally:
            checks.dispose_engines()


@pytest.mark.parametrize(("backend", "sleep"), [("postgresql", "pg_sleep"), ("mariadb", "SLEEP(")])
def test_a_connection_dropped_mid_query_is_not_retried_past_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, sleep: str
) -> None:
    monkeypatch.setenv("REMINDERS_NOW", NOW)
    with services.business_database(backend) as url:
        shop = build_shop(tmp_path, url, slow_timeout="2s")
        app = shop.app()
        admin = shop.writable()

        def drop_the_slow_query() -> int:
            time.sleep(0.5)
            return _drop_connections(admin, backend, running=sleep)

        try:
            with ThreadPoolExecutor(1) as pool:
                dropping = pool.submit(drop_the_slow_query)
                started = time.monotonic()
                answer = run_check(app, "slow", {"customer_id": 7})
                elapsed = time.monotonic() - started
                dropped = dropping.result()
        finally:
            admin.dispose()
            checks.dispose_engines()
    # Retried, it would have slept again until the 2 s timeout: the checkout waits no longer
    # than the check's timeout, and hears that the database went away.
    assert dropped == 1
    assert elapsed < 2.0
    assert answer["status"] == "error"
    assert answer["error"].startswith("check slow: business DB unreachable: ")


def test_a_broken_query_is_an_error_answer_naming_the_check(shop: Shop) -> None:
    answer = run_check(shop.app(), "broken", {"customer_id": 7})
    assert answer["duplicate"] is None
    assert answer["status"] == "error"
    assert answer["error"].startswith("check broken: the query failed: ")
    assert "no_such_column" in answer["error"]


@pytest.mark.parametrize(
    ("backend", "url"),
    [("postgresql", "postgresql+psycopg://postgres@127.0.0.1:{port}/shop"),
     ("mariadb", "mysql://root@127.0.0.1:{port}/shop")],
)  # fmt: skip
def test_an_unreachable_database_is_an_error_answer(tmp_path: Path, backend: str, url: str) -> None:
    port = services.free_port()  # nothing listens there
    shop = Shop(tmp_path, url.format(port=port), backend)
    (tmp_path / "rules").mkdir()
    (tmp_path / "templates").mkdir()
    (tmp_path / "rules" / "checks.yaml").write_text(
        RULES.format(slow=json.dumps(SLOW["postgresql"]), slow_timeout="1s")
    )
    (tmp_path / "config.yaml").write_text(CONFIG.format(source=shop.url))
    try:
        answer = run_check(shop.app(), "already-owned", {"customer_id": 7, "sku": "B01"})
    finally:
        checks.dispose_engines()
    assert answer["duplicate"] is None
    assert answer["status"] == "error"
    assert "business DB unreachable" in answer["error"]


def test_a_message_that_fails_to_render_still_answers(sqlite_shop: Shop) -> None:
    (sqlite_shop.root / "templates" / "already-owned.check.j2").write_text(
        "You bought {{ no_such_name }}.\n"
    )
    answer = run_check(sqlite_shop.app(), "already-owned", {"customer_id": 7, "sku": "B01"})
    assert answer["duplicate"] is True
    assert answer["match"]["order_id"] == 101
    assert answer["message"] is None
    assert "already-owned.check.j2:1" in answer["message_error"]
    assert "no_such_name" in answer["message_error"]


# --- parameters -----------------------------------------------------------------------------------


def _param_errors(shop: Shop, params: dict[str, Any], name: str = "already-owned") -> dict:
    with pytest.raises(CheckParamError) as caught:
        run_check(shop.app(), name, params)
    assert caught.value.allowed == shop.app().ruleset.check(name).params
    return caught.value.errors


def test_missing_wrong_type_and_extra_parameters_are_each_named(sqlite_shop: Shop) -> None:
    errors = _param_errors(sqlite_shop, {"customer_id": "7", "colour": "red"})
    assert errors == {
        "customer_id": 'must be an integer, got the string "7"',
        "sku": "missing: a string is required",
        "colour": "not a parameter of this check (allowed: customer_id, sku)",
    }


@pytest.mark.parametrize(
    ("param", "value", "expected"),
    [
        ("customer_id", True, "must be an integer, got the boolean true"),
        ("customer_id", 7.5, "must be an integer, got the number 7.5"),
        ("customer_id", None, "must be an integer, got null"),
        ("digital_only", "yes", 'must be true or false, got the string "yes"'),
        ("min_id", "1", 'must be a number, got the string "1"'),
        ("after", "03/01/2027", 'must be a date (YYYY-MM-DD), got the string "03/01/2027"'),
        ("after", 20270301, "must be a date (YYYY-MM-DD), got the number 20270301"),
        (
            "before",
            "soon",
            'must be an ISO 8601 date and time (no zone = UTC), got the string "soon"',
        ),
        ("before", [], "must be an ISO 8601 date and time (no zone = UTC), got a list"),
    ],
)
def test_a_value_of_the_wrong_type_says_what_is_allowed(
    sqlite_shop: Shop, param: str, value: Any, expected: str
) -> None:
    good = {
        "customer_id": 7,
        "after": "2027-03-01",
        "before": "2027-03-10T00:00:00",
        "digital_only": False,
        "min_id": 0,
    }
    assert _param_errors(sqlite_shop, good | {param: value}, "typed") == {param: expected}


def test_an_unknown_check_names_the_known_ones(sqlite_shop: Shop) -> None:
    with pytest.raises(RuleError, match=r'no check named "nope" \(checks: already-owned, '):
        run_check(sqlite_shop.app(), "nope", {})


def test_command_line_values_are_parsed_as_their_declared_types(sqlite_shop: Shop) -> None:
    check = sqlite_shop.app().ruleset.check("typed")
    text = {
        "customer_id": "7",
        "after": "2027-03-01",
        "before": "2027-03-10T00:00:00",
        "digital_only": "no",
        "min_id": "1",
    }
    typed = checks.coerce_params(check, text, text=True)
    assert typed["customer_id"] == 7
    assert typed["digital_only"] is False
    assert typed["min_id"] == 1.0
    with pytest.raises(CheckParamError) as caught:
        checks.coerce_params(
            check, text | {"customer_id": "seven", "digital_only": "maybe"}, text=True
        )
    assert caught.value.errors == {
        "customer_id": 'must be an integer, got the string "seven"',
        "digital_only": 'must be true or false, got the string "maybe"',
    }
    with pytest.raises(CheckParamError) as caught:
        checks.coerce_params(check, text | {"customer_id": "1" + "0" * 30}, text=True)
    assert caught.value.errors == {
        "customer_id": "must be an integer from -9223372036854775808 to 9223372036854775807 "
        '(64 bits), got the string "1000000000000000000000000000000"'
    }


def test_key_value_pairs_are_parsed_and_bad_ones_named() -> None:
    assert checks.parse_pairs(["customer_id=7", "sku=B=01", "note="]) == {
        "customer_id": "7",
        "sku": "B=01",
        "note": "",
    }
    with pytest.raises(InputError) as caught:
        checks.parse_pairs(["customer_id", "sku=1", "sku=2", "=3"])
    assert [p.message for p in caught.value.problems] == [
        '"customer_id" is not key=value (e.g. customer_id=7)',
        "sku is given twice",
        '"=3" is not key=value (e.g. customer_id=7)',
    ]


# --- rule files -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("window: 30d\n", "window binds :since: use it in the query"),
        ("timeout: 0s\n", "timeout must be more than 0"),
    ],
)
def test_check_settings_are_validated_at_load(sqlite_shop: Shop, extra: str, message: str) -> None:
    (sqlite_shop.root / "rules" / "checks.yaml").write_text(
        "checks:\n  - name: c\n    query: SELECT 1 FROM owned WHERE customer_id = :customer_id\n"
        "    params: {customer_id: int}\n    " + extra
    )
    with pytest.raises(RuleError, match=message) as caught:
        sqlite_shop.app().ruleset  # noqa: B018
    assert caught.value.problems[0].file == "rules/checks.yaml"
    assert caught.value.problems[0].line == 2


def test_a_query_parameter_not_declared_is_a_load_error(sqlite_shop: Shop) -> None:
    (sqlite_shop.root / "rules" / "checks.yaml").write_text(
        "checks:\n  - name: c\n"
        "    query: SELECT 1 FROM owned WHERE customer_id = :customer_id AND placed_at >= :since\n"
        "    params: {customer_id: int}\n"
    )
    with pytest.raises(
        RuleError,
        match=r"uses :since, which is not in params \(the engine binds :now, :today\) "
        r"\(or set window: to bind :since\)",
    ):
        sqlite_shop.app().ruleset  # noqa: B018


# --- the command line -----------------------------------------------------------------------------


def _reminders(shop: Shop, *args: str) -> subprocess.CompletedProcess[str]:
    command = Path(sys.executable).with_name("reminders")
    env = dict(os.environ, REMINDERS_NOW=NOW)
    env.pop("REMINDERS_CONFIG", None)
    return subprocess.run(
        [str(command), "-c", str(shop.config_path), "check", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_the_command_line_prints_the_same_answer_and_exits_0(shop: Shop) -> None:
    done = _reminders(shop, "already-owned", "customer_id=7", "sku=B01")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer == run_check(shop.app(), "already-owned", {"customer_id": 7, "sku": "B01"})
    assert answer["match"]["order_id"] == 101
    done = _reminders(shop, "already-owned", "customer_id=7", "sku=ZZZ")
    assert (done.returncode, json.loads(done.stdout)) == (0, {"duplicate": False})


def test_the_command_line_exits_1_when_unknown_or_failed(sqlite_shop: Shop) -> None:
    done = _reminders(sqlite_shop, "slow", "customer_id=7")
    assert done.returncode == 1
    assert json.loads(done.stdout) == {
        "duplicate": None,
        "status": "unknown",
        "reason": "the query took longer than 100 ms",
    }
    done = _reminders(sqlite_shop, "broken", "customer_id=7")
    assert done.returncode == 1
    assert json.loads(done.stdout)["status"] == "error"


def test_the_command_line_exits_2_on_bad_parameters(sqlite_shop: Shop) -> None:
    done = _reminders(sqlite_shop, "already-owned", "customer_id=seven", "colour=red")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        'check already-owned: customer_id: must be an integer, got the string "seven"',
        "check already-owned: sku: missing: a string is required",
        "check already-owned: colour: not a parameter of this check (allowed: customer_id, sku)",
    ]
    done = _reminders(sqlite_shop, "already-owned", "customer_id")
    assert done.returncode == 2
    assert '"customer_id" is not key=value' in done.stderr
    done = _reminders(sqlite_shop, "nope")
    assert done.returncode == 2
    assert 'no check named "nope"' in done.stderr


# --- the reminder that follows a duplicate that went through anyway -------------------------------


def test_a_duplicate_that_went_through_gets_its_notice_from_the_same_definition(
    shop: Shop, redis_url: str
) -> None:
    """The check and the bought-twice rule read one view (owned): what the checkout calls a
    duplicate is what the notice is sent about. Customer 9 bought Dune again (order 106)."""
    config = shop.config_path.read_text() + f"redis:\n  url: {redis_url}\n"
    shop.config_path.write_text(config)
    match = run_check(shop.app(), "already-owned", {"customer_id": 9, "sku": "B02"})["match"]
    assert (match["order_id"], match["title"]) == (105, "Dune (e-book)")
    command = str(Path(sys.executable).with_name("reminders"))
    # links in the message (unsubscribe) are signed: web.public_url is set
    env = dict(os.environ, REMINDERS_NOW=NOW, REMINDERS_SECRET="s" * 40)
    for step in (["db", "upgrade"], ["scan"], ["dispatch"], ["worker", "--burst"]):
        done = subprocess.run(
            [command, "-c", str(shop.config_path), *step],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert done.returncode == 0, (step, done.stdout, done.stderr)
    sent = [json.loads(line) for line in (shop.root / "outbox.jsonl").read_text().splitlines()]
    assert [(m["rule"], m["to"], m["subject"]) for m in sent] == [
        ("bought-twice", "c9@example.com", "You bought Dune (e-book) twice")
    ]
    assert "order 106" in sent[0]["body"]
