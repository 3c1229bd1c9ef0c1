"""Ambiguous sends are reconciled with the provider's own records, never retried blind.

Real Redis, real state DBs (SQLite and PostgreSQL), the real twilio library against the project's
Twilio stub (which records a message and then does not answer, or drops the connection, and
serves the Messages list), real worker and scheduler processes where a process dies:

- Twilio records the message and does not answer within the client's timeout: exactly one
  message, the reminder ends ``sent`` with Twilio's SID, and a later delivery report for that SID
  is applied;
- Twilio drops the connection before accepting: sent once, after ``reconcile_after``;
- a worker SIGKILLed after Twilio accepted and before the record: ``sent`` with no one's help
  (a serving worker and the scheduler), no second message;
- a worker SIGKILLed while Twilio never received the message: sent once;
- a slow batch on a live worker is never reconciled.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from typing import IO, Any

import pytest
from twilio.request_validator import RequestValidator

from reminders import links
from tests.delivery_fixtures import RULES, SEND_AT, Shop, wait_until
from tests.twilio_stub import ACCEPT_THEN_HANG, AUTH_TOKEN, DROP_BEFORE_ACCEPT, TwilioStub

# A one-second request timeout and a one-second wait before deciding "not sent", so the tests
# do not wait a minute (the defaults are 10 s and 1 m).
FAST = "    timeout: 1s\n    reconcile_after: 1s\n"
PUBLIC = "https://reminders.example.com"
WEB = f"web:\n  public_url: {PUBLIC}\n"
SCHEDULER = "scheduler:\n  scan_every: 1h\n  dispatch_every: 1s\n"


def by_phone(shop: Shop) -> dict[str, dict[str, Any]]:
    """Each reminder by its patient's phone number."""
    from reminders import codec

    return {codec.loads(r["data"])["phone"]: r for r in shop.reminders()}


def created_for(stub: TwilioStub, phone: str) -> list[dict[str, Any]]:
    return [m for m in stub.created if m["to"] == phone]


def reconciled(shop: Shop) -> int:
    return int(shop.ok("dispatch", "--json", now=SEND_AT).json_lines()[0]["reconciled"])


class Process:
    """A long-running ``reminders`` process, its output in a file (a pipe would fill up)."""

    def __init__(self, shop: Shop, *args: str) -> None:
        self.log = shop.root / f"{args[0]}-{os.urandom(3).hex()}.log"
        self._out: IO[str] = self.log.open("w")
        env = {
            k: v for k, v in os.environ.items() if k not in ("REMINDERS_NOW", "REMINDERS_CONFIG")
        }
        self.popen = subprocess.Popen(
            shop.command(*args, now=SEND_AT),
            cwd=shop.root,
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def kill(self) -> None:
        os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()

    def stop(self) -> str:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
        self._out.close()
        return self.log.read_text()


def test_twilio_records_the_message_then_does_not_answer(
    any_shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(links.SECRET_ENV, "s" * 32)  # links in messages are signed with it
    shop = any_shop.configure(sms_extra=FAST, extra=WEB)
    people = shop.prepare(3)
    phone = people[0]["phone"]
    shop.stub.respond(phone, ACCEPT_THEN_HANG)  # recorded, then no answer for 3 s
    shop.ok("dispatch", now=SEND_AT)
    shop.worker()
    assert shop.statuses() == {"sent": 2, "unknown": 1}
    stuck = by_phone(shop)[phone]
    assert "Twilio did not answer in time" in stuck["reason"]
    assert stuck["attempt_at"] is not None and len(stuck["body_digest"]) == 64
    # The next dispatch asks Twilio's Messages list and finds it: sent, with Twilio's SID.
    assert reconciled(shop) == 1
    [record] = created_for(shop.stub, phone)
    found = by_phone(shop)[phone]
    assert (found["status"], found["provider_id"]) == ("sent", record["sid"])
    assert found["reason"].startswith("sent: found in Twilio's records")
    assert shop.stub.list_requests >= 1
    # Nothing sends it again, however many passes.
    shop.ok("dispatch", now=SEND_AT)
    shop.worker()
    assert shop.stub.received[phone] == 1 and shop.stub.accepted[phone] == 1
    assert sum(shop.stub.accepted.values()) == 3
    assert [m["provider_id"] for m in shop.messages()].count(record["sid"]) == 1
    # Twilio's delivery report for that SID is applied.
    from reminders.app import App
    from reminders.web import create_app

    monkeypatch.setenv("REMINDERS_NOW", SEND_AT)
    client = create_app(App(str(shop.root / "config.yaml"))).test_client()
    params = {"MessageSid": record["sid"], "MessageStatus": "delivered"}
    url = PUBLIC + "/webhooks/twilio/status"
    signature = RequestValidator(AUTH_TOKEN).compute_signature(url, params)
    answer = client.post(
        "/webhooks/twilio/status", data=params, headers={"X-Twilio-Signature": signature}
    )
    assert answer.status_code in (200, 204)
    assert by_phone(shop)[phone]["status"] == "delivered"


@pytest.mark.parametrize(
    ("state", "code", "ends"),
    [("delivered", None, "delivered"), ("undelivered", 30003, "undelivered")],
)
def test_a_final_status_in_twilios_records_is_applied_when_found(
    any_shop: Shop, state: str, code: int | None, ends: str
) -> None:
    """Its status callback came while the send was unknown (and found no message then): the
    status the Messages list shows is applied as the callback would have been."""
    shop = any_shop.configure(sms_extra=FAST)
    [person] = shop.prepare(1)
    phone = person["phone"]
    shop.stub.respond(phone, ACCEPT_THEN_HANG)
    shop.ok("dispatch", now=SEND_AT)
    shop.worker()
    assert shop.statuses() == {"unknown": 1}
    [record] = created_for(shop.stub, phone)
    record.update(status=state, error_code=code)  # what Twilio did meanwhile
    assert reconciled(shop) == 1
    found = by_phone(shop)[phone]
    assert (found["status"], found["provider_id"]) == (ends, record["sid"])
    [sent] = [m for m in shop.messages() if m["provider_id"] == record["sid"]]
    assert (sent["status"], sent["error_code"]) == (state, None if code is None else str(code))
    assert shop.stub.accepted[phone] == 1


def test_twilio_drops_the_connection_before_accepting(any_shop: Shop) -> None:
    shop = any_shop.configure(sms_extra=FAST)
    people = shop.prepare(2)
    phone = people[1]["phone"]
    shop.stub.respond(phone, DROP_BEFORE_ACCEPT)
    shop.ok("dispatch", now=SEND_AT)
    shop.worker()
    assert shop.statuses() == {"sent": 1, "unknown": 1}
    assert "closed the connection before answering" in by_phone(shop)[phone]["reason"]
    assert shop.stub.accepted[phone] == 0
    # Not in Twilio's records once reconcile_after has passed (real time): sent once more.
    wait_until(lambda: reconciled(shop) == 1, timeout=60, interval=0.3)
    again = by_phone(shop)[phone]
    assert again["status"] in ("pending", "queued")
    assert again["reason"].startswith("not sent: no such message in Twilio's records since")
    shop.worker()
    assert shop.statuses() == {"sent": 2}
    assert shop.stub.received[phone] == 2 and shop.stub.accepted[phone] == 1
    assert len(created_for(shop.stub, phone)) == 1


def test_a_worker_killed_after_twilio_accepted_recovers_by_itself(any_shop: Shop) -> None:
    shop = any_shop
    shop.configure(sms_extra=FAST.replace("timeout: 1s", "timeout: 30s"), extra=SCHEDULER)
    people = shop.prepare(3)
    phone = people[2]["phone"]
    shop.stub.hang_seconds = 60
    shop.stub.respond(phone, ACCEPT_THEN_HANG)
    shop.ok("dispatch", now=SEND_AT)
    doomed = Process(shop, "worker")
    try:
        # One batch: Twilio has all three (two answered), the worker waits for the third.
        wait_until(lambda: sum(shop.stub.accepted.values()) == 3)
        assert shop.statuses() == {"sending": 3}
    finally:
        doomed.kill()  # Twilio has the messages; the worker never records them
    died = time.monotonic()
    # The ordinary processes: a serving worker and the scheduler, nobody running `retry`.
    worker, scheduler = Process(shop, "worker"), Process(shop, "scheduler")
    try:
        wait_until(lambda: shop.statuses() == {"sent": 3}, timeout=120, interval=0.5)
    finally:
        logs = worker.stop() + scheduler.stop()
    print(f"recovered {time.monotonic() - died:.0f} s after the worker's death")  # not asserted
    for person in people:
        found = by_phone(shop)[person["phone"]]
        assert found["provider_id"] == created_for(shop.stub, person["phone"])[0]["sid"], logs
        assert shop.stub.received[person["phone"]] == 1
    assert set(shop.stub.accepted.values()) == {1}
    reasons = [e["reason"] for e in shop.events() if e["reminder_id"] == found["id"]]
    assert any("is gone (no heartbeat)" in (why or "") for why in reasons), reasons


def test_a_worker_killed_before_twilio_received_it_sends_it_once(shop: Shop) -> None:
    shop.configure(sms_extra=FAST.replace("timeout: 1s", "timeout: 30s"), extra=SCHEDULER)
    people = shop.prepare(3)
    phone = people[0]["phone"]
    # The request reaches the server, which holds it 5 s and then drops it unrecorded.
    shop.stub.latency_ms = 5000
    shop.stub.respond(phone, DROP_BEFORE_ACCEPT)
    shop.ok("dispatch", now=SEND_AT)
    doomed = Process(shop, "worker")
    try:
        wait_until(lambda: shop.stub.received[phone] == 1)
    finally:
        doomed.kill()
    died = time.monotonic()
    assert by_phone(shop)[phone]["status"] == "sending"
    shop.stub.latency_ms = 0
    worker, scheduler = Process(shop, "worker"), Process(shop, "scheduler")
    try:
        wait_until(lambda: shop.statuses() == {"sent": 3}, timeout=120, interval=0.5)
    finally:
        worker.stop()
        scheduler.stop()
    print(f"sent again {time.monotonic() - died:.0f} s after the worker's death")  # not asserted
    assert shop.stub.accepted[phone] == 1 and len(created_for(shop.stub, phone)) == 1
    assert sum(shop.stub.accepted.values()) == 3


# -- email: SMTP has no list to ask ---------------------------------------------------------

EMAIL_ONLY = RULES.replace("channels: [sms, email]", "channels: [email]")


def email_shop(shop: Shop, resend: bool) -> Shop:
    shop.configure(rules=EMAIL_ONLY)
    extra = "    resend_unknown: true\n    reconcile_after: 1s\n" if resend else ""
    text = shop.read("config.yaml").replace("    timeout: 5s\n", "    timeout: 1s\n" + extra)
    shop.write("config.yaml", text)
    return shop


def test_an_smtp_timeout_after_data_is_not_resent_by_default(shop: Shop) -> None:
    email_shop(shop, resend=False)
    shop.prepare(2)
    shop.smtp.mailbox.data_delay = 3  # the server has the message, the client stops waiting
    shop.ok("dispatch", now=SEND_AT)
    shop.worker()
    assert shop.statuses() == {"unknown": 2}
    message_ids = [m.message["Message-ID"] for m in shop.smtp.mailbox.messages]
    assert len(message_ids) == 2
    rows = shop.reminders()
    assert sorted(r["provider_id"] for r in rows) == sorted(message_ids)
    assert all("SMTP connection timed out" in r["reason"] for r in rows)
    # Shown to ops with the Message-ID to look up in the mail server's log ...
    text = shop.ok("status", now=SEND_AT).out
    assert "unknown (the provider may have it" in text and message_ids[0] in text
    # ... and never resent by the ordinary processes: at most once.
    shop.smtp.mailbox.data_delay = 0
    for later in ("2027-03-10T15:05:00Z", "2027-03-10T18:00:00Z"):
        assert shop.ok("dispatch", "--json", now=later).json_lines()[0]["reconciled"] == 0
        shop.worker(now=later)
    assert shop.statuses() == {"unknown": 2}
    assert len(shop.smtp.mailbox.messages) == 2
    # Ops who find them missing from the mail server's log resend them deliberately.
    result = shop.ok("retry", "--status", "unknown", now=later)
    assert "put back 2 unknown reminder(s) to pending" in result.out
    shop.ok("dispatch", now=later)
    shop.worker(now=later)
    assert shop.statuses() == {"sent": 2}
    assert len(shop.smtp.mailbox.messages) == 4


def test_an_smtp_timeout_after_data_is_resent_once_with_resend_unknown(shop: Shop) -> None:
    email_shop(shop, resend=True)
    shop.prepare(1)
    shop.smtp.mailbox.data_delay = 3
    shop.ok("dispatch", now=SEND_AT)
    shop.worker()
    assert shop.statuses() == {"unknown": 1}
    shop.smtp.mailbox.data_delay = 0
    wait_until(lambda: reconciled(shop) == 1, timeout=60, interval=0.3)
    [row] = shop.reminders()
    assert row["reason"].startswith("resending once (channels.email.resend_unknown)")
    shop.worker()
    assert shop.statuses() == {"sent": 1}
    assert len(shop.smtp.mailbox.messages) == 2  # at least once: the first one had arrived
    shop.ok("dispatch", now=SEND_AT)
    shop.worker()
    assert len(shop.smtp.mailbox.messages) == 2


# -- a storm ------------------------------------------------------------------------------------

STORM = 2000  # reminders
STORM_SECONDS = 60.0  # at most this long a worker is killed every half second


# Run on its own, before the rest of the suite (`make test`): on the shared 2-core machine, after
# the rest of the suite has run, it did not settle within pytest's 300 s (it takes about 50 s
# alone); see the closing note of the session that added this marker.
@pytest.mark.storm
def test_a_storm_of_killed_workers_and_timeouts_sends_each_reminder_at_most_once(
    shop: Shop,
) -> None:
    """2,000 reminders, 3 workers, one SIGKILLed every half second (and started again) until all
    were claimed once (60 s at most),
    Twilio recording 5% of the messages without answering within the client's timeout: every
    reminder ends sent exactly once, or visibly failed/unknown with a reason, counted here."""
    shop.configure(batch_size=50, sms_extra=FAST, extra=SCHEDULER)
    people = shop.prepare(STORM)
    shop.stub.hang_ratio = 0.05
    shop.stub.hang_seconds = 2
    shop.stub.latency_ms = 100  # a batch is in flight a while: kills land mid-send too
    shop.stub._random.seed(12)
    scheduler = Process(shop, "scheduler")
    workers = [Process(shop, "worker") for _ in range(3)]
    kills = 0
    pick = random.Random(5)
    try:
        # A worker chosen at random is killed every half second (and another started), so some
        # live long enough to claim batches and die in the middle of them; until every reminder
        # has been claimed at least once (or STORM_SECONDS).
        ends = time.monotonic() + STORM_SECONDS
        while time.monotonic() < ends:
            time.sleep(0.5)
            victim = pick.randrange(len(workers))
            workers[victim].kill()
            workers[victim].stop()
            workers[victim] = Process(shop, "worker")
            kills += 1
            left = shop.statuses()
            if not left.get("pending") and not left.get("queued"):
                break

        def settled() -> bool:
            left = shop.statuses()
            return not any(left.get(s) for s in ("pending", "queued", "sending", "unknown"))

        wait_until(settled, timeout=400, interval=1.0)
    finally:
        for process in [*workers, scheduler]:
            process.stop()
    rows = shop.reminders()
    statuses = shop.statuses()
    sent = [r for r in rows if r["status"] == "sent"]
    hung = sum(1 for m in shop.stub.created if m["to"])  # every message Twilio has
    print(f"storm: {kills} kills, {sum(shop.stub.received.values())} requests, {hung} messages")
    print(f"storm: {statuses}")
    assert max(shop.stub.accepted.values()) == 1  # nobody got a reminder twice
    assert len(shop.stub.created) == len(sent)  # every message Twilio has is recorded sent
    phones = {phone: row["id"] for phone, row in by_phone(shop).items()}
    assert sorted(phones) == sorted(p["phone"] for p in people)
    phone_of = {rid: phone for phone, rid in phones.items()}
    sids = {m["to"]: m["sid"] for m in shop.stub.created}
    for row in sent:
        assert row["provider_id"] == sids[phone_of[row["id"]]]
    for row in rows:
        if row["status"] != "sent":  # visibly failed or unknown, with its reason
            assert row["status"] in ("failed", "unknown") and row["reason"], row
    assert len(sent) + statuses.get("failed", 0) + statuses.get("unknown", 0) == STORM
    ambiguous = [e for e in shop.events() if e["to_status"] == "unknown"]
    died = [e for e in ambiguous if "is gone (no heartbeat)" in e["reason"]]
    again = [e for e in shop.events() if (e["reason"] or "").startswith("not sent: no such")]
    print(
        f"storm: {len(ambiguous) - len(died)} sends unanswered, {len(died)} left by a killed "
        f"worker, {len(again)} decided not sent and sent again"
    )
    assert len(ambiguous) > len(died) > 0, "the storm made no send ambiguous"
