"""A business with notices of several kinds per customer, for frequency caps and quiet hours.

``Notices`` extends the rules engine's ``Project``: a ``customers`` table and a ``notices`` table
(id, customer, kind, due_at as a local wall time); one rule per kind (``payment``, priority 0;
``refill``, priority 5; ``fraud``, exempt from caps), each a single ``0m`` reminder at ``due_at``,
so a test puts a notice exactly where it wants it. Both channels are outboxes (one file), the
queues live in Redis database 10 (this suite's own), the zone is America/New_York.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from reminders import models
from tests import services
from tests.rules_fixtures import Project, Result, config_yaml, made_at

REDIS_DB = int(os.environ.get("REMINDERS_TEST_CAPS_REDIS_DB", "10"))

CONFIG = config_yaml(redis="{redis}", settings="batch_size: {batch_size}\n")

RULE = """\
  - name: {name}
    query: |
      SELECT n.id AS notice_id, n.due_at, c.id AS customer_id, c.first_name, c.phone,
             c.email, c.timezone
      FROM notices n JOIN customers c ON c.id = n.customer_id
      WHERE n.kind = '{name}'
      ORDER BY n.id
    occurrence: "{{{{ notice_id }}}}"
    due: due_at
    offsets: [0m]
    channels: [{channels}]
    template: notice
"""

# What each kind adds to its rule by default.
KINDS = {"payment": "", "refill": "    priority: 5\n", "fraud": "    caps: false\n"}

SMS_TEMPLATE = "Hi {{ first_name }}, notice {{ notice_id }}.\n"
EMAIL_TEMPLATE = """\
{% block subject %}Notice {{ notice_id }}{% endblock %}
{% block text %}Hi {{ first_name }}, notice {{ notice_id }}.{% endblock %}
"""

SCHEMA = (
    """CREATE TABLE customers (
        id INTEGER PRIMARY KEY, first_name TEXT, phone TEXT, email TEXT, timezone TEXT)""",
    """CREATE TABLE notices (
        id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL, kind TEXT NOT NULL,
        due_at TIMESTAMP NOT NULL)""",
)


def rules_yaml(channels: str | dict[str, str] = "email", **extra: str) -> str:
    """The three rules on ``channels`` (the same for all, or per kind, email by default);
    ``extra`` replaces a kind's added lines (YAML)."""
    body = "rules:\n"
    for name, added in KINDS.items():
        on = channels if isinstance(channels, str) else channels.get(name, "email")
        body += RULE.format(name=name, channels=on) + extra.get(name, added)
    return body


class Notices(Project):
    """A project whose customers get notices of several kinds through outboxes."""

    def __init__(
        self, root: Path, redis_url: str, backend: str = "sqlite", pg_url: str | None = None
    ) -> None:
        super().__init__(root, backend, pg_url)
        self.redis_url = redis_url
        self._customers: set[int] = set()
        self._tables = False

    def configure(
        self, *, caps: str = "", rules: str | None = None, batch_size: int = 100
    ) -> Notices:
        """Write config (``caps`` is YAML appended to it), rules and templates; the tables."""
        body = CONFIG.format(
            source=self.source_config_url,
            state=self.state_config_url,
            redis=self.redis_url,
            batch_size=batch_size,
        )
        self.write("config.yaml", body + caps)
        self.write("rules/notices.yaml", rules or rules_yaml())
        self.write("templates/notice.sms.j2", SMS_TEMPLATE)
        self.write("templates/notice.email.j2", EMAIL_TEMPLATE)
        if not self._tables:
            with self.business.begin() as conn:
                for ddl in SCHEMA:
                    conn.exec_driver_sql(ddl)
            self._tables = True
        return self

    def scan(self, now: str) -> Result:
        """``db upgrade`` and ``scan`` at ``now``."""
        self.ok("db", "upgrade", now=now)
        return self.ok("scan", now=now)

    def customer(self, cid: int, timezone: str | None = None) -> None:
        self.sql(
            "INSERT INTO customers (id, first_name, phone, email, timezone) "
            "VALUES (:id, :name, :phone, :email, :tz)",
            {
                "id": cid,
                "name": f"C{cid}",
                "phone": f"+1212555{cid:04d}",
                "email": f"c{cid}@example.com",
                "tz": timezone,
            },
        )
        self._customers.add(cid)

    def notice(self, nid: int, customer: int, kind: str, due_at: str) -> None:
        """A notice due at the local wall time ``due_at`` (``2027-03-13 10:00``)."""
        if customer not in self._customers:
            self.customer(customer)
        due: Any = due_at if self.backend == "sqlite" else datetime.fromisoformat(due_at)
        self.sql(
            "INSERT INTO notices (id, customer_id, kind, due_at) VALUES (:id, :c, :k, :d)",
            {"id": nid, "c": customer, "k": kind, "d": due},
        )

    def send(self, now: str) -> Result:
        """``dispatch`` then ``worker --burst`` at ``now``; returns the worker's result."""
        self.ok("dispatch", now=now)
        return self.ok("worker", "--burst", now=now)

    def by_occurrence(self) -> dict[str, dict[str, Any]]:
        """Reminders by occurrence (the notice id as text)."""
        return {r["occurrence"]: r for r in self.rows(models.reminder)}

    def sent_notices(self) -> list[int]:
        """Notice ids in the outbox, in the order written."""
        path = self.root / "outbox.jsonl"
        if not path.exists():
            return []
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        ids = {r["id"]: int(r["occurrence"]) for r in self.rows(models.reminder)}
        return [ids[line["reminder_id"]] for line in lines]

    def reasons(self, occurrence: str) -> list[str | None]:
        rid = self.by_occurrence()[occurrence]["id"]
        return [e["reason"] for e in self.events() if e["reminder_id"] == rid]


@pytest.fixture
def caps_redis() -> Iterator[str]:
    """A flushed Redis database of this suite's own (10), flushed again afterwards."""
    with services.flushed_redis(REDIS_DB) as url:
        yield url


def _notices_at(root: Path, backend: str, redis_url: str) -> AbstractContextManager[Notices]:
    return made_at(root, backend, lambda root, *database: Notices(root, redis_url, *database))


@pytest.fixture(params=["sqlite", "postgresql"])
def notices(request: pytest.FixtureRequest, tmp_path: Path, caps_redis: str) -> Iterator[Notices]:
    """The project on SQLite, and with its business and state DB on PostgreSQL."""
    with _notices_at(tmp_path, request.param, caps_redis) as project:
        yield project


@pytest.fixture
def lite_notices(tmp_path: Path, caps_redis: str) -> Iterator[Notices]:
    """The project on SQLite only (for what does not depend on the database)."""
    with _notices_at(tmp_path, "sqlite", caps_redis) as project:
        yield project
