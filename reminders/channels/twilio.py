"""SMS through Twilio, with the real ``twilio`` library (9.x).

Errors are mapped in one place, :func:`twilio_error`. Ambiguous (Twilio may have the message:
recorded ``unknown`` and reconciled with Twilio's Messages list, never retried blind): a read
timeout after the request was written, the connection reset or closed before an answer, an
answer that is not HTTP, HTTP 5xx (Twilio 20500). Transient (nothing was sent: retry with
backoff): HTTP 429 and Twilio 20429 ("always safe to retry"), a connection that could not be made
(DNS, refused, timed out, the TLS handshake or certificate), a request the kernel took no byte of,
and the account-level
answers 401/403/404 (wrong credentials, a suspended account, a wrong account SID or ``api_url``):
those fail every message alike, so they wait for ops rather than push every customer onto the next
channel. Permanent: 21211 invalid number, 21614 not a mobile number, 21408 region not enabled,
21610 the recipient replied STOP (``opt_out``), and any other 4xx.
See https://www.twilio.com/docs/api/errors.

``send_many`` keeps ``concurrency`` requests in flight: a real round trip takes ~100 ms, so one
request at a time would cap a worker near 10 messages a second.

The HTTP transport is the project's own (:mod:`reminders.channels.twilio_http`): twilio's
``TwilioHttpClient`` goes through ``requests`` (preparing the request, hooks, the cookie jar, the
adapter's connection lookup) before urllib3 sends anything, and that layer was about 40% of the
CPU a send cost a worker. Ours hands the request to one urllib3 pool of ``concurrency``
connections. Sending 2,000 messages one after another to the stub (no latency, in another
process), the sending process spent 0.72-0.97 ms of CPU a message through requests and 0.40-0.54 ms
through urllib3 (medians of three runs, four rounds on a busy 2-core machine): about 45% less.

A send builds twilio's request once, not at every call: the URL, headers and credentials that
``messages.create`` would send are taken from the client when the channel is built, and the answer's
SID is read without a ``MessageInstance`` (twilio parses its dates and price for every message);
an error answer still becomes twilio's own exception. The transport keeps each URL's connection
pool instead of parsing the URL and looking its pool up for every request. Measured alone against
the stub (one thread, 7 x 500 sends, medians): 0.346 -> 0.271 ms of CPU a send without twilio's
per-call objects, and the transport's request 0.228 -> 0.188 ms with the pool kept. A request's
headers and body leave in one write (http.client writes them apart): 0.247 -> 0.228 ms a send
(15 x 500 sends to the threaded stub, medians).

Since then, with no proxy named, requests go through the project's own HTTP/1.1 client
(:mod:`reminders.channels.http1`; urllib3 stays behind a proxy): one write, the answer read with a
few ``bytes`` operations, a pool of kept-alive connections checked before reuse. Measured alone
against the threaded stub (one thread, 5 x 1,000 sends, medians): 0.253 -> 0.094 ms of CPU a
send, then 0.088 ms with the form encoded by ``str.translate``; a bare socket exchange of the same
bytes costs 0.054 ms. Its failures tell before the request left (``NotSent``: transient) from
after (``MaybeSent``: ambiguous) exactly; see that module.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from twilio.base.exceptions import TwilioException, TwilioRestException, TwilioServiceException
from twilio.rest import Client
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ProxyError,
)
from urllib3.exceptions import TimeoutError as HTTPTimeoutError

from reminders.channels.base import Channel, Message, body_digest
from reminders.channels.http1 import ConnectTimeout, HTTPFailure, NotSent, ReadTimeout
from reminders.channels.twilio_http import FORM, http_client
from reminders.config import SmsConfig
from reminders.errors import (
    AmbiguousError,
    ChannelError,
    ConfigError,
    PermanentError,
    RuntimeFailure,
    TransientError,
)
from reminders.phone import mask, mask_numbers_in
from reminders.process_metrics import SEND_SECONDS, timed

if TYPE_CHECKING:
    from reminders.config import Config, EmailConfig

OPT_OUT_CODES = frozenset({21610})  # the recipient replied STOP to this sender
PERMANENT_CODES = frozenset({21211, 21614, 21408}) | OPT_OUT_CODES
TRANSIENT_CODES = frozenset({20429, 20003})  # too many requests; authentication failed
TRANSIENT_STATUSES = frozenset({401, 403, 404, 408, 429})


def twilio_error(exc: Exception, to: str = "") -> ChannelError:
    """Map a failure of ``messages.create`` to an ambiguous, transient or permanent
    ``ChannelError``.

    The error text keeps Twilio's code and message, with phone numbers masked.
    """
    if isinstance(exc, TwilioRestException | TwilioServiceException):
        status = int(exc.status or 0)
        code = int(exc.code) if exc.code is not None else status
        is_problem = isinstance(exc, TwilioServiceException)  # RFC 9457 answers
        detail = (exc.detail or exc.title) if is_problem else exc.msg
        text = f"Twilio {code} (HTTP {status}): {mask_numbers_in(str(detail))}"
        if code in PERMANENT_CODES:
            return PermanentError(text, code=str(code), opt_out=code in OPT_OUT_CODES)
        if status >= 500 or code == 20500:
            # Twilio's advice: a POST is not idempotent; it may have been created.
            return AmbiguousError(f"{text} (the message may have been sent)", code=str(code))
        if code in TRANSIENT_CODES or status in TRANSIENT_STATUSES:
            if status in (401, 403, 404) or code == 20003:
                text += " (check the account SID, auth token and api_url)"
            return TransientError(text, code=str(code))
        return PermanentError(text, code=str(code))
    recipient = f" sending to {mask(to)}" if to else ""
    if isinstance(exc, HTTPFailure):  # the direct transport (reminders.channels.http1)
        if isinstance(exc, ConnectTimeout):
            return TransientError(f"Twilio did not accept a connection in time{recipient}: {exc}")
        if isinstance(exc, NotSent):  # nothing of the request left: safe to send again
            return TransientError(f"Twilio could not be reached{recipient}: {exc}")
        if isinstance(exc, ReadTimeout):
            return AmbiguousError(
                f"Twilio did not answer in time{recipient} (the message may have been sent): {exc}"
            )
        # Disconnected, BadAnswer: the request was written, no whole answer came back.
        return AmbiguousError(
            f"Twilio closed the connection before answering{recipient} "
            f"(the message may have been sent): {exc}"
        )
    if isinstance(exc, MaxRetryError) and exc.reason is not None:
        exc = exc.reason  # not raised with retries=False; the cause is what matters
    # NewConnectionError (refused, unreachable, unknown host) subclasses ConnectTimeoutError.
    if isinstance(exc, ConnectTimeoutError) and not isinstance(exc, NewConnectionError):
        return TransientError(f"Twilio did not accept a connection in time{recipient}: {exc}")
    if isinstance(exc, HTTPTimeoutError) and not isinstance(exc, NewConnectionError):
        # ReadTimeoutError: the request went out, Twilio may have accepted it without answering.
        return AmbiguousError(
            f"Twilio did not answer in time{recipient} (the message may have been sent): {exc}"
        )
    if isinstance(exc, ProtocolError):
        # The connection was reset or closed once the request was (being) written.
        return AmbiguousError(
            f"Twilio closed the connection before answering{recipient} "
            f"(the message may have been sent): {exc}"
        )
    if isinstance(exc, ProxyError):
        return TransientError(f"Twilio could not be reached through the proxy{recipient}: {exc}")
    if isinstance(exc, HTTPError | OSError):
        # NewConnectionError, SSLError (the handshake: nothing was sent), ...
        return TransientError(f"Twilio could not be reached{recipient}: {exc}")
    raise TypeError(f"not a Twilio or HTTP failure: {exc!r}") from exc


# Reconciliation reads Twilio's Messages list this many at a time, newest first, and at most this
# many pages (a number that received more since the attempt is not decided automatically).
LIST_PAGE_SIZE = 50
LIST_MAX_PAGES = 20
# Twilio's clock and ours may differ: a message created this long before the attempt began still
# counts as the attempt's.
CLOCK_SKEW = timedelta(seconds=30)


# What a request to Twilio can fail with, whichever transport carried it: Twilio's error answers,
# the direct transport's failures, urllib3's (behind a proxy), the socket's. twilio_error tells
# them apart.
_SEND_ERRORS = (TwilioRestException, TwilioServiceException, HTTPFailure, HTTPError, OSError)


@dataclass(frozen=True)
class Found:
    """A message in Twilio's records: its SID, its status there (queued, sent, delivered...) and
    its error code when it failed (30005...)."""

    sid: str
    status: str
    error_code: str | None = None


class LookupFailed(RuntimeFailure):
    """Twilio's Messages list could not be read (the decision waits for the next pass)."""


class TwilioChannel(Channel):
    """Sends SMS with Twilio's Messages API.

    ``from_`` (an E.164 sender) or ``messaging_service_sid`` is required. ``api_url`` points the
    client at a Twilio-compatible endpoint (a mock such as Prism) instead of api.twilio.com.
    ``concurrency`` is the number of requests kept in flight, by one ``send_many`` or by several
    at once; ``timeout`` is the connect and read timeout of one request, in seconds.
    """

    name = "sms"

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        from_: str | None = None,
        messaging_service_sid: str | None = None,
        api_url: str | None = None,
        concurrency: int = 64,
        timeout: float = 10.0,
    ) -> None:
        if not account_sid or not auth_token:
            raise ConfigError("channels.sms: Twilio needs account_sid and auth_token")
        if not from_ and not messaging_service_sid:
            raise ConfigError("channels.sms: set `from` (a Twilio number) or messaging_service_sid")
        if concurrency < 1:
            raise ConfigError(f"channels.sms: concurrency must be at least 1, not {concurrency}")
        if api_url is not None:
            parts = urlsplit(api_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ConfigError(f"channels.sms.api_url must be an http(s) URL, not {api_url!r}")
        self.from_ = from_
        self.messaging_service_sid = messaging_service_sid
        self.concurrency = concurrency
        self.timeout = timeout

        base_url = api_url.rstrip("/") if api_url is not None else "https://api.twilio.com"
        # One pool of `concurrency` connections: send_many calls running at once (rate-limited
        # waves) share them rather than opening and discarding more. No retries: the engine
        # retries, and records it.
        self._http = http_client(base_url, maxsize=concurrency, timeout=timeout)
        self._client = Client(account_sid, auth_token, http_client=self._http)
        if api_url is not None:
            # No base-URL argument in twilio 9: set the domain's base_url. TWILIO_EDGE and
            # TWILIO_REGION from the environment would rewrite the host: ignore them here.
            self._client.api.base_url = base_url
            self._client.edge = None
            self._client.region = None
        # Resolve the lazily built resource once, not racing in every thread.
        self._messages = self._client.api.v2010.account.messages
        # What twilio's ``messages.create`` sends, built once: the URL (after twilio's edge and
        # region rewriting), its headers (User-Agent, Accept, ...) and the Basic credentials.
        # A send then costs one request; see send().
        version = self._client.api.v2010
        self._create_path = f"/Accounts/{account_sid}/Messages.json"
        self._create_url = self._client.get_hostname(
            version.domain.absolute_url(version.relative_uri(self._create_path))
        )
        self._create_headers = self._client.get_headers(
            "POST", {"Content-Type": FORM, "Accept": "application/json"}
        )
        self._create_auth = self._client.get_auth(None)
        self._version = version
        # One thread pool for the process, started on first use; see _executor.
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._pool_lock = threading.Lock()

    @classmethod
    def from_config(cls, name: str, cfg: SmsConfig | EmailConfig, config: Config) -> TwilioChannel:
        assert isinstance(cfg, SmsConfig)
        assert cfg.account_sid and cfg.auth_token  # the config requires them for twilio
        return cls(
            cfg.account_sid,
            cfg.auth_token,
            from_=cfg.from_,
            messaging_service_sid=cfg.messaging_service_sid,
            api_url=cfg.api_url,
            concurrency=cfg.concurrency,
            timeout=cfg.timeout.total_seconds(),
        )

    def send(self, message: Message) -> str:
        """POST the message as twilio's ``messages.create`` does (the same form, headers and
        URL), without building a ``MessageInstance`` of the answer: only its SID is kept. An
        error answer becomes the exception twilio raises for it (``Version.exception``)."""
        data: dict[str, object] = {"To": message.to}
        if message.status_callback:
            data["StatusCallback"] = message.status_callback
        if self.from_:
            data["From"] = self.from_
        if self.messaging_service_sid:
            data["MessagingServiceSid"] = self.messaging_service_sid
        data["Body"] = message.body
        try:
            answer = self._http.request(
                "POST",
                self._create_url,
                data=data,
                headers=self._create_headers,
                auth=self._create_auth,
            )
            if not 200 <= answer.status_code < 300:
                raise self._version.exception(
                    "POST", self._create_path, answer, "Unable to create record"
                )
        except _SEND_ERRORS as exc:
            raise twilio_error(exc, message.to) from exc
        return str(json.loads(answer.text)["sid"])

    def lookup(
        self, to: str, digest: str, since: datetime, skip: frozenset[str] = frozenset()
    ) -> Found | None:
        """A message to ``to`` from this sender whose text has the SHA-256 ``digest``, created at
        or after ``since`` (less ``CLOCK_SKEW``), and not one of ``skip`` (SIDs already recorded
        for other reminders); None when Twilio has none.

        Reads ``GET /2010-04-01/Accounts/{sid}/Messages.json?To=..&From=..`` newest first, page
        after page, until a match or a message older than ``since`` (at most ``LIST_MAX_PAGES``
        pages: past them ``LookupFailed``, as for any failure to read the list).
        """
        oldest = since - CLOCK_SKEW
        filters: dict[str, Any] = {"to": to, "page_size": LIST_PAGE_SIZE}
        if self.from_ and not self.messaging_service_sid:
            filters["from_"] = self.from_
        try:
            page = self._messages.page(**filters)
            for _ in range(LIST_MAX_PAGES):
                for record in page:
                    created = record.date_created
                    if created is not None and created < oldest:
                        return None
                    if not self._ours(record) or record.sid in skip:
                        continue
                    if body_digest(record.body or "") == digest:
                        code = record.error_code
                        return Found(
                            str(record.sid),
                            str(record.status or ""),
                            None if code in (None, "", 0) else str(code),
                        )
                page = page.next_page()
                if page is None:
                    return None
        except _SEND_ERRORS as exc:
            raise LookupFailed(str(twilio_error(exc, to))) from exc
        except TwilioException as exc:  # "Unable to fetch page", with the HTTP answer
            raise LookupFailed(f"Twilio's Messages list: {mask_numbers_in(str(exc))}") from exc
        raise LookupFailed(
            f"more than {LIST_PAGE_SIZE * LIST_MAX_PAGES} messages to {mask(to)} since the attempt"
        )

    def _ours(self, record: Any) -> bool:
        """Whether a listed message came from this channel's sender."""
        if self.messaging_service_sid:
            return bool(record.messaging_service_sid == self.messaging_service_sid)
        return bool(record.from_ == self.from_)

    def _send_one(self, message: Message) -> str | ChannelError:
        try:
            with timed(SEND_SECONDS, message.channel):
                return self.send(message)
        except ChannelError as exc:
            return exc

    def send_many(self, messages: list[Message]) -> list[str | ChannelError]:
        """Send with up to ``concurrency`` requests in flight; results in the messages' order.

        An exception that is not a ``ChannelError`` (a bug) is raised once every message of the
        batch has been attempted.
        """
        if len(messages) <= 1:
            return [self._send_one(m) for m in messages]
        pool = self._executor()
        futures = [pool.submit(self._send_one, m) for m in messages]
        return [f.result() for f in futures]

    def _executor(self) -> ThreadPoolExecutor:
        """The process's pool of ``concurrency`` threads, shared by every ``send_many``.

        Starting threads for every batch costs CPU at every batch; one pool is kept instead. Its
        threads do not survive a fork (RQ's forking worker): a forked child starts its own.
        """
        pid = os.getpid()
        pool = self._pool
        if pool is not None and self._pool_pid == pid:
            return pool
        with self._pool_lock:
            if self._pool is None or self._pool_pid != pid:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.concurrency, thread_name_prefix="twilio"
                )
                self._pool_pid = pid
            return self._pool

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None and self._pool_pid == os.getpid():
            pool.shutdown(wait=True)
        self._http.close()
