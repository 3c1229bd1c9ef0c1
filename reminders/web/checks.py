"""``POST /v1/checks/<name>``: the checkout's synchronous questions, over HTTP.

JSON in (the check's parameters), JSON out (the answer of :func:`reminders.checks.ask`).
``Authorization: Bearer <key>`` with a key from ``REMINDERS_API_KEYS`` (comma-separated, read at
each request and compared in constant time); with no key configured every request is refused.

Statuses: 200 answered or ``unknown`` (timed out: the checkout decides, nothing broke); 401 no or
a wrong key; 403 no keys configured; 404 no such check; 405 not a POST; 400 a body that is not
JSON; 413 a body over 64 KiB; 414 a URL over 4 KiB; 422 bad parameters (each one named, with the
allowed ones and their types); 500 the check's query or message is broken; 503 the business DB is
unreachable.

The endpoint is a plain WSGI app placed in front of Flask (:class:`ChecksEndpoint`): a checkout
waits on every answer, and Flask's routing, request and response objects cost about twice the
check itself (0.2 ms of CPU a request). Everything else goes on to Flask.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from ..checks import CheckParamError, ask
from ..errors import InputError
from .context import MAX_BODY, SECURE_HEADERS, url_too_long

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from ..app import App

API_KEYS_ENV = "REMINDERS_API_KEYS"
PREFIX = "/v1/checks/"

log = logging.getLogger(__name__)

# (HTTP status, JSON body, headers): not the check's own Answer, which the body carries
HttpAnswer = tuple[int, dict[str, Any], list[tuple[str, str]]]
_JSON_HEADERS = [
    ("Content-Type", "application/json"),
    ("Cache-Control", "no-store"),  # an answer about one customer's purchases
    *SECURE_HEADERS,
]


def api_keys() -> list[bytes]:
    """The configured API keys (``REMINDERS_API_KEYS``, comma-separated; blanks ignored)."""
    raw = os.environ.get(API_KEYS_ENV, "")
    return [key.strip().encode() for key in raw.split(",") if key.strip()]


def key_is_valid(given: bytes, keys: list[bytes]) -> bool:
    """Whether ``given`` is one of ``keys``, in time independent of where they differ."""
    found = False
    for key in keys:  # every key is compared: the time does not tell which one matched
        found |= hmac.compare_digest(given, key)
    return found


def refused(authorization: str) -> HttpAnswer | None:
    """A 401/403 answer when ``authorization`` (the header) holds no valid API key, else None."""
    keys = api_keys()
    if not keys:
        error = f"checks are disabled: no API key is configured (set {API_KEYS_ENV})"
        return 403, {"error": error}, []
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        error = "an API key is required: send the header Authorization: Bearer <key>"
        return 401, {"error": error}, [("WWW-Authenticate", 'Bearer realm="reminders"')]
    if not key_is_valid(token.encode(), keys):
        challenge = 'Bearer realm="reminders", error="invalid_token"'
        return 401, {"error": "the API key is not valid"}, [("WWW-Authenticate", challenge)]
    return None


def _standard(status: int) -> HttpAnswer:
    return status, {"error": HTTPStatus(status).phrase}, []


class ChecksEndpoint:
    """WSGI middleware: answers ``/v1/checks/...`` itself and hands every other path to ``app``."""

    def __init__(self, engine: App, app: WSGIApplication) -> None:
        self.engine = engine
        self.app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path: str = environ.get("PATH_INFO", "")
        if not path.startswith(PREFIX):
            return self.app(environ, start_response)
        status, body, headers = self.answer(environ, path)
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        start_response(
            f"{status} {HTTPStatus(status).phrase}",
            [*_JSON_HEADERS, ("Content-Length", str(len(data))), *headers],
        )
        return [data]

    def answer(self, environ: WSGIEnvironment, path: str) -> HttpAnswer:
        # WSGI hands the path over as latin-1 text of its bytes (PEP 3333); names are UTF-8.
        name = path[len(PREFIX) :].encode("latin-1", "replace").decode("utf-8", "replace")
        if not name or "/" in name:
            return _standard(404)
        if environ.get("REQUEST_METHOD") != "POST":
            status, body, _ = _standard(405)
            return status, body, [("Allow", "POST")]
        if url_too_long(environ):
            return _standard(414)
        no = refused(environ.get("HTTP_AUTHORIZATION", ""))
        if no is not None:
            return no
        try:
            return self.check(environ, name)
        except Exception:
            log.exception("check %s failed", name)
            return _standard(500)

    def check(self, environ: WSGIEnvironment, name: str) -> HttpAnswer:
        try:
            ruleset = self.engine.ruleset
        except InputError as exc:
            return 500, {"error": "the rules are invalid", "problems": _texts(exc)}, []
        known = [c.name for c in ruleset.checks]
        if name not in known:
            return 404, {"error": f'no check named "{name}"', "checks": known}, []
        raw = _body(environ)
        if raw is None:
            return _standard(413)
        try:
            given = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            return 400, {"error": f"the body is not JSON: {exc}"}, []
        if not isinstance(given, dict):
            error = "the body must be a JSON object of parameters"
            return 422, {"error": error, "allowed": dict(ruleset.check(name).params)}, []
        try:
            answer = ask(self.engine, name, given)
        except CheckParamError as exc:
            error = f"bad parameters for check {name}"
            return 422, {"error": error, "params": exc.errors, "allowed": exc.allowed}, []
        except InputError as exc:
            return 500, {"error": "the check is invalid", "problems": _texts(exc)}, []
        status = 200
        if answer.status == "error":
            status = 503 if answer.unreachable else 500
        return status, answer.as_dict(), []


def _body(environ: WSGIEnvironment) -> bytes | None:
    """The request body, or None when it is over ``MAX_BODY`` (declared or sent)."""
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:
        try:
            declared = int(length)
        except ValueError:
            declared = -1
        if declared > MAX_BODY:
            return None
        if declared >= 0:
            data: bytes = stream.read(declared)
            return data
    data = stream.read(MAX_BODY + 1)  # chunked: read no more than the limit allows
    return None if len(data) > MAX_BODY else data


def _texts(exc: InputError) -> list[str]:
    return [str(problem) for problem in exc.problems]
