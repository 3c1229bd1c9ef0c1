"""A lean HTTP/1.1 client: requests on kept-alive connections, each failure told apart by whether
the request could have reached the server.

Why not urllib3: on loopback, urllib3 and http.client cost a Twilio send about 0.25 ms of CPU
(the pool's queue and ``Timeout`` objects, the connection's header checks, http.client's header
parser built on ``email.parser``, the response wrapper); writing the request as one block of
bytes and reading the answer with a few ``bytes`` operations costs about a quarter of that. This
client does only what the Twilio channel needs:

- HTTP/1.1 over TCP or TLS (the caller's ``SSLContext``: verification, hostname check, CA bundle);
  no proxy (the channel uses urllib3 when the environment names one), no redirect, no retry, no
  compression (``Accept-Encoding: identity``, as http.client sends);
- a request with a ``bytes`` body, written in one ``send`` (headers and body together);
- answers with ``Content-Length``, ``chunked``, or a body that ends when the server closes; 1xx
  interim answers skipped;
- up to ``maxsize`` connections an origin, kept alive; a request waits for a free one.

**What a failure means** (the engine's guarantees rest on it: a message that may have reached the
provider is never sent again blind):

- :class:`NotSent`: nothing of the request left this process. The connection could not be made
  (DNS, refused, unreachable, :class:`ConnectTimeout`, the TLS handshake or the certificate), or
  the kernel took none of the request's bytes (the first ``send`` failed). Safe to send again.
- :class:`MaybeSent`: the request was written, wholly or in part, and no whole answer came back:
  :class:`ReadTimeout`, :class:`Disconnected` (closed or reset), :class:`BadAnswer` (not HTTP).
  The server may have acted on it.

**A kept-alive connection the server closed while it was idle** (a server's idle timeout, a load
balancer): before a connection is reused it is polled; an idle connection has nothing to read
unless the server closed it (or broke the protocol), so a readable one is closed and the request
goes on a new connection: nothing was sent on the old one. urllib3 checks the same way
(``is_connection_dropped``). If the server closes it in the instant between that check and the
write, either the kernel refuses the write (the server's reset has arrived: nothing was sent, and
the request goes once more on a new connection) or it takes the bytes and no answer comes:
:class:`Disconnected`, ambiguous, as with urllib3 (with ``retries=False``) before.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import ssl
import threading
from dataclasses import dataclass

from reminders.errors import RuntimeFailure

_READ_SIZE = 65536
_MAX_HEAD = 65536  # bytes of status line and headers before the answer is not HTTP
_MAX_LINE = 4096  # a chunk-size or trailer line
_TLS_RECORD = 16384  # the most plaintext one TLS record carries
_NO_BODY_STATUSES = frozenset({204, 304})
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")  # as http.client refuses in a request target
_BAD_VALUE = re.compile(r"[\r\n\x00]")  # a header value that would forge another header
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # a header name (RFC 9110)
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")  # a chunk size


class HTTPFailure(RuntimeFailure):
    """A request that got no whole answer. ``sent``: whether it may have reached the server.
    (The Twilio channel maps each to a ``ChannelError``: see ``twilio_error``.)"""

    sent = True


class NotSent(HTTPFailure):
    """Nothing of the request left this process: it is safe to send it again."""

    sent = False


class ConnectTimeout(NotSent):
    """The connection (or its TLS handshake) was not made in time."""


class MaybeSent(HTTPFailure):
    """The request was written (wholly or in part) and no whole answer came."""


class ReadTimeout(MaybeSent):
    """The server did not answer in time."""


class Disconnected(MaybeSent):
    """The connection was closed or reset before the whole answer came."""


class BadAnswer(MaybeSent):
    """The server answered something that is not HTTP/1.x."""


class _Refused(Exception):
    """The kernel took none of the request's bytes (internal: becomes a retry or NotSent)."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass
class Answer:
    """An HTTP answer: status, reason, headers (names as sent; repeated ones joined), body."""

    status: int
    reason: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Origin:
    """Where connections go: ``scheme`` ("http" or "https"), ``host``, ``port``."""

    scheme: str
    host: str
    port: int

    @property
    def host_header(self) -> str:
        """The ``Host`` value: with the port unless it is the scheme's default (as http.client)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def request_head(
    method: str, target: str, host: str, headers: dict[str, str], body: bytes | None
) -> bytes:
    """The request line and headers, as http.client writes them: ``Host``, then
    ``Accept-Encoding: identity`` and ``Content-Length`` unless given, then ``headers`` in order.

    Raises ``ValueError`` for a target or header that would break the request's framing.
    """
    if _BAD_TARGET.search(target):
        raise ValueError(f"a request target with a control character or space: {target!r}")
    given = {name.lower() for name in headers}
    lines = [f"{method} {target} HTTP/1.1"]
    if "host" not in given:
        lines.append(f"Host: {host}")
    if "accept-encoding" not in given:
        lines.append("Accept-Encoding: identity")
    if "content-length" not in given and (body is not None or method in ("POST", "PUT", "PATCH")):
        lines.append(f"Content-Length: {len(body) if body is not None else 0}")
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
            raise ValueError(f"an invalid header: {name!r}: {value!r}")
        lines.append(f"{name}: {value}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


class Connection:
    """One connection to an origin, carrying one request at a time."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.default_timeout = self.timeout = timeout  # seconds, for each read and write
        self._buf = bytearray()

    @classmethod
    def open(cls, origin: Origin, timeout: float, context: ssl.SSLContext | None) -> Connection:
        """Connect (and shake hands over TLS); every failure here is :class:`NotSent`."""
        try:
            sock = socket.create_connection((origin.host, origin.port), timeout=timeout)
        except TimeoutError as exc:
            raise ConnectTimeout(
                f"connecting to {origin.host}:{origin.port} timed out ({timeout} s)"
            ) from exc
        except OSError as exc:  # refused, unreachable, DNS (socket.gaierror)
            raise NotSent(f"cannot connect to {origin.host}:{origin.port}: {exc}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if origin.scheme == "https":
                assert context is not None
                sock = context.wrap_socket(sock, server_hostname=origin.host)
        except TimeoutError as exc:
            sock.close()
            raise ConnectTimeout(
                f"the TLS handshake with {origin.host}:{origin.port} timed out ({timeout} s)"
            ) from exc
        except OSError as exc:  # ssl.SSLError (a refused certificate...), a reset handshake
            sock.close()
            raise NotSent(f"TLS with {origin.host}:{origin.port} failed: {exc}") from exc
        return cls(sock, timeout)

    def idle_and_open(self) -> bool:
        """Whether this idle connection can carry a request: nothing to read on it. The server
        closing it (EOF or reset), or sending anything unasked, makes it readable."""
        sock = self.sock
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return False
        try:
            poller = select.poll()  # not select(): a descriptor past 1023 is fine
            poller.register(sock, select.POLLIN)
            return not poller.poll(0)
        except (OSError, ValueError):  # closed under us
            return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def exchange(
        self, method: str, data: bytes, timeout: float | None = None
    ) -> tuple[Answer, bool]:
        """Write one request (``data``: head and body) and read its answer; returns the answer
        and whether the connection can carry another request.

        Raises :class:`_Refused` when the kernel took none of ``data`` (nothing was sent),
        :class:`MaybeSent` once any of it may have left.
        """
        sock = self.sock
        wanted = self.default_timeout if timeout is None else timeout
        if wanted != self.timeout:
            sock.settimeout(wanted)
            self.timeout = wanted
        try:
            written = sock.send(data)
        except OSError as exc:  # a timeout too: no byte was taken
            if isinstance(sock, ssl.SSLSocket) and len(data) > _TLS_RECORD:
                # TLS writes whole records: some may have left before the error. (A part of
                # one record cannot be read by the server: one record's worth is exact.)
                raise Disconnected(f"writing the request failed: {exc}") from exc
            raise _Refused(exc) from exc
        try:
            if written < len(data):
                sock.sendall(memoryview(data)[written:])
        except TimeoutError as exc:
            raise Disconnected(f"writing the request timed out ({self.timeout} s)") from exc
        except OSError as exc:
            raise Disconnected(
                f"the connection broke while the request was written: {exc}"
            ) from exc
        try:
            return self._answer(method)
        except TimeoutError as exc:
            raise ReadTimeout(f"Read timed out. (read timeout={self.timeout})") from exc
        except OSError as exc:  # ECONNRESET, an SSL error or EOF in the middle of a record
            raise Disconnected(f"the connection broke before the whole answer: {exc}") from exc

    # -- reading ---------------------------------------------------------------------------------

    def _fill(self) -> bool:
        """Read what the server sent next into the buffer; False at the end of the stream."""
        data = self.sock.recv(_READ_SIZE)
        if not data:
            return False
        self._buf += data
        return True

    def _answer(self, method: str) -> tuple[Answer, bool]:
        while True:
            version, status, reason, headers, fields = self._head()
            if status >= 200 or status == 101:
                break  # 100 Continue, 102, 103: interim answers, the final one follows
        if status == 101:
            raise BadAnswer("the server switched protocols")
        keep = _keeps_alive(version, fields.get("connection", ""))
        if method == "HEAD" or status in _NO_BODY_STATUSES:
            body = b""
        elif "chunked" in fields.get("transfer-encoding", "").lower():
            body = self._chunked()
        elif "content-length" in fields:
            body = self._exactly(_content_length(fields["content-length"]))
        else:  # the body ends when the server closes the connection
            while self._fill():
                pass
            body = bytes(self._buf)
            self._buf.clear()
            keep = False
        if self._buf:  # bytes past the answer: nothing was asked for them
            keep = False
        return Answer(status, reason, headers, body), keep

    def _head(self) -> tuple[bytes, int, str, dict[str, str], dict[str, str]]:
        buf = self._buf
        start = 0
        while True:
            end = buf.find(b"\r\n\r\n", start)
            if end >= 0:
                break
            if len(buf) > _MAX_HEAD:
                raise BadAnswer(f"an answer head longer than {_MAX_HEAD} bytes")
            start = max(0, len(buf) - 3)
            if not self._fill():
                if buf:
                    raise Disconnected("the server closed the connection in the answer's head")
                raise Disconnected("the server closed the connection without answering")
        head = bytes(buf[:end])
        del buf[: end + 4]
        lines = head.split(b"\r\n")
        parts = lines[0].split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise BadAnswer(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        code = parts[1]
        if len(code) != 3 or not code.isdigit():
            raise BadAnswer(f"not an HTTP status: {lines[0][:80]!r}")
        reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
        headers: dict[str, str] = {}
        fields: dict[str, str] = {}  # lower-case names, for framing
        name = ""
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t") and name:  # an obsolete folded continuation
                headers[name] += " " + line.strip().decode("latin-1")
                fields[name.lower()] = headers[name]
                continue
            raw, sep, value = line.partition(b":")
            if not sep or not raw or raw != raw.strip():
                raise BadAnswer(f"not a header line: {line[:80]!r}")
            name = raw.decode("latin-1")
            text = value.strip().decode("latin-1")
            headers[name] = f"{headers[name]}, {text}" if name in headers else text
            lower = name.lower()
            fields[lower] = f"{fields[lower]}, {text}" if lower in fields else text
        return parts[0], int(code), reason, headers, fields

    def _exactly(self, size: int) -> bytes:
        buf = self._buf
        while len(buf) < size:
            if not self._fill():
                raise Disconnected(
                    f"the server closed the connection {size - len(buf)} bytes before the "
                    "answer's end"
                )
        data = bytes(buf[:size])
        del buf[:size]
        return data

    def _line(self) -> bytes:
        buf = self._buf
        start = 0
        while True:
            end = buf.find(b"\r\n", start)
            if end >= 0:
                line = bytes(buf[:end])
                del buf[: end + 2]
                return line
            if len(buf) > _MAX_LINE:
                raise BadAnswer(f"a chunk line longer than {_MAX_LINE} bytes")
            start = max(0, len(buf) - 1)
            if not self._fill():
                raise Disconnected("the server closed the connection in a chunked answer")

    def _chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            line = self._line()
            size_text = line.split(b";", 1)[0].strip()
            if not _HEX.fullmatch(size_text):
                raise BadAnswer(f"not a chunk size: {line[:40]!r}")
            size = int(size_text, 16)
            if size == 0:
                while self._line():  # trailer fields, up to the empty line
                    pass
                return b"".join(parts)
            parts.append(self._exactly(size))
            if self._exactly(2) != b"\r\n":
                raise BadAnswer("a chunk not followed by CRLF")


def _keeps_alive(version: bytes, connection: str) -> bool:
    tokens = {t.strip().lower() for t in connection.split(",")} if connection else set()
    if version == b"HTTP/1.0":
        return "keep-alive" in tokens
    return "close" not in tokens


def _content_length(value: str) -> int:
    # Repeated (joined with ", ") is allowed only when every copy is the same (RFC 9110 8.6).
    copies = {v.strip() for v in value.split(",")}
    if len(copies) != 1:
        raise BadAnswer(f"conflicting Content-Length values: {value!r}")
    text = copies.pop()
    if not text.isdigit():
        raise BadAnswer(f"not a Content-Length: {value!r}")
    return int(text)


class Pool:
    """Up to ``maxsize`` connections to one origin; a request waits for a free one."""

    def __init__(
        self, origin: Origin, maxsize: int, timeout: float, context: ssl.SSLContext | None
    ) -> None:
        self.origin = origin
        self.timeout = timeout
        self.context = context
        self._slots = threading.BoundedSemaphore(maxsize)
        self._idle: list[Connection] = []  # last in, first out: the warmest connection first
        self.opened = 0  # connections opened, ever (for tests and logs)

    def request(self, method: str, data: bytes, timeout: float | None = None) -> Answer:
        """Send one request (``data``: the head and body) and read its whole answer.

        A reused connection found closed by the server is replaced before anything is written
        on it; one whose write the kernel refused (nothing sent) is replaced once too.
        """
        with self._slots:
            conn, reused = self._take()
            try:
                try:
                    answer, keep = conn.exchange(method, data, timeout)
                except _Refused as refused:
                    conn.close()
                    if not reused:
                        raise NotSent(
                            f"the connection to {self.origin.host}:{self.origin.port} took no "
                            f"byte of the request: {refused.cause}"
                        ) from refused.cause
                    conn, reused = self._new(), False  # nothing left: send it on a new one
                    try:
                        answer, keep = conn.exchange(method, data, timeout)
                    except _Refused as again:
                        raise NotSent(
                            f"the connection to {self.origin.host}:{self.origin.port} took no "
                            f"byte of the request: {again.cause}"
                        ) from again.cause
            except BaseException:
                conn.close()
                raise
            if keep:
                self._idle.append(conn)
            else:
                conn.close()
            return answer

    def _take(self) -> tuple[Connection, bool]:
        idle = self._idle
        while True:
            try:
                conn = idle.pop()
            except IndexError:
                return self._new(), False
            if conn.idle_and_open():
                return conn, True
            conn.close()  # the server closed it while idle: nothing was sent on it

    def _new(self) -> Connection:
        conn = Connection.open(self.origin, self.timeout, self.context)
        self.opened += 1
        return conn

    def close(self) -> None:
        """Close the idle connections (those in use close when their request is done)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class Pools:
    """A :class:`Pool` an origin, rebuilt in a forked child (its parent's sockets are not its
    own)."""

    def __init__(self, maxsize: int, timeout: float, context: ssl.SSLContext | None) -> None:
        self.maxsize = maxsize
        self.timeout = timeout
        self.context = context
        self._pools: dict[Origin, Pool] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def get(self, origin: Origin) -> Pool:
        pool = self._pools.get(origin)
        if pool is not None and self._pid == os.getpid():
            return pool
        with self._lock:
            if self._pid != os.getpid():
                self._pools, self._pid = {}, os.getpid()
            pool = self._pools.get(origin)
            if pool is None:
                pool = self._pools[origin] = Pool(origin, self.maxsize, self.timeout, self.context)
            return pool

    def close(self) -> None:
        for pool in list(self._pools.values()):
            pool.close()
