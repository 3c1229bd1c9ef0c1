"""Digests through the real providers: the twilio library against the Twilio stub, SMTP to an
aiosmtpd server, real worker and scheduler processes where a worker dies mid-digest.

Each patient has one prescription and two rules about it (``refill-due`` and ``refill-soon``,
both at 10:00 on the day it runs out), gathered by the digest ``daily``: one message a patient.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from reminders import codec, receipts
from reminders.app import App
from reminders.rules import load_rules
from tests.channel_fixtures import SmtpServer
from tests.delivery_fixtures import RULES, SEND_AT, Shop, any_shop, wait_until
from tests.test_reconcile import FAST, SCHEDULER, Process, created_for
from tests.twilio_stub import ACCEPT_THEN_HANG, DROP_BEFORE_ACCEPT

__all__ = ["SmtpServer", "any_shop"]

SECOND = RULES.removeprefix("rules:\n").replace("name: refill-due", "name: refill-soon")
DIGEST_RULES = (
    RULES
    + SECOND
    + """\
digests:
  - name: daily
    rules: [refill-due, refill-soon]
    window: 1d
    template: daily
"""
)
DAILY_SMS = "{% for item in items %}{{ item.rule }}: {{ item.text }}\n{% endfor %}"
DAILY_EMAIL = """\
{% block subject %}{{ digest.count }} reminders{% endblock %}
{% block text %}{% for item in items %}{{ item.rule }}: {{ item.text }}
{% endfor %}{% endblock %}
"""


def digest_shop(shop: Shop, **configure: Any) -> Shop:
    shop.configure(rules=DIGEST_RULES, **configure)
    shop.write("templates/daily.sms.j2", DAILY_SMS)
    shop.write("templates/daily.email.j2", DAILY_EMAIL)
    return shop


def of_patient(shop: Shop, patient: int) -> list[dict[str, Any]]:
    return [r for r in shop.reminders() if codec.loads(r["data"])["customer_id"] == patient]


def killed_then_recovered(
    shop: Shop, reached: Callable[[], bool], latency: float | None = None
) -> dict[str, int]:
    """Dispatch; a worker killed once ``reached``; then (with the stub's ``latency`` in ms) a
    serving worker and the scheduler, nobody running ``retry``, until all is sent. Returns the
    statuses at the worker's death."""
    shop.ok("dispatch", now=SEND_AT)
    doomed = Process(shop, "worker")
    try:
        wait_until(reached)
    finally:
        doomed.kill()
    at_death = shop.statuses()
    if latency is not None:
        shop.stub.latency_ms = latency
    total = sum(at_death.values())
    worker, scheduler = Process(shop, "worker"), Process(shop, "scheduler")
    try:
        wait_until(lambda: shop.statuses() == {"sent": total}, timeout=120, interval=0.5)
    finally:
        worker.stop()
        scheduler.stop()
    return at_death


def test_a_permanent_sms_error_sends_the_same_digest_by_email(any_shop: Shop) -> None:
    shop = digest_shop(any_shop)
    shop.prepare(2, phone=lambda i: "+15005550001" if i == 1 else f"+1212555{i:04d}")  # 21211
    shop.ok("dispatch", now=SEND_AT)
    shop.worker()
    assert shop.statuses() == {"sent": 4}
    assert shop.stub.received["+15005550001"] == 1  # one digest tried by SMS
    (mail,) = shop.smtp.mailbox.messages
    assert mail.rcpt_tos == ["p1@example.com"]
    assert mail.message["Subject"] == "2 reminders"
    text = mail.message.get_content()
    assert "refill-due: Hi P1" in text and "refill-soon: Hi P1" in text
    first = of_patient(shop, 1)
    assert {r["channel"] for r in first} == {"email"}
    assert len({r["provider_id"] for r in first}) == 1
    assert all("sms failed: Twilio 21211" in r["reason"] for r in first)
    (sms,) = created_for(shop.stub, "+12125550002")
    assert sms["body"].count("Hi P2") == 2
    assert {r["channel"] for r in of_patient(shop, 2)} == {"sms"}


def test_a_worker_killed_after_twilio_accepted_the_digest_records_it_on_each_item(
    any_shop: Shop,
) -> None:
    shop = digest_shop(any_shop, sms_extra=FAST.replace("timeout: 1s", "timeout: 30s"))
    shop.write("config.yaml", shop.read("config.yaml") + SCHEDULER)
    people = shop.prepare(2)
    phone = people[1]["phone"]
    shop.stub.hang_seconds = 60
    shop.stub.respond(phone, ACCEPT_THEN_HANG)
    # Twilio has both digests; the worker never records the second.
    at_death = killed_then_recovered(shop, lambda: sum(shop.stub.accepted.values()) == 2)
    assert at_death == {"sent": 2, "sending": 2}
    (created,) = created_for(shop.stub, phone)
    assert shop.stub.received[phone] == 1
    items = of_patient(shop, 2)
    assert [r["provider_id"] for r in items] == [created["sid"]] * 2
    messages = [m for m in shop.messages() if m["provider_id"] == created["sid"]]
    assert sorted(m["reminder_id"] for m in messages) == sorted(r["id"] for r in items)


def test_a_worker_killed_before_twilio_got_the_digest_sends_it_once(shop: Shop) -> None:
    digest_shop(shop, sms_extra=FAST.replace("timeout: 1s", "timeout: 30s"), extra=SCHEDULER)
    people = shop.prepare(2)
    phone = people[0]["phone"]
    # The request reaches the server, which holds it 5 s and then drops it unrecorded.
    shop.stub.latency_ms = 5000
    shop.stub.respond(phone, DROP_BEFORE_ACCEPT)
    at_death = killed_then_recovered(shop, lambda: shop.stub.received[phone] == 1, latency=0)
    assert at_death.get("sending") == 2
    (created,) = created_for(shop.stub, phone)
    assert shop.stub.accepted[phone] == 1
    assert created["body"].count("Hi P1") == 2  # the digest again, whole
    assert {r["provider_id"] for r in of_patient(shop, 1)} == {created["sid"]}


def test_a_delivery_report_for_a_digest_applies_to_each_item(shop: Shop) -> None:
    digest_shop(shop)
    shop.prepare(1)
    shop.ok("dispatch", now=SEND_AT)
    shop.worker()
    (created,) = created_for(shop.stub, "+12125550001")
    ruleset = load_rules(App(shop.root / "config.yaml").config)
    with shop.state.begin() as conn:
        did = receipts.apply_report(
            conn, ruleset, created["sid"], "delivered", None, datetime(2027, 3, 10, 16, tzinfo=UTC)
        )
    assert did == "delivered"
    assert shop.statuses() == {"delivered": 2}
    assert {m["status"] for m in shop.messages()} == {"delivered"}
