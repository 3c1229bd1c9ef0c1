"""Delivery end to end: dispatch, workers, real Redis, the real twilio library, a real SMTP server.

Every test drives the command line (``dispatch``, ``worker --burst``) on a project whose SMS goes
to the Twilio stub and whose email goes to an aiosmtpd server, and reads the state DB back.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from reminders import consent, models
from tests.channel_fixtures import Mailbox, _start
from tests.delivery_fixtures import RULES, SEND_AT, Shop, rules_with_check
from tests.twilio_stub import INVALID_NUMBER, TOO_MANY_REQUESTS, UNAUTHORIZED, UNSUBSCRIBED

SMS_ONLY = RULES.replace("channels: [sms, email]", "channels: [sms]")
EMAIL_ONLY = RULES.replace("channels: [sms, email]", "channels: [email]")
CHECKED = rules_with_check("SELECT 1 FROM prescriptions WHERE id = :rx_id AND refills_left > 0")


def sa_now() -> datetime:
    return datetime.now(UTC)


def events_of(shop: Shop, rid: int) -> list[tuple[str | None, str, str | None]]:
    return [
        (e["from_status"], e["to_status"], e["reason"])
        for e in shop.events()
        if e["reminder_id"] == rid
    ]


def test_due_reminders_are_sent_once_with_a_message_row_each(shop: Shop) -> None:
    people = shop.prepare(5)
    result = shop.ok("dispatch", now=SEND_AT)
    assert "5 enqueued" in result.out
    shop.worker()
    assert shop.statuses() == {"sent": 5}
    assert sorted(shop.stub.accepted) == sorted(p["phone"] for p in people)
    assert set(shop.stub.accepted.values()) == {1}
    messages = shop.messages()
    assert len(messages) == 5
    assert {m["to_address"] for m in messages} == {p["phone"] for p in people}
    assert all(m["segments"] == 1 and m["provider_id"].startswith("SM") for m in messages)
    assert all(m["status"] == "sent" and m["channel"] == "sms" for m in messages)
    body = shop.stub.forms[0]["Body"]
    assert body.startswith("Hi P") and "Mar 10, 2027" in body
    first = shop.status_of()[1]
    assert [(e[0], e[1]) for e in events_of(shop, 1)][-3:] == [
        ("pending", "queued"),
        ("queued", "sending"),
        ("sending", "sent"),
    ]
    assert first["sent_at"] is not None and first["attempts"] == 1


def test_nothing_is_enqueued_before_its_send_time(shop: Shop) -> None:
    shop.prepare(3)
    result = shop.ok("dispatch", "--json", now="2027-03-10T14:59:59Z")
    assert result.json_lines() == [{"enqueued": 0, "requeued": 0, "jobs": 0, "reconciled": 0}]
    assert shop.statuses() == {"pending": 3}


def test_a_second_dispatch_enqueues_nothing_already_queued(shop: Shop) -> None:
    shop.prepare(4)
    shop.ok("dispatch", now=SEND_AT)
    again = shop.ok("dispatch", "--json", now=SEND_AT)
    assert again.json_lines()[0]["enqueued"] == 0
    shop.worker()
    assert set(shop.stub.accepted.values()) == {1}
    assert sum(shop.stub.received.values()) == 4


def test_reminders_are_batched_into_few_jobs(shop: Shop) -> None:
    shop.configure(batch_size=10)
    shop.prepare(25)
    result = shop.ok("dispatch", "--json", now=SEND_AT)
    assert result.json_lines()[0] == {"enqueued": 25, "requeued": 0, "jobs": 3, "reconciled": 0}
    jobs = {r["job_id"] for r in shop.reminders()}
    assert len(jobs) == 3


def test_quiet_hours_defer_to_their_end_in_the_recipients_zone(shop: Shop) -> None:
    """At 22:30 New York time (03:30Z next day, EST), an SMS waits until 08:00 EST (13:00Z)."""
    shop.prepare(2, timezone=lambda i: "America/New_York" if i == 1 else "Europe/Berlin")
    late = "2027-03-11T03:30:00Z"  # 22:30 in New York; 04:30 in Berlin (both quiet)
    shop.ok("dispatch", now=late)
    shop.worker(now=late)
    rows = shop.status_of()
    assert shop.stub.received == {}
    assert rows[1]["status"] == "pending"
    assert rows[1]["send_at"].isoformat() == "2027-03-11T13:00:00+00:00"
    assert "quiet hours 21:00-08:00 in America/New_York" in rows[1]["reason"]
    # The Berlin patient's reminder (10:00 CET = 09:00Z) was 18.5 hours late: still within the
    # 1d grace, and deferred to 08:00 in Berlin (07:00Z).
    assert rows[2]["send_at"].isoformat() == "2027-03-11T07:00:00+00:00"
    shop.ok("dispatch", now="2027-03-11T07:00:00Z")
    shop.worker(now="2027-03-11T07:00:00Z")
    assert shop.status_of()[2]["status"] == "sent"
    assert shop.status_of()[1]["status"] == "pending"
    shop.ok("dispatch", now="2027-03-11T13:00:00Z")
    shop.worker(now="2027-03-11T13:00:00Z")
    assert shop.statuses() == {"sent": 2}


def test_email_has_no_quiet_hours_by_default(shop: Shop) -> None:
    shop.configure(rules=EMAIL_ONLY)
    shop.prepare(1)
    late = "2027-03-11T03:30:00Z"
    shop.ok("dispatch", now=late)
    shop.worker(now=late)
    assert shop.statuses() == {"sent": 1}
    assert len(shop.smtp.mailbox.messages) == 1


def test_an_invalid_phone_number_falls_back_to_email_in_the_same_burst(shop: Shop) -> None:
    shop.prepare(3, phone=lambda i: "12" if i == 2 else f"+1212555{i:04d}")
    shop.ok("dispatch", now=SEND_AT)
    shop.worker()
    rows = shop.status_of()
    assert shop.statuses() == {"sent": 3}
    assert rows[2]["channel"] == "email" and rows[2]["channel_index"] == 1
    assert "sms: phone number" in rows[2]["reason"]
    assert [m.rcpt_tos for m in shop.smtp.mailbox.messages] == [["p2@example.com"]]
    assert sum(shop.stub.received.values()) == 2  # the bad number never reached the provider


def test_a_permanent_provider_error_falls_back_to_email(shop: Shop) -> None:
    shop.prepare(2, phone=lambda i: "+15005550001" if i == 1 else f"+1212555{i:04d}")
    shop.ok("dispatch", now=SEND_AT)
    shop.worker()
    rows = shop.status_of()
    assert rows[1]["status"] == "sent" and rows[1]["channel"] == "email"
    assert "sms failed: Twilio 21211" in rows[1]["reason"]
    assert rows[2]["channel"] == "sms"
    assert shop.stub.received["+15005550001"] == 1
    assert len(shop.smtp.mailbox.messages) == 1
    moved = events_of(shop, 1)
    assert ("sending", "pending") in [(e[0], e[1]) for e in moved]


def test_21610_opts_out_fails_and_later_reminders_are_canceled(shop: Shop) -> None:
    shop.configure(rules=SMS_ONLY)
    people = shop.patients(2)
    number = people[0]["phone"]
    shop.stub.respond(number, UNSUBSCRIBED)
    shop.sql(
        "INSERT INTO prescriptions (id, patient_id, drug_name, runs_out_on) "
        "VALUES (3, 1, 'Metformin', '2027-03-11')"
    )
    shop.ok("db", "upgrade")
    shop.ok("scan", now="2027-03-10T12:00:00Z")
    shop.ok("dispatch", now=SEND_AT)
    shop.worker()
    rows = {(r["occurrence"]): r for r in shop.reminders()}
    assert rows["1"]["status"] == "failed"
    assert "Twilio 21610" in rows["1"]["reason"]
    assert rows["2"]["status"] == "sent"
    optouts = shop.rows(models.optout)
    assert [(o["channel"], o["address"], o["source"]) for o in optouts] == [
        ("sms", number, "21610")
    ]
    # The next day's reminder to that number is canceled at its send time, never sent.
    next_day = "2027-03-11T15:00:00Z"
    shop.ok("dispatch", now=next_day)
    shop.worker(now=next_day)
    later = {(r["occurrence"]): r for r in shop.reminders()}["3"]
    assert later["status"] == "canceled"
    assert "opted out of sms" in later["reason"]
    assert shop.stub.received[number] == 1


def test_an_opted_out_number_goes_by_email_instead(shop: Shop) -> None:
    people = shop.prepare(2)
    shop.ok("dispatch", now=SEND_AT)  # queued first: the opt-out arrives before the send
    with shop.state.begin() as conn:
        conn.execute(
            models.optout.insert().values(
                channel="sms",
                address=people[0]["phone"],
                source="stop",
                created_at=sa.func.now(),
            )
        )
    shop.worker()
    rows = shop.status_of()
    assert rows[1]["channel"] == "email" and rows[1]["status"] == "sent"
    assert "opted out of sms (stop)" in rows[1]["reason"]
    assert people[0]["phone"] not in shop.stub.received


def test_a_preference_turned_off_skips_that_channel(shop: Shop) -> None:
    shop.configure(rules=SMS_ONLY)
    shop.prepare(2)
    with shop.state.begin() as conn:
        conn.execute(
            models.preference.insert().values(
                customer_id="2", rule="*", channel="sms", enabled=False, updated_at=sa.func.now()
            )
        )
    shop.ok("dispatch", now=SEND_AT)
    shop.worker()
    rows = shop.status_of()
    assert rows[1]["status"] == "sent"
    assert rows[2]["status"] == "canceled"
    assert "turned off by the customer" in rows[2]["reason"]


def test_no_usable_contact_fails_visibly_with_the_reasons(shop: Shop) -> None:
    shop.prepare(1, phone=None, email="")
    shop.ok("dispatch", now=SEND_AT)
    shop.worker()
    row = shop.status_of()[1]
    assert row["status"] == "failed"
    assert "sms: no phone number" in row["reason"] and "email: no email address" in row["reason"]
    status = json.loads(shop.ok("status", "--json", now=SEND_AT).out)
    assert [f["id"] for f in status["recent_failures"]] == [1]


# Each refused for the reason email-validator gives (syntax only: no DNS lookups here).
UNUSABLE_EMAILS = {
    1: ("p1\u200b@example.com", "ZERO WIDTH SPACE"),
    2: ("\ufeffp2@example.com", "ZERO WIDTH NO-BREAK SPACE"),
    3: ("p3\x00@example.com", "U+0000"),
    4: ("p4..walker@example.com", "two periods in a row"),
    5: ("p5.@example.com", "period immediately before the @-sign"),
    6: ("p6@-example.com", "hyphen immediately after the @-sign"),
    7: ("p7@exa_mple.com", "invalid characters: '_'"),
    8: ("p8@example..com", "two periods in a row"),
}


def test_unusable_email_addresses_fail_with_the_reason_and_nothing_is_sent(shop: Shop) -> None:
    shop.configure(rules=EMAIL_ONLY)
    shop.prepare(len(UNUSABLE_EMAILS), email=lambda i: UNUSABLE_EMAILS[i][0])
    shop.ok("dispatch", now=SEND_AT)
    shop.worker()
    rows = shop.status_of()
    for rid, (_address, reason) in UNUSABLE_EMAILS.items():
        assert rows[rid]["status"] == "failed", rows[rid]
        assert "email: not a usable email address" in rows[rid]["reason"]
        assert reason in rows[rid]["reason"], rows[rid]["reason"]
        assert f"p{rid}@" not in rows[rid]["reason"]  # masked
    assert shop.smtp.mailbox.messages == []


def test_the_local_part_goes_out_as_written_and_opt_outs_match_any_case(shop: Shop) -> None:
    shop.configure(rules=EMAIL_ONLY)
    shop.prepare(2, email=lambda i: f"Chloe.Walker{i}@Example.COM")
    with shop.state.begin() as conn:
        consent.opt_out(conn, "email", "CHLOE.WALKER2@example.com", "unsubscribe", None, sa_now())
    shop.ok("dispatch", now=SEND_AT)
    shop.worker()
    # RFC 5321 2.4: a local part may be case-sensitive; a domain is not.
    (received,) = shop.smtp.mailbox.messages
    assert received.rcpt_tos == ["Chloe.Walker1@example.com"]
    assert received.message["To"] == "Chloe.Walker1@example.com"
    rows = shop.status_of()
    assert rows[1]["status"] == "sent"
    assert rows[2]["status"] == "canceled" and "opted out of email" in rows[2]["reason"]
    assert [m["to_address"] for m in shop.messages()] == ["Chloe.Walker1@example.com"]


def test_a_template_error_fails_that_reminder_naming_file_and_line(shop: Shop) -> None:
    shop.configure(sms_template="Hi {{ first_name }},\nyour {{ no_such_column }} runs out.\n")
    shop.prepare(2)
    shop.ok("dispatch", now=SEND_AT)
    shop.worker()
    rows = shop.status_of()
    assert {r["status"] for r in rows.values()} == {"failed"}
    reason = rows[1]["reason"]
    assert "templates/refill-due.sms.j2:2" in reason and "no_such_column" in reason
    assert shop.stub.received == {}
    assert shop.smtp.mailbox.messages == []


def test_an_sms_past_max_segments_fails_with_the_reason_and_is_not_sent(shop: Shop) -> None:
    # 497 GSM-7 characters ("Hi P1, " and 490 more): four parts of 153, past the default of 3.
    shop.configure(sms_template="Hi {{ first_name }}, " + "x" * 490 + "\n")
    shop.prepare(1)
    shop.ok("dispatch", now=SEND_AT)
    shop.worker()
    row = shop.status_of()[1]
    assert row["status"] == "failed"
    assert "templates/refill-due.sms.j2" in row["reason"]
    assert "4 segments (497 GSM-7 units), more than channels.sms.max_segments = 3" in row["reason"]
    assert shop.stub.received == {}
    assert shop.smtp.mailbox.messages == []


def test_an_email_past_max_bytes_fails_with_the_reason_and_is_not_sent(shop: Shop) -> None:
    shop.configure(rules=EMAIL_ONLY, extra="    max_bytes: 2000\n")
    shop.write(
        "templates/refill-due.email.j2",
        "{% block subject %}Refill{% endblock %}{% block text %}" + "é" * 1000 + "{% endblock %}",
    )
    shop.prepare(1)
    shop.ok("dispatch", now=SEND_AT)
    shop.worker()
    row = shop.status_of()[1]
    assert row["status"] == "failed"
    assert "templates/refill-due.email.j2" in row["reason"]
    expected = "2,006 bytes (subject, text and HTML), more than channels.email.max_bytes = 2,000"
    assert expected in row["reason"]
    assert shop.smtp.mailbox.messages == []


def test_a_reminder_past_grace_at_send_time_is_canceled_as_expired(shop: Shop) -> None:
    shop.prepare(1)
    two_days_late = "2027-03-12T15:00:01Z"
    shop.ok("dispatch", now=two_days_late)
    shop.worker(now=two_days_late)
    row = shop.status_of()[1]
    assert row["status"] == "canceled"
    assert row["reason"].startswith("expired: send time 2027-03-10T15:00:00Z")
    assert shop.stub.received == {}


def test_a_check_query_without_a_row_cancels(shop: Shop) -> None:
    shop.configure(rules=CHECKED)
    shop.prepare(3)
    shop.sql("UPDATE prescriptions SET refills_left = 0 WHERE id = 2")
    shop.ok("dispatch", now=SEND_AT)
    shop.worker()
    rows = shop.status_of()
    assert rows[2]["status"] == "canceled"
    assert "check query returned no row" in rows[2]["reason"]
    assert rows[1]["status"] == rows[3]["status"] == "sent"
    assert len(shop.stub.received) == 2


def test_a_flaky_provider_delivers_everything_once_with_attempts_recorded(shop: Shop) -> None:
    shop.configure(max_attempts=12, batch_size=10)
    people = shop.prepare(40)
    # Answers that say nothing was created (a 5xx may have been: see tests/test_reconcile.py).
    shop.stub.failure = UNAUTHORIZED
    shop.stub.failure_ratio = 0.3
    shop.stub._random.seed(7)
    for person in people[:5]:
        shop.stub.respond(person["phone"], TOO_MANY_REQUESTS)
    for minute in range(0, 60, 2):  # past max_backoff (1m) each round
        now = f"2027-03-10T15:{minute:02d}:00Z"
        shop.ok("dispatch", now=now)
        shop.worker(now=now)
        if shop.statuses() == {"sent": 40}:
            break
    assert shop.statuses() == {"sent": 40}
    assert sorted(shop.stub.accepted) == sorted(p["phone"] for p in people)
    assert set(shop.stub.accepted.values()) == {1}
    rows = shop.status_of()
    total_requests = sum(shop.stub.received.values())
    assert total_requests > 45  # failures happened
    assert sum(r["attempts"] for r in rows.values()) == total_requests
    retried = [
        e for e in shop.events() if e["from_status"] == "sending" and e["to_status"] == "pending"
    ]
    assert len(retried) == total_requests - 40
    assert any("Twilio 20429" in e["reason"] for e in retried)
    assert any("HTTP 401" in e["reason"] for e in retried)


def test_transient_errors_end_failed_after_max_attempts(shop: Shop) -> None:
    shop.configure(max_attempts=2, rules=SMS_ONLY)
    people = shop.prepare(1)
    shop.stub.respond(people[0]["phone"], TOO_MANY_REQUESTS, TOO_MANY_REQUESTS)
    for now in (SEND_AT, "2027-03-10T15:05:00Z"):
        shop.ok("dispatch", now=now)
        shop.worker(now=now)
    row = shop.status_of()[1]
    assert row["status"] == "failed" and row["attempts"] == 2
    assert row["reason"].startswith("failed after 2 attempts")


def test_smtp_down_then_up_delivers(tmp_path, delivery_redis, stub) -> None:  # type: ignore[no-untyped-def]
    from tests import services
    from tests.channel_fixtures import SmtpServer

    port = services.free_port()
    shop = Shop(tmp_path, delivery_redis, stub, SmtpServer("127.0.0.1", port, Mailbox()))
    try:
        shop.configure(rules=EMAIL_ONLY)
        shop.prepare(3)
        shop.ok("dispatch", now=SEND_AT)
        shop.worker()  # nothing listens on the port: connection refused, a transient error
        assert shop.statuses() == {"pending": 3}
        row = shop.status_of()[1]
        assert row["attempts"] == 1 and "SMTP server unreachable" in row["reason"]
        controller, server = _start(Mailbox())
        try:
            shop.smtp = server
            shop.configure(rules=EMAIL_ONLY)  # the server is back (on its new port)
            later = "2027-03-10T15:02:00Z"
            shop.ok("dispatch", now=later)
            shop.worker(now=later)
            assert shop.statuses() == {"sent": 3}
            assert sorted(m.rcpt_tos[0] for m in server.mailbox.messages) == [
                "p1@example.com",
                "p2@example.com",
                "p3@example.com",
            ]
        finally:
            controller.stop()
    finally:
        shop.close()


def test_a_worker_of_one_queue_leaves_the_other(shop: Shop) -> None:
    shop.prepare(2, phone=lambda i: None if i == 2 else f"+1212555{i:04d}")
    shop.ok("dispatch", now=SEND_AT)
    shop.worker("--queue", "email")
    assert shop.statuses() == {"queued": 2}
    shop.worker("--queue", "sms")  # routes #2 to the email queue
    assert shop.statuses() == {"sent": 1, "queued": 1}
    shop.worker("--queue", "email")
    assert shop.statuses() == {"sent": 2}


def test_an_unknown_queue_is_a_usage_error(shop: Shop) -> None:
    shop.prepare(1)
    result = shop.run("worker", "--burst", "--queue", "fax", now=SEND_AT)
    assert result.code == 2
    assert "--queue fax" in result.err


@pytest.mark.parametrize("provider_error", [INVALID_NUMBER])
def test_sms_only_permanent_error_fails_at_once(shop: Shop, provider_error) -> None:  # type: ignore[no-untyped-def]
    shop.configure(rules=SMS_ONLY)
    people = shop.prepare(1)
    shop.stub.respond(people[0]["phone"], provider_error)
    shop.ok("dispatch", now=SEND_AT)
    shop.worker()
    row = shop.status_of()[1]
    assert row["status"] == "failed" and "21211" in row["reason"]
    assert shop.rows(models.optout) == []


def test_ops_retry_puts_failed_reminders_back_deliberately(shop: Shop) -> None:
    shop.configure(sms_template="Hi {{ nope }}\n")
    shop.prepare(2)
    shop.ok("dispatch", now=SEND_AT)
    shop.worker()
    assert shop.statuses() == {"failed": 2}
    dry = shop.ok("retry", "--dry-run", now=SEND_AT)
    assert "would put back 2 failed reminder(s)" in dry.out
    assert shop.statuses() == {"failed": 2}
    shop.configure()  # the template is fixed
    later = "2027-03-10T16:00:00Z"
    result = shop.ok("retry", "--rule", "refill-due", "--id", "2", now=later)
    assert "put back 1 failed reminder(s)" in result.out
    row = shop.status_of()[2]
    assert row["status"] == "pending" and row["attempts"] == 0
    assert row["reason"].startswith("retry requested by ops (was failed: template error")
    shop.ok("dispatch", now=later)
    shop.worker(now=later)
    assert shop.status_of()[2]["status"] == "sent"
    assert shop.status_of()[1]["status"] == "failed"
    unknown = shop.run("retry", "--rule", "nope", now=later)
    assert unknown.code == 2


def test_rqs_own_worker_command_runs_the_jobs_with_the_settings_module(shop: Shop) -> None:
    import os
    import subprocess
    import sys

    shop.prepare(3)
    shop.ok("dispatch", now=SEND_AT)
    # From the business's folder, not the repository: the settings ship in the package.
    env = dict(os.environ, REMINDERS_CONFIG=str(shop.root / "config.yaml"), REMINDERS_NOW=SEND_AT)
    command = [sys.executable, "-m", "rq.cli", "worker", "--burst", "-c", "reminders.rq_settings"]
    done = subprocess.run(
        [*command, "-w", "reminders.jobs.DeliveryWorker"],
        cwd=shop.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "reminders-sms" in done.stdout and "reminders-email" in done.stdout  # its queues
    assert shop.statuses() == {"sent": 3}


def test_an_unreachable_business_db_at_check_time_is_retried_later(shop: Shop) -> None:
    shop.configure(rules=CHECKED)
    shop.prepare(2)
    shop.ok("dispatch", now=SEND_AT)
    moved = shop.root / "business.db.away"
    shop.close()  # let go of the test's own connections before the file goes
    (shop.root / "business.db").rename(moved)
    shop.worker()
    rows = shop.status_of()
    assert {r["status"] for r in rows.values()} == {"pending"}
    assert "check query failed: business DB unreachable" in rows[1]["reason"]
    assert rows[1]["attempts"] == 1
    moved.rename(shop.root / "business.db")
    later = "2027-03-10T15:02:00Z"
    shop.ok("dispatch", now=later)
    shop.worker(now=later)
    assert shop.statuses() == {"sent": 2}


def test_a_fallback_that_fails_too_keeps_both_reasons(shop: Shop) -> None:
    shop.prepare(1, phone="+15005550001")  # Twilio's magic invalid number: 21211
    shop.smtp.mailbox.always_refuse["p1@example.com"] = "550 5.1.1 No such user"
    shop.ok("dispatch", now=SEND_AT)
    shop.worker()
    row = shop.status_of()[1]
    assert row["status"] == "failed" and row["channel"] == "email"
    assert row["reason"].startswith("sms failed: Twilio 21211")
    assert "; then email failed: SMTP 550" in row["reason"]


def test_a_worker_with_a_broken_channel_config_stops_at_start(shop: Shop) -> None:
    shop.prepare(1)
    text = shop.read("config.yaml").replace(f"api_url: {shop.stub.url}", "api_url: ftp://nowhere")
    shop.write("config.yaml", text)
    result = shop.run("worker", "--burst", now=SEND_AT)
    assert result.code == 2
    assert "api_url must be an http(s) URL" in result.err


def test_links_and_status_callbacks_need_the_secret_and_nothing_is_lost_meanwhile(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop.configure(extra="web:\n  public_url: https://reminders.example.com\n")
    shop.write(
        "templates/refill-due.email.j2",
        "{% block subject %}Refill{% endblock %}\n"
        "{% block text %}Stop: {{ unsubscribe_url }} Prefs: {{ preferences_url }}{% endblock %}\n",
    )
    shop.prepare(2, phone=lambda i: None if i == 2 else f"+1212555{i:04d}")
    monkeypatch.delenv("REMINDERS_SECRET", raising=False)
    shop.ok("dispatch", now=SEND_AT)
    # The worker refuses to start, naming the secret, rather than failing each job it takes.
    refused = shop.run("worker", "--burst", now=SEND_AT)
    assert refused.code == 2, refused
    assert "web.public_url is set: environment variable REMINDERS_SECRET is not set" in refused.err
    assert shop.statuses() == {"queued": 2}
    assert shop.stub.received == {}
    monkeypatch.setenv("REMINDERS_SECRET", "s" * 32)
    later = "2027-03-10T15:05:00Z"
    again = shop.ok("dispatch", "--json", now=later).json_lines()[0]
    assert again["requeued"] == 0  # the job waited in its queue, untouched
    shop.worker(now=later)
    assert shop.statuses() == {"sent": 2}
    form = shop.stub.forms[0]
    assert form["StatusCallback"] == "https://reminders.example.com/webhooks/twilio/status"
    (mail,) = shop.smtp.mailbox.messages
    header = mail.message["List-Unsubscribe"]
    assert header.startswith("<https://reminders.example.com/unsubscribe/")
    assert mail.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    text = mail.message.get_body(("plain",)).get_content()
    assert "Stop: https://reminders.example.com/unsubscribe/" in text
    assert "Prefs: https://reminders.example.com/preferences/" in text
    from reminders import links

    token = header.strip("<>").rsplit("/", 1)[1]
    link = links.read_unsubscribe(token, now=links.clock.parse_instant(later))
    assert (link.customer_id, link.channel) == ("2", "email")
    assert links.match_address(link, ["p1@example.com", "p2@example.com"]) == links.Unsubscribe(
        "2", "email", "p2@example.com"
    )


@pytest.mark.parametrize(
    ("attempt", "low", "high"),
    [(1, 5, 10), (2, 10, 20), (3, 20, 40), (4, 30, 60), (9, 30, 60)],  # backoff 10s, cap 1m
)
def test_backoff_doubles_up_to_the_cap_with_jitter(
    shop: Shop, attempt: int, low: float, high: float
) -> None:
    import random

    from reminders.app import App
    from reminders.delivery import backoff

    config = App(shop.root / "config.yaml").config
    draws = [backoff(config, attempt, random.Random(seed)).total_seconds() for seed in range(200)]
    assert all(low <= d <= high for d in draws)
    assert max(draws) - min(draws) > (high - low) / 2  # spread out, not all alike


def test_dispatch_pages_through_more_reminders_than_one_read(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reminders import dispatch

    monkeypatch.setattr(dispatch, "SELECT_CHUNK", 7)
    shop.prepare(20)
    result = shop.ok("dispatch", "--json", now=SEND_AT)
    assert result.json_lines()[0]["enqueued"] == 20
    assert shop.statuses() == {"queued": 20}


def test_what_names_reminders_by_id_is_planned_by_id_on_sqlite(shop: Shop) -> None:
    """SQLite plans without statistics: beside ``id IN (...)`` an equality on the status made it
    read the status's index, every due or every queued reminder, instead of the few ids (a
    claim of 5 took 1.4 s with a million due). Every statement of a dispatch and a worker's run
    that names reminders by id and by status is planned by the primary key."""
    assert shop.state_url.startswith("sqlite:///")
    shop.prepare(5)
    seen: list[tuple[str, Any]] = []

    def spy(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        where = statement.split(" WHERE ", 1)[-1]
        if "reminders_reminder.id IN (" in where and "status" in where:
            seen.append((statement, parameters))

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", spy)
    try:
        shop.ok("dispatch", now=SEND_AT)
        shop.worker()
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", spy)
    assert shop.statuses() == {"sent": 5}
    # The dispatch's claim (pending -> queued), the worker's read of its job and its claim.
    kinds = {statement.split()[0] for statement, _ in seen}
    assert kinds == {"UPDATE", "SELECT"} and len(seen) >= 3, seen
    with sqlite3.connect(shop.state_url.removeprefix("sqlite:///")) as db:
        for statement, parameters in seen:
            plan = [row[-1] for row in db.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)]
            assert "USING INTEGER PRIMARY KEY" in plan[0] and "status" not in plan[0], plan
