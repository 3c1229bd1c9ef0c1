"""A Twilio-shaped HTTP server of the project's own, for what Prism cannot answer.

Twilio's OpenAPI spec (served by Prism) defines only the 201 answer of ``Messages.json``; the error
answers a sender must handle (429/20429, 5xx, 400 with 21211/21610/...) come from here, in Twilio's
JSON error shape (https://www.twilio.com/docs/usage/twilios-response#response-formats-exceptions).
The delivery benchmark uses it as a stand-in provider with a round-trip latency.

    with TwilioStub(latency_ms=100) as stub:
        channel = TwilioChannel(ACCOUNT_SID, AUTH_TOKEN, from_="+15005550006", api_url=stub.url)
        stub.respond("+14155550100", TOO_MANY_REQUESTS)  # the next request to it answers 429
        ...
        stub.accepted["+14155550100"]                      # messages accepted for that number

Numbers: Twilio's magic test numbers answer as Twilio's test credentials do (``+15005550001``
invalid, ``+15005550003`` region not enabled, ``+15005550004`` unsubscribed, ``+15005550009`` not
a mobile number); ``respond(to, *errors)`` queues answers for one number, consumed in order;
``failure_ratio`` answers that share of all other requests with ``failure`` at random.

Ambiguous outcomes: ``respond(to, ACCEPT_THEN_HANG)`` records the message and then sends no answer
for ``hang_seconds`` before closing the connection (the client's read times out);
``respond(to, DROP_BEFORE_ACCEPT)`` closes the connection without recording anything;
``hang_ratio`` makes that share of all other requests ``ACCEPT_THEN_HANG``.

The Messages list (``GET .../Messages.json``, filters ``To`` and ``From``, ``PageSize``, ``Page``)
answers from the messages recorded, newest first, in Twilio's page shape with ``next_page_uri``:
what reconciliation reads (``created`` holds them, oldest first).
"""

from __future__ import annotations

import base64
import json
import random
import re
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

ACCOUNT_SID = "AC" + "a" * 32
AUTH_TOKEN = "stub-auth-token"

_MESSAGES = re.compile(r"^/2010-04-01/Accounts/(?P<account>AC\w+)/Messages\.json$")


@dataclass(frozen=True)
class StubError:
    """One error answer. ``raw``, when set, is sent as is (an HTML page from a load balancer)."""

    status: int
    code: int
    message: str
    raw: str | None = None

    def body(self, to: str) -> tuple[bytes, str]:
        if self.raw is not None:
            return self.raw.encode(), "text/html"
        payload = {
            "code": self.code,
            "message": self.message.format(to=to),
            "more_info": f"https://www.twilio.com/docs/errors/{self.code}",
            "status": self.status,
        }
        return json.dumps(payload).encode(), "application/json"


@dataclass(frozen=True)
class StubAction:
    """An answer that is no answer: ``hang`` (record, then say nothing) or ``drop`` (close)."""

    kind: str


ACCEPT_THEN_HANG = StubAction("hang")
DROP_BEFORE_ACCEPT = StubAction("drop")

TOO_MANY_REQUESTS = StubError(429, 20429, "Too Many Requests")
SERVER_ERROR = StubError(500, 20500, "An internal server error has occurred")
BAD_GATEWAY_HTML = StubError(502, 502, "", raw="<html><body>502 Bad Gateway</body></html>")
UNAUTHORIZED = StubError(401, 20003, "Authentication Error - invalid username")
INVALID_NUMBER = StubError(400, 21211, "The 'To' number {to} is not a valid phone number.")
REGION_NOT_ENABLED = StubError(
    400,
    21408,
    "Permission to send an SMS has not been enabled for the region indicated by the "
    "'To' number: {to}.",
)
UNSUBSCRIBED = StubError(400, 21610, "Attempt to send to unsubscribed recipient")
NOT_MOBILE = StubError(400, 21614, "'To' number {to} is not a valid mobile number")
QUEUE_OVERFLOW = StubError(400, 21611, "This 'From' number has exceeded the maximum queue size")

# https://www.twilio.com/docs/iam/test-credentials#test-sms-messages-parameters-To
MAGIC_NUMBERS: dict[str, StubError] = {
    "+15005550001": INVALID_NUMBER,
    "+15005550003": REGION_NOT_ENABLED,
    "+15005550004": UNSUBSCRIBED,
    "+15005550009": NOT_MOBILE,
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # the default backlog of 5 resets connections under a burst
    stub: TwilioStub


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Twilio: the client's pool reuses connections
    # Headers and body go out in two writes: with Nagle on, the body waits for the client's
    # delayed ACK of the headers (~40 ms a request on Linux loopback).
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, error: StubError, to: str = "") -> None:
        body, content_type = error.body(to)
        self._answer(error.status, body, content_type)

    def do_GET(self) -> None:
        stub = self.server.stub
        parts = urlsplit(self.path)
        match = _MESSAGES.match(parts.path)
        if not match:
            self._error(StubError(404, 20404, "The requested resource was not found"))
            return
        if self.headers.get("Authorization") != stub._expected_auth:
            self._error(UNAUTHORIZED)
            return
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        stub._listed()
        self._answer(200, json.dumps(stub._page(match["account"], parts.path, query)).encode())

    def do_POST(self) -> None:
        stub = self.server.stub
        length = int(self.headers.get("Content-Length") or 0)
        form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
        match = _MESSAGES.match(self.path)
        if not match:
            self._error(StubError(404, 20404, f"The requested resource {self.path} was not found"))
            return
        to = form.get("To", "")
        stub._arrived(to, form)
        try:
            if stub.latency_ms:
                time.sleep(stub.latency_ms / 1000)
            if self.headers.get("Authorization") != stub._expected_auth:
                self._error(UNAUTHORIZED, to)
                return
            if not to:
                self._error(StubError(400, 21604, "A 'To' phone number is required."))
                return
            if not form.get("From") and not form.get("MessagingServiceSid"):
                self._error(StubError(400, 21603, "A 'From' phone number is required."))
                return
            error = stub._error_for(to)
            if error == DROP_BEFORE_ACCEPT:
                self.close_connection = True
                return
            if isinstance(error, StubError):
                self._error(error, to)
                return
            created = _message(match["account"], form)
            stub._accepted(to, created)
            if error == ACCEPT_THEN_HANG:
                time.sleep(stub.hang_seconds)
                self.close_connection = True
                return
            self._answer(201, json.dumps(created).encode())
        finally:
            stub._left()


def _message(account: str, form: dict[str, str]) -> dict[str, Any]:
    sid = "SM" + uuid.uuid4().hex
    now = formatdate(usegmt=True).replace("GMT", "+0000")
    return {
        "account_sid": account,
        "api_version": "2010-04-01",
        "body": form.get("Body", ""),
        "date_created": now,
        "date_sent": None,
        "date_updated": now,
        "direction": "outbound-api",
        "error_code": None,
        "error_message": None,
        "from": form.get("From"),
        "messaging_service_sid": form.get("MessagingServiceSid"),
        "num_media": "0",
        "num_segments": "1",
        "price": None,
        "price_unit": "USD",
        "sid": sid,
        "status": "queued",
        "subresource_uris": {"media": f"/2010-04-01/Accounts/{account}/Messages/{sid}/Media.json"},
        "to": form.get("To"),
        "uri": f"/2010-04-01/Accounts/{account}/Messages/{sid}.json",
    }


class TwilioStub:
    """A Twilio Messages API on 127.0.0.1, one thread per request.

    ``latency_ms``: added to every create request; ``failure_ratio`` (0..1): share of requests
    (to numbers without a scripted answer) answered with ``failure``; ``seed`` makes that draw
    repeatable. ``received`` counts create requests by To, ``accepted`` the 201 answers;
    ``forms`` keeps every request's form fields; ``max_in_flight`` is the most seen at once.
    """

    def __init__(
        self,
        latency_ms: float = 0.0,
        failure_ratio: float = 0.0,
        failure: StubError = SERVER_ERROR,
        seed: int | None = None,
        account_sid: str = ACCOUNT_SID,
        auth_token: str = AUTH_TOKEN,
        numbers: dict[str, StubError] | None = None,
        hang_ratio: float = 0.0,
        hang_seconds: float = 3.0,
    ) -> None:
        self.latency_ms = latency_ms
        self.hang_ratio = hang_ratio
        self.hang_seconds = hang_seconds
        self.created: list[dict[str, Any]] = []
        self.list_requests = 0
        self.failure_ratio = failure_ratio
        self.failure = failure
        self.numbers = dict(MAGIC_NUMBERS if numbers is None else numbers)
        credentials = base64.b64encode(f"{account_sid}:{auth_token}".encode()).decode()
        self._expected_auth = f"Basic {credentials}"
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._scripted: dict[str, deque[StubError | StubAction]] = {}
        self.received: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()
        self.forms: list[dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- control --

    def start(self) -> TwilioStub:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.stub = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="twilio-stub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> TwilioStub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The base URL to give ``TwilioChannel(api_url=...)``."""
        assert self._server is not None, "start() the stub first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def respond(self, to: str, *errors: StubError | StubAction) -> None:
        """Answer the next requests to ``to`` with ``errors``, one each, then accept again."""
        with self._lock:
            self._scripted.setdefault(to, deque()).extend(errors)

    def reset(self) -> None:
        """Forget counts, forms and scripted answers."""
        with self._lock:
            self._scripted.clear()
            self.received.clear()
            self.accepted.clear()
            self.forms.clear()
            self.created.clear()
            self.max_in_flight = 0

    # -- called by the handler threads --

    def _arrived(self, to: str, form: dict[str, str]) -> None:
        with self._lock:
            self.received[to] += 1
            self.forms.append(form)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _left(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _accepted(self, to: str, created: dict[str, Any]) -> None:
        with self._lock:
            self.accepted[to] += 1
            self.created.append(created)

    def _listed(self) -> None:
        with self._lock:
            self.list_requests += 1

    def _error_for(self, to: str) -> StubError | StubAction | None:
        with self._lock:
            queued = self._scripted.get(to)
            if queued:
                return queued.popleft()
            if to in self.numbers:
                return self.numbers[to]
            if self.failure_ratio and self._random.random() < self.failure_ratio:
                return self.failure
            if self.hang_ratio and self._random.random() < self.hang_ratio:
                return ACCEPT_THEN_HANG
        return None

    def _page(self, account: str, path: str, query: dict[str, str]) -> dict[str, Any]:
        """One page of the Messages list, newest first, as Twilio answers it."""
        with self._lock:
            found = [
                m
                for m in reversed(self.created)
                if m["account_sid"] == account
                and ("To" not in query or m["to"] == query["To"])
                and ("From" not in query or m["from"] == query["From"])
            ]
        size = int(query.get("PageSize", 50))
        page = int(query.get("Page", 0))
        chunk = found[page * size : (page + 1) * size]
        filters = {k: v for k, v in query.items() if k in ("To", "From")}

        def uri(number: int) -> str:
            return f"{path}?{urlencode({**filters, 'PageSize': size, 'Page': number})}"

        more = (page + 1) * size < len(found)
        return {
            "end": page * size + max(len(chunk) - 1, 0),
            "first_page_uri": uri(0),
            "next_page_uri": uri(page + 1) + f"&PageToken=PA{page + 1}" if more else None,
            "page": page,
            "page_size": size,
            "previous_page_uri": uri(page - 1) if page else None,
            "start": page * size,
            "uri": uri(page),
            "messages": chunk,
        }
