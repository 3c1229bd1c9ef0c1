"""Database errors, translated once: the driver's first line, and which database failed."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from reminders import dberrors
from reminders.errors import ServiceUnavailable, SourceError, StateError
from tests import services


def _failure(url: str, sql: str) -> sa.exc.DBAPIError:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(sql), {"secret": "a customer's data"})
    except sa.exc.DBAPIError as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError(f"{sql} did not fail")


def test_a_failed_query_is_the_drivers_first_line_without_the_statement(tmp_path: Path) -> None:
    exc = _failure(f"sqlite:///{tmp_path / 'x.db'}", "SELECT * FROM missing WHERE a = :secret")
    assert dberrors.message(exc) == "no such table: missing"
    assert not dberrors.unreachable(exc)
    error = dberrors.error(exc, dberrors.BUSINESS_DB, "rule t")
    assert isinstance(error, SourceError)
    assert str(error) == "rule t: the query failed: no such table: missing"
    state = dberrors.error(exc, dberrors.STATE_DB)
    assert isinstance(state, StateError) and str(state) == "state DB: no such table: missing"


def test_a_database_that_does_not_answer_is_a_service_failure() -> None:
    port = services.free_port()
    exc = _failure(f"postgresql+psycopg://postgres@127.0.0.1:{port}/x", "SELECT 1")
    assert dberrors.unreachable(exc)
    error = dberrors.error(exc, dberrors.STATE_DB, "rule t")
    assert isinstance(error, ServiceUnavailable)
    assert str(error).startswith("rule t: state DB unreachable: ")
    assert "\n" not in str(error)


@pytest.mark.parametrize(
    ("exc", "said"),
    [(ValueError("first\nsecond"), "first"), (ValueError(), ""), (ValueError("  \n"), "")],
)
def test_any_other_exception_is_its_own_first_line(exc: Exception, said: str) -> None:
    assert dberrors.message(exc) == said
