"""The rule's check query at send time (:mod:`reminders.policies.recheck`), on a real SQLite
business DB opened read-only as the worker opens it: no row cancels; a query the database cannot
answer now is retried; one that cannot be asked for this reminder fails it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from reminders import business_db
from reminders.compose import RecheckFailed
from reminders.policies import Cancel, Decision, Fail, Retry, recheck
from tests.rule_objects import context, load_rule, refills_with

NOW = datetime(2027, 3, 13, 15, tzinfo=UTC)
STILL_REFILLABLE = "SELECT 1 FROM prescriptions WHERE id = :rx_id AND refills_left > 0"


@pytest.fixture
def business(tmp_path: Path) -> Iterator[Connection]:
    """Prescription 1 with refills left, 2 without; a read-only connection to them."""
    path = tmp_path / "business.db"
    writer = sa.create_engine(f"sqlite:///{path}")
    with writer.begin() as conn:
        conn.execute(sa.text("CREATE TABLE prescriptions (id INTEGER, refills_left INTEGER)"))
        conn.execute(sa.text("INSERT INTO prescriptions VALUES (1, 2), (2, 0)"))
    writer.dispose()
    engine = business_db.create_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        yield conn
    engine.dispose()


def ask(tmp_path: Path, check: str, conn: Connection, **values: Any) -> Decision | None:
    config, rule = load_rule(tmp_path / "project", refills_with(check=check))
    return recheck.policy(context(config, rule, NOW, values=values, business=lambda: conn))


@pytest.mark.parametrize(
    ("check", "values", "expected"),
    [
        (STILL_REFILLABLE, {"rx_id": 1}, None),
        (
            STILL_REFILLABLE,
            {"rx_id": 2},
            Cancel("canceled: the rule's check query returned no row"),
        ),
        (
            STILL_REFILLABLE,
            {"rx_id": 3},
            Cancel("canceled: the rule's check query returned no row"),
        ),
        # the engine's own parameters: :today is in the config's zone (New York)
        ("SELECT 1 WHERE :today = '2027-03-13'", {}, None),
        # a row value of the same name wins over the engine's
        ("SELECT 1 WHERE :today = 'mine'", {"today": "mine"}, None),
        (
            "SELECT 1 FROM prescriptions WHERE id = :rx",
            {},
            Fail(
                "check query: rule refill-due (rules/rules.yaml:2): the check query uses :rx, "
                "which the rule's query does not return"
            ),
        ),
        (
            "SELECT 1 FROM refills WHERE id = :rx_id",
            {},
            Retry("check query failed: rule refill-due: no such table: refills"),
        ),
    ],
)
def test_recheck(
    tmp_path: Path,
    business: Connection,
    check: str,
    values: dict[str, Any],
    expected: Decision | None,
) -> None:
    assert ask(tmp_path, check, business, **values) == expected


def test_a_rule_without_a_check_asks_nothing(tmp_path: Path) -> None:
    config, rule = load_rule(tmp_path)
    assert recheck.policy(context(config, rule, NOW)) is None  # its business DB raises if asked


def test_an_unreachable_business_db_is_retried(tmp_path: Path) -> None:
    def unreachable() -> Connection:
        raise RecheckFailed("business DB unreachable: connection refused")

    config, rule = load_rule(tmp_path, refills_with(check=STILL_REFILLABLE))
    decision = recheck.policy(context(config, rule, NOW, business=unreachable))
    assert decision == Retry("check query failed: business DB unreachable: connection refused")
