"""The Twilio channel's HTTP transports, against real servers on 127.0.0.1: the direct one
(``DirectHttpClient``, :mod:`reminders.channels.http1`; its failures: tests/test_http1.py) and
urllib3's, used behind a proxy (``Urllib3HttpClient``, with its failures here).

A recording server of this module's own answers as Twilio does and keeps every request as it
arrived (method, target, headers, raw body) and the connections it accepted; it also serves as an
HTTP proxy (a proxy gets the absolute URL) and over TLS with the test certificate.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import certifi
import pytest
import requests.auth
import urllib3
from hypothesis import given, settings
from hypothesis import strategies as st
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client
from urllib3.exceptions import (
    ConnectTimeoutError,
    NewConnectionError,
    ProtocolError,
    ProxyError,
    ReadTimeoutError,
    SSLError,
)

from reminders.channels import Message, TwilioChannel
from reminders.channels.http1 import Origin
from reminders.channels.twilio import twilio_error
from reminders.channels.twilio_http import (
    DirectHttpClient,
    Urllib3HttpClient,
    basic_auth,
    form_encode,
)
from reminders.errors import AmbiguousError, ConfigError, TransientError
from tests import services
from tests.twilio_stub import ACCOUNT_SID, AUTH_TOKEN, TwilioStub

if TYPE_CHECKING:
    from tests.channel_fixtures import TlsFiles

# tls_files (a self-signed certificate for 127.0.0.1, made with openssl)

FROM = "+15005550006"
TO = "+14155550100"
BODY = "Your Lisinopril runs out Friday. Reply DONE if refilled."
MESSAGES = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
ENVIRONMENT = (
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
    "http_proxy", "https_proxy", "all_proxy", "no_proxy",
    "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE",
)  # fmt: skip


@pytest.fixture(autouse=True)
def _no_ambient_proxy_or_ca(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's proxy and CA variables must not decide these tests; each sets its own."""
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


# -- a recording server ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    method: str
    target: str  # the request line's target: a path, or an absolute URL when sent to a proxy
    headers: dict[str, str]
    body: bytes


class Recorder(ThreadingHTTPServer):
    """Answers every POST with a created message, every GET with an empty page of messages."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, latency_ms: float = 0, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _RecordingHandler)
        self.latency_ms = latency_ms
        self.tls = tls
        self.seen: list[Seen] = []
        self.connections = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        if self.tls is not None:  # the handshake happens in the connection's thread
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a refused handshake, a client that went away

    def __enter__(self) -> Recorder:
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


class _RecordingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: Recorder

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def _handle(self, payload: dict[str, Any], status: int) -> None:
        server = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with server.lock:
            server.seen.append(Seen(self.command, self.path, dict(self.headers.items()), body))
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
            time.sleep(server.latency_ms / 1000)
            answer = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)
        finally:
            with server.lock:
                server.in_flight -= 1

    def do_POST(self) -> None:
        sid = "SM" + uuid.uuid4().hex
        self._handle({"sid": sid, "account_sid": ACCOUNT_SID, "status": "queued"}, 201)

    def do_GET(self) -> None:
        self._handle({"messages": [], "next_page_uri": None, "page": 0, "page_size": 2}, 200)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    with Recorder() as server:
        yield server


def sms(to: str = TO, reminder_id: int = 1) -> Message:
    return Message(reminder_id=reminder_id, rule="refill-due", channel="sms", to=to, body=BODY)


def channel_for(url: str, **kwargs: Any) -> TwilioChannel:
    return TwilioChannel(ACCOUNT_SID, AUTH_TOKEN, from_=FROM, api_url=url, **kwargs)


def client_for(url: str, http: Any) -> Client:
    """A twilio Client on ``http``, pointed at ``url`` as TwilioChannel points it."""
    client = Client(ACCOUNT_SID, AUTH_TOKEN, http_client=http)
    client.api.base_url = url
    client.edge = client.region = None
    return client


def transport(url: str, maxsize: int = 4, timeout: float = 5.0) -> Urllib3HttpClient:
    return Urllib3HttpClient(url, maxsize=maxsize, timeout=timeout)


# -- what goes on the wire -------------------------------------------------------------------------


MEDIA = ["https://r.example.com/a.png?x=1&y=2", "https://r.example.com/b.png"]


def create_with_media(client: Client) -> str:
    created = client.api.v2010.account.messages.create(
        to=TO,
        from_=FROM,
        body="Café ☕ & more = 100%",
        media_url=MEDIA,
        status_callback="https://r.example.com/webhooks/twilio/status",
    )
    return str(created.sid)


def test_the_request_on_the_wire(recorder: Recorder) -> None:
    sid = create_with_media(client_for(recorder.url, transport(recorder.url)))
    assert sid.startswith("SM")
    [seen] = recorder.seen
    assert (seen.method, seen.target) == ("POST", MESSAGES)
    form = [
        ("To", TO),
        ("From", FROM),
        ("Body", "Café ☕ & more = 100%"),
        ("StatusCallback", "https://r.example.com/webhooks/twilio/status"),
        ("MediaUrl", MEDIA[0]),
        ("MediaUrl", MEDIA[1]),  # a list: the field repeated, in order
    ]
    assert sorted(seen.body.decode().split("&")) == sorted(urlencode(form).split("&"))
    headers = seen.headers
    token = base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
    assert headers["Authorization"] == f"Basic {token}"
    assert headers["User-Agent"].startswith("twilio-python/9.")
    assert headers["X-Twilio-Client"].startswith("python-9.")
    assert headers["Accept"] == "application/json"
    assert headers["Accept-Charset"] == "utf-8"
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert headers["Content-Length"] == str(len(seen.body))
    assert headers["Host"] == f"127.0.0.1:{recorder.port}"


def test_the_same_request_as_twilios_own_client(recorder: Recorder) -> None:
    """Method, target, body and twilio's headers are what TwilioHttpClient (requests) sends."""
    create_with_media(client_for(recorder.url, TwilioHttpClient()))
    create_with_media(client_for(recorder.url, transport(recorder.url)))
    theirs, ours = recorder.seen
    assert (ours.method, ours.target, ours.body) == (theirs.method, theirs.target, theirs.body)
    # requests adds its own defaults (Accept-Encoding: gzip, Connection: keep-alive); HTTP/1.1
    # keeps the connection open without the latter, and the answers are a few hundred bytes.
    assert ours.headers.pop("Accept-Encoding") == "identity"  # added by http.client
    defaults = {"Accept-Encoding", "Connection"}
    assert ours.headers == {k: v for k, v in theirs.headers.items() if k not in defaults}


@pytest.mark.parametrize(
    "sender",
    [{"from_": FROM}, {"messaging_service_sid": "MG" + "0" * 32}],
    ids=["from", "messaging-service"],
)
def test_the_channel_sends_what_messages_create_sends(
    recorder: Recorder, sender: dict[str, str]
) -> None:
    """TwilioChannel.send posts itself, without twilio's per-call objects: the same target, form
    (fields in twilio's order) and headers as twilio's ``messages.create`` on the same client."""
    channel = TwilioChannel(ACCOUNT_SID, AUTH_TOKEN, api_url=recorder.url, **sender)
    message = sms()
    message.status_callback = "https://r.example.com/webhooks/twilio/status"
    sid = channel.send(message)
    created = channel._messages.create(
        to=message.to,
        body=message.body,
        status_callback=message.status_callback,
        **sender,
    )
    ours, theirs = recorder.seen
    assert sid.startswith("SM") and str(created.sid).startswith("SM") and sid != created.sid
    assert (ours.method, ours.target, ours.body) == (theirs.method, theirs.target, theirs.body)
    assert ours.headers == theirs.headers


def test_query_parameters(recorder: Recorder) -> None:
    client = client_for(recorder.url, transport(recorder.url))
    assert client.api.v2010.account.messages.list(to=TO, limit=2) == []
    http = transport(recorder.url)
    answer = http.request(
        "get", recorder.url + "/x.json?Page=1", params={"Status": ["sent", "failed"], "To": TO}
    )
    assert answer.status_code == 200 and json.loads(answer.text)["messages"] == []
    first, second = recorder.seen
    assert first.method == "GET" and first.target == f"{MESSAGES}?To=%2B14155550100&PageSize=2"
    assert second.target == "/x.json?Page=1&Status=sent&Status=failed&To=%2B14155550100"
    assert second.body == b"" and "Content-Type" not in second.headers


def test_json_body_for_json_content_type(recorder: Recorder) -> None:
    data = {"Friendly": "Café", "Tags": ["a", "b"]}
    transport(recorder.url).request(
        "POST", recorder.url + "/v1/x", data=data, headers={"Content-Type": "application/json"}
    )
    [seen] = recorder.seen
    assert json.loads(seen.body) == data
    assert seen.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(
    ("user", "password"), [(ACCOUNT_SID, AUTH_TOKEN), ("SK" + "1" * 32, "pässwörd")]
)
def test_basic_auth_is_encoded_as_requests_encodes_it(user: str, password: str) -> None:
    assert basic_auth(user, password) == requests.auth._basic_auth_str(user, password)


def test_basic_auth_header_is_built_once(recorder: Recorder) -> None:
    channel = channel_for(recorder.url)
    for _ in range(3):
        channel.send(sms())
    assert list(channel._http._auth) == [(ACCOUNT_SID, AUTH_TOKEN)]
    assert len({seen.headers["Authorization"] for seen in recorder.seen}) == 1


def test_answers_are_decoded_as_utf8_with_replacement() -> None:
    """A proxy's error page in Latin-1 still becomes text; twilio then maps the status."""

    class Latin1(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            page = "<h1>Passerelle défaillante</h1>".encode("latin-1")
            self.send_response(502)
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Latin1)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        answer = transport(url).request("POST", url + "/x", data={"a": "b"})
        assert (answer.status_code, answer.text) == (502, "<h1>Passerelle d\ufffdfaillante</h1>")
        with pytest.raises(AmbiguousError, match=r"HTTP 502"):
            channel_for(url).send(sms())
    finally:
        server.shutdown()
        server.server_close()


def test_debug_log_has_no_credentials_or_numbers(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # An earlier test may have set the engine's logger to INFO (reminders.jobs.setup_logging).
    caplog.set_level(logging.DEBUG, logger="reminders")
    channel_for(recorder.url).send(sms())
    assert "Messages.json: HTTP 201" in caplog.text
    token = base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
    for secret in (AUTH_TOKEN, token, "4155550100", "5005550006"):
        assert secret not in caplog.text
    assert not [r for r in caplog.records if r.name.startswith("reminders") and r.levelno > 10]


# -- connections -----------------------------------------------------------------------------------


def test_sequential_sends_reuse_one_connection(recorder: Recorder) -> None:
    channel = channel_for(recorder.url)
    results = [channel.send(sms(reminder_id=i)) for i in range(50)]
    assert len(set(results)) == 50
    assert recorder.connections == 1


def test_batches_reuse_at_most_concurrency_connections() -> None:
    with Recorder(latency_ms=20) as server:
        channel = channel_for(server.url, concurrency=8)
        for batch in range(4):
            results = channel.send_many([sms(reminder_id=batch * 100 + i) for i in range(40)])
            assert all(isinstance(r, str) for r in results)
        channel.close()
    assert len(server.seen) == 160
    assert server.connections <= 8 and server.max_in_flight <= 8


def test_the_pool_blocks_at_its_size() -> None:
    """Six threads, two connections: requests wait for a free connection, none is added."""
    with Recorder(latency_ms=100) as server:
        http = transport(server.url, maxsize=2)
        answers: list[int] = []

        def post() -> None:
            answer = http.request("POST", server.url + MESSAGES, data={"To": TO})
            answers.append(answer.status_code)

        threads = [threading.Thread(target=post) for _ in range(6)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
    assert answers == [201] * 6
    assert server.max_in_flight == 2 and server.connections == 2
    assert elapsed >= 0.28  # three rounds of two


class _CountingSocket:
    """A connected socket that counts the writes made on it (and makes them)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.writes: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.writes.append(bytes(data))
        return self.sock.send(data)

    def sendall(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.sock.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def origin_of(recorder: Recorder) -> Origin:
    return Origin("http", "127.0.0.1", recorder.port)


def test_a_request_is_written_in_one_send(recorder: Recorder) -> None:
    """Headers and body leave in one write (one segment, one wake-up of the server); a GET,
    without a body, in one write too."""
    channel = channel_for(recorder.url)
    assert isinstance(channel._http, DirectHttpClient)
    assert channel.send(sms()).startswith("SM")
    [conn] = channel._http.pools.get(origin_of(recorder))._idle
    counting = conn.sock = _CountingSocket(conn.sock)  # type: ignore[assignment]
    assert channel.send(sms()).startswith("SM")
    [write] = counting.writes
    head, _, body = write.partition(b"\r\n\r\n")
    assert head.startswith(b"POST " + MESSAGES.encode()) and body == recorder.seen[-1].body
    answer = channel._http.request("GET", recorder.url + MESSAGES)
    assert answer.status_code == 200 and len(counting.writes) == 2
    assert counting.writes[1].startswith(b"GET ") and counting.writes[1].endswith(b"\r\n\r\n")
    assert recorder.connections == 1


def test_urllib3_writes_a_request_in_one_send(recorder: Recorder) -> None:
    """The same for the transport used behind a proxy."""
    http = transport(recorder.url)
    http.request("POST", recorder.url + MESSAGES, data={"To": TO})
    [(_manager, pool, _path)] = http._targets.values()
    [conn] = [c for c in pool.pool.queue if c is not None]  # type: ignore[union-attr]
    counting = conn.sock = _CountingSocket(conn.sock)
    http.request("POST", recorder.url + MESSAGES, data={"To": TO})
    [write] = counting.writes
    head, _, body = write.partition(b"\r\n\r\n")
    assert head.startswith(b"POST " + MESSAGES.encode()) and body == recorder.seen[-1].body


def test_close_drops_the_pooled_connections(recorder: Recorder) -> None:
    channel = channel_for(recorder.url)
    channel.send(sms())
    channel.close()
    assert channel.send(sms()).startswith("SM")  # the channel still works, on a new connection
    assert recorder.connections == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_connections(recorder: Recorder) -> None:
    channel = channel_for(recorder.url)
    assert isinstance(channel._http, DirectHttpClient)
    pools = channel._http.pools
    channel.send(sms())
    parent_pool = pools.get(origin_of(recorder))
    pid = os.fork()
    if pid == 0:  # the child: a new pool, a new connection, and a message sent
        try:
            ok = channel.send(sms()).startswith("SM")
            ok = ok and pools.get(origin_of(recorder)) is not parent_pool
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert channel.send(sms()).startswith("SM")
    assert pools.get(origin_of(recorder)) is parent_pool and parent_pool.opened == 1
    assert recorder.connections == 2 and len(recorder.seen) == 3


# -- failures --------------------------------------------------------------------------------------


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A listening socket that never accepts: the kernel completes the connection, no answer."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.fixture
def full_backlog() -> Iterator[str]:
    """A listening socket whose accept queue is full: a connection attempt gets no answer."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    queued: list[socket.socket] = []
    try:
        for _ in range(8):
            probe = socket.socket()
            probe.settimeout(0.2)
            queued.append(probe)
            try:
                probe.connect(address)
            except TimeoutError:
                break  # full: SYNs are now dropped
        else:
            services.unavailable("this kernel completes connections past a full accept queue")
        yield f"http://127.0.0.1:{address[1]}"
    finally:
        for probe in queued:
            probe.close()
        listener.close()


def raised(url: str, timeout: float = 0.3, **kwargs: Any) -> Exception:
    """The exception a real request to ``url`` raises through the transport."""
    with pytest.raises(Exception) as caught:
        transport(url, timeout=timeout).request("POST", url + MESSAGES, data={"To": TO}, **kwargs)
    return caught.value


def test_read_timeout(silent_server: str) -> None:
    assert isinstance(raised(silent_server), ReadTimeoutError)
    started = time.monotonic()
    with pytest.raises(AmbiguousError) as caught:
        channel_for(silent_server, timeout=0.3).send(sms())
    assert time.monotonic() - started < 1.5
    text = caught.value.message
    assert "Twilio did not answer in time sending to +1******0100" in text
    assert "(the message may have been sent)" in text and "Read timed out" in text


def test_connect_timeout(full_backlog: str) -> None:
    exc = raised(full_backlog)
    assert isinstance(exc, ConnectTimeoutError) and not isinstance(exc, NewConnectionError)
    started = time.monotonic()
    with pytest.raises(TransientError) as caught:
        channel_for(full_backlog, timeout=0.3).send(sms())
    assert time.monotonic() - started < 1.5
    text = caught.value.message
    assert "Twilio did not accept a connection in time sending to +1******0100" in text
    assert "may have been sent" not in text


def test_refused_connection() -> None:
    url = f"http://127.0.0.1:{services.free_port()}"
    exc = raised(url)
    assert isinstance(exc, NewConnectionError)  # a ConnectTimeoutError subclass, not a timeout
    assert str(twilio_error(exc, TO)).startswith(
        "Twilio could not be reached sending to +1******0100"
    )


def test_connection_closed_without_an_answer() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"

        def hang_up() -> None:
            for _ in range(2):
                connection, _ = listener.accept()
                connection.recv(65536)
                connection.close()

        thread = threading.Thread(target=hang_up, daemon=True)
        thread.start()
        exc = raised(url)
        assert isinstance(exc, ProtocolError)
        # The request went out: Twilio may have created the message before the line dropped.
        with pytest.raises(
            AmbiguousError, match=r"closed the connection before answering sending to \+1\*+0100"
        ):
            channel_for(url).send(sms())
        thread.join(timeout=5)


def test_unreachable_proxy(monkeypatch: pytest.MonkeyPatch, recorder: Recorder) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{services.free_port()}")
    exc = raised(recorder.url)
    assert isinstance(exc, ProxyError)
    assert "could not be reached through the proxy sending to +1******0100" in str(
        twilio_error(exc, TO)
    )
    assert recorder.seen == []


def test_other_exceptions_are_not_mapped() -> None:
    with pytest.raises(TypeError, match="not a Twilio or HTTP failure"):
        twilio_error(ValueError("a bug"), TO)


# -- the environment: proxies and the CA bundle ----------------------------------------------------


def test_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch, recorder: Recorder) -> None:
    """The recorder plays the proxy; nothing listens at the API URL itself."""
    monkeypatch.setenv("HTTP_PROXY", f"http://ops:s%40cret@127.0.0.1:{recorder.port}")
    api_url = f"http://127.0.0.1:{services.free_port()}"
    channel = channel_for(api_url)
    assert isinstance(channel._http.pool, urllib3.ProxyManager)
    monkeypatch.delenv("HTTP_PROXY")  # read once, when the channel was built
    assert channel.send(sms()).startswith("SM")
    [seen] = recorder.seen
    assert seen.target == api_url + MESSAGES  # the absolute form: a proxy's request
    proxy_auth = base64.b64encode(b"ops:s@cret").decode()
    assert seen.headers["Proxy-Authorization"] == f"Basic {proxy_auth}"
    assert seen.headers["Authorization"].startswith("Basic ")


def test_no_proxy_bypasses_the_proxy(monkeypatch: pytest.MonkeyPatch, recorder: Recorder) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{services.free_port()}")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    channel = channel_for(recorder.url)
    assert isinstance(channel._http, DirectHttpClient)
    assert channel.send(sms()).startswith("SM")
    assert recorder.seen[0].target == MESSAGES


def test_https_proxy_for_twilio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "proxy.internal:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://other.internal:8080")
    pool = TwilioChannel(ACCOUNT_SID, AUTH_TOKEN, from_=FROM)._http.pool
    assert isinstance(pool, urllib3.ProxyManager)
    assert pool.proxy is not None and pool.proxy.url == "http://proxy.internal:3128"
    assert pool.connection_pool_kw["maxsize"] == 64 and pool.connection_pool_kw["block"] is True


def test_pool_settings(recorder: Recorder) -> None:
    channel = channel_for(recorder.url, concurrency=5, timeout=2.5)
    http = channel._http
    assert isinstance(http, DirectHttpClient)
    assert (http.pools.maxsize, http.pools.timeout) == (5, 2.5)
    assert http.pools.context is None  # no TLS to an http:// API: no CA bundle loaded
    secure = TwilioChannel(ACCOUNT_SID, AUTH_TOKEN, from_=FROM, concurrency=3)._http
    assert isinstance(secure, DirectHttpClient) and secure.pools.context is not None
    assert secure.pools.context.verify_mode == ssl.CERT_REQUIRED
    assert secure.pools.context.check_hostname


def test_urllib3_pool_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{services.free_port()}")
    channel = channel_for("http://api.example.com", concurrency=5, timeout=2.5)
    assert isinstance(channel._http, Urllib3HttpClient)
    settings = channel._http.pool.connection_pool_kw
    assert (settings["maxsize"], settings["block"]) == (5, True)
    assert settings["retries"].total is False  # no retry, no redirect
    assert (settings["timeout"].connect_timeout, settings["timeout"].read_timeout) == (2.5, 2.5)
    assert settings["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    assert settings["ssl_context"].check_hostname


def test_certifi_by_default() -> None:
    assert Urllib3HttpClient("https://api.twilio.com", maxsize=1, timeout=1).ca_bundle == (
        certifi.where()
    )


@pytest.fixture
def tls_recorder(tls_files: TlsFiles) -> Iterator[Recorder]:
    with Recorder(tls=tls_files.server_context()) as server:
        yield server


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"])
def test_ca_bundle_from_the_environment(
    tls_recorder: Recorder, tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, str(tls_files.cert))
    channel = channel_for(tls_recorder.url)
    assert channel._http.ca_bundle == str(tls_files.cert)
    assert channel.send(sms()).startswith("SM")
    assert tls_recorder.seen[0].target == MESSAGES


def test_ca_bundle_directory(
    tls_recorder: Recorder, tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    certificate = ssl.PEM_cert_to_DER_cert(tls_files.cert.read_text())
    x509_hash = _subject_hash(tls_files)
    (tmp_path / f"{x509_hash}.0").write_text(ssl.DER_cert_to_PEM_cert(certificate))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path))
    assert channel_for(tls_recorder.url).send(sms()).startswith("SM")


def _subject_hash(tls_files: TlsFiles) -> str:
    done = subprocess.run(
        ["openssl", "x509", "-noout", "-hash", "-in", str(tls_files.cert)],
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


def test_untrusted_certificate_is_refused(tls_recorder: Recorder) -> None:
    """certifi does not trust the test certificate: no request goes out."""
    exc = raised(tls_recorder.url, timeout=5)
    assert isinstance(exc, SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc)
    with pytest.raises(TransientError, match=r"could not be reached sending to \+1\*+0100"):
        channel_for(tls_recorder.url).send(sms())
    assert tls_recorder.seen == []


def test_wrong_ca_bundle_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="cannot load the CA bundle"):
        TwilioChannel(ACCOUNT_SID, AUTH_TOKEN, from_=FROM)


# -- the shared stub, through the new transport ----------------------------------------------------


def test_stub_accepts_what_the_transport_sends() -> None:
    """The stub checks the Basic credentials and the form: a wrong token is refused."""
    with TwilioStub() as stub:
        assert channel_for(stub.url).send(sms()).startswith("SM")
        wrong = TwilioChannel(ACCOUNT_SID, "wrong", from_=FROM, api_url=stub.url)
        with pytest.raises(TransientError, match="check the account SID"):
            wrong.send(sms())
        assert stub.forms[0] == {"To": TO, "From": FROM, "Body": BODY}
        assert stub.accepted[TO] == 1


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=12),
        st.one_of(
            st.text(max_size=80),
            st.lists(st.text(max_size=20), max_size=3),
            st.integers(),
            st.booleans(),
            st.binary(max_size=10),
        ),
        max_size=6,
    )
)
def test_form_encoding_is_urlencodes(data: dict[str, object]) -> None:
    """The form a send posts is urlencode's, byte for byte (emoji, spaces, ``&``, ``=``, lists)."""
    assert form_encode(data) == urlencode(data, doseq=True)


def test_form_encoding_of_a_message() -> None:
    form = {"To": TO, "From": FROM, "Body": "Café ☕ & more = 100%\nReply DONE"}
    assert (
        form_encode(form)
        == urlencode(form)
        == (
            "To=%2B14155550100&From=%2B15005550006&Body=Caf%C3%A9+%E2%98%95+%26+more+%3D+100%25"
            "%0AReply+DONE"
        )
    )
