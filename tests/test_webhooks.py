"""Signed webhooks end to end: a real HTTP receiver that verifies each signature as the README
shows, down for a while, then back; every event arrives once delivered, with its id unchanged."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from werkzeug.wrappers import Request, Response

from reminders import links, models, webhooks
from reminders.app import App
from tests import services
from tests.channel_fixtures import SmtpServer
from tests.delivery_fixtures import RULES, SEND_AT, Shop, phone_of, shop_at
from tests.rules_fixtures import Project, lite
from tests.test_outbox import PUBLIC, SECRET, inbound, pass_at, twilio_post
from tests.twilio_stub import TwilioStub

__all__ = ["lite"]

HOOK_SECRET = "whsec-a-long-random-value-0123456789"


def verify(secret: str, body: bytes, header: str, tolerance: int = 300) -> bool:
    """The README's receiver code, as a business would write it."""
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    t, given = parts.get("t", ""), parts.get("v1", "")
    if not t.isdigit() or abs(time.time() - int(t)) > tolerance:
        return False
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, given)


@dataclass
class Receiver:
    """A business's endpoint: verifies the signature, answers 503 while ``down``."""

    down: bool = False
    accepted: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (path, event id) answered 503
    forged: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        body = request.get_data()
        with self.lock:
            if not verify(HOOK_SECRET, body, request.headers.get("Reminders-Signature", "")):
                self.forged += 1
                return Response("bad signature", status=400)(environ, start_response)
            event = json.loads(body)
            if self.down:
                self.refused.append((request.path, event["id"]))
                return Response("down", status=503)(environ, start_response)
            self.accepted.append((request.path, event))
        return Response("", status=204)(environ, start_response)

    def events(self, path: str) -> list[dict[str, Any]]:
        return [event for at, event in self.accepted if at == path]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    app = Receiver()
    with services.serving(app) as port:
        yield app, port


def status_callback(port: int, sid: str, state: str, code: str | None = None) -> Any:
    """A Twilio delivery report."""
    params = {"MessageSid": sid, "MessageStatus": state, **({"ErrorCode": code} if code else {})}
    return twilio_post(port, "/webhooks/twilio/status", params)


def hooks_config(port: int) -> str:
    return f"""\
webhooks:
  - url: http://127.0.0.1:{port}/all
    events: ["*"]
    secret: ${{REMINDERS_WEBHOOK_SECRET}}
  - url: http://127.0.0.1:{port}/crm
    events: [customer.opted_out]
    secret: ${{REMINDERS_WEBHOOK_SECRET}}
    include_addresses: true
web:
  public_url: {PUBLIC}
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def hshop(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    delivery_redis: str,
    stub: TwilioStub,
    mailbox_server: SmtpServer,
    monkeypatch: pytest.MonkeyPatch,
    receiver: tuple[Receiver, int],
) -> Iterator[Shop]:
    monkeypatch.setenv(links.SECRET_ENV, SECRET)
    monkeypatch.setenv("REMINDERS_WEBHOOK_SECRET", HOOK_SECRET)
    with shop_at(tmp_path, request.param, delivery_redis, stub, mailbox_server) as shop:
        shop.configure(extra=hooks_config(receiver[1]))
        yield shop


def test_events_reach_a_verifying_receiver_after_it_was_down(
    hshop: Shop, receiver: tuple[Receiver, int]
) -> None:
    shop, (hook, _port) = hshop, receiver
    shop.prepare(2)
    hook.down = True
    pass_at(shop, SEND_AT)  # sent; the events wait for the next pass
    pass_at(shop, SEND_AT)  # the receiver answers 503: retried later, nothing lost
    rows = shop.rows(models.outbox)
    assert [(r["type"], r["status"]) for r in rows] == [("sent", "pending")] * 2
    assert rows[0]["attempts"] == 1 and rows[0]["last_error"] == "HTTP 503"
    assert rows[1]["attempts"] == 0  # behind the failing head
    assert hook.refused == [("/all", rows[0]["event_id"])]
    report = shop.ok("status", now=SEND_AT).out
    assert "outbox webhook http://127.0.0.1:" in report and "HTTP 503" in report

    hook.down = False
    pass_at(shop, "2027-03-10T15:05:00Z")
    sent = hook.events("/all")
    assert [e["id"] for e in sent] == [r["event_id"] for r in rows]  # ids kept across retries
    assert {e["type"] for e in sent} == {"reminder.sent"}
    assert sorted(e["data"]["reminder_id"] for e in sent) == [1, 2]
    first = sent[0]
    assert first["created"] == "2027-03-10T15:00:00Z"
    assert first["data"]["rule"] == "refill-due" and first["data"]["channel"] == "sms"
    assert first["data"]["provider_id"].startswith("SM")
    assert "address" not in first["data"] and "phone" not in first["data"]
    assert hook.events("/crm") == []  # it asked for opt-outs only

    # STOP through Twilio's signed inbound webhook: both endpoints hear of it; only the one
    # that asked for addresses gets the number.
    from reminders.web import create_app

    by_reminder = {e["data"]["reminder_id"]: e["data"]["provider_id"] for e in sent}
    with services.serving(create_app(App(shop.root / "config.yaml"))) as port:
        assert inbound(port, "STOP", phone_of(1), "SM" + "3" * 32).status_code == 200
        # Twilio's delivery reports, signed likewise.
        assert status_callback(port, by_reminder[1], "delivered").status_code == 204
        assert status_callback(port, by_reminder[2], "undelivered", "30003").status_code == 204
    pass_at(shop, "2027-03-10T15:05:00Z")
    reports = {
        e["type"]: e["data"] for e in hook.events("/all")[2:] if e["type"] != "customer.opted_out"
    }
    assert reports["reminder.delivered"]["reminder_id"] == 1
    assert reports["reminder.failed"]["reminder_id"] == 2
    assert reports["reminder.failed"]["error_code"] == "30003"
    (crm,) = hook.events("/crm")
    opted = [e for e in hook.events("/all") if e["type"] == "customer.opted_out"]
    assert [e["id"] for e in opted] == [crm["id"]]
    assert crm["data"]["source"] == "stop" and crm["data"]["customer_id"] == "1"
    assert crm["data"]["address"] == phone_of(1)
    assert "address" not in opted[0]["data"]
    assert hook.forged == 0
    assert {r["status"] for r in shop.rows(models.outbox)} == {"done"}


def test_a_receiver_that_does_not_answer_in_time_is_retried(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()

    def slow(environ: dict[str, Any], start_response: Any) -> Any:
        release.wait(30)
        return Response("", status=200)(environ, start_response)

    monkeypatch.setattr(webhooks, "TIMEOUT", 0.2)
    monkeypatch.setenv(links.SECRET_ENV, SECRET)
    monkeypatch.setenv("REMINDERS_WEBHOOK_SECRET", HOOK_SECRET)
    with services.serving(slow) as port:
        shop.configure(extra=hooks_config(port))
        shop.prepare(1)
        pass_at(shop, SEND_AT)
        pass_at(shop, SEND_AT)
        release.set()
        (row,) = shop.rows(models.outbox)
        assert row["status"] == "pending" and row["attempts"] == 1
        assert row["last_error"] == "no answer within 0.2 s"


def test_a_webhook_is_given_up_three_days_after_its_event_and_the_next_one_goes(
    hshop: Shop, receiver: tuple[Receiver, int]
) -> None:
    shop, (hook, _port) = hshop, receiver
    shop.prepare(2)
    hook.down = True
    pass_at(shop, SEND_AT)
    pass_at(shop, SEND_AT)
    # Still down three days after the events: the first is given up at its next try, and the
    # next one is tried at once (and given up too, as old).
    later = "2027-03-13T15:00:01Z"
    pass_at(shop, later)
    first, second = shop.rows(models.outbox)
    assert (first["status"], first["attempts"]) == ("failed", 2)
    assert (second["status"], second["attempts"]) == ("failed", 1)
    assert [event_id for _, event_id in hook.refused] == [first["event_id"]] * 2 + [
        second["event_id"]
    ]
    report = shop.ok("status", "--json", now=later).json_lines()[0]
    (entry,) = [x for x in report["outbox"] if x["name"].endswith("/all")]
    assert entry["failed"] == 2 and entry["pending"] == 0


def test_the_signature_is_over_the_exact_bytes_sent() -> None:
    body = b'{"id":"evt_1","type":"reminder.sent"}'
    header = webhooks.signature(HOOK_SECRET, body, 1_800_000_000)
    t, v1 = (part.split("=", 1)[1] for part in header.split(","))
    assert t == "1800000000"
    expected = hmac.new(HOOK_SECRET.encode(), b"1800000000." + body, hashlib.sha256).hexdigest()
    assert v1 == expected
    assert webhooks.signature(HOOK_SECRET, body + b" ", 1_800_000_000) != header


def test_a_webhook_secret_written_into_the_config_is_refused(lite: Project) -> None:
    config = lite.read("config.yaml") + (
        "webhooks:\n  - url: https://crm.example.com/hooks\n    events: ['*']\n"
        f"    secret: {HOOK_SECRET}\n"
    )
    lite.write("config.yaml", config)
    result = lite.run("validate")
    assert result.code == 2
    line = next(i for i, text in enumerate(config.splitlines(), 1) if "secret:" in text)
    assert f"config.yaml:{line}: webhooks[0].secret: read it from the environment" in result.err
    assert HOOK_SECRET not in result.err


def test_an_unknown_event_type_is_named_with_the_types_there_are(
    lite: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REMINDERS_WEBHOOK_SECRET", HOOK_SECRET)
    config = lite.read("config.yaml") + (
        "webhooks:\n  - url: https://crm.example.com/hooks\n    events: [reminder.shipped]\n"
        "    secret: ${REMINDERS_WEBHOOK_SECRET}\n"
    )
    lite.write("config.yaml", config)
    result = lite.run("validate")
    assert result.code == 2
    assert '"reminder.shipped" is not an event type (types: reminder.sent' in result.err


def test_replies_reach_the_endpoint_as_replied_and_done(
    shop: Shop, receiver: tuple[Receiver, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    hook, port = receiver
    monkeypatch.setenv(links.SECRET_ENV, SECRET)
    monkeypatch.setenv("REMINDERS_WEBHOOK_SECRET", HOOK_SECRET)
    rules = RULES.replace("    offsets: [0d]\n", "    offsets: [0d, 2d]\n").replace(
        "    template: refill-due\n",
        "    template: refill-due\n    replies:\n      DONE: done\n      LATER: snooze 1d\n",
    )
    shop.configure(rules=rules, extra=hooks_config(port))
    shop.prepare(2)
    pass_at(shop, SEND_AT)
    from reminders.web import create_app

    with services.serving(create_app(App(shop.root / "config.yaml"))) as web:
        assert inbound(web, "Later", phone_of(1), "SM" + "4" * 32).status_code == 200
        assert inbound(web, "done!", phone_of(2), "SM" + "5" * 32).status_code == 200
    pass_at(shop, SEND_AT)
    got = [(e["type"], e["data"]["reminder_id"], e["data"]["keyword"]) for e in hook.events("/all")]
    sent = {r["occurrence"]: r["id"] for r in shop.reminders() if r["offset"] == "0d"}
    later = {r["occurrence"]: r["id"] for r in shop.reminders() if r["offset"] == "2d"}
    assert got[2:] == [
        ("reminder.replied", sent["1"], "LATER"),
        ("reminder.replied", sent["2"], "DONE"),
        ("reminder.canceled", later["2"], None),  # DONE cancels what was still open
        ("reminder.done", sent["2"], "DONE"),
    ]
    assert hook.forged == 0
