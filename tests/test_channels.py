"""Channels against real servers: Prism (Twilio's spec), the Twilio stub, aiosmtpd, files."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.header import decode_header, make_header
from email.utils import parseaddr
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reminders.channels import (
    PROVIDERS,
    Channel,
    Message,
    OutboxChannel,
    SmtpChannel,
    TwilioChannel,
)
from reminders.channels.base import body_digest
from reminders.channels.smtp import wire_bytes
from reminders.channels.twilio import CLOCK_SKEW, Found, LookupFailed
from reminders.compose import open_channel
from reminders.config import load_config
from reminders.errors import (
    AmbiguousError,
    ChannelError,
    ConfigError,
    PermanentError,
    TransientError,
)
from tests import services
from tests.twilio_stub import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    BAD_GATEWAY_HTML,
    QUEUE_OVERFLOW,
    SERVER_ERROR,
    TOO_MANY_REQUESTS,
    UNAUTHORIZED,
    TwilioStub,
)

if TYPE_CHECKING:
    from reminders.config import Config, EmailConfig, SmsConfig
    from tests.channel_fixtures import SmtpServer

# prism_url, twilio_stub, smtp_server, smtp_tls_server, smtp_ssl_server, trust_test_ca

ROOT = Path(__file__).resolve().parent.parent
FROM = "+15005550006"
OK_NUMBER = "+14155550100"


def sms(to: str = OK_NUMBER, reminder_id: int = 1, **extra: str) -> Message:
    return Message(
        reminder_id=reminder_id,
        rule="refill-due",
        channel="sms",
        to=to,
        body="Your Lisinopril runs out Friday. Reply DONE if refilled.",
        **extra,
    )


def mail(to: str = "jane@example.com", reminder_id: int = 1, **extra: str | None) -> Message:
    fields: dict[str, str | None] = {
        "subject": "Your refill is due",
        "body": "Hello Jane,\nyour Lisinopril runs out on Friday.\n",
    }
    fields.update(extra)
    return Message(reminder_id=reminder_id, rule="refill-due", channel="email", to=to, **fields)  # type: ignore[arg-type]


def test_registry() -> None:
    assert dict(PROVIDERS) == {
        "twilio": TwilioChannel,
        "smtp": SmtpChannel,
        "outbox": OutboxChannel,
    }
    assert all(issubclass(cls, Channel) for cls in PROVIDERS.values())


@pytest.mark.parametrize(
    ("channels", "sms_provider", "email_provider"),
    [
        (
            "channels:\n  sms:\n    provider: twilio\n    account_sid: AC1\n"
            "    auth_token: secret\n    from: '+15005550006'\n"
            "  email:\n    provider: smtp\n    from: Shop <care@example.com>\n    port: 2525\n",
            "twilio",
            "smtp",
        ),
        (
            "channels:\n  sms:\n    provider: outbox\n  email:\n    provider: outbox\n"
            "    path: mail/outbox.jsonl\n",
            "outbox",
            "outbox",
        ),
    ],
)
def test_each_configured_channel_opens_its_registered_provider(
    tmp_path: Path, channels: str, sms_provider: str, email_provider: str
) -> None:
    (tmp_path / "config.yaml").write_text("source:\n  url: sqlite:///shop.db\n" + channels)
    config = load_config(tmp_path / "config.yaml", env={})
    sms_channel, email = open_channel(config, "sms"), open_channel(config, "email")
    try:
        assert type(sms_channel) is PROVIDERS[sms_provider] and sms_channel.name == "sms"
        assert type(email) is PROVIDERS[email_provider] and email.name == "email"
        if isinstance(email, SmtpChannel):
            assert (email.port, email.envelope_from) == (2525, "care@example.com")
        else:
            assert isinstance(email, OutboxChannel)
            assert email.path == tmp_path / "mail" / "outbox.jsonl"
    finally:
        sms_channel.close()
        email.close()


# -- the interface's default send_many -----------------------------------------------------------


class _Numbered(Channel):
    """A provider of the test's own: even reminder ids fail permanently."""

    name = "sms"

    @classmethod
    def from_config(cls, name: str, cfg: SmsConfig | EmailConfig, config: Config) -> _Numbered:
        return cls()

    def send(self, message: Message) -> str:
        if message.reminder_id == 99:
            raise RuntimeError("a bug, not a provider failure")
        if message.reminder_id % 2 == 0:
            raise PermanentError(f"refused {message.reminder_id}")
        return f"id-{message.reminder_id}"


def test_default_send_many_isolates_failures_in_order() -> None:
    results = _Numbered().send_many([sms(reminder_id=i) for i in (1, 2, 3, 4)])
    assert results[0] == "id-1" and results[2] == "id-3"
    assert [type(r) for r in results[1::2]] == [PermanentError, PermanentError]
    assert [str(r) for r in results[1::2]] == ["refused 2", "refused 4"]
    with pytest.raises(RuntimeError):  # a bug is not turned into a send result
        _Numbered().send_many([sms(reminder_id=1), sms(reminder_id=99)])


# -- Twilio against Twilio's own spec (Prism) ----------------------------------------------------


def test_twilio_send_against_twilio_spec(prism_url: str) -> None:
    with TwilioChannel(ACCOUNT_SID, AUTH_TOKEN, from_=FROM, api_url=prism_url) as channel:
        sid = channel.send(sms(status_callback="https://r.example.com/webhooks/twilio/status"))
    assert sid.startswith("SM") and len(sid) == 34


def test_twilio_messaging_service_against_twilio_spec(prism_url: str) -> None:
    channel = TwilioChannel(
        ACCOUNT_SID, AUTH_TOKEN, messaging_service_sid="MG" + "b" * 32, api_url=prism_url + "/"
    )
    results = channel.send_many([sms(reminder_id=i) for i in range(20)])
    channel.close()
    assert all(isinstance(r, str) and r.startswith("SM") for r in results)


def test_twilio_spec_validation_error_is_permanent(prism_url: str) -> None:
    # Prism checks requests against the spec: an account SID of the wrong shape is a 422.
    channel = TwilioChannel("not-an-account", AUTH_TOKEN, from_=FROM, api_url=prism_url)
    with pytest.raises(PermanentError) as caught:
        channel.send(sms())
    assert caught.value.code == "422" and "HTTP 422" in caught.value.message


# The list answer Twilio's spec gives as its example: two messages of 24 May 2019 17:44:46 UTC
# to +18182008801 through the messaging service MGaaaa..., "testing" the first (SMded05...).
SPEC_TO = "+18182008801"
SPEC_SERVICE = "MG" + "a" * 32
SPEC_CREATED = datetime(2019, 5, 24, 17, 44, 46, tzinfo=UTC)


def test_twilio_messages_list_against_twilio_spec(prism_url: str) -> None:
    """Reconciliation's request is one Twilio's spec accepts, and its answer is read right."""
    channel = TwilioChannel(
        ACCOUNT_SID, AUTH_TOKEN, messaging_service_sid=SPEC_SERVICE, api_url=prism_url
    )
    with channel:
        found = channel.lookup(SPEC_TO, body_digest("testing"), SPEC_CREATED)
        assert found == Found("SMded05904ccb347238880ca9264e8fe1c", "sent")
        # an attempt begun after the messages (beyond the clock skew): none of them is its own
        later = SPEC_CREATED + CLOCK_SKEW + timedelta(seconds=1)
        assert channel.lookup(SPEC_TO, body_digest("testing"), later) is None
        # a recorded SID or another text is not a match
        skip = frozenset({"SMded05904ccb347238880ca9264e8fe1c"})
        with pytest.raises(LookupFailed, match="more than 1000 messages"):
            # the mock answers the same page for every page: never older, never a match
            channel.lookup(SPEC_TO, body_digest("testing"), SPEC_CREATED, skip)


def test_twilio_messages_list_from_a_number_against_twilio_spec(prism_url: str) -> None:
    with TwilioChannel(ACCOUNT_SID, AUTH_TOKEN, from_=FROM, api_url=prism_url) as channel:
        # the example's messages are from another sender: not this channel's
        later = SPEC_CREATED + CLOCK_SKEW + timedelta(seconds=1)
        assert channel.lookup(SPEC_TO, body_digest("testing"), later) is None


def test_twilio_lookup_pages_newest_first_until_older_than_the_attempt(
    twilio_stub: TwilioStub,
) -> None:
    channel = stub_channel(twilio_stub)
    began = datetime.now(UTC)
    sids = [channel.send(sms()) for _ in range(3)]
    for i in range(120):  # more than two pages of other texts to the same number since
        channel.send(Message(i, "refill-due", "sms", OK_NUMBER, f"other {i}"))
    digest = body_digest(sms().body)
    found = channel.lookup(OK_NUMBER, digest, began)
    assert found is not None and found.sid == sids[-1] and found.status == "queued"
    assert twilio_stub.list_requests == 3  # PageSize 50, newest first: page 3 holds the match
    # SIDs already recorded for other reminders are passed over
    assert channel.lookup(OK_NUMBER, digest, began, frozenset(sids[1:])).sid == sids[0]  # type: ignore[union-attr]
    assert channel.lookup(OK_NUMBER, digest, began, frozenset(sids)) is None
    # another number, or a text that differs, is not a match
    assert channel.lookup("+14155550199", digest, began) is None
    assert channel.lookup(OK_NUMBER, body_digest("Your Lisinopril"), began) is None
    # every message is older than an attempt that began later (beyond the clock skew)
    assert channel.lookup(OK_NUMBER, digest, began + timedelta(minutes=5)) is None
    channel.close()


def test_twilio_lookup_failure_is_reported(twilio_stub: TwilioStub) -> None:
    channel = TwilioChannel(ACCOUNT_SID, "wrong", from_=FROM, api_url=twilio_stub.url)
    with pytest.raises(LookupFailed, match=r"Unable to fetch page.*HTTP 401.*20003"):
        channel.lookup(OK_NUMBER, "0" * 64, datetime.now(UTC))


# -- Twilio errors (the project's stub) ------------------------------------------------------------


def stub_channel(stub: TwilioStub, **kwargs: object) -> TwilioChannel:
    return TwilioChannel(ACCOUNT_SID, AUTH_TOKEN, from_=FROM, api_url=stub.url, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("to", "kind", "code", "opt_out", "words"),
    [
        ("+15005550001", PermanentError, "21211", False, "not a valid phone number"),
        ("+15005550003", PermanentError, "21408", False, "Permission to send an SMS"),
        ("+15005550004", PermanentError, "21610", True, "unsubscribed recipient"),
        ("+15005550009", PermanentError, "21614", False, "not a valid mobile number"),
    ],
)
def test_twilio_permanent_errors(
    twilio_stub: TwilioStub, to: str, kind: type[ChannelError], code: str, opt_out: bool, words: str
) -> None:
    with pytest.raises(kind) as caught:
        stub_channel(twilio_stub).send(sms(to=to))
    error = caught.value
    assert (error.permanent, error.code, error.opt_out) == (True, code, opt_out)
    assert f"Twilio {code} (HTTP 400)" in error.message and words in error.message
    assert to not in error.message  # the number is masked in the error text
    assert twilio_stub.accepted[to] == 0


@pytest.mark.parametrize(
    ("answer", "kind", "code", "words"),
    [
        (TOO_MANY_REQUESTS, TransientError, "20429", "Too Many Requests"),
        (UNAUTHORIZED, TransientError, "20003", "check the account SID"),
        # Twilio may have created the message: not retried blind (reconciled instead)
        (SERVER_ERROR, AmbiguousError, "20500", "may have been sent"),
        (BAD_GATEWAY_HTML, AmbiguousError, "502", "HTTP 502"),
    ],
)
def test_twilio_transient_and_ambiguous_errors_then_success(
    twilio_stub: TwilioStub, answer: object, kind: type[ChannelError], code: str, words: str
) -> None:
    twilio_stub.respond(OK_NUMBER, answer)  # type: ignore[arg-type]
    channel = stub_channel(twilio_stub)
    with pytest.raises(kind) as caught:
        channel.send(sms())
    assert caught.value.code == code and not caught.value.permanent
    assert words in caught.value.message
    assert channel.send(sms()).startswith("SM")  # retrying helps
    assert twilio_stub.received[OK_NUMBER] == 2 and twilio_stub.accepted[OK_NUMBER] == 1


def test_twilio_other_4xx_is_permanent(twilio_stub: TwilioStub) -> None:
    twilio_stub.respond(OK_NUMBER, QUEUE_OVERFLOW)
    with pytest.raises(PermanentError) as caught:
        stub_channel(twilio_stub).send(sms())
    assert caught.value.code == "21611"


def test_twilio_wrong_token_is_transient(twilio_stub: TwilioStub) -> None:
    channel = TwilioChannel(ACCOUNT_SID, "wrong", from_=FROM, api_url=twilio_stub.url)
    with pytest.raises(TransientError, match="check the account SID, auth token and api_url"):
        channel.send(sms())


def test_twilio_timeout_is_ambiguous() -> None:
    with TwilioStub(latency_ms=2000) as stub:
        channel = stub_channel(stub, timeout=0.3)
        started = time.monotonic()
        with pytest.raises(AmbiguousError, match=r"did not answer in time .*may have been sent"):
            channel.send(sms())
        assert time.monotonic() - started < 1.5


def test_twilio_unreachable_is_transient() -> None:
    channel = TwilioChannel(
        ACCOUNT_SID, AUTH_TOKEN, from_=FROM, api_url=f"http://127.0.0.1:{services.free_port()}"
    )
    with pytest.raises(TransientError, match=r"could not be reached sending to \+1\*+0100"):
        channel.send(sms())


def test_twilio_sends_the_fields(twilio_stub: TwilioStub) -> None:
    channel = stub_channel(twilio_stub, messaging_service_sid="MG" + "c" * 32)
    channel.send(sms(status_callback="https://r.example.com/webhooks/twilio/status"))
    [form] = twilio_stub.forms
    assert form == {
        "To": OK_NUMBER,
        "From": FROM,
        "MessagingServiceSid": "MG" + "c" * 32,
        "Body": sms().body,
        "StatusCallback": "https://r.example.com/webhooks/twilio/status",
    }


def test_twilio_ignores_edge_and_region_from_the_environment(
    twilio_stub: TwilioStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TWILIO_EDGE", "sydney")
    monkeypatch.setenv("TWILIO_REGION", "au1")
    assert stub_channel(twilio_stub).send(sms()).startswith("SM")


def test_twilio_send_many_mixed_results_in_order(twilio_stub: TwilioStub) -> None:
    twilio_stub.respond("+14155550102", TOO_MANY_REQUESTS)
    numbers = ["+14155550101", "+15005550001", "+14155550102", "+15005550004", "+14155550103"]
    results = stub_channel(twilio_stub).send_many(
        [sms(to=n, reminder_id=i) for i, n in enumerate(numbers)]
    )
    kinds = [type(r).__name__ if isinstance(r, ChannelError) else "sid" for r in results]
    assert kinds == ["sid", "PermanentError", "TransientError", "PermanentError", "sid"]
    assert isinstance(results[3], ChannelError) and results[3].opt_out


def test_twilio_send_many_keeps_requests_in_flight(caplog: pytest.LogCaptureFixture) -> None:
    """64 messages at 100 ms each: sequential would take 6.4 s; 32 in flight take ~0.2 s."""
    caplog.set_level(logging.WARNING, logger="urllib3")
    with TwilioStub(latency_ms=100) as stub:
        channel = stub_channel(stub, concurrency=32)
        started = time.monotonic()
        results = channel.send_many([sms(to=f"+1415555{i:04d}", reminder_id=i) for i in range(64)])
        elapsed = time.monotonic() - started
        channel.close()
    assert all(isinstance(r, str) for r in results)
    assert len(set(results)) == 64
    assert sum(stub.accepted.values()) == 64
    assert elapsed < 2.0, f"64 messages took {elapsed:.2f}s"
    assert 16 <= stub.max_in_flight <= 32
    # twilio sizes its pool for https:// only; ours covers the http:// mock too
    assert "Connection pool is full" not in caplog.text


def test_twilio_concurrency_is_shared_by_batches_sent_at_once() -> None:
    with TwilioStub(latency_ms=50) as stub:
        channel = stub_channel(stub, concurrency=4)
        batches = [[sms(to=f"+1415555{b}{i:03d}") for i in range(12)] for b in range(3)]
        threads = [threading.Thread(target=channel.send_many, args=(b,)) for b in batches]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sum(stub.accepted.values()) == 36
    assert stub.max_in_flight <= 4


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"account_sid": "", "auth_token": "t", "from_": FROM}, "account_sid and auth_token"),
        ({"account_sid": ACCOUNT_SID, "auth_token": "t"}, "messaging_service_sid"),
        (
            {"account_sid": ACCOUNT_SID, "auth_token": "t", "from_": FROM, "api_url": "localhost"},
            "http(s) URL",
        ),
        (
            {"account_sid": ACCOUNT_SID, "auth_token": "t", "from_": FROM, "concurrency": 0},
            "concurrency",
        ),
    ],
)
def test_twilio_configuration_errors(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        TwilioChannel(**kwargs)  # type: ignore[arg-type]
    assert words in str(caught.value)


# -- SMTP ------------------------------------------------------------------------------------------


def smtp_channel(server: SmtpServer, **kwargs: object) -> SmtpChannel:
    return SmtpChannel(server.host, server.port, "Acme Pharmacy <care@example.com>", **kwargs)  # type: ignore[arg-type]


def test_smtp_multipart_with_one_click_unsubscribe(smtp_server: SmtpServer) -> None:
    url = "https://reminders.example.com/unsubscribe/" + "t0k3n" * 30  # long: must not be folded
    message = mail(
        subject="Your refill is due — Friday",
        body="Hello Jane,\nyour Lisinopril runs out on Friday. Café ☕\n",
        html="<p>Hello Jane,</p><p>your Lisinopril runs out on <b>Friday</b>. Café ☕</p>",
        unsubscribe_url=url,
        unsubscribe_mailto="unsubscribe@example.com?subject=stop",
    )
    message_id = smtp_channel(smtp_server).send(message)

    [received] = smtp_server.mailbox.messages
    assert received.mail_from == "care@example.com"
    assert received.rcpt_tos == ["jane@example.com"]
    got = received.message
    assert got["Message-ID"] == message_id and message_id.endswith("@example.com>")
    assert got["From"] == "Acme Pharmacy <care@example.com>"
    assert got["To"] == "jane@example.com"
    assert got["Subject"] == "Your refill is due — Friday"
    sent_at = datetime.strptime(got["Date"], "%a, %d %b %Y %H:%M:%S %z")
    assert abs(sent_at - datetime.now(UTC)) < timedelta(minutes=1)
    assert got["List-Unsubscribe"] == f"<{url}>, <mailto:unsubscribe@example.com?subject=stop>"
    assert got["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert f"List-Unsubscribe: <{url}>".encode() in received.raw  # one unencoded line
    assert got.get_content_type() == "multipart/alternative"
    text = got.get_body(("plain",))
    html = got.get_body(("html",))
    assert text is not None and html is not None
    assert text.get_content().replace("\r\n", "\n") == message.body  # CRLF on the wire
    assert "<b>Friday</b>. Café ☕" in html.get_content()
    assert received.raw.isascii()  # quoted-printable: any server takes it


# RFC 2047 section 2: an encoded-word is at most 75 characters.
ENCODED_WORD = re.compile(rb"=\?[^?\s]+\?[BbQq]\?[^?\s]*\?=")


def test_smtp_non_ascii_subject_and_name_in_encoded_words_of_75_characters_at_most(
    smtp_server: SmtpServer,
) -> None:
    url = "https://reminders.example.com/unsubscribe/" + "t0k3n" * 30
    sender = "Pharmacie Générale de la Côte d’Azur — Service Clients <care@example.com>"
    subject = (
        "Votre ordonnance de Lisinopril arrive à échéance vendredi 12 mars — répondez « FAIT » "
        "ou « PLUS TARD » 😀 — Ελληνικά, русский, 日本語のテキストも少し"
    )
    channel = SmtpChannel(smtp_server.host, smtp_server.port, sender)
    channel.send(mail(subject=subject, unsubscribe_url=url))

    [received] = smtp_server.mailbox.messages
    head = received.raw.split(b"\r\n\r\n", 1)[0]
    words = ENCODED_WORD.findall(head)
    assert len(words) > 4  # the subject and the name, each in several words
    assert max(len(w) for w in words) <= 75, [w for w in words if len(w) > 75]
    lines = head.split(b"\r\n")
    assert all(len(line) <= 78 for line in lines if not line.startswith(b"List-Unsubscribe:"))
    assert f"List-Unsubscribe: <{url}>".encode() in lines  # one line, not encoded
    assert received.message["Subject"] == subject
    assert received.message["List-Unsubscribe"] == f"<{url}>"
    # email.header decodes as RFC 2047 section 6.2 says (the space between two encoded-words is
    # not text); Python's newer parser puts one back inside a display name.
    raw_from = message_from_bytes(received.raw, policy=policy.compat32)["From"]
    assert str(make_header(decode_header(raw_from))) == sender


@settings(max_examples=300, deadline=None)
@given(
    subject=st.lists(
        st.sampled_from([*"ab XY,.;:()'@=?_—«»’éçüßΔЖ中한😀🇫🇷👍🏽", "  ", "x" * 40]),
        min_size=1,
        max_size=120,
    ).map("".join),
    name=st.lists(st.sampled_from([*"ab XY.—éçüΔЖ中😀", "x" * 30]), min_size=1, max_size=60).map(
        "".join
    ),
)
def test_smtp_encoded_words_round_trip(subject: str, name: str) -> None:
    name = " ".join(name.split()) or "x"
    sender = f'"{name}" <care@example.com>'
    built = SmtpChannel("127.0.0.1", 25, sender).build(mail(subject=subject))
    raw = wire_bytes(built)
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert all(len(w) <= 75 for w in ENCODED_WORD.findall(head))
    for line in head.split(b"\r\n"):
        # At most 76, unless an ASCII word longer than a line has no place to fold (a 90-letter
        # display name): RFC 5322 then allows up to 998.
        unbreakable = not ENCODED_WORD.search(line) and max(map(len, line.split())) > 70
        assert len(line) <= 76 or (unbreakable and len(line) <= 998), line
    parsed = message_from_bytes(raw, policy=policy.compat32)
    assert str(make_header(decode_header(parsed["Subject"]))) == " ".join(subject.split())
    decoded = str(make_header(decode_header(parsed["From"])))
    if name.isascii():  # no encoded-words: as Python quotes and folds it
        assert parseaddr(decoded) == (name, "care@example.com")
    else:
        assert decoded == f"{name} <care@example.com>"


def test_smtp_plain_text_without_unsubscribe(smtp_server: SmtpServer) -> None:
    smtp_channel(smtp_server).send(mail())
    got = smtp_server.mailbox.messages[0].message
    assert got.get_content_type() == "text/plain"
    assert "List-Unsubscribe" not in got and "List-Unsubscribe-Post" not in got


def test_smtp_mailto_only_is_not_one_click(smtp_server: SmtpServer) -> None:
    smtp_channel(smtp_server).send(mail(unsubscribe_mailto="mailto:stop@example.com"))
    got = smtp_server.mailbox.messages[0].message
    assert got["List-Unsubscribe"] == "<mailto:stop@example.com>"
    assert "List-Unsubscribe-Post" not in got


def test_smtp_batch_uses_one_connection(smtp_server: SmtpServer) -> None:
    smtp_server.mailbox.always_refuse["gone@example.com"] = "550 5.1.1 No such user"
    addresses = ["a@example.com", "gone@example.com", "b@example.com", "c@example.com"]
    results = smtp_channel(smtp_server).send_many(
        [mail(to=a, reminder_id=i) for i, a in enumerate(addresses)]
    )
    assert isinstance(results[1], PermanentError) and results[1].code == "550"
    ids = [r for r in results if isinstance(r, str)]
    assert len(ids) == 3 and len(set(ids)) == 3
    assert [m.rcpt_tos for m in smtp_server.mailbox.messages] == [
        ["a@example.com"],
        ["b@example.com"],
        ["c@example.com"],
    ]
    assert smtp_server.mailbox.connections == 1


def test_smtp_deferred_then_accepted(smtp_server: SmtpServer) -> None:
    smtp_server.mailbox.defer("jane@example.com", "451 4.7.1 Greylisted, try again later")
    channel = smtp_channel(smtp_server)
    with pytest.raises(TransientError) as caught:
        channel.send(mail())
    assert caught.value.code == "451" and "Greylisted" in caught.value.message
    assert "j***@example.com" in caught.value.message
    assert channel.send(mail()).startswith("<")
    assert len(smtp_server.mailbox.messages) == 1


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        ("550 5.1.1 No such user here", "550"),
        ("551 5.1.6 User not local", "551"),
        ("552 5.2.2 Mailbox full", "552"),
        ("553 5.1.3 Mailbox name not allowed", "553"),
    ],
)
def test_smtp_refused_recipient_is_permanent(
    smtp_server: SmtpServer, reply: str, code: str
) -> None:
    smtp_server.mailbox.always_refuse["jane@example.com"] = reply
    with pytest.raises(PermanentError) as caught:
        smtp_channel(smtp_server).send(mail())
    assert caught.value.code == code and reply[4:] in caught.value.message


def test_smtp_refused_data_is_judged_by_code(smtp_server: SmtpServer) -> None:
    channel = smtp_channel(smtp_server)
    smtp_server.mailbox.data_reply = "554 5.7.1 Message rejected as spam"
    with pytest.raises(PermanentError, match="554"):
        channel.send(mail())
    smtp_server.mailbox.data_reply = "452 4.3.1 Insufficient system storage"
    with pytest.raises(TransientError, match="452"):
        channel.send(mail())


def test_smtp_server_down_is_transient_for_the_whole_batch() -> None:
    channel = SmtpChannel("127.0.0.1", services.free_port(), "care@example.com", timeout=2)
    started = time.monotonic()
    results = channel.send_many([mail(reminder_id=i) for i in range(3)])
    assert all(isinstance(r, TransientError) for r in results)
    assert "unreachable" in str(results[0])
    assert time.monotonic() - started < 2  # one refused connection, not one per message


@pytest.mark.parametrize("silently", [False, True])
def test_smtp_reconnects_when_the_server_drops_the_connection(
    smtp_server: SmtpServer, silently: bool
) -> None:
    smtp_server.mailbox.drop_every = 2
    smtp_server.mailbox.drop_silently = silently
    addresses = [f"p{i}@example.com" for i in range(5)]
    results = smtp_channel(smtp_server).send_many([mail(to=a) for a in addresses])
    assert all(isinstance(r, str) for r in results), results
    assert [m.rcpt_tos[0] for m in smtp_server.mailbox.messages] == addresses  # each once
    assert smtp_server.mailbox.connections == 3


def test_smtp_invalid_address_is_permanent_without_a_connection(smtp_server: SmtpServer) -> None:
    results = smtp_channel(smtp_server).send_many(
        [
            mail(to="not-an-address"),
            mail(to="a@b.example\r\nBcc: x@y"),
            mail(to=""),
            mail(to="jane\u200b@example.com"),
            mail(to="jane@example..com"),
        ]
    )
    assert all(isinstance(r, PermanentError) and r.code == "invalid_address" for r in results)
    assert "ZERO WIDTH SPACE" in str(results[3])
    assert smtp_server.mailbox.connections == 0


def test_smtp_sends_the_local_part_as_written_and_an_idn_domain_in_ascii(
    smtp_server: SmtpServer,
) -> None:
    channel = smtp_channel(smtp_server)
    channel.send(mail(to="Jane.Doe@Example.COM"))
    channel.send(mail(to="Jane@Exämple.com"))
    received = smtp_server.mailbox.messages
    assert [m.rcpt_tos for m in received] == [["Jane.Doe@example.com"], ["Jane@xn--exmple-cua.com"]]
    assert [m.message["To"] for m in received] == [
        "Jane.Doe@example.com",
        "Jane@xn--exmple-cua.com",
    ]


def test_smtp_login(smtp_server: SmtpServer) -> None:
    server = smtp_server
    channel = smtp_channel(server, username=server.username, password=server.password)
    assert channel.send(mail()).startswith("<")
    wrong = smtp_channel(server, username=server.username, password="wrong")
    with pytest.raises(TransientError, match=r"login failed .*check username and password"):
        wrong.send(mail())


@pytest.mark.usefixtures("trust_test_ca")
def test_smtp_starttls(smtp_tls_server: SmtpServer) -> None:
    channel = smtp_channel(
        smtp_tls_server,
        security="starttls",
        username=smtp_tls_server.username,
        password=smtp_tls_server.password,
    )
    assert channel.send(mail()).startswith("<")
    assert len(smtp_tls_server.mailbox.messages) == 1
    # the server requires STARTTLS: plain fails, and not as the recipient's fault
    with pytest.raises(TransientError):
        smtp_channel(smtp_tls_server).send(mail())


@pytest.mark.usefixtures("trust_test_ca")
def test_smtp_implicit_tls(smtp_ssl_server: SmtpServer) -> None:
    channel = smtp_channel(smtp_ssl_server, security="ssl")
    assert channel.send(mail()).startswith("<")
    assert len(smtp_ssl_server.mailbox.messages) == 1


def test_smtp_untrusted_certificate_is_refused(
    smtp_ssl_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", os.devnull)
    with pytest.raises(TransientError, match="TLS"):
        smtp_channel(smtp_ssl_server, security="ssl").send(mail())
    assert smtp_ssl_server.mailbox.messages == []


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"from_addr": "care"}, "channels.email.from"),
        ({"from_addr": "Shop <care\u200b@example.com>"}, "channels.email.from.*ZERO WIDTH SPACE"),
        ({"from_addr": "Shop <care@example..com>"}, "channels.email.from.*two periods"),
        ({"security": "tls"}, "none, starttls or ssl"),
        ({"username": "u"}, "both username and password"),
    ],
)
def test_smtp_configuration_errors(kwargs: dict[str, str], words: str) -> None:
    arguments: dict[str, object] = {"host": "127.0.0.1", "port": 25, "from_addr": "c@example.com"}
    with pytest.raises(ConfigError, match=words):
        SmtpChannel(**{**arguments, **kwargs})  # type: ignore[arg-type]


# -- outbox ----------------------------------------------------------------------------------------


def read_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_outbox_writes_one_object_a_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMINDERS_NOW", "2027-03-14T10:00:00-04:00")
    path = tmp_path / "out" / "outbox.jsonl"
    with OutboxChannel("email", path) as channel:
        first = channel.send(mail(subject="Due — Friday", body="Café\nline 2"))
        results = channel.send_many([sms(reminder_id=2), sms(reminder_id=3)])
    assert first.startswith("outbox-") and len({first, *results}) == 3
    assert read_lines(path) == [
        {
            "reminder_id": 1,
            "rule": "refill-due",
            "channel": "email",
            "to": "jane@example.com",
            "subject": "Due — Friday",
            "body": "Café\nline 2",
            "sent_at": "2027-03-14T14:00:00Z",
        },
        *(
            {
                "reminder_id": i,
                "rule": "refill-due",
                "channel": "sms",
                "to": OK_NUMBER,
                "subject": None,
                "body": sms().body,
                "sent_at": "2027-03-14T14:00:00Z",
            }
            for i in (2, 3)
        ),
    ]


def test_outbox_sent_at_is_the_current_utc_time(tmp_path: Path) -> None:
    channel = OutboxChannel("sms", tmp_path / "outbox.jsonl")
    channel.send(sms())
    channel.close()
    [line] = read_lines(tmp_path / "outbox.jsonl")
    sent_at = str(line["sent_at"])
    assert sent_at.endswith("Z")
    moment = datetime.fromisoformat(sent_at.replace("Z", "+00:00"))
    assert abs(moment - datetime.now(UTC)) < timedelta(minutes=1)


def test_outbox_unwritable_is_transient(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(TransientError, match="cannot append to the outbox"):
        OutboxChannel("sms", tmp_path / "a-file" / "outbox.jsonl").send(sms())


WRITER = textwrap.dedent(
    """
    import sys
    from reminders.channels import Message, OutboxChannel

    path, writer, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    channel = OutboxChannel("email", path)
    body = ("x" * 99 + "\\n") * 80  # 8 kB lines: more than PIPE_BUF, still one write() each
    batch = [
        Message(reminder_id=writer * 100000 + i, rule="r", channel="email", to="a@b.c", body=body)
        for i in range(count)
    ]
    for start in range(0, count, 50):
        channel.send_many(batch[start : start + 50])
    channel.close()
    """
)


def test_outbox_several_processes_and_threads_append_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(w), "400"], env=env)
        for w in range(1, 5)
    ]
    shared = OutboxChannel("sms", path)  # and threads of this process, on one channel
    threads = [
        threading.Thread(
            target=lambda t=t: shared.send_many([sms(reminder_id=t * 1000 + i) for i in range(200)])
        )
        for t in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    shared.close()
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0, 0]

    lines = read_lines(path)  # raises if any line is torn or interleaved
    ids = [line["reminder_id"] for line in lines]
    assert len(ids) == 4 * 400 + 4 * 200 == len(set(ids))
