"""The web endpoint through real HTTP: Twilio webhooks, unsubscribe, preferences, health, limits.

The production app (``reminders.web.create_app``) is served on a free loopback port in a thread,
on SQLite and PostgreSQL state DBs; signatures are made with twilio's own ``RequestValidator``
against ``web.public_url`` (not the address the app is bound to). Reminders and sent messages are
rows in the real state DB, as the worker leaves them. The app served by ``reminders web`` is in
``test_web_server.py``.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from twilio.request_validator import RequestValidator

from reminders import codec, lifecycle, links, models, state_db
from reminders.app import App
from tests import services

SECRET = "a-link-signing-secret-of-enough-length-0123456789"
AUTH_TOKEN = "twilio-auth-token-0123456789abcdef"
PUBLIC = "https://reminders.example.com"
NOW = datetime(2027, 3, 10, 15, 0, tzinfo=UTC)
PHONE = "+14155552671"
OTHER_PHONE = "+14155550199"
EMAIL = "jane.doe@example.com"
REDIS_DB = 7  # this suite's own Redis database
HELP = "Acme Pharmacy reminders. Questions: 555-0100. Reply STOP to opt out."

RULES = """\
rules:
  - name: refill-due
    description: Text patients 3 days before their prescription runs out.
    label: "Refill of {{ drug_name }}, runs out {{ runs_out_on | date('MMM d') }}"
    query: SELECT * FROM rx
    occurrence: "{{ rx_id }}"
    due: runs_out_on
    offsets: [-3d, 0d]
    at: "10:00"
    grace: 1d
    channels: [sms, email]
    replies:
      DONE: done
      LATER: snooze 1d
  - name: renewal
    description: Email members a week before their membership renews.
    query: SELECT * FROM members
    occurrence: "{{ member_id }}"
    due: renews_on
    offsets: [-7d]
    channels: [email]
"""


def write_config(
    root: Path, state_url: str, redis_url: str | None = None, help_text: str | None = HELP
) -> Path:
    (root / "rules").mkdir(exist_ok=True)
    (root / "rules" / "rules.yaml").write_text(RULES)
    (root / "templates").mkdir(exist_ok=True)
    lines = [
        "timezone: America/New_York",
        "source: {url: sqlite:///business.db}",
        f"state: {{url: '{state_url}'}}",
        "channels:",
        "  sms:",
        "    provider: twilio",
        "    account_sid: AC00000000000000000000000000000000",
        f"    auth_token: {AUTH_TOKEN}",
        "    from: '+15005550006'",
        "  email: {provider: outbox, path: outbox.jsonl}",
        "web:",
        f"  public_url: {PUBLIC}",
        "  business_name: Acme Pharmacy",
    ]
    if help_text:
        lines.append(f"  help_text: '{help_text}'")
    if redis_url:
        lines.append(f"redis: {{url: '{redis_url}'}}")
    config = root / "config.yaml"
    config.write_text("\n".join(lines) + "\n")
    return config


@dataclass
class Web:
    """The running app: its base URL, engine App and state DB."""

    base: str
    app: App
    monkeypatch: pytest.MonkeyPatch
    sids: list[int] = field(default_factory=lambda: [0])

    @property
    def state(self) -> sa.Engine:
        return self.app.state

    def set_now(self, moment: datetime) -> None:
        self.monkeypatch.setenv("REMINDERS_NOW", moment.isoformat())

    # -- requests -------------------------------------------------------------------------

    def twilio(
        self,
        path: str,
        params: dict[str, str],
        *,
        sign: str | None = "public",
        token: str = AUTH_TOKEN,
        query: str = "",
        signed_query: str | None = None,
    ) -> requests.Response:
        """POST a form to a Twilio webhook, signed as Twilio would for the configured URL."""
        headers = {}
        signed = query if signed_query is None else signed_query
        if sign == "public":
            url = PUBLIC + path + (f"?{signed}" if signed else "")
            headers["X-Twilio-Signature"] = RequestValidator(token).compute_signature(url, params)
        elif sign == "bound":  # signed for the address the app is bound to: must be refused
            url = self.base + path + (f"?{signed}" if signed else "")
            headers["X-Twilio-Signature"] = RequestValidator(token).compute_signature(url, params)
        elif sign is not None:
            headers["X-Twilio-Signature"] = sign
        target = self.base + path + (f"?{query}" if query else "")
        return requests.post(target, data=params, headers=headers, timeout=30)

    def sid(self, prefix: str = "SM") -> str:
        self.sids[0] += 1
        return f"{prefix}{self.sids[0]:032x}"

    def inbound(self, body: str, number: str = PHONE, sid: str | None = None) -> requests.Response:
        params = {
            "From": number,
            "To": "+15005550006",
            "Body": body,
            "MessageSid": sid or self.sid(),
            "AccountSid": "AC00000000000000000000000000000000",
        }
        return self.twilio("/webhooks/twilio/inbound", params)

    def status(self, sid: str, state: str, code: str | None = None) -> requests.Response:
        params = {"MessageSid": sid, "MessageStatus": state}
        if code:
            params["ErrorCode"] = code
        return self.twilio("/webhooks/twilio/status", params)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.base + path, timeout=30, allow_redirects=False, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(self.base + path, timeout=30, allow_redirects=False, **kwargs)

    # -- state ----------------------------------------------------------------------------

    def add_reminder(
        self,
        *,
        rule: str = "refill-due",
        occurrence: str = "rx-1",
        offset: str = "-3d",
        customer_id: str = "7",
        send_at: datetime = NOW,
        status: str = lifecycle.PENDING,
        channel: str | None = None,
        channel_index: int = 0,
        data: dict[str, Any] | None = None,
    ) -> int:
        values = data or {
            "rx_id": occurrence,
            "drug_name": "Metformin",
            "runs_out_on": date(2027, 3, 17),
            "customer_id": customer_id,
            "phone": PHONE,
            "email": EMAIL,
            "timezone": "America/New_York",
            "first_name": "Jane",
        }
        with self.state.begin() as conn:
            rid = conn.execute(
                models.reminder.insert().returning(models.reminder.c.id),
                {
                    "rule": rule,
                    "occurrence": occurrence,
                    "offset": offset,
                    "customer_id": customer_id,
                    "planned_at": send_at,
                    "send_at": send_at,
                    "status": status,
                    "channel": channel,
                    "channel_index": channel_index,
                    "data": codec.dumps(values),
                    "row_hash": "0" * 32,
                    "created_at": NOW - timedelta(days=30),
                    "updated_at": NOW - timedelta(days=30),
                },
            ).scalar_one()
        return int(rid)

    def add_sent(
        self,
        *,
        to: str = PHONE,
        at: datetime = NOW - timedelta(hours=1),
        **kwargs: Any,
    ) -> tuple[int, str]:
        """A reminder sent by SMS at ``at`` (as the worker records it); returns (id, MessageSid)."""
        kwargs.setdefault("send_at", at)
        rid = self.add_reminder(status=lifecycle.SENT, channel="sms", **kwargs)
        sid = self.sid()
        with self.state.begin() as conn:
            conn.execute(
                models.reminder.update()
                .where(models.reminder.c.id == rid)
                .values(sent_at=at, provider_id=sid)
            )
            conn.execute(
                models.message.insert(),
                {
                    "reminder_id": rid,
                    "channel": "sms",
                    "to_address": to,
                    "provider_id": sid,
                    "status": lifecycle.SENT,
                    "created_at": at,
                    "updated_at": at,
                },
            )
        return rid, sid

    def add_sent_email(self, *, customer_id: str = "7", to: str = EMAIL) -> int:
        """A reminder of ``customer_id`` sent by email to ``to`` (as the worker records it)."""
        at = NOW - timedelta(hours=1)
        rid = self.add_reminder(
            occurrence=f"rx-{customer_id}-{to}",
            status=lifecycle.SENT,
            channel="email",
            customer_id=customer_id,
            send_at=at,
            data={"rx_id": 1, "customer_id": customer_id, "email": to, "first_name": "Jo"},
        )
        with self.state.begin() as conn:
            conn.execute(
                models.message.insert(),
                {
                    "reminder_id": rid,
                    "channel": "email",
                    "to_address": to,
                    "provider_id": f"<{rid}@example.com>",
                    "status": lifecycle.SENT,
                    "created_at": at,
                    "updated_at": at,
                },
            )
        return rid

    def reminder(self, rid: int) -> Any:
        with self.state.connect() as conn:
            return conn.execute(sa.select(models.reminder).where(models.reminder.c.id == rid)).one()

    def rows(self, table: sa.Table) -> list[Any]:
        with self.state.connect() as conn:
            return list(conn.execute(sa.select(table).order_by(table.c.id)))

    def events(self, rid: int) -> list[Any]:
        with self.state.connect() as conn:
            return list(
                conn.execute(
                    sa.select(models.event)
                    .where(models.event.c.reminder_id == rid)
                    .order_by(models.event.c.id)
                )
            )

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every table the endpoint can write, to assert that a request changed nothing."""
        tables = (
            models.reminder,
            models.event,
            models.message,
            models.optout,
            models.preference,
            models.inbound,
            models.consent_event,
        )
        return {t.name: [tuple(r) for r in self.rows(t)] for t in tables}


def serve(app: App, monkeypatch: pytest.MonkeyPatch) -> Iterator[Web]:
    """The production Flask app of ``app`` on a free loopback port, in a thread."""
    from reminders.web import create_app

    flask_app = create_app(app)
    try:
        with services.serving(flask_app) as port:
            yield Web(f"http://127.0.0.1:{port}", app, monkeypatch)
    finally:
        app.state.dispose()


@pytest.fixture
def web_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMINDERS_NOW", NOW.isoformat())
    monkeypatch.setenv(links.SECRET_ENV, SECRET)
    monkeypatch.delenv(links.PREVIOUS_SECRET_ENV, raising=False)


def _started(
    root: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, **options: Any
) -> Iterator[Web]:
    state_db.upgrade(state_url)
    yield from serve(App(write_config(root, state_url, **options)), monkeypatch)


@pytest.fixture(params=["sqlite", "postgresql"])
def web(
    request: pytest.FixtureRequest, tmp_path: Path, web_env: None, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Web]:
    """The web app on a SQLite state DB and on a PostgreSQL one."""
    if request.param == "sqlite":
        yield from _started(tmp_path, f"sqlite:///{tmp_path / 'state.db'}", monkeypatch)
        return
    with services.postgres_database() as url:
        yield from _started(tmp_path, url, monkeypatch)


@pytest.fixture
def sqlite_web(tmp_path: Path, web_env: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[Web]:
    yield from _started(tmp_path, f"sqlite:///{tmp_path / 'state.db'}", monkeypatch)


def pref_token(customer_id: str, now: datetime = NOW) -> str:
    return links.preferences_token(customer_id, keys=[SECRET], now=now)


def unsub_token(customer_id: str = "7", address: str = EMAIL, now: datetime = NOW) -> str:
    return links.unsubscribe_token(customer_id, "email", address, keys=[SECRET], now=now)


# --- the app itself ------------------------------------------------------------------------------


def test_a_missing_secret_stops_the_app_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reminders.errors import ConfigError
    from reminders.web import create_app

    monkeypatch.delenv(links.SECRET_ENV, raising=False)
    app = App(write_config(tmp_path, f"sqlite:///{tmp_path / 'state.db'}"))
    with pytest.raises(ConfigError, match="REMINDERS_SECRET is not set"):
        create_app(app)


def test_a_missing_public_url_stops_the_app_at_start(tmp_path: Path, web_env: None) -> None:
    from reminders.errors import ConfigError
    from reminders.web import create_app

    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'state.db'}")
    config.write_text(config.read_text().replace(f"  public_url: {PUBLIC}\n", ""))
    with pytest.raises(ConfigError, match=r"web\.public_url is not set"):
        create_app(App(config))


# --- Twilio signatures ---------------------------------------------------------------------------


def test_unsigned_and_badly_signed_webhooks_are_refused_and_change_nothing(web: Web) -> None:
    rid, sid = web.add_sent()
    before = web.snapshot()
    stop = {"From": PHONE, "To": "+15005550006", "Body": "STOP", "MessageSid": web.sid()}
    delivered = {"MessageSid": sid, "MessageStatus": "undelivered", "ErrorCode": "30005"}
    for path, params in (
        ("/webhooks/twilio/inbound", stop),
        ("/webhooks/twilio/status", delivered),
    ):
        assert web.twilio(path, params, sign=None).status_code == 403
        assert web.twilio(path, params, sign="").status_code == 403
        assert web.twilio(path, params, sign="bm90IGEgc2lnbmF0dXJl").status_code == 403
        assert web.twilio(path, params, token="another-accounts-token").status_code == 403
        # Behind a proxy the app's own address is not what Twilio signed.
        assert web.twilio(path, params, sign="bound").status_code == 403
        # A signature over other fields does not cover these.
        altered = (
            dict(params, From=OTHER_PHONE) if "From" in params else dict(params, ErrorCode="1")
        )
        headers = {
            "X-Twilio-Signature": RequestValidator(AUTH_TOKEN).compute_signature(
                PUBLIC + path, params
            )
        }
        forged = requests.post(web.base + path, data=altered, headers=headers, timeout=30)
        assert forged.status_code == 403
    assert web.snapshot() == before
    assert web.reminder(rid).status == lifecycle.SENT


def test_signature_covers_the_query_string(sqlite_web: Web) -> None:
    params = {"From": PHONE, "To": "+1", "Body": "HELP", "MessageSid": sqlite_web.sid()}
    path = "/webhooks/twilio/inbound"
    assert sqlite_web.twilio(path, params, query="site=3").status_code == 200
    params["MessageSid"] = sqlite_web.sid()
    refused = sqlite_web.twilio(path, params, query="site=3", signed_query="")
    assert refused.status_code == 403


def test_signed_requests_missing_fields_are_400_and_change_nothing(web: Web) -> None:
    before = web.snapshot()
    assert web.twilio("/webhooks/twilio/status", {"MessageSid": "SM1"}).status_code == 400
    assert web.twilio("/webhooks/twilio/inbound", {"From": PHONE, "Body": "STOP"}).status_code == (
        400
    )
    assert web.twilio("/webhooks/twilio/inbound", {}).status_code == 400
    assert web.snapshot() == before


def test_wrong_methods_are_405(sqlite_web: Web) -> None:
    for path in ("/webhooks/twilio/status", "/webhooks/twilio/inbound"):
        reply = sqlite_web.get(path)
        assert reply.status_code == 405
        assert "POST" in reply.headers["Allow"]
    assert sqlite_web.post("/healthz").status_code == 405
    assert sqlite_web.post(f"/preferences/{pref_token('7')}", data={}).status_code == 400
    assert (
        requests.delete(f"{sqlite_web.base}/unsubscribe/{unsub_token()}", timeout=30).status_code
        == 405
    )


# --- status callbacks ----------------------------------------------------------------------------


def test_delivered_is_recorded_once(web: Web) -> None:
    rid, sid = web.add_sent()
    assert web.status(sid, "sent").status_code == 204
    assert web.reminder(rid).status == lifecycle.SENT
    assert web.status(sid, "delivered").status_code == 204
    assert web.reminder(rid).status == lifecycle.DELIVERED
    (msg,) = web.rows(models.message)
    assert msg.status == "delivered"
    events = web.events(rid)
    assert [(e.from_status, e.to_status) for e in events] == [("sent", "delivered")]
    # Twilio retries, and intermediate reports arrive late: nothing changes again.
    for state in ("delivered", "sent", "undelivered"):
        assert (
            web.status(sid, state, "30005" if state == "undelivered" else None).status_code == 204
        )
    assert web.reminder(rid).status == lifecycle.DELIVERED
    assert len(web.events(rid)) == 1
    assert web.rows(models.optout) == []


def test_30005_suppresses_the_number_and_falls_back_to_email(web: Web) -> None:
    rid, sid = web.add_sent()
    other, other_sid = web.add_sent(occurrence="rx-2", customer_id="8", to=OTHER_PHONE)
    assert web.status(sid, "undelivered", "30005").status_code == 204
    row = web.reminder(rid)
    assert (row.status, row.channel, row.channel_index) == (lifecycle.PENDING, "email", 1)
    assert "30005" in row.reason and "trying email" in row.reason
    assert row.send_at == NOW - timedelta(hours=1)  # due at once; its grace is not extended
    (stopped,) = web.rows(models.optout)
    assert (stopped.channel, stopped.address, stopped.source, stopped.customer_id) == (
        "sms",
        PHONE,
        "30005",
        "7",
    )
    msg = next(m for m in web.rows(models.message) if m.provider_id == sid)
    assert (msg.status, msg.error_code) == ("undelivered", "30005")
    assert [(e.from_status, e.to_status) for e in web.events(rid)] == [("sent", "pending")]
    # the retry changes nothing; the other customer's reminder was never touched
    before = web.snapshot()
    assert web.status(sid, "undelivered", "30005").status_code == 204
    assert web.snapshot() == before
    assert web.reminder(other).status == lifecycle.SENT
    assert other_sid != sid


def test_30005_past_grace_is_undelivered_and_still_suppresses(web: Web) -> None:
    rid, sid = web.add_sent(at=NOW - timedelta(days=2))
    assert web.status(sid, "failed", "30006").status_code == 204
    row = web.reminder(rid)
    assert row.status == lifecycle.UNDELIVERED
    assert "30006" in row.reason
    assert [o.source for o in web.rows(models.optout)] == ["30006"]


def test_last_channel_undelivered_stays_undelivered(web: Web) -> None:
    rid, sid = web.add_sent(channel_index=1)  # nothing after it in [sms, email]
    assert web.status(sid, "undelivered", "30005").status_code == 204
    assert web.reminder(rid).status == lifecycle.UNDELIVERED


def test_other_error_codes_are_recorded_without_suppressing(web: Web) -> None:
    rid, sid = web.add_sent()
    assert web.status(sid, "undelivered", "30003").status_code == 204
    row = web.reminder(rid)
    assert row.status == lifecycle.UNDELIVERED
    assert "30003" in row.reason
    (msg,) = web.rows(models.message)
    assert (msg.status, msg.error_code) == ("undelivered", "30003")
    assert web.rows(models.optout) == []


def test_an_unknown_message_changes_nothing(web: Web) -> None:
    web.add_sent()
    before = web.snapshot()
    assert web.status("SM" + "f" * 32, "undelivered", "30005").status_code == 204
    assert web.snapshot() == before


# --- inbound SMS ---------------------------------------------------------------------------------


def test_stop_records_an_opt_out_and_answers_empty(web: Web) -> None:
    web.add_sent()
    sid = web.sid()
    reply = web.inbound(" stop ", sid=sid)
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("application/xml")
    assert "<Message>" not in reply.text and "<Response" in reply.text
    (stopped,) = web.rows(models.optout)
    assert (stopped.channel, stopped.address, stopped.source, stopped.customer_id) == (
        "sms",
        PHONE,
        "stop",
        "7",
    )
    (received,) = web.rows(models.inbound)
    assert (received.action, received.provider_id, received.from_address) == ("stop", sid, PHONE)
    # Twilio retries: the same MessageSid is handled once
    assert web.inbound(" stop ", sid=sid).status_code == 200
    assert len(web.rows(models.inbound)) == 1
    assert len(web.rows(models.optout)) == 1


@pytest.mark.parametrize("word", ["STOPALL", "Unsubscribe", "cancel", "END", "quit", "OptOut"])
def test_stop_synonyms(sqlite_web: Web, word: str) -> None:
    assert sqlite_web.inbound(word).status_code == 200
    assert [o.source for o in sqlite_web.rows(models.optout)] == ["stop"]


def test_start_restores(web: Web) -> None:
    web.inbound("STOP")
    assert len(web.rows(models.optout)) == 1
    reply = web.inbound("start")
    assert reply.status_code == 200 and "<Message>" not in reply.text
    assert web.rows(models.optout) == []
    web.inbound("STOP")
    web.inbound("UNSTOP")
    assert web.rows(models.optout) == []
    assert [r.action for r in web.rows(models.inbound)] == ["stop", "start", "stop", "start"]


def test_help_answers_the_business_help_text(web: Web) -> None:
    reply = web.inbound("help")
    assert reply.status_code == 200
    assert f"<Message>{HELP}</Message>" in reply.text
    assert "<Message>" in web.inbound("INFO").text
    assert web.rows(models.optout) == []


def test_help_without_a_help_text_answers_empty(
    tmp_path: Path, web_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for web in _started(tmp_path, f"sqlite:///{tmp_path / 's.db'}", monkeypatch, help_text=None):
        reply = web.inbound("HELP")
        assert reply.status_code == 200 and "<Message>" not in reply.text
        assert [r.action for r in web.rows(models.inbound)] == ["help"]


def test_done_cancels_the_occurrences_open_reminders(web: Web) -> None:
    sent, _ = web.add_sent(offset="-3d")
    later = web.add_reminder(offset="0d", send_at=NOW + timedelta(days=3))
    queued = web.add_reminder(
        offset="-1d", send_at=NOW + timedelta(days=2), status=lifecycle.QUEUED, channel="sms"
    )
    other = web.add_reminder(occurrence="rx-2", offset="0d", send_at=NOW + timedelta(days=3))
    sid = web.sid()
    reply = web.inbound("Done.", sid=sid)
    assert reply.status_code == 200
    assert "<Message>Thanks!" in reply.text
    for rid in (later, queued):
        row = web.reminder(rid)
        assert row.status == lifecycle.CANCELED
        assert row.reason == "done: replied DONE"
        assert [(e.from_status, e.to_status) for e in web.events(rid)][-1][1] == "canceled"
    assert web.reminder(other).status == lifecycle.PENDING
    assert web.reminder(sent).status == lifecycle.SENT
    (received,) = web.rows(models.inbound)
    assert (received.action, received.reminder_id) == ("done", sent)
    before = web.snapshot()
    assert "<Message>Thanks!" in web.inbound("Done.", sid=sid).text
    assert web.snapshot() == before


def test_snooze_moves_the_next_open_reminder_once(web: Web) -> None:
    web.add_sent(offset="-3d")
    nearest = web.add_reminder(offset="-1d", send_at=NOW + timedelta(days=2))
    farthest = web.add_reminder(offset="0d", send_at=NOW + timedelta(days=3))
    sid = web.sid()
    reply = web.inbound("later", sid=sid)
    assert reply.status_code == 200
    assert "<Message>OK, we'll remind you again in 1 day.</Message>" in reply.text.replace(
        "&#x27;", "'"
    ).replace("&apos;", "'")
    moved = web.reminder(nearest)
    assert moved.send_at == NOW + timedelta(days=3)
    assert moved.planned_at == NOW + timedelta(days=2)  # a rescan compares planned times
    assert moved.status == lifecycle.PENDING and moved.reason == "snoozed: replied LATER"
    assert web.reminder(farthest).send_at == NOW + timedelta(days=3)
    assert len(web.events(nearest)) == 1
    web.inbound("later", sid=sid)  # Twilio's retry
    assert web.reminder(nearest).send_at == NOW + timedelta(days=3)
    assert len(web.events(nearest)) == 1


def test_snooze_of_an_overdue_reminder_counts_from_now(sqlite_web: Web) -> None:
    sqlite_web.add_sent()
    due = sqlite_web.add_reminder(
        offset="0d", send_at=NOW - timedelta(minutes=5), status=lifecycle.QUEUED, channel="sms"
    )
    sqlite_web.inbound("LATER")
    row = sqlite_web.reminder(due)
    expected = (lifecycle.PENDING, NOW + timedelta(days=1), None)
    assert (row.status, row.send_at, row.job_id) == expected


def test_keywords_apply_to_the_most_recent_message_to_that_number(web: Web) -> None:
    web.add_sent(occurrence="rx-1", at=NOW - timedelta(days=2))
    web.add_sent(occurrence="rx-2", at=NOW - timedelta(hours=2))
    old = web.add_reminder(occurrence="rx-1", offset="0d", send_at=NOW + timedelta(days=1))
    recent = web.add_reminder(occurrence="rx-2", offset="0d", send_at=NOW + timedelta(days=1))
    someone_else = web.add_reminder(
        occurrence="rx-3", offset="0d", customer_id="8", send_at=NOW + timedelta(days=1)
    )
    web.add_sent(occurrence="rx-3", customer_id="8", to=OTHER_PHONE, at=NOW)
    web.inbound("DONE")
    assert web.reminder(recent).status == lifecycle.CANCELED
    assert web.reminder(old).status == lifecycle.PENDING
    assert web.reminder(someone_else).status == lifecycle.PENDING


def test_unknown_words_get_the_list_of_keywords(web: Web) -> None:
    web.add_sent()
    before = {t: v for t, v in web.snapshot().items() if t != "reminders_inbound"}
    reply = web.inbound("what is this?")
    assert reply.status_code == 200
    assert "Reply DONE or LATER, HELP for help, or STOP to opt out." in reply.text
    assert {t: v for t, v in web.snapshot().items() if t != "reminders_inbound"} == before
    assert [r.action for r in web.rows(models.inbound)] == ["unknown"]


def test_a_rule_keyword_from_a_number_never_texted_changes_nothing(web: Web) -> None:
    pending = web.add_reminder(send_at=NOW + timedelta(days=1))
    reply = web.inbound("DONE", number=OTHER_PHONE)
    assert reply.status_code == 200
    assert "Reply HELP for help, or STOP to opt out." in reply.text
    assert web.reminder(pending).status == lifecycle.PENDING


# --- unsubscribe ---------------------------------------------------------------------------------


def test_get_shows_a_confirming_page_and_changes_nothing(web: Web) -> None:
    web.add_sent_email()
    token = unsub_token()
    before = web.snapshot()
    reply = web.get(f"/unsubscribe/{token}")
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("text/html")
    assert '<form method="post">' in reply.text
    assert "j*******@example.com" in reply.text and EMAIL not in reply.text
    assert reply.headers["Cache-Control"] == "no-store"
    assert reply.headers["Referrer-Policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in reply.headers["Content-Security-Policy"]
    reply = requests.head(f"{web.base}/unsubscribe/{token}", timeout=30)
    assert reply.status_code == 200
    assert web.snapshot() == before


def test_one_click_post_suppresses_the_address(web: Web) -> None:
    web.add_sent_email(to="Jane.Doe@Example.com")  # as written in the business's row
    token = unsub_token(address="Jane.Doe@Example.com")
    reply = web.post(
        f"/unsubscribe/{token}",
        data="List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert reply.status_code == 200
    (stopped,) = web.rows(models.optout)
    assert (stopped.channel, stopped.address, stopped.source, stopped.customer_id) == (
        "email",
        EMAIL,
        "unsubscribe",
        "7",
    )
    assert stopped.reason == "one-click unsubscribe"
    # as multipart/form-data too (RFC 8058 allows either), and twice: still one record
    again = web.post(f"/unsubscribe/{token}", files={"List-Unsubscribe": (None, "One-Click")})
    assert again.status_code == 200
    assert len(web.rows(models.optout)) == 1
    # the page now says so
    assert "already unsubscribed" in web.get(f"/unsubscribe/{token}").text


def test_the_pages_button_unsubscribes_with_its_nonce(sqlite_web: Web) -> None:
    sqlite_web.add_sent_email()
    token = unsub_token()
    page = sqlite_web.get(f"/unsubscribe/{token}").text
    nonce = page.split('name="nonce" value="')[1].split('"')[0]
    assert sqlite_web.post(f"/unsubscribe/{token}", data={"nonce": "x" + nonce}).status_code == 403
    assert sqlite_web.post(f"/unsubscribe/{token}", data={}).status_code == 400
    assert sqlite_web.rows(models.optout) == []
    reply = sqlite_web.post(f"/unsubscribe/{token}", data={"nonce": nonce})
    assert reply.status_code == 200
    assert "You are unsubscribed" in reply.text
    assert [o.reason for o in sqlite_web.rows(models.optout)] == ["unsubscribe page"]


# An unsubscribe link made before links carried no address (["7","email","jane.doe@example.com"]
# signed with SECRET on 2027-02-28): such links are honoured until they expire.
OLD_STYLE_TOKEN = "WyI3IiwiZW1haWwiLCJqYW5lLmRvZUBleGFtcGxlLmNvbSJd.a4Q2cA.ECCvCKyQ7d7jRqV6srVwHA"
OLD_STYLE_EXPIRED = "WyI3IiwiZW1haWwiLCJqYW5lLmRvZUBleGFtcGxlLmNvbSJd.axls8A.cpBNP0ia6KtjSxEQCjDaBA"


def test_a_link_carries_no_address_and_the_server_finds_it(web: Web) -> None:
    web.add_sent_email()
    token = unsub_token()
    payload = base64.urlsafe_b64decode(token.split(".")[0] + "==").decode()
    assert "jane" not in payload.lower() and "example" not in payload
    reply = web.post(f"/unsubscribe/{token}", data={"List-Unsubscribe": "One-Click"})
    assert reply.status_code == 200
    (stopped,) = web.rows(models.optout)
    assert (stopped.address, stopped.customer_id) == (EMAIL, "7")


def test_an_address_found_only_on_the_customers_reminder_rows(web: Web) -> None:
    # The worker died after sending, before recording the message: the row still has the address.
    web.add_reminder(status=lifecycle.SENDING, channel="email")
    reply = web.post(f"/unsubscribe/{unsub_token()}", data={"List-Unsubscribe": "One-Click"})
    assert reply.status_code == 200
    assert [o.address for o in web.rows(models.optout)] == [EMAIL]


def test_a_link_for_an_address_the_customer_was_never_sent_changes_nothing(web: Web) -> None:
    web.add_sent_email(customer_id="7", to=EMAIL)
    web.add_sent_email(customer_id="8", to="other@example.com")
    before = web.snapshot()
    one_click = {"List-Unsubscribe": "One-Click"}
    # another customer's address under customer 7, and customer 7's address under customer 8
    for token in (unsub_token("7", "other@example.com"), unsub_token("8", EMAIL)):
        assert web.post(f"/unsubscribe/{token}", data=one_click).status_code == 404
        assert web.get(f"/unsubscribe/{token}").status_code == 404
    assert web.snapshot() == before


def test_links_made_before_tags_still_unsubscribe_until_they_expire(web: Web) -> None:
    before = web.snapshot()
    expired = web.post(f"/unsubscribe/{OLD_STYLE_EXPIRED}", data={"List-Unsubscribe": "One-Click"})
    assert expired.status_code == 403
    assert web.snapshot() == before
    assert "j*******@example.com" in web.get(f"/unsubscribe/{OLD_STYLE_TOKEN}").text
    reply = web.post(f"/unsubscribe/{OLD_STYLE_TOKEN}", data={"List-Unsubscribe": "One-Click"})
    assert reply.status_code == 200
    assert [(o.address, o.customer_id) for o in web.rows(models.optout)] == [(EMAIL, "7")]


@pytest.mark.parametrize(
    "token",
    [
        "forged",
        links.unsubscribe_token("7", "email", EMAIL, keys=["another-secret-0123456789"], now=NOW),
        unsub_token()[:-3] + "AAA",
        unsub_token().replace(".", "", 1),
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "x" * 3000,
    ],
)
def test_forged_tokens_are_refused_and_change_nothing(web: Web, token: str) -> None:
    before = web.snapshot()
    one_click = {"List-Unsubscribe": "One-Click"}
    assert web.post(f"/unsubscribe/{token}", data=one_click).status_code == 404
    assert web.get(f"/unsubscribe/{token}").status_code == 404
    assert web.get(f"/preferences/{token}").status_code == 404
    assert web.post(f"/preferences/{token}", data={"nonce": "x", "on": "*:*"}).status_code == 404
    assert web.snapshot() == before


def test_a_link_of_one_kind_does_not_open_the_other(web: Web) -> None:
    before = web.snapshot()
    prefs, unsub = pref_token("7"), unsub_token()
    assert web.post(
        f"/unsubscribe/{prefs}", data={"List-Unsubscribe": "One-Click"}
    ).status_code == (404)
    assert web.get(f"/preferences/{unsub}").status_code == 404
    assert web.snapshot() == before


def test_expired_tokens_are_refused_and_change_nothing(web: Web) -> None:
    web.add_sent_email()
    old = NOW - timedelta(days=91)
    unsub, prefs = unsub_token(now=old), pref_token("7", now=old)
    before = web.snapshot()
    reply = web.post(f"/unsubscribe/{unsub}", data={"List-Unsubscribe": "One-Click"})
    assert reply.status_code == 403
    assert "expired" in reply.text
    assert web.get(f"/preferences/{prefs}").status_code == 403
    assert web.post(f"/preferences/{prefs}", data={"nonce": "x"}).status_code == 403
    assert web.snapshot() == before
    # 89 days old still works: unsubscribe requests arrive late
    recent = unsub_token(now=NOW - timedelta(days=89))
    ok = web.post(f"/unsubscribe/{recent}", data={"List-Unsubscribe": "One-Click"})
    assert ok.status_code == 200


# --- preferences ---------------------------------------------------------------------------------


def test_preferences_show_only_the_customers_own_reminders(web: Web) -> None:
    web.add_reminder(customer_id="7", send_at=datetime(2027, 3, 14, 14, 0, tzinfo=UTC))
    web.add_reminder(
        rule="renewal",
        occurrence="m-8",
        customer_id="8",
        send_at=datetime(2027, 4, 1, 14, 0, tzinfo=UTC),
        data={"member_id": "m-8", "email": "bob@example.com", "customer_id": "8"},
    )
    reply = web.get(f"/preferences/{pref_token('7')}")
    assert reply.status_code == 200
    page = reply.text
    # The card says what it is about (the rule's label over the row); the on/off section uses
    # the rule's plain name; the description, written for staff, is never shown.
    assert "<strong>Refill of Metformin, runs out Mar 17</strong>" in page
    assert "<legend>Refill due</legend>" in page
    assert "Text patients" not in page
    assert "Sunday, March 14, 2027" in page and "10:00" in page  # New York time
    assert "America/New_York" in page
    assert "By text message" in page
    assert "renewal" not in page.lower() and "bob@" not in page and "April" not in page
    assert 'value="refill-due:sms" checked' in page and 'value="refill-due:email" checked' in page
    other = web.get(f"/preferences/{pref_token('8')}").text
    assert "<strong>Renewal</strong>" in other and "<legend>Renewal</legend>" in other
    assert "refill" not in other.lower() and "Email members" not in other


def test_saving_preferences_writes_only_the_tokens_customer(web: Web) -> None:
    web.add_reminder(customer_id="7")
    web.add_reminder(occurrence="rx-9", customer_id="9")
    mine, theirs = pref_token("7"), pref_token("9")
    page = web.get(f"/preferences/{mine}").text
    nonce = page.split('name="nonce" value="')[1].split('"')[0]
    before = web.snapshot()
    # another customer's page with my nonce: refused
    stolen = {"nonce": nonce, "on": ["refill-due:email"]}
    assert web.post(f"/preferences/{theirs}", data=stolen).status_code == 403
    assert web.post(f"/preferences/{mine}", data={"on": "refill-due:email"}).status_code == 400
    assert web.snapshot() == before
    # switches for rules this customer does not hear from, or made up, are ignored
    form = {"nonce": nonce, "on": ["refill-due:email", "renewal:email", "*:*", "x:y"]}
    reply = web.post(f"/preferences/{mine}", data=form)
    assert reply.status_code == 303
    assert reply.headers["Location"].endswith(f"/preferences/{mine}?saved=1")
    saved = [(p.customer_id, p.rule, p.channel, p.enabled) for p in web.rows(models.preference)]
    assert saved == [("7", "refill-due", "sms", False)]
    page = web.get(f"/preferences/{mine}?saved=1").text
    assert "Your choices are saved" in page
    assert 'value="refill-due:sms">' in page and "By email" in page


def _nonce(page: str) -> str:
    return page.split('name="nonce" value="')[1].split('"')[0]


def _resume_ref(page: str) -> str:
    return page.split('name="resume" value="')[1].split('"')[0]


def test_after_a_one_click_unsubscribe_the_page_says_email_is_stopped_and_can_resume_it(
    web: Web,
) -> None:
    web.add_reminder(customer_id="7")
    mine = pref_token("7")
    one_click = {"List-Unsubscribe": "One-Click"}
    assert web.post(f"/unsubscribe/{unsub_token()}", data=one_click).status_code == 200
    page = web.get(f"/preferences/{mine}").text
    assert "<strong>Emails</strong> to j*******@example.com:" in page
    assert "You unsubscribed with the link in an email on March 10, 2027." in page
    assert "<strong>Text messages</strong> to +1******2671:" in page
    # The email switch is shown off and disabled, never ticked as if it worked.
    assert 'value="refill-due:email" disabled> Email <span class="note">(stopped' in page
    assert "Send me emails again" in page and "By text message" in page

    # Saving the switches does not lift the stop (and records no choice for the stopped channel).
    form = {"nonce": _nonce(page), "on": ["refill-due:sms", "refill-due:email"]}
    assert web.post(f"/preferences/{mine}", data=form).status_code == 303
    assert [r.channel for r in web.rows(models.optout)] == ["email"]
    assert web.rows(models.preference) == []

    # The resume button lifts it, recorded as an opt-in from the preferences page.
    resume = {"nonce": _nonce(page), "resume": _resume_ref(page)}
    reply = web.post(f"/preferences/{mine}", data=resume)
    assert reply.status_code == 303
    assert reply.headers["Location"].endswith(f"/preferences/{mine}?resumed=email")
    assert web.rows(models.optout) == []
    history = [
        (e.channel, e.address, e.customer_id, e.action, e.source, e.reason)
        for e in web.rows(models.consent_event)
    ]
    assert history == [
        ("email", EMAIL, "7", "opt_out", "unsubscribe", "one-click unsubscribe"),
        ("email", EMAIL, "7", "opt_in", "preferences", "preferences page"),
    ]
    page = web.get(f"/preferences/{mine}?resumed=email").text
    assert "Emails are back on." in page
    assert 'value="refill-due:email" checked' in page and "You unsubscribed" not in page


def test_a_stop_reply_is_shown_with_start_as_the_way_back_and_the_page_cannot_lift_it(
    web: Web,
) -> None:
    web.add_reminder(customer_id="7")
    assert web.inbound("STOP").status_code == 200
    mine = pref_token("7")
    page = web.get(f"/preferences/{mine}").text
    assert "You replied STOP to a text message on March 10, 2027." in page
    assert "reply START to any of our texts" in page
    assert 'name="resume"' not in page  # only a START from the phone lifts a STOP
    before = web.snapshot()
    ref = "sms:" + page.split("sms:")[0][-1:]  # anything: no stopped SMS address is resumable
    forged = {"nonce": _nonce(page), "resume": ref}
    assert web.post(f"/preferences/{mine}", data=forged).status_code == 400
    assert web.snapshot() == before


def test_a_page_cannot_resume_another_customers_address(web: Web) -> None:
    web.add_reminder(customer_id="7")
    web.add_reminder(
        occurrence="rx-9",
        customer_id="9",
        data={"rx_id": "rx-9", "customer_id": "9", "email": "bob@example.com"},
    )
    one_click = {"List-Unsubscribe": "One-Click"}
    bobs = links.unsubscribe_token("9", "email", "bob@example.com", keys=[SECRET], now=NOW)
    assert web.post(f"/unsubscribe/{bobs}", data=one_click).status_code == 200
    theirs = web.get(f"/preferences/{pref_token('9')}").text
    mine = web.get(f"/preferences/{pref_token('7')}").text
    before = web.snapshot()
    stolen = {"nonce": _nonce(mine), "resume": _resume_ref(theirs)}
    assert web.post(f"/preferences/{pref_token('7')}", data=stolen).status_code == 400
    assert web.snapshot() == before


# --- limits --------------------------------------------------------------------------------------


def test_huge_bodies_are_413_and_change_nothing(web: Web) -> None:
    web.add_sent_email()
    before = web.snapshot()
    huge = {"From": PHONE, "Body": "STOP", "MessageSid": web.sid(), "Pad": "x" * 100_000}
    assert web.twilio("/webhooks/twilio/inbound", huge).status_code == 413
    one_click = {"List-Unsubscribe": "One-Click", "Pad": "x" * 100_000}
    assert web.post(f"/unsubscribe/{unsub_token()}", data=one_click).status_code == 413
    assert web.get(f"/unsubscribe/{unsub_token()}", data="x" * 100_000).status_code == 413
    assert web.snapshot() == before


def test_a_json_body_on_a_webhook_is_refused(sqlite_web: Web) -> None:
    path = "/webhooks/twilio/inbound"
    signature = RequestValidator(AUTH_TOKEN).compute_signature(PUBLIC + path, {})
    reply = requests.post(
        sqlite_web.base + path,
        json={"From": PHONE, "Body": "STOP", "MessageSid": "SM1"},
        headers={"X-Twilio-Signature": signature},
        timeout=30,
    )
    assert reply.status_code == 400  # the signature covers no fields; the fields are missing
    assert sqlite_web.rows(models.optout) == []


def test_health_reports_what_failed(
    tmp_path: Path, web_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis_url = services.redis_url(REDIS_DB)  # only pinged: nothing is written to it
    dead = f"redis://127.0.0.1:{services.free_port()}/0"
    for web in _started(tmp_path, f"sqlite:///{tmp_path / 's.db'}", monkeypatch, redis_url=dead):
        reply = web.get("/healthz")
        assert reply.status_code == 503
        assert reply.json() == {
            "status": "unhealthy",
            "state_db": "ok",
            "redis": "unreachable",
            "oldest_due_unsent_seconds": 0.0,
        }
    alive = tmp_path / "alive"
    alive.mkdir()
    for web in _started(alive, f"sqlite:///{alive / 's.db'}", monkeypatch, redis_url=redis_url):
        reply = web.get("/healthz")
        assert reply.status_code == 200
        assert reply.json() == {
            "status": "ok",
            "state_db": "ok",
            "redis": "ok",
            "oldest_due_unsent_seconds": 0.0,
        }
        # the state DB going away (a PostgreSQL that does not answer) is a 503 too
        dead_db = f"postgresql+psycopg://postgres@127.0.0.1:{services.free_port()}/x"
        monkeypatch.setitem(web.app.__dict__, "state", state_db.create_engine(dead_db))
        reply = web.get("/healthz")
        assert reply.status_code == 503
        assert reply.json() == {"status": "unhealthy", "state_db": "unreachable", "redis": "ok"}


# --- retries racing each other ------------------------------------------------------------------


def test_the_same_webhook_arriving_many_times_at_once_acts_once(web: Web) -> None:
    from concurrent.futures import ThreadPoolExecutor

    rid, sid = web.add_sent()
    later = web.add_reminder(offset="0d", send_at=NOW + timedelta(days=3))
    done_sid = web.sid()
    with ThreadPoolExecutor(8) as pool:
        dones = list(pool.map(lambda _: web.inbound("DONE", sid=done_sid), range(8)))
        statuses = list(pool.map(lambda _: web.status(sid, "undelivered", "30005"), range(8)))
    assert {r.status_code for r in dones} == {200}
    assert all("<Message>Thanks!" in r.text for r in dones)
    assert {r.status_code for r in statuses} == {204}
    assert len(web.rows(models.inbound)) == 1
    assert [e.to_status for e in web.events(later)] == ["canceled"]
    assert [e.to_status for e in web.events(rid)] == ["pending"]
    assert len(web.rows(models.optout)) == 1
