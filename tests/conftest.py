from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from reminders import state_db
from tests import services

# The SMTP servers, TLS files and Twilio stub fixtures, and the delivery project's (``shop``, its
# Redis database, SMTP server and Twilio stub), Twilio's segment calculator and the console's, for
# every module (registered here, before any test module imports them, so pytest rewrites their
# asserts).
pytest_plugins = [
    "tests.channel_fixtures",
    "tests.delivery_fixtures",
    "tests.sms_oracle",
    "tests.console_fixtures",
]


@pytest.fixture(autouse=True)
def _no_ambient_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests set the engine clock explicitly; an ambient REMINDERS_NOW/CONFIG must not leak in."""
    for var in ("REMINDERS_NOW", "REMINDERS_CONFIG"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A flushed Redis database of the tests' own (db 13), flushed again afterwards."""
    with services.flushed_redis(int(os.environ.get("REMINDERS_TEST_REDIS_DB", "13"))) as url:
        yield url


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database (dropped afterwards)."""
    with services.postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A state DB URL on SQLite and on PostgreSQL, not yet migrated."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state' / 'reminders.db'}"
        yield url
    else:
        with services.postgres_database() as url:
            yield url
    state_db.dispose_engines(url)


@pytest.fixture
def state(state_url: str) -> sa.Engine:
    """A migrated state DB's engine."""
    state_db.upgrade(state_url)
    return state_db.engine_for(state_url)
