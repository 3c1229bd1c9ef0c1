"""The ASGI front of the WSGI app: a request is received whole before a thread runs it.

granian's WSGI interface hands a request to a Python thread as soon as its headers have arrived,
and the thread then waits for the body: eight requests that declared a body and sent none held
every thread of ``reminders web`` (no credentials needed, as the signature is checked only after
the body is read). Here granian's event loop receives the body, within ``body_timeout`` seconds
(else 408) and ``MAX_BODY`` bytes, and only then does one of ``threads`` threads run the app.

It also refuses request headers (request line included) over ``MAX_HEADER_BYTES`` with 431:
hyper's own read buffer (set to the same size) bounds the memory, but may let a head of up to
twice its size through.

The WSGI environ is built here from the ASGI scope, as granian's WSGI interface built it, but
without the process's environment variables.
"""

from __future__ import annotations

import asyncio
import io
import sys
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from .context import MAX_BODY

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication, WSGIEnvironment

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# Request headers, request line included, are refused past this.
MAX_HEADER_BYTES = 64 * 1024
# Seconds a client has to send a whole body once its headers are in.
BODY_TIMEOUT = 10.0


class _Gone(Exception):
    """The client went away before its body was complete."""


class WSGIFront:
    """An ASGI app running ``app`` (WSGI) on ``threads`` threads, each request received whole."""

    def __init__(
        self,
        app: WSGIApplication,
        threads: int,
        *,
        body_timeout: float = BODY_TIMEOUT,
        max_body: int = MAX_BODY,
        max_header_bytes: int = MAX_HEADER_BYTES,
    ) -> None:
        self.app = app
        self.body_timeout = body_timeout
        self.max_body = max_body
        self.max_header_bytes = max_header_bytes
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="reminders-web")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no websockets; no lifespan (granian runs this without it)
        if _head_size(scope) > self.max_header_bytes:
            await _plain(send, 431, b"431 Request Header Fields Too Large\n")
            return
        declared, chunked = _framing(scope)
        body = b""
        if chunked or declared:
            try:
                async with asyncio.timeout(self.body_timeout):  # no task of its own: cheaper
                    body = await self._body(receive, declared)
            except TimeoutError:
                await _plain(send, 408, b"408 Request Timeout\n")
                return
            except _Gone:
                return
        environ = _environ(scope, body, declared)
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def run() -> None:
            try:
                outcome: Any = self._run(environ)
            except BaseException as exc:  # handed to the loop, which raises it there
                outcome = exc
            loop.call_soon_threadsafe(_settle, done, outcome)

        self.executor.submit(run)
        status, headers, content = await done
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    async def _body(self, receive: Receive, declared: int | None) -> bytes:
        """The whole body; past ``max_body`` only its first ``max_body + 1`` bytes (the app
        answers 413 on the length, declared or received)."""
        if declared is not None and declared > self.max_body:
            return b""  # refused on its declared length: not worth receiving
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Gone
            chunk = message.get("body", b"")
            parts.append(chunk)
            size += len(chunk)
            if size > self.max_body or not message.get("more_body", False):
                return b"".join(parts)[: self.max_body + 1]

    def _run(self, environ: WSGIEnvironment) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Call the WSGI app in a thread; its status, headers and whole body."""
        started: list[Any] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            if exc_info and started:
                raise exc_info[1].with_traceback(exc_info[2])
            started[:] = [status, headers]
            return lambda data: chunks.append(data)

        chunks: list[bytes] = []
        result: Iterable[bytes] = self.app(environ, start_response)
        try:
            chunks.extend(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        status, headers = started
        encoded = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        return int(status.split(" ", 1)[0]), encoded, b"".join(chunks)


def _head_size(scope: Scope) -> int:
    """The bytes of the request line and headers, as the client sent them (near enough)."""
    line = len(scope["method"]) + len(scope.get("raw_path") or b"") + len(scope["query_string"])
    return line + 12 + sum(len(k) + len(v) + 4 for k, v in scope["headers"])


def _framing(scope: Scope) -> tuple[int | None, bool]:
    """The declared ``Content-Length`` (None when absent or not a number) and whether the body
    comes chunked; a request with neither has no body to wait for."""
    declared: int | None = None
    chunked = False
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                chunked = True  # unreadable: receive what comes, the app judges it
        elif key == b"transfer-encoding":
            chunked = True
    return declared, chunked


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    if future.cancelled():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _environ(scope: Scope, body: bytes, declared: int | None) -> WSGIEnvironment:
    """The WSGI environ of a request (PEP 3333), its body already received."""
    raw_path = scope.get("raw_path") or scope["path"].encode("utf-8")
    path = unquote_to_bytes(raw_path.split(b"?", 1)[0]).decode("latin-1")
    server = scope.get("server") or ("127.0.0.1", 80)
    client = scope.get("client") or ("", 0)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": scope["query_string"].decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]),
        "REMOTE_ADDR": str(client[0]),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": io.BytesIO(body),
        "wsgi.input_terminated": True,  # the stream ends with the body, chunked or not
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    # A body refused on its declared length keeps that length, so the app answers 413.
    if declared is not None or body:
        environ["CONTENT_LENGTH"] = str(declared if declared is not None else len(body))
    for key, value in scope["headers"]:
        name = key.decode("latin-1")
        text = value.decode("latin-1")
        if name == "content-length":
            continue
        if name == "content-type":
            environ["CONTENT_TYPE"] = text
            continue
        wsgi_name = "HTTP_" + name.upper().replace("-", "_")
        if wsgi_name in environ:
            joiner = "; " if name == "cookie" else ","
            environ[wsgi_name] += joiner + text
        else:
            environ[wsgi_name] = text
    return environ


async def _plain(send: Send, status: int, body: bytes) -> None:
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
