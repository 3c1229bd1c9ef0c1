"""Email over SMTP: a plain-text part, an optional HTML alternative, one-click unsubscribe headers.

Errors are mapped in one place, :func:`smtp_error`. What the server says about a message (its
answer to MAIL FROM, RCPT TO or DATA) is judged by its reply code: 4xx is transient, 5xx permanent
(550, 551 and 553 on a recipient: the mailbox does not exist or is refused). Failures of the
connection itself (refused, timed out, dropped, TLS or login failing) are transient: they are not
about the recipient, and they pass once the server is back or ops fix its settings.

``send_many`` sends a batch over one connection. When the server dropped it (an idle timeout, a
per-connection limit, a 421 answer) before a message's data went out, the channel reconnects once
and sends that message again; a message whose data was already sent is never sent twice by this
code (the server may have accepted it): the connection lost or timed out once the DATA command
began is an ``AmbiguousError`` carrying the message's Message-ID (SMTP has no way to ask the
server afterwards; ops find it in the server's log). The connection is then closed, so a late
answer is never read as the next message's.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from datetime import UTC, datetime
from email import policy
from email.header import Header
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import EmailPolicy
from email.utils import format_datetime, make_msgid, parseaddr
from typing import TYPE_CHECKING, Any, Literal

from reminders import email_address
from reminders.channels.base import Channel, Message
from reminders.config import EmailConfig
from reminders.errors import (
    AmbiguousError,
    ChannelError,
    ConfigError,
    PermanentError,
    TransientError,
)
from reminders.phone import mask_email
from reminders.process_metrics import SEND_SECONDS, timed

if TYPE_CHECKING:
    from reminders.config import Config, SmsConfig

Security = Literal["none", "starttls", "ssl"]

# Non-ASCII text goes quoted-printable or base64, so any server takes it (no 8BITMIME needed).
_BUILD_POLICY = policy.SMTP.clone(cte_type="7bit")

# Headers Python must not fold: it would fold a long List-Unsubscribe URL into RFC 2047 encoded
# words, which mail providers do not decode back into a URL. RFC 5322's 998 is their limit.
_UNFOLDED = frozenset({"list-unsubscribe"})
# Non-ASCII text is written in RFC 2047 encoded-words of at most 75 characters (section 2; longer
# ones may be shown raw), lines of at most 76. Python's own folder keeps to the length but can
# drop the space between two words where it folds (CPython 3.11-3.13), so these headers are
# encoded with email.header, which carries each space inside an encoded-word.
_ENCODED_LINE = 76
_UNSTRUCTURED = frozenset({"subject"})
_ONE_ADDRESS = frozenset({"from", "to", "reply-to", "sender"})


def _encoded(name: str, value: Any, linesep: str) -> str | None:
    """``name: value`` folded, non-ASCII text in encoded-words of at most 75 characters; None
    when the header has no non-ASCII text to encode (the policy's folding is right for it)."""
    key = name.lower()
    text = str(value)
    if text.isascii():
        return None
    if key in _UNSTRUCTURED:
        return f"{name}: {_words(text, name, linesep)}{linesep}"
    addresses: tuple[Address, ...] = getattr(value, "addresses", ())
    if key in _ONE_ADDRESS and len(addresses) == 1 and addresses[0].addr_spec.isascii():
        words = _words(addresses[0].display_name, name, linesep)
        spec = f"<{addresses[0].addr_spec}>"
        lines = words.split(linesep)
        used = len(lines[-1]) + (len(name) + 2 if len(lines) == 1 else 0)
        gap = " " if used + 1 + len(spec) <= _ENCODED_LINE else f"{linesep} "
        return f"{name}: {words}{gap}{spec}{linesep}"
    return None


def _words(text: str, name: str, linesep: str) -> str:
    """``text`` as UTF-8 encoded-words, folded to lines of ``_ENCODED_LINE`` after ``name: ``."""
    return str(Header(text, "utf-8", _ENCODED_LINE, name).encode(linesep=linesep))


class _WirePolicy(EmailPolicy):
    """Keeps List-Unsubscribe on one line, and writes a non-ASCII subject or display name in
    encoded-words of at most 75 characters (see ``_encoded``); other headers fold as usual."""

    def fold(self, name: str, value: Any) -> str:
        if name.lower() in _UNFOLDED:
            return super(_WirePolicy, self.clone(max_line_length=998)).fold(name, value)
        return super().fold(name, value)

    def fold_binary(self, name: str, value: Any) -> bytes:
        if name.lower() in _UNFOLDED:
            return super(_WirePolicy, self.clone(max_line_length=998)).fold_binary(name, value)
        if not self.utf8:  # with SMTPUTF8, non-ASCII headers go as UTF-8, not encoded
            encoded = _encoded(name, value, self.linesep)
            if encoded is not None:
                return encoded.encode("ascii")
        return super().fold_binary(name, value)


_WIRE_POLICY = _WirePolicy(linesep="\r\n", max_line_length=_ENCODED_LINE)


def wire_bytes(mail: EmailMessage, utf8: bool = False) -> bytes:
    """``mail`` as it goes over SMTP: CRLF lines, headers folded as ``_WirePolicy`` does, and with
    ``utf8`` (the server took SMTPUTF8) non-ASCII headers in UTF-8 instead of encoded-words."""
    return mail.as_bytes(policy=_WIRE_POLICY.clone(utf8=utf8))


# Answers about this session, not the message: authentication or TLS required (530), a
# temporary (454) or final (535, 534, 538) authentication failure. Ops fix these; retry meanwhile.
SESSION_CODES = frozenset({454, 530, 534, 535, 538})


class _Dropped(Exception):
    """The server closed the connection before the message's data was sent: safe to resend."""


def smtp_error(exc: Exception, to: str = "") -> ChannelError:
    """Map an SMTP failure to a transient or permanent ``ChannelError`` (reply code in ``code``)."""
    who = f" for {mask_email(to)}" if to else ""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        code, reply = next(iter(exc.recipients.values()))
        return _by_code(code, reply, f"recipient refused{who}")
    if isinstance(exc, smtplib.SMTPSenderRefused):
        return _by_code(exc.smtp_code, exc.smtp_error, f"sender {exc.sender} refused{who}")
    if isinstance(exc, smtplib.SMTPDataError):
        return _by_code(exc.smtp_code, exc.smtp_error, f"message refused{who}")
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return TransientError(
            f"SMTP login failed ({exc.smtp_code} {_text(exc.smtp_error)}): check username and "
            "password",
            code=str(exc.smtp_code),
        )
    if isinstance(exc, smtplib.SMTPResponseException):
        # The greeting, EHLO or STARTTLS answered with an error: the server, not the recipient.
        return TransientError(
            f"SMTP server answered {exc.smtp_code} {_text(exc.smtp_error)}", code=str(exc.smtp_code)
        )
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return TransientError(f"SMTP server does not support what this channel needs: {exc}")
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return TransientError(f"TLS with the SMTP server failed: {exc}")
    if isinstance(exc, TimeoutError | socket.timeout):
        return TransientError(f"SMTP server did not answer in time{who}: {exc or 'timed out'}")
    if isinstance(exc, smtplib.SMTPException | OSError):
        return TransientError(f"SMTP server unreachable{who}: {exc}")
    raise TypeError(f"not an SMTP failure: {exc!r}") from exc


def _text(reply: bytes | str) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)


def _by_code(code: int, reply: bytes | str, what: str) -> ChannelError:
    text = f"SMTP {code} {_text(reply)}: {what}"
    if code in SESSION_CODES:
        return TransientError(f"{text} (check security, username and password)", code=str(code))
    if 400 <= code < 500:
        return TransientError(text, code=str(code))
    if code >= 500:
        return PermanentError(text, code=str(code))
    return TransientError(text, code=str(code))  # an unexpected reply (2xx/3xx where 250 was due)


def _reset(conn: smtplib.SMTP) -> None:
    """RSET after a refusal, so the connection serves the next message; a dead one is let go."""
    try:
        conn.rset()
    except (smtplib.SMTPException, OSError):
        conn.close()


class SmtpChannel(Channel):
    """Sends email through one SMTP server.

    ``security``: ``"none"`` (plain, e.g. a local relay), ``"starttls"`` (upgrade, usually port
    587) or ``"ssl"`` (implicit TLS, usually port 465); certificates are verified against the
    system's CA store. ``timeout`` is in seconds, for connecting and for each reply.
    """

    name = "email"

    def __init__(
        self,
        host: str,
        port: int,
        from_addr: str,
        username: str | None = None,
        password: str | None = None,
        security: Security = "none",
        timeout: float = 10.0,
    ) -> None:
        if security not in ("none", "starttls", "ssl"):
            raise ConfigError(
                f"channels.email.security must be none, starttls or ssl, not {security!r}"
            )
        envelope = parseaddr(from_addr)[1]
        try:
            envelope = email_address.wire_form(envelope)
        except PermanentError as exc:
            raise ConfigError(
                f"channels.email.from must be an address like 'Shop <care@example.com>', "
                f"not {from_addr!r} ({exc})"
            ) from None
        if bool(username) != bool(password):
            raise ConfigError("channels.email: set both username and password, or neither")
        self.host = host
        self.port = int(port)
        self.from_addr = from_addr
        self.envelope_from = envelope
        self.domain = envelope.rpartition("@")[2]
        self.username = username
        self.password = password
        self.security: Security = security
        self.timeout = timeout

    @classmethod
    def from_config(cls, name: str, cfg: SmsConfig | EmailConfig, config: Config) -> SmtpChannel:
        assert isinstance(cfg, EmailConfig) and cfg.from_  # the config requires from for smtp
        return cls(
            cfg.host,
            cfg.port,
            cfg.from_,
            username=cfg.username,
            password=cfg.password,
            security=cfg.security,
            timeout=cfg.timeout.total_seconds(),
        )

    # -- building ---------------------------------------------------------------------------

    def build(self, message: Message) -> EmailMessage:
        """The MIME message for ``message`` (raises ``PermanentError`` for an unusable address,
        saying why). Its ``To`` is the address the envelope uses too."""
        to = email_address.wire_form(message.to)
        mail = EmailMessage(policy=_BUILD_POLICY)
        mail["From"] = self.from_addr
        mail["To"] = to
        mail["Subject"] = " ".join((message.subject or "").split())
        # The wall clock, not the engine's: REMINDERS_NOW must not date a real email.
        mail["Date"] = format_datetime(datetime.now(UTC), usegmt=True)
        mail["Message-ID"] = make_msgid(domain=self.domain)
        links = []
        if message.unsubscribe_url:
            links.append(f"<{message.unsubscribe_url}>")
        if message.unsubscribe_mailto:
            mailto = message.unsubscribe_mailto
            links.append(f"<{mailto if mailto.startswith('mailto:') else 'mailto:' + mailto}>")
        if links:
            mail["List-Unsubscribe"] = ", ".join(links)
        if message.unsubscribe_url:
            # RFC 8058 one-click: the mailbox provider POSTs List-Unsubscribe=One-Click to the URL.
            mail["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        mail.set_content(message.body)
        if message.html:
            mail.add_alternative(message.html, subtype="html")
        return mail

    # -- the connection ---------------------------------------------------------------------

    def _connect(self) -> smtplib.SMTP:
        context = ssl.create_default_context()
        conn: smtplib.SMTP
        if self.security == "ssl":
            conn = smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout, context=context)
        else:
            conn = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        try:
            conn.ehlo()
            if self.security == "starttls":
                conn.starttls(context=context)
                conn.ehlo()
            if self.username and self.password:
                conn.login(self.username, self.password)
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _quit(conn: smtplib.SMTP) -> None:
        try:
            conn.quit()
        except (smtplib.SMTPException, OSError):
            conn.close()

    def _transmit(self, conn: smtplib.SMTP, mail: EmailMessage, to: str) -> None:
        """MAIL, RCPT, DATA for one message; raises ``_Dropped`` when resending is safe."""
        options: list[str] = []
        if not (to.isascii() and self.envelope_from.isascii()):
            if not conn.has_extn("smtputf8"):
                raise PermanentError(
                    f"the SMTP server cannot deliver to the non-ASCII address {mask_email(to)}",
                    code="invalid_address",
                )
            options = ["SMTPUTF8", "BODY=8BITMIME"]
        data = wire_bytes(mail, utf8=bool(options))
        try:
            code, reply = conn.mail(self.envelope_from, options)
            if code == 421:
                raise _Dropped(f"{code} {_text(reply)}")
            if code != 250:
                _reset(conn)
                raise smtplib.SMTPSenderRefused(code, reply, self.envelope_from)
            code, reply = conn.rcpt(to)
            if code == 421:
                raise _Dropped(f"{code} {_text(reply)}")
            if code not in (250, 251):
                _reset(conn)
                raise smtplib.SMTPRecipientsRefused({to: (code, reply)})
        except smtplib.SMTPServerDisconnected as exc:
            raise _Dropped(str(exc)) from exc
        try:
            code, reply = conn.data(data)
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            # smtplib reports a read timeout as "Connection unexpectedly closed: timed out".
            timed_out = isinstance(exc, TimeoutError) or "timed out" in str(exc)
            what = "timed out" if timed_out else "was lost"
            raise AmbiguousError(
                f"SMTP connection {what} while sending the message to {mask_email(to)} "
                f"(it may have been delivered; Message-ID {mail['Message-ID']}): "
                f"{exc or 'timed out'}",
                provider_id=str(mail["Message-ID"]),
            ) from exc
        if code != 250:
            _reset(conn)
            raise smtplib.SMTPDataError(code, reply)

    # -- sending ----------------------------------------------------------------------------

    def send(self, message: Message) -> str:
        result = self.send_many([message])[0]
        if isinstance(result, ChannelError):
            raise result
        return result

    def send_many(self, messages: list[Message]) -> list[str | ChannelError]:
        """Send the batch over one connection; results in order (Message-ID or error)."""
        results: list[str | ChannelError] = []
        conn: smtplib.SMTP | None = None
        down: ChannelError | None = None  # set once connecting failed: the rest fail alike
        try:
            for message in messages:
                try:
                    mail = self.build(message)
                except PermanentError as exc:
                    results.append(exc)
                    continue
                if down is not None:
                    results.append(down)
                    continue
                reconnected = False
                while True:
                    try:
                        if conn is None:
                            conn = self._connect()
                        with timed(SEND_SECONDS, message.channel):
                            self._transmit(conn, mail, str(mail["To"]))
                        results.append(str(mail["Message-ID"]))
                        break
                    except _Dropped as exc:
                        if conn is not None:
                            conn.close()
                        conn = None
                        if reconnected:
                            results.append(
                                TransientError(f"SMTP server keeps closing the connection: {exc}")
                            )
                            break
                        reconnected = True
                    except ChannelError as exc:
                        results.append(exc)
                        if isinstance(exc, AmbiguousError) and conn is not None:
                            conn.close()  # its late answer must not be read as the next one's
                            conn = None
                        break
                    except (smtplib.SMTPException, OSError) as exc:
                        error = smtp_error(exc, message.to)
                        results.append(error)
                        if conn is None:  # connecting failed: the server is down or misconfigured
                            down = error
                        break
        finally:
            if conn is not None:
                self._quit(conn)
        return results
