"""Write-back end to end: the outbox written with each change, applied to the business DB.

Every test drives the command line (``scheduler --once``, ``worker --burst``) on a shop whose SMS
goes through the real twilio library to the Twilio stub, on SQLite, on PostgreSQL (business and
state DB in one database) and on MariaDB (the state DB on SQLite). An inbound STOP comes through
the real web endpoint, signed as Twilio signs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from twilio.request_validator import RequestValidator

from reminders import links, models
from reminders.app import App
from tests import services
from tests.channel_fixtures import SmtpServer
from tests.delivery_fixtures import (
    RULES,
    SEND_AT,
    SENDER,
    Shop,
    phone_of,
    shop_at,
)
from tests.rules_fixtures import BUSINESS_BACKENDS, Project, lite
from tests.twilio_stub import AUTH_TOKEN, TwilioStub

__all__ = ["lite"]

PUBLIC = "https://reminders.example.com"
SECRET = "a-link-signing-secret-of-enough-length-0123456789"

WRITEBACK_RULES = RULES.replace(
    "    template: refill-due\n",
    """\
    template: refill-due
    replies:
      DONE: done
    writeback:
      sent: UPDATE prescriptions SET last_reminded_at = :at WHERE id = :rx_id
      done: UPDATE prescriptions SET reminder_outcome = 'done' WHERE id = :rx_id
""",
)


def writeback_config(url: str, web: bool = True) -> str:
    text = f"""\
writeback:
  url: {url}
  when:
    opted_out: UPDATE patients SET sms_opt_out = 1 WHERE id = :customer_id AND :channel = 'sms'
    opted_in: UPDATE patients SET sms_opt_out = 0 WHERE id = :customer_id AND :channel = 'sms'
"""
    return text + (f"web:\n  public_url: {PUBLIC}\n" if web else "")


@pytest.fixture(params=BUSINESS_BACKENDS)
def wshop(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    delivery_redis: str,
    stub: TwilioStub,
    mailbox_server: SmtpServer,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Shop]:
    monkeypatch.setenv(links.SECRET_ENV, SECRET)
    with shop_at(tmp_path, request.param, delivery_redis, stub, mailbox_server) as shop:
        shop.configure(rules=WRITEBACK_RULES, extra=writeback_config(shop.source_config_url))
        yield shop


def add_columns(shop: Shop) -> None:
    """The business's own columns the statements write."""
    stamp = {"sqlite": "TEXT", "postgresql": "TIMESTAMPTZ", "mariadb": "DATETIME"}[shop.backend]
    shop.sql(f"ALTER TABLE prescriptions ADD COLUMN last_reminded_at {stamp}")
    shop.sql("ALTER TABLE prescriptions ADD COLUMN reminder_outcome VARCHAR(20)")
    shop.sql("ALTER TABLE patients ADD COLUMN sms_opt_out INTEGER NOT NULL DEFAULT 0")


def reminded(shop: Shop) -> dict[int, Any]:
    rows = shop.business_rows("SELECT id, last_reminded_at FROM prescriptions ORDER BY id")
    return {rx: _utc(at) for rx, at in rows}


def _utc(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def pass_at(shop: Shop, now: str, *, scan_fails: bool = False) -> None:
    """One scheduler pass and one burst of the workers at ``now``."""
    if scan_fails:  # the rule's own query meets the same outage: exit 1, the rest still done
        assert shop.run("scheduler", "--once", now=now).code == 1
    else:
        shop.ok("scheduler", "--once", now=now)
    shop.worker(now=now)


def outbox_rows(shop: Shop) -> list[dict[str, Any]]:
    return shop.rows(models.outbox)


def twilio_post(port: int, path: str, params: dict[str, str]) -> requests.Response:
    """A form POST to the web endpoint, signed as Twilio signs it for the public URL."""
    signature = RequestValidator(AUTH_TOKEN).compute_signature(PUBLIC + path, params)
    return requests.post(
        f"http://127.0.0.1:{port}{path}",
        data=params,
        headers={"X-Twilio-Signature": signature},
        timeout=30,
    )


def inbound(port: int, body: str, number: str, sid: str) -> requests.Response:
    """An inbound SMS from ``number``."""
    params = {"From": number, "To": SENDER, "Body": body, "MessageSid": sid}
    return twilio_post(port, "/webhooks/twilio/inbound", params)


def test_sent_stop_and_done_reach_the_business_rows_after_an_outage(wshop: Shop) -> None:
    shop = wshop
    shop.prepare(2)
    add_columns(shop)
    # A prescription no reminder is about: nothing may be written to it.
    shop.sql(
        "INSERT INTO prescriptions (id, patient_id, drug_name, runs_out_on, refills_left) "
        "VALUES (9, 1, 'Other', :due, 0)",
        {"due": shop.due("2027-06-01")},
    )

    # The reminders go out; their `sent` events wait in the outbox for the next pass.
    pass_at(shop, SEND_AT)
    assert shop.statuses() == {"sent": 2}
    pending = outbox_rows(shop)
    assert [(r["destination"], r["type"], r["status"]) for r in pending] == [
        ("writeback:refill-due", "sent", "pending")
    ] * 2
    assert reminded(shop) == {1: None, 2: None, 9: None}

    # The business table is gone for a while (renamed): the head fails and waits; nothing lost.
    shop.sql("ALTER TABLE prescriptions RENAME TO prescriptions_away")
    pass_at(shop, SEND_AT, scan_fails=True)
    first, second = outbox_rows(shop)
    assert first["status"] == "pending" and first["attempts"] == 1
    assert first["last_error"] and first["next_at"] > _utc(SEND_AT)  # type: ignore[operator]
    assert second["attempts"] == 0  # the rows behind the failing head wait their turn
    status = shop.ok("status", "--json", now=SEND_AT).json_lines()[0]
    assert status["outbox"][0]["pending"] == 2 and status["outbox"][0]["last_error"]
    metrics = shop.ok("metrics", now=SEND_AT).out
    assert 'reminders_outbox_pending{destination="writeback:refill-due"} 2.0' in metrics
    assert 'reminders_outbox_oldest_attempts{destination="writeback:refill-due"} 1.0' in metrics

    # Back; not yet time to retry: still nothing applied.
    shop.sql("ALTER TABLE prescriptions_away RENAME TO prescriptions")
    pass_at(shop, SEND_AT)
    assert reminded(shop) == {1: None, 2: None, 9: None}
    later = "2027-03-10T15:05:00Z"
    pass_at(shop, later)
    sent_at = _utc(SEND_AT)
    assert reminded(shop) == {1: sent_at, 2: sent_at, 9: None}
    assert {r["status"] for r in outbox_rows(shop)} == {"done"}

    # Patient 1 texts STOP, patient 2 DONE, through the signed Twilio webhook.
    from reminders.web import create_app

    with services.serving(create_app(App(shop.root / "config.yaml"))) as port:
        assert inbound(port, "STOP", phone_of(1), "SM" + "1" * 32).status_code == 200
        assert inbound(port, "done", phone_of(2), "SM" + "2" * 32).status_code == 200
    pass_at(shop, later)
    opted = shop.business_rows("SELECT id, sms_opt_out FROM patients ORDER BY id")
    assert [(int(i), int(o)) for i, o in opted] == [(1, 1), (2, 0)]
    outcomes = shop.business_rows("SELECT id, reminder_outcome FROM prescriptions ORDER BY id")
    assert outcomes == [(1, None), (2, "done"), (9, None)]
    assert {r["status"] for r in outbox_rows(shop)} == {"done"}


def test_nothing_is_written_to_the_outbox_without_writeback_or_webhooks(shop: Shop) -> None:
    shop.configure()
    shop.prepare(2)
    pass_at(shop, SEND_AT)
    assert shop.statuses() == {"sent": 2}
    assert outbox_rows(shop) == []


def test_a_rule_without_statements_writes_no_events(shop: Shop) -> None:
    shop.configure(extra=writeback_config(shop.source_config_url, web=False))
    shop.prepare(2)
    pass_at(shop, SEND_AT)
    assert shop.statuses() == {"sent": 2}
    assert outbox_rows(shop) == []


def test_a_statement_for_a_row_the_business_deleted_changes_nothing_else(wshop: Shop) -> None:
    shop = wshop
    shop.prepare(2)
    add_columns(shop)
    pass_at(shop, SEND_AT)  # both sent; their events wait
    shop.sql("DELETE FROM prescriptions WHERE id = 2")
    pass_at(shop, SEND_AT)
    assert reminded(shop) == {1: _utc(SEND_AT)}
    assert [r["status"] for r in outbox_rows(shop)] == ["done", "done"]


def test_the_write_back_engine_never_creates_a_sqlite_file(tmp_path: Path) -> None:
    from reminders import errors, writeback

    with pytest.raises(errors.ServiceUnavailable, match="no database file at"):
        writeback.create_engine(f"sqlite:///{tmp_path / 'missing.db'}")
    with pytest.raises(errors.ServiceUnavailable, match="must be a file"):
        writeback.create_engine("sqlite://")
    path = tmp_path / "shop.db"
    sa.create_engine(f"sqlite:///{path}").connect().close()
    engine = writeback.create_engine(f"sqlite:///{path}")
    path.unlink()  # gone after the engine was made: an error, not a new empty file
    with pytest.raises(sa.exc.OperationalError):
        engine.connect()
    assert not path.exists()


# --- validate ------------------------------------------------------------------------------------


def rules_writing(event: str, statement: str) -> str:
    """The refill rule with one write-back statement."""
    return RULES.replace(
        "    template: refill-due\n",
        f"    template: refill-due\n    writeback:\n      {event}: {statement}\n",
    )


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        (
            "UPDATE prescriptions SET last_reminded_at = :at WHERE id = :rx_idd",
            "rule refill-due: writeback.sent: :rx_idd is not bound by sent",
        ),
        (
            "UPDATE prescriptions SET x = 1 WHERE id = :rx_id; DELETE FROM prescriptions",
            "one statement only",
        ),
    ],
)
def test_validate_names_a_bad_statement_with_its_file_and_line(
    lite: Project, statement: str, message: str
) -> None:
    rules = rules_writing("sent", statement)
    lite.write("rules/refills.yaml", rules)
    config = lite.read("config.yaml") + "writeback:\n  url: sqlite:///business.db\n"
    lite.write("config.yaml", config)
    result = lite.run("validate")
    assert result.code == 2, str(result)
    line = _line_of(rules, "sent: ")
    assert f"rules/refills.yaml:{line}: " in result.err
    assert message in result.err


@pytest.mark.parametrize(
    ("event", "message"),
    [
        ("shipped", "'sent', 'delivered', 'failed', 'canceled', 'replied' or 'done'"),
        ("sent", "writeback needs a writable connection: set writeback.url"),
    ],
)
def test_validate_refuses_an_unknown_event_and_a_statement_without_a_connection(
    lite: Project, event: str, message: str
) -> None:
    rules = rules_writing(event, "UPDATE x SET y = 1")
    lite.write("rules/refills.yaml", rules)
    result = lite.run("validate")
    assert result.code == 2
    line = _line_of(rules, f"{event}:" if event == "shipped" else "writeback:")
    assert f"rules/refills.yaml:{line}: " in result.err
    assert message in result.err


def test_validate_checks_the_consent_statements_binds(lite: Project) -> None:
    extra = (
        "writeback:\n  url: sqlite:///business.db\n  when:\n"
        "    opted_out: UPDATE patients SET x = 1 WHERE id = :patient_id\n"
    )
    config = lite.read("config.yaml") + extra
    lite.write("config.yaml", config)
    result = lite.run("validate")
    assert result.code == 2
    assert f"config.yaml:{_line_of(config, 'opted_out:')}: " in result.err
    assert ":patient_id is not bound by opted_out and opted_in" in result.err


# --- the console ---------------------------------------------------------------------------------


def test_the_console_shows_a_statement_that_keeps_failing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reminders import state_db
    from reminders.console import create_console
    from tests import console_fixtures as cf

    monkeypatch.setenv(links.SECRET_ENV, cf.SECRET)
    monkeypatch.setenv("REMINDERS_NOW", cf.NOW.isoformat())
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    config = cf.write_project(tmp_path, state_url)
    config.write_text(config.read_text() + "writeback: {url: 'sqlite:///business.db'}\n")
    state_db.upgrade(state_url)
    cf.make_users(state_db.engine_for(state_url))
    with state_db.engine_for(state_url).begin() as conn:
        conn.execute(
            models.outbox.insert(),
            [
                {
                    "event_id": "evt_1",
                    "destination": "writeback:refill-due",
                    "type": "sent",
                    "payload": '{"facts":{}}',
                    "status": "pending",
                    "attempts": 3,
                    "next_at": cf.at("03-10 15:30"),
                    "last_error": "no such column: last_reminded_at",
                    "created_at": cf.at("03-10 14:00"),
                }
            ],
        )
    with services.serving(create_console(App(config))) as port:
        console = cf.Console(f"http://127.0.0.1:{port}", App(config), monkeypatch, "", "")
        session, _token = console.login(cf.VIEWER)
        page = session.get(f"{console.base}/").text
    assert "Write-back and webhooks" in page
    assert "writeback:refill-due" in page
    assert "failed 3 times" in page and "no such column: last_reminded_at" in page
    assert "write-back or webhook failing" in page  # an attention card names it


# --- a role of its own, down for a while ------------------------------------------------------


def test_a_writable_role_of_its_own_that_cannot_log_in_for_a_while(
    tmp_path: Path,
    delivery_redis: str,
    stub: TwilioStub,
    mailbox_server: SmtpServer,
) -> None:
    """PostgreSQL: the statements run as a role that may update one column; while it cannot
    log in, the events wait (the scan, on its own connection, goes on); then they are applied."""
    import uuid

    from reminders import writeback

    role = f"outbox_writer_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(services.PG_DSN, isolation_level="AUTOCOMMIT")

    def as_admin(statement: str) -> None:
        with admin.connect() as conn:
            conn.exec_driver_sql(statement)

    try:
        with shop_at(tmp_path, "postgresql", delivery_redis, stub, mailbox_server) as shop:
            as_admin(f"CREATE ROLE {role} LOGIN")
            writer = sa.engine.make_url(shop.source_config_url).set(username=role)
            url = writer.render_as_string(hide_password=False)
            rules = rules_writing(
                "sent", "UPDATE prescriptions SET last_reminded_at = :at WHERE id = :rx_id"
            )
            shop.configure(rules=rules, extra=writeback_config(url, web=False))
            shop.prepare(2)
            add_columns(shop)
            shop.sql(f"GRANT SELECT (id), UPDATE (last_reminded_at) ON prescriptions TO {role}")
            as_admin(f"ALTER ROLE {role} NOLOGIN")
            pass_at(shop, SEND_AT)
            pass_at(shop, SEND_AT)
            first, second = outbox_rows(shop)
            assert first["attempts"] == 1 and role in (first["last_error"] or "")
            assert second["attempts"] == 0
            assert reminded(shop) == {1: None, 2: None}
            as_admin(f"ALTER ROLE {role} LOGIN")
            pass_at(shop, "2027-03-10T15:05:00Z")
            assert reminded(shop) == {1: _utc(SEND_AT), 2: _utc(SEND_AT)}
            assert [r["status"] for r in outbox_rows(shop)] == ["done", "done"]
            writeback._engines.dispose(role)
    finally:
        as_admin(f"DROP ROLE IF EXISTS {role}")  # its grants went with the test's database
        admin.dispose()


# --- retention -----------------------------------------------------------------------------------


def test_delivered_events_are_pruned_after_a_week_and_waiting_ones_never(tmp_path: Path) -> None:
    from datetime import timedelta

    from reminders import outbox, state_db

    url = f"sqlite:///{tmp_path / 'state.db'}"
    state_db.upgrade(url)
    now = _utc(SEND_AT)
    assert now is not None
    old = now - timedelta(days=40)

    def row(status: str, done_days_ago: int | None) -> dict[str, Any]:
        done_at = None if done_days_ago is None else now - timedelta(days=done_days_ago)
        return {
            "event_id": f"evt_{status}_{done_days_ago}",
            "destination": "writeback:consent",
            "type": "opted_out",
            "payload": '{"facts":{}}',
            "status": status,
            "next_at": old,
            "created_at": old,
            "done_at": done_at,
        }

    engine = state_db.engine_for(url)
    with engine.begin() as conn:
        conn.execute(
            models.outbox.insert(),
            [
                row("done", 8),
                row("done", 6),
                row("skipped", 8),
                row("failed", 31),
                row("failed", 29),
                row("pending", None),
            ],
        )
        assert outbox.prune(conn, now) == 3
        left = conn.execute(sa.select(models.outbox.c.event_id).order_by(models.outbox.c.id))
        assert [r.event_id for r in left] == ["evt_done_6", "evt_failed_29", "evt_pending_None"]
    engine.dispose()


def test_an_occurrence_that_vanished_is_written_back_as_canceled_with_its_reason(
    shop: Shop,
) -> None:
    rules = rules_writing(
        "canceled", "UPDATE prescriptions SET reminder_outcome = :reason WHERE id = :rx_id"
    )
    shop.configure(rules=rules, extra=writeback_config(shop.source_config_url, web=False))
    shop.prepare(2)
    add_columns(shop)
    shop.sql("UPDATE prescriptions SET refills_left = 0 WHERE id = 2")  # out of the query
    pass_at(shop, "2027-03-10T13:00:00Z")  # the scan cancels it; its event waits
    pass_at(shop, "2027-03-10T13:00:00Z")
    outcomes = shop.business_rows("SELECT id, reminder_outcome FROM prescriptions ORDER BY id")
    (canceled,) = [r for r in shop.reminders() if r["status"] == "canceled"]
    assert outcomes == [(1, None), (2, canceled["reason"])]
    assert canceled["reason"]


def test_a_destination_another_worker_is_applying_is_left_to_it(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    from reminders import outbox

    shop.configure(rules=WRITEBACK_RULES, extra=writeback_config(shop.source_config_url, False))
    shop.prepare(1)
    add_columns(shop)
    pass_at(shop, SEND_AT)
    monkeypatch.setenv("REMINDERS_NOW", SEND_AT)
    connection = redis.Redis.from_url(shop.redis_url)
    key = f"reminders:outbox:lock:{outbox.job_id('writeback:refill-due')}"
    connection.set(key, "another-worker", px=60_000)
    app = App(shop.root / "config.yaml")
    assert outbox.apply(app, "writeback:refill-due", connection).as_dict() == {
        "delivered": 0,
        "failed": 0,
        "skipped": 0,
    }
    assert connection.get(key) == b"another-worker"  # not taken, not released
    connection.delete(key)
    assert outbox.apply(app, "writeback:refill-due", connection).delivered == 1
    assert connection.get(key) is None
    assert reminded(shop)[1] == _utc(SEND_AT)
    connection.close()


def test_pruning_reminders_leaves_their_undelivered_events(shop: Shop) -> None:
    shop.configure(rules=WRITEBACK_RULES, extra=writeback_config(shop.source_config_url, False))
    shop.prepare(2)
    add_columns(shop)
    pass_at(shop, SEND_AT)  # sent; their events wait
    much_later = "2027-10-01T12:00:00Z"  # past the default retention (180 days)
    shop.ok("prune", now=much_later)
    assert shop.reminders() == []
    assert [r["status"] for r in outbox_rows(shop)] == ["pending", "pending"]
    pass_at(shop, much_later)  # applied from what each event carries
    assert reminded(shop) == {1: _utc(SEND_AT), 2: _utc(SEND_AT)}
