"""Real servers for the channel tests: Prism (Twilio's spec), the Twilio stub, an SMTP server.

Import the fixtures into a test module (``from tests.channel_fixtures import smtp_server``).

- ``prism_url`` (session): Stoplight Prism serving ``tests/twilio-oai/twilio_api_v2010.json``, from
  ``tests/node_modules`` (``npm ci --prefix tests``); skipped locally, failed in CI, when missing.
- ``twilio_stub``: :class:`tests.twilio_stub.TwilioStub`, for the error answers the spec lacks.
- ``smtp_server``: an aiosmtpd server on a free port whose :class:`Mailbox` records every message
  and can be told to refuse, defer or drop.
- ``tls_files`` (session): a self-signed certificate for 127.0.0.1 (made with ``openssl``), and
  ``smtp_tls_server`` / ``smtp_ssl_server`` using it (STARTTLS and implicit TLS).
"""

from __future__ import annotations

import asyncio
import email
import shutil
import ssl
import subprocess
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests import services
from tests.twilio_stub import TwilioStub

TESTS = Path(__file__).resolve().parent
PRISM = TESTS / "node_modules" / ".bin" / "prism"
TWILIO_SPEC = TESTS / "twilio-oai" / "twilio_api_v2010.json"

SMTP_USER, SMTP_PASSWORD = "reminders", "s3cret"


# -- Prism ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def prism_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of Prism mocking Twilio's API v2010 from Twilio's own OpenAPI spec."""
    if not PRISM.exists():
        services.unavailable("Prism is not installed: run npm ci --prefix tests")
    if shutil.which("node") is None:
        services.unavailable("Prism needs Node.js, which is not on PATH")
    port = services.free_port()
    log_path = tmp_path_factory.mktemp("prism") / "prism.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(PRISM), "mock", "-p", str(port), "-h", "127.0.0.1", str(TWILIO_SPEC)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=TESTS,
        )
    try:
        deadline = time.monotonic() + 90  # the spec is large: Prism takes a few seconds
        while not services.port_open("127.0.0.1", port, timeout=0.2):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                pytest.fail(f"Prism did not start (exit {process.poll()}):\n{tail}", pytrace=False)
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the Twilio stub ----------------------------------------------------------------------------


@pytest.fixture
def twilio_stub() -> Iterator[TwilioStub]:
    with TwilioStub() as stub:
        yield stub


# -- SMTP ---------------------------------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    raw: bytes


@dataclass
class Mailbox:
    """An aiosmtpd handler that records what it accepts and answers as told.

    ``rcpt_replies[address]`` queues replies to ``RCPT TO`` for that address (consumed in order,
    then accepted); ``always_refuse[address]`` is the reply every time. ``drop_every`` > 0: the
    server ends a connection at the ``MAIL FROM`` after that many messages on it, with a 421
    answer, or silently when ``drop_silently``.
    """

    messages: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, deque[str]] = field(default_factory=dict)
    always_refuse: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    drop_every: int = 0
    drop_silently: bool = False
    connections: int = 0
    # Seconds to hold the answer to DATA after the message was recorded (a client's read times
    # out: the outcome is unknown to it).
    data_delay: float = 0.0

    def defer(self, address: str, *replies: str) -> None:
        self.rcpt_replies.setdefault(address, deque()).extend(replies)

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        if not getattr(session, "counted", False):
            session.counted = True  # type: ignore[attr-defined]
            session.delivered = 0  # type: ignore[attr-defined]
            self.connections += 1
        session.host_name = hostname
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.drop_every and getattr(session, "delivered", 0) >= self.drop_every:
            transport = server.transport
            assert transport is not None
            if self.drop_silently:
                transport.close()
                return "250 OK"  # never reaches the client: the connection is closed
            server.loop.call_soon(transport.close)  # after the 421 has been written
            return "421 4.7.0 Too many messages on this connection, closing"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address in self.always_refuse:
            return self.always_refuse[address]
        queued = self.rcpt_replies.get(address)
        if queued:
            return queued.popleft()
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_reply is not None:
            return self.data_reply
        raw = bytes(envelope.original_content or b"")
        message = email.message_from_bytes(raw, policy=default_policy)
        assert isinstance(message, EmailMessage)
        assert envelope.mail_from is not None
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos), message, raw))
        session.delivered = getattr(session, "delivered", 0) + 1  # type: ignore[attr-defined]
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        return "250 2.0.0 Message accepted for delivery"


@dataclass
class SmtpServer:
    host: str
    port: int
    mailbox: Mailbox
    username: str = SMTP_USER  # the login the server accepts
    password: str = SMTP_PASSWORD


def _start(mailbox: Mailbox, **kwargs: Any) -> tuple[Controller, SmtpServer]:
    port = services.free_port()
    controller = Controller(
        mailbox, hostname="127.0.0.1", port=port, server_hostname="mail.test", **kwargs
    )
    controller.start()
    return controller, SmtpServer("127.0.0.1", port, mailbox)


def _authenticate(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        SMTP_USER.encode(),
        SMTP_PASSWORD.encode(),
    )
    return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    """A plain SMTP server (AUTH offered without TLS, for the login tests)."""
    controller, server = _start(Mailbox(), authenticator=_authenticate, auth_require_tls=False)
    try:
        yield server
    finally:
        controller.stop()


@dataclass
class TlsFiles:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A self-signed certificate for 127.0.0.1 and localhost, made with the openssl tool."""
    if shutil.which("openssl") is None:
        services.unavailable("openssl is not installed: it makes the TLS tests' certificate")
    folder = tmp_path_factory.mktemp("tls")
    files = TlsFiles(folder / "cert.pem", folder / "key.pem")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(files.key), "-out", str(files.cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return files


@pytest.fixture
def trust_test_ca(tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``ssl.create_default_context()`` trust the test certificate (and only it)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.cert))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


@pytest.fixture
def smtp_tls_server(tls_files: TlsFiles) -> Iterator[SmtpServer]:
    """An SMTP server that requires STARTTLS and AUTH after it."""
    controller, server = _start(
        Mailbox(),
        tls_context=tls_files.server_context(),
        require_starttls=True,
        authenticator=_authenticate,
    )
    try:
        yield server
    finally:
        controller.stop()


@pytest.fixture
def smtp_ssl_server(tls_files: TlsFiles) -> Iterator[SmtpServer]:
    """An SMTP server speaking TLS from the first byte (port 465 style)."""
    controller, server = _start(
        Mailbox(), ssl_context=tls_files.server_context(), authenticator=_authenticate
    )
    try:
        yield server
    finally:
        controller.stop()
