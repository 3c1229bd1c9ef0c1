"""The direct HTTP/1.1 transport (:mod:`reminders.channels.http1`), against real sockets.

Each server here is a listening socket whose connections a test scripts byte by byte: answer,
close while idle, close or reset after reading a request, hang, answer garbage. What matters most
is the line between :class:`NotSent` (nothing left: the engine may send again) and
:class:`MaybeSent` (the provider may have the message: ``unknown``, reconciled, never resent
blind), through the channel as the engine sees it.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

from reminders.channels import Message, TwilioChannel
from reminders.channels.http1 import (
    BadAnswer,
    Connection,
    ConnectTimeout,
    Disconnected,
    HTTPFailure,
    MaybeSent,
    NotSent,
    Origin,
    Pool,
    ReadTimeout,
    _Refused,
    request_head,
)
from reminders.channels.twilio_http import DirectHttpClient
from reminders.errors import AmbiguousError, TransientError
from tests import services
from tests.twilio_stub import ACCOUNT_SID, AUTH_TOKEN

if TYPE_CHECKING:
    from tests.channel_fixtures import TlsFiles

FROM = "+15005550006"
TO = "+14155550100"
MESSAGES = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
CREATED = b'{"sid": "SM00000000000000000000000000000001", "status": "queued"}'


@pytest.fixture(autouse=True)
def _no_ambient_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy named by the machine would put the channel on urllib3: these test the direct path."""
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)


def created(extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
        + extra
        + b"Content-Length: %d\r\n\r\n" % len(CREATED)
        + CREATED
    )


def read_request(conn: socket.socket) -> bytes:
    """One whole request (head and Content-Length body) from ``conn``; b"" at EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += conn.recv(65536)
    return head + b"\r\n\r\n" + body


def reset(conn: socket.socket) -> None:
    """Close with a TCP reset rather than a FIN (SO_LINGER 0)."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


class Scripted:
    """A server whose every accepted connection runs ``script(conn, server)`` in a thread; it
    counts connections and the requests the scripts read (``requests``)."""

    def __init__(self, script: Callable[[socket.socket, Scripted], None]) -> None:
        self.script = script
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.connections = 0
        self.requests: list[bytes] = []
        self.lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    @property
    def origin(self) -> Origin:
        return Origin("http", "127.0.0.1", self.listener.getsockname()[1])

    def read(self, conn: socket.socket) -> bytes:
        request = read_request(conn)
        if request:
            with self.lock:
                self.requests.append(request)
        return request

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.script(conn, self)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[socket.socket, Scripted], None]], Scripted]]:
    servers: list[Scripted] = []

    def start(script: Callable[[socket.socket, Scripted], None]) -> Scripted:
        servers.append(Scripted(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def keep_answering(conn: socket.socket, server: Scripted) -> None:
    while server.read(conn):
        conn.sendall(created())


def channel_for(url: str, **kwargs: object) -> TwilioChannel:
    return TwilioChannel(ACCOUNT_SID, AUTH_TOKEN, from_=FROM, api_url=url, **kwargs)  # type: ignore[arg-type]


def sms(reminder_id: int = 1) -> Message:
    return Message(reminder_id, "refill-due", "sms", TO, "Your refill is due Friday.")


def pool_for(server: Scripted, maxsize: int = 4, timeout: float = 2.0) -> Pool:
    return Pool(server.origin, maxsize, timeout, None)


def post() -> bytes:
    body = b"To=%2B14155550100&Body=hi"
    return request_head("POST", MESSAGES, "example", {"Content-Type": "x"}, body) + body


# -- keep-alive ------------------------------------------------------------------------------------


def test_sends_reuse_one_kept_alive_connection(serve: Callable[..., Scripted]) -> None:
    server = serve(keep_answering)
    channel = channel_for(server.url)
    assert [channel.send(sms(i)) for i in range(20)] == [CREATED[9:43].decode()] * 20
    assert server.connections == 1 and len(server.requests) == 20


def test_a_connection_the_server_closed_while_idle_is_replaced_before_sending(
    serve: Callable[..., Scripted],
) -> None:
    """A server that closes each connection a moment after answering (an idle timeout, without
    ``Connection: close``): the next send finds it closed before writing anything, and goes once
    on a new connection."""

    def answer_then_close_when_idle(conn: socket.socket, server: Scripted) -> None:
        if server.read(conn):
            conn.sendall(created())
            time.sleep(0.05)

    server = serve(answer_then_close_when_idle)
    channel = channel_for(server.url)
    for i in range(3):
        assert channel.send(sms(i)).startswith("SM")
        time.sleep(0.2)  # the server's close arrives while the connection is idle
    assert server.connections == 3 and len(server.requests) == 3  # each sent exactly once


def test_a_connection_reset_while_idle_is_replaced_before_sending(
    serve: Callable[..., Scripted],
) -> None:
    def answer_then_reset(conn: socket.socket, server: Scripted) -> None:
        if server.read(conn):
            conn.sendall(created())
            time.sleep(0.05)
            reset(conn)

    server = serve(answer_then_reset)
    pool = pool_for(server)
    for _ in range(3):
        assert pool.request("POST", post()).status == 201
        time.sleep(0.2)
    assert server.connections == 3 and len(server.requests) == 3 and pool.opened == 3


def test_a_write_refused_on_a_reused_connection_goes_once_on_a_new_one(
    serve: Callable[..., Scripted], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server resets the idle connection in the instant after the check before reuse: the
    kernel takes none of the request (the reset has arrived), so it was not sent; it goes once
    more, on a new connection."""

    def answer_once_then_reset(conn: socket.socket, server: Scripted) -> None:
        if server.read(conn):
            conn.sendall(created())
            time.sleep(0.05)
            reset(conn)

    server = serve(answer_once_then_reset)
    pool = pool_for(server)
    assert pool.request("POST", post()).status == 201
    time.sleep(0.2)
    monkeypatch.setattr(Connection, "idle_and_open", lambda self: True)  # the check missed it
    assert pool.request("POST", post()).status == 201
    assert server.connections == 2 and len(server.requests) == 2


def test_a_request_written_on_a_connection_closing_under_it_is_ambiguous(
    serve: Callable[..., Scripted], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server closed (FIN) the idle connection in the instant after the check: the kernel
    takes the request's bytes, and no answer comes. The server may have had it: ambiguous,
    and not sent again."""

    def answer_once_then_close(conn: socket.socket, server: Scripted) -> None:
        if server.read(conn):
            conn.sendall(created())
            conn.shutdown(socket.SHUT_WR)
            time.sleep(0.3)  # still reading: the next request arrives, unanswered
            server.read(conn)

    server = serve(answer_once_then_close)
    channel = channel_for(server.url)
    assert channel.send(sms()).startswith("SM")
    time.sleep(0.1)
    monkeypatch.setattr(Connection, "idle_and_open", lambda self: True)  # the check missed it
    with pytest.raises(AmbiguousError, match="closed the connection before answering"):
        channel.send(sms(2))
    time.sleep(0.4)
    assert server.connections == 1 and len(server.requests) == 2  # never resent


def test_connection_close_and_http10_answers_are_not_reused(
    serve: Callable[..., Scripted],
) -> None:
    def answers(conn: socket.socket, server: Scripted) -> None:
        if server.read(conn):
            if server.connections == 1:
                conn.sendall(created(b"Connection: close\r\n"))
            else:  # HTTP/1.0, no length: the body ends with the connection
                conn.sendall(b"HTTP/1.0 201 Created\r\n\r\n" + CREATED)
                return
            time.sleep(0.5)  # not closed yet: only the header says not to reuse it

    server = serve(answers)
    pool = pool_for(server)
    assert pool.request("POST", post()).body == CREATED
    assert pool.request("POST", post()).body == CREATED
    assert pool.request("POST", post()).status == 201
    assert server.connections == 3 and pool._idle == []


def test_chunked_and_interim_answers(serve: Callable[..., Scripted]) -> None:
    def chunked(conn: socket.socket, server: Scripted) -> None:
        while server.read(conn):
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            conn.sendall(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n")
            conn.sendall(b"X-Folded: a\r\n b\r\n\r\n")
            for part in (CREATED[:10], CREATED[10:]):
                conn.sendall(b"%x;ext=1\r\n%s\r\n" % (len(part), part))
                time.sleep(0.01)
            conn.sendall(b"0\r\nTrailer: x\r\n\r\n")

    server = serve(chunked)
    pool = pool_for(server)
    for _ in range(2):
        answer = pool.request("POST", post())
        assert (answer.status, answer.body) == (201, CREATED)
        assert answer.headers["X-Folded"] == "a b"
    assert server.connections == 1


def test_a_timeout_for_one_request_only(serve: Callable[..., Scripted]) -> None:
    def slow_second(conn: socket.socket, server: Scripted) -> None:
        while server.read(conn):
            if len(server.requests) == 2:
                time.sleep(0.5)
            conn.sendall(created())

    server = serve(slow_second)
    pool = pool_for(server, timeout=2.0)
    assert pool.request("POST", post()).status == 201
    with pytest.raises(ReadTimeout):
        pool.request("POST", post(), timeout=0.2)
    assert pool.request("POST", post()).status == 201  # the pool's own 2 s again
    assert len(server.requests) == 3


# -- failures: before the request left -------------------------------------------------------------


def test_refused_connection_is_not_sent() -> None:
    url = f"http://127.0.0.1:{services.free_port()}"
    with pytest.raises(NotSent) as caught:
        DirectHttpClient(url, maxsize=1, timeout=1).request("POST", url + MESSAGES, data={"a": 1})
    assert not caught.value.sent and not isinstance(caught.value, MaybeSent)
    with pytest.raises(TransientError, match=r"could not be reached sending to \+1\*+0100"):
        channel_for(url).send(sms())


def test_unknown_host_is_not_sent() -> None:
    url = "http://twilio-api.invalid"
    with pytest.raises(TransientError, match="could not be reached") as caught:
        channel_for(url, timeout=2).send(sms())
    assert isinstance(caught.value.__cause__, NotSent)


def test_connect_timeout_is_not_sent(full_backlog: str) -> None:
    started = time.monotonic()
    with pytest.raises(TransientError) as caught:
        channel_for(full_backlog, timeout=0.3).send(sms())
    assert time.monotonic() - started < 1.5
    assert isinstance(caught.value.__cause__, ConnectTimeout)
    assert "did not accept a connection in time sending to +1******0100" in caught.value.message
    assert "may have been sent" not in caught.value.message


def test_tls_handshake_timeout_is_not_sent(serve: Callable[..., Scripted]) -> None:
    """A server that accepts TCP and never speaks TLS: nothing of the request was written."""

    def mute(conn: socket.socket, server: Scripted) -> None:
        time.sleep(1.0)

    server = serve(mute)
    url = server.url.replace("http://", "https://")
    with pytest.raises(TransientError, match="did not accept a connection in time") as caught:
        channel_for(url, timeout=0.3).send(sms())
    assert isinstance(caught.value.__cause__, ConnectTimeout)
    assert server.requests == []


def test_untrusted_certificate_is_not_sent(
    serve: Callable[..., Scripted], tls_files: TlsFiles
) -> None:
    context = tls_files.server_context()

    def tls(conn: socket.socket, server: Scripted) -> None:
        with context.wrap_socket(conn, server_side=True) as secure:
            server.read(secure)

    server = serve(tls)
    url = server.url.replace("http://", "https://")
    with pytest.raises(TransientError, match="CERTIFICATE_VERIFY_FAILED") as caught:
        channel_for(url).send(sms())
    assert isinstance(caught.value.__cause__, NotSent)
    assert server.requests == []


@pytest.mark.parametrize(("size", "sent"), [(2_000, False), (40_000, True)])
def test_a_refused_tls_write_is_not_sent_only_within_one_record(
    serve: Callable[..., Scripted], tls_files: TlsFiles, size: int, sent: bool
) -> None:
    """The server resets the connection right after the TLS handshake: the write fails. A
    request that fits one TLS record left nothing the server could read (refused: the pool sends
    it again on a new connection); a longer one may have left whole records before the error,
    so it counts as possibly sent."""
    context = tls_files.server_context()

    def handshake_then_reset(conn: socket.socket, server: Scripted) -> None:
        reset(context.wrap_socket(conn, server_side=True))

    server = serve(handshake_then_reset)
    client = ssl.create_default_context(cafile=str(tls_files.cert))
    conn = Connection.open(Origin("https", "127.0.0.1", server.origin.port), 2.0, client)
    time.sleep(0.3)  # the reset has arrived
    body = b"x" * size
    data = request_head("POST", "/", "h", {}, body) + body
    with pytest.raises(Disconnected if sent else _Refused):
        conn.exchange("POST", data)
    assert server.requests == []


# -- failures: after the request left --------------------------------------------------------------


def test_read_timeout_is_ambiguous(serve: Callable[..., Scripted]) -> None:
    def read_and_hang(conn: socket.socket, server: Scripted) -> None:
        server.read(conn)
        time.sleep(1.0)

    server = serve(read_and_hang)
    started = time.monotonic()
    with pytest.raises(AmbiguousError) as caught:
        channel_for(server.url, timeout=0.3).send(sms())
    assert time.monotonic() - started < 1.5
    assert isinstance(caught.value.__cause__, ReadTimeout)
    text = caught.value.message
    assert "Twilio did not answer in time sending to +1******0100" in text
    assert "(the message may have been sent)" in text and "Read timed out" in text
    assert len(server.requests) == 1


@pytest.mark.parametrize("how", ["close", "reset"])
def test_connection_lost_after_the_request_is_ambiguous(
    serve: Callable[..., Scripted], how: str
) -> None:
    """A new connection, the request read, then closed or reset: Twilio may have created the
    message; it is not sent again."""

    def read_then_drop(conn: socket.socket, server: Scripted) -> None:
        if server.read(conn) and how == "reset":
            reset(conn)

    server = serve(read_then_drop)
    with pytest.raises(AmbiguousError, match="closed the connection before answering") as caught:
        channel_for(server.url).send(sms())
    assert isinstance(caught.value.__cause__, Disconnected)
    assert server.connections == 1 and len(server.requests) == 1


@pytest.mark.parametrize(
    "answer",
    [
        created()[:40],  # the head cut short
        created()[:-10],  # the body cut short
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nshort",
    ],
    ids=["head", "body", "chunk"],
)
def test_an_answer_cut_short_is_ambiguous(serve: Callable[..., Scripted], answer: bytes) -> None:
    def cut(conn: socket.socket, server: Scripted) -> None:
        if server.read(conn):
            conn.sendall(answer)

    server = serve(cut)
    with pytest.raises(Disconnected):
        pool_for(server).request("POST", post())
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 2x1 Created\r\n\r\n",
        b"HTTP/1.1 201 Created\r\nno colon\r\n\r\n",
        b"HTTP/1.1 201 Created\r\nContent-Length: 5, 6\r\n\r\nhello!",
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
    ],
    ids=["not-http", "status", "header", "lengths", "chunk-size"],
)
def test_an_answer_that_is_not_http_is_ambiguous(
    serve: Callable[..., Scripted], answer: bytes
) -> None:
    def garbage(conn: socket.socket, server: Scripted) -> None:
        if server.read(conn):
            conn.sendall(answer)
            time.sleep(0.3)

    server = serve(garbage)
    with pytest.raises(BadAnswer) as caught:
        pool_for(server).request("POST", post())
    assert isinstance(caught.value, MaybeSent) and caught.value.sent
    with pytest.raises(AmbiguousError, match="may have been sent"):
        channel_for(server.url).send(sms())


def test_every_failure_is_one_of_the_two_kinds() -> None:
    for kind in (NotSent, ConnectTimeout, ReadTimeout, Disconnected, BadAnswer):
        assert issubclass(kind, HTTPFailure)
        assert issubclass(kind, NotSent) != issubclass(kind, MaybeSent)


# -- the request ---------------------------------------------------------------------------------


def test_request_head_is_what_http_client_writes() -> None:
    head = request_head("POST", "/a?b=1", "h:1", {"Accept": "application/json"}, b"x=1")
    assert head == (
        b"POST /a?b=1 HTTP/1.1\r\nHost: h:1\r\nAccept-Encoding: identity\r\n"
        b"Content-Length: 3\r\nAccept: application/json\r\n\r\n"
    )
    assert b"Content-Length" not in request_head("GET", "/", "h", {}, None)
    assert b"Content-Length: 0" in request_head("POST", "/", "h", {}, None)


@pytest.mark.parametrize(
    ("target", "headers"),
    [("/a b", {}), ("/a\r\nX: y", {}), ("/", {"X": "a\r\nEvil: 1"}), ("/", {"Bad Name": "v"})],
)
def test_request_head_refuses_what_would_break_the_framing(
    target: str, headers: dict[str, str]
) -> None:
    with pytest.raises(ValueError):
        request_head("GET", target, "h", headers, None)


def test_host_header() -> None:
    assert Origin("https", "api.twilio.com", 443).host_header == "api.twilio.com"
    assert Origin("http", "127.0.0.1", 4010).host_header == "127.0.0.1:4010"
    assert Origin("http", "::1", 80).host_header == "[::1]"


def test_the_pool_blocks_at_its_size(serve: Callable[..., Scripted]) -> None:
    def slow(conn: socket.socket, server: Scripted) -> None:
        while server.read(conn):
            time.sleep(0.1)
            conn.sendall(created())

    server = serve(slow)
    pool = pool_for(server, maxsize=2)
    threads = [threading.Thread(target=pool.request, args=("POST", post())) for _ in range(6)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert time.monotonic() - started >= 0.28  # three rounds of two
    assert len(server.requests) == 6 and server.connections == 2 and pool.opened == 2


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
