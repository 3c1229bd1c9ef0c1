"""The console's tests' project: a pharmacy's config, rules and business DB, a state DB (SQLite
or PostgreSQL) holding known reminders, events, messages, opt-outs and a scan as the engine
leaves them, the console served over real HTTP, and users and keys made as ops make them.

The clock is ``NOW`` = 2027-03-10 15:00 UTC (10:00 in New York, the config's zone).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from reminders import accounts, codec, counts, links, models, state_db
from reminders.app import App
from reminders.console import create_console
from tests import services

SECRET = "a-console-secret-of-enough-length-0123456789"
NOW = datetime(2027, 3, 10, 15, 0, tzinfo=UTC)
PASSWORD = "correct horse battery"
OPERATOR, VIEWER = "olivia", "victor"

RULES = """\
rules:
  - name: refill-due
    description: Your prescription refill
    query: |
      SELECT rx.id AS rx_id, rx.drug_name, rx.runs_out_on,
             p.id AS customer_id, p.first_name, p.phone, p.email, p.timezone
      FROM prescriptions rx JOIN patients p ON p.id = rx.patient_id
    occurrence: "{{ rx_id }}"
    due: runs_out_on
    offsets: [-3d, 0d]
    at: "10:00"
    channels: [sms, email]
  - name: renewal
    description: Your membership renewal
    query: SELECT m.id AS member_id, m.renews_on, m.customer_id, m.email FROM members m
    occurrence: "{{ member_id }}"
    due: renews_on
    offsets: [-7d]
    channels: [email]
"""


def at(text: str) -> datetime:
    """``"03-09 15:00"`` as 2027-03-09 15:00 UTC."""
    return datetime.fromisoformat(f"2027-{text}").replace(tzinfo=UTC)


def write_project(root: Path, state_url: str) -> Path:
    """Config, rules, templates and a small business DB in ``root``; returns the config."""
    (root / "rules").mkdir(exist_ok=True)
    (root / "rules" / "rules.yaml").write_text(RULES)
    (root / "templates").mkdir(exist_ok=True)
    (root / "templates" / "refill-due.sms.j2").write_text(
        "Hi {{ first_name }}, your {{ drug_name }} runs out {{ runs_out_on | date }}."
    )
    (root / "templates" / "refill-due.email.j2").write_text(
        "{% block subject %}Refill your {{ drug_name }}{% endblock %}"
        "{% block text %}Hi {{ first_name }}, it runs out {{ runs_out_on | date }}.{% endblock %}"
    )
    (root / "templates" / "renewal.email.j2").write_text(
        "{% block subject %}Renew{% endblock %}"
        "{% block text %}Renew by {{ renews_on }}.{% endblock %}"
    )
    db = sqlite3.connect(root / "business.db")
    db.executescript(
        """
        CREATE TABLE patients (id INTEGER PRIMARY KEY, first_name TEXT, phone TEXT, email TEXT,
                               timezone TEXT);
        CREATE TABLE prescriptions (id INTEGER PRIMARY KEY, patient_id INTEGER, drug_name TEXT,
                                    runs_out_on TEXT);
        CREATE TABLE members (id TEXT PRIMARY KEY, customer_id INTEGER, email TEXT, renews_on TEXT);
        INSERT INTO patients VALUES
            (7, 'Jane', '(415) 555-2671', 'jane@example.com', 'America/New_York'),
            (8, 'Bob', 'not a phone', NULL, 'America/New_York'),
            (11, 'Ann', '+1 415 555 0100', 'ann@example.com', 'America/Chicago');
        INSERT INTO prescriptions VALUES (1, 7, 'Lisinopril', '2027-03-12'),
                                         (2, 8, 'Metformin', '2027-03-14'),
                                         (5, 11, 'Atorvastatin', '2027-03-13');
        INSERT INTO members VALUES ('m1', 7, 'jane@example.com', '2027-03-19');
        """
    )
    db.commit()
    db.close()
    config = root / "config.yaml"
    config.write_text(
        "timezone: America/New_York\n"
        "source: {url: sqlite:///business.db}\n"
        f"state: {{url: '{state_url}'}}\n"
        "channels:\n"
        "  sms: {provider: outbox, path: outbox.jsonl}\n"
        "  email: {provider: outbox, path: outbox.jsonl}\n"
    )
    return config


def _reminder(
    conn: sa.Connection,
    rid: int,
    rule: str,
    occurrence: str,
    offset: str,
    customer: str,
    status: str,
    send_at: datetime,
    *,
    planned_at: datetime | None = None,
    channel: str | None = None,
    reason: str | None = None,
    chain: list[tuple[str, str, str, str | None]] = (),  # type: ignore[assignment]
    sent_at: datetime | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    """A reminder as the engine leaves it, with its events (``chain``: at, from, to, reason)."""
    last = at(chain[-1][0]) if chain else at("03-01 12:00")
    conn.execute(
        models.reminder.insert().values(
            id=rid,
            rule=rule,
            occurrence=occurrence,
            offset=offset,
            customer_id=customer,
            planned_at=planned_at or send_at,
            send_at=send_at,
            status=status,
            channel=channel,
            reason=reason,
            data=codec.dumps(data or {"customer_id": customer}),
            row_hash="0" * 32,
            sent_at=sent_at,
            created_at=at("03-01 12:00"),
            updated_at=last,
        )
    )
    for when, old, new, why in chain:
        conn.execute(
            models.event.insert().values(
                reminder_id=rid, at=at(when), from_status=old, to_status=new, reason=why
            )
        )


def populate(engine: sa.Engine) -> None:
    """The known data every count in the tests is checked against (see the module's tests)."""
    jane = {
        "rx_id": 1,
        "customer_id": 7,
        "first_name": "Jane",
        "phone": "(415) 555-2671",
        "email": "jane@example.com",
        "timezone": "America/New_York",
        "runs_out_on": "2027-03-12",
    }
    with engine.begin() as conn:
        # 1. sent by SMS on 03-09 and delivered; 2. its 0d reminder canceled by the check (done).
        _reminder(
            conn, 1, "refill-due", "1", "-3d", "7", "delivered", at("03-09 15:00"),
            channel="sms", sent_at=at("03-09 15:00"), data=jane,
            chain=[
                ("03-09 14:59", "pending", "queued", None),
                ("03-09 14:59:30", "queued", "sending", None),
                ("03-09 15:00", "sending", "sent", "sent by sms"),
                ("03-09 15:01", "sent", "delivered", "delivered"),
            ],
        )  # fmt: skip
        _reminder(
            conn, 2, "refill-due", "1", "0d", "7", "canceled", at("03-12 15:00"),
            reason="canceled: the rule's check query returned no row", data=jane,
            chain=[("03-09 20:00", "pending", "canceled",
                    "canceled: the rule's check query returned no row")],
        )  # fmt: skip
        # 3. no usable address (failed on 03-10); 4. failed after retries (on 03-08).
        no_address = "failed: no usable channel (sms: not a valid phone number; email: no email)"
        _reminder(
            conn, 3, "refill-due", "2", "-3d", "8", "failed", at("03-10 13:30"),
            reason=no_address,
            chain=[("03-10 13:30", "pending", "queued", None),
                   ("03-10 14:00", "queued", "failed", no_address)],
        )  # fmt: skip
        _reminder(
            conn, 4, "refill-due", "3", "-3d", "9", "failed", at("03-08 15:00"), channel="sms",
            reason="failed after 5 attempts: sms: HTTP 500",
            chain=[("03-08 15:00", "pending", "queued", None),
                   ("03-08 15:00:10", "queued", "sending", None),
                   ("03-08 16:00", "sending", "failed", "failed after 5 attempts: sms: HTTP 500")],
        )  # fmt: skip
        # 5. stuck in sending since 14:00; 6. due at 13:00 and not sent; 7. due tomorrow.
        _reminder(
            conn, 5, "refill-due", "4", "-3d", "10", "sending", at("03-10 13:55"), channel="sms",
            chain=[("03-10 13:59", "pending", "queued", None),
                   ("03-10 14:00", "queued", "sending", None)],
        )  # fmt: skip
        ann = {**jane, "rx_id": 5, "customer_id": 11, "first_name": "Ann",
               "phone": "+1 415 555 0100", "email": "ann@example.com"}  # fmt: skip
        _reminder(conn, 6, "refill-due", "5", "-3d", "11", "pending", at("03-10 13:00"), data=ann)
        _reminder(conn, 7, "refill-due", "6", "0d", "12", "pending", at("03-11 15:00"), data=jane)
        # 8. deferred by quiet hours to 03-12 14:00; 9. an email sent on 03-08.
        _reminder(
            conn, 8, "renewal", "m1", "-7d", "7", "pending", at("03-12 14:00"),
            planned_at=at("03-12 02:00"),
            reason="deferred: quiet hours 21:00-08:00 in America/New_York for email; "
            "send at 2027-03-12T14:00:00Z",
            chain=[("03-10 14:30", "queued", "pending", "deferred: quiet hours")],
        )  # fmt: skip
        _reminder(
            conn, 9, "renewal", "m2", "-7d", "13", "sent", at("03-08 14:00"), channel="email",
            sent_at=at("03-08 14:00"),
            chain=[("03-08 14:00", "sending", "sent", "sent by email")],
        )  # fmt: skip
        # 10. expired past grace (03-09); 11. canceled: opted out (03-10 07:00 in New York).
        _reminder(
            conn, 10, "refill-due", "7", "-3d", "14", "canceled", at("03-08 15:00"),
            reason="expired: send time 2027-03-08T15:00:00Z is more than 1d ago",
            chain=[("03-09 16:00", "queued", "canceled", "expired")],
        )  # fmt: skip
        _reminder(
            conn, 11, "renewal", "m3", "-7d", "15", "canceled", at("03-10 12:00"),
            reason="canceled: opted out of email (unsubscribe)",
            chain=[("03-10 12:00", "queued", "canceled", "canceled: opted out")],
        )  # fmt: skip
        conn.execute(
            models.message.insert(),
            [
                {
                    "reminder_id": 1,
                    "channel": "sms",
                    "to_address": "+14155552671",
                    "provider_id": "SM0001",
                    "status": "delivered",
                    "segments": 1,
                    "created_at": at("03-09 15:00"),
                    "updated_at": at("03-09 15:01"),
                },
                {
                    "reminder_id": 9,
                    "channel": "email",
                    "to_address": "jane.doe@example.com",
                    "provider_id": "<m9@example.com>",
                    "status": "sent",
                    "segments": None,
                    "created_at": at("03-08 14:00"),
                    "updated_at": at("03-08 14:00"),
                },
            ],
        )
        conn.execute(
            models.inbound.insert().values(
                from_address="+14155552671", body="DONE", provider_id="SMin1", action="done",
                reminder_id=1, created_at=at("03-09 20:00"),
            )
        )  # fmt: skip
        conn.execute(
            models.optout.insert(),
            [
                {
                    "channel": "sms",
                    "address": "+14155550100",
                    "customer_id": "11",
                    "source": "stop",
                    "created_at": at("03-09 18:00"),
                },
                {
                    "channel": "email",
                    "address": "old@example.com",
                    "customer_id": "16",
                    "source": "unsubscribe",
                    "created_at": at("03-07 12:00"),
                },
            ],
        )
        run = conn.execute(
            models.scan_run.insert().values(
                rule="refill-due", started_at=at("03-10 14:00"), finished_at=at("03-10 14:00"),
                status="done", rows=9, created=0, moved=0, canceled=0, unchanged=7, skipped=2,
            )
        ).inserted_primary_key[0]  # fmt: skip
        conn.execute(
            models.skipped_row.insert(),
            [
                {
                    "scan_run_id": run,
                    "rule": "refill-due",
                    "row_number": 3,
                    "occurrence": "9",
                    "column": "runs_out_on",
                    "reason": "runs_out_on = 'soon' is not a date or datetime",
                },
                {
                    "scan_run_id": run,
                    "rule": "refill-due",
                    "row_number": 5,
                    "occurrence": None,
                    "column": "customer_id",
                    "reason": "no customer id: column customer_id is missing or empty",
                },
            ],
        )
        if engine.dialect.name == "postgresql":  # rows were given ids: move the sequence on
            conn.execute(sa.text("SELECT setval('reminders_reminder_id_seq', 100)"))
        # Written as the engine would have left them, not through it: counted as a migration
        # counts the rows already there.
        counts.rebuild(conn)


@dataclass
class Console:
    """The console served on a loopback port, its engine App and its keys."""

    base: str
    app: App
    monkeypatch: pytest.MonkeyPatch
    operator_key: str
    viewer_key: str

    @property
    def state(self) -> sa.Engine:
        return self.app.state

    def set_now(self, moment: datetime) -> None:
        self.monkeypatch.setenv("REMINDERS_NOW", moment.isoformat())

    def key(self, key: str) -> requests.Session:
        client = requests.Session()
        client.headers["Authorization"] = f"Bearer {key}"
        return client

    def login(self, name: str = OPERATOR, password: str = PASSWORD) -> tuple[requests.Session, str]:
        """A browser-like session logged in as ``name``, and its CSRF token."""
        client = requests.Session()
        token = self.csrf(client)
        answer = client.post(
            f"{self.base}/login",
            data={"name": name, "password": password, "csrf_token": token},
            allow_redirects=False,
        )
        assert answer.status_code == 302, answer.text
        page = client.get(f"{self.base}/")
        assert page.status_code == 200
        return client, self.csrf_of(page.text)

    def csrf(self, client: requests.Session) -> str:
        return self.csrf_of(client.get(f"{self.base}/login").text)

    @staticmethod
    def csrf_of(html: str) -> str:
        found = re.search(r'name="csrf_token" value="([^"]+)"', html)
        assert found is not None
        return found.group(1)


def make_users(engine: sa.Engine) -> tuple[str, str]:
    """An operator and a viewer (password ``PASSWORD``); returns an operator and a viewer key."""
    with engine.begin() as conn:
        accounts.add_user(conn, OPERATOR, "operator", PASSWORD, now=NOW)
        accounts.add_user(conn, VIEWER, "viewer", PASSWORD, now=NOW)
        operator = accounts.add_key(conn, "deploy", "operator", now=NOW)
        viewer = accounts.add_key(conn, "dashboard", "viewer", now=NOW)
    return operator, viewer


def serve_console(
    root: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, data: bool = True
) -> Iterator[Console]:
    """Migrate, fill and serve; the body of the ``console`` fixtures."""
    monkeypatch.setenv(links.SECRET_ENV, SECRET)
    monkeypatch.setenv("REMINDERS_NOW", NOW.isoformat())
    config = write_project(root, state_url)
    state_db.upgrade(state_url)
    engine = state_db.engine_for(state_url)
    if data:
        populate(engine)
    operator, viewer = make_users(engine)
    app = App(config)
    with services.serving(create_console(app)) as port:
        yield Console(f"http://127.0.0.1:{port}", app, monkeypatch, operator, viewer)


@pytest.fixture
def console(state_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Console]:
    """The console on SQLite and on PostgreSQL, with the known data."""
    yield from serve_console(tmp_path, state_url, monkeypatch)
