"""The engine's :class:`~reminders.app.App` as seen from a request."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import current_app, request
from werkzeug.exceptions import RequestEntityTooLarge, RequestURITooLarge

from reminders.app import App

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

KEY = "reminders"
MAX_BODY = 64 * 1024  # bytes; Twilio's webhooks are a few KiB, a one-click POST a few bytes
MAX_URL = 4096  # bytes of path and query; the longest link the engine writes is a few hundred
_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
# On every answer: pages forbid framing, scripts and referrers (a token in their URL is a
# credential); JSON is never sniffed as something else.
SECURE_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy", _CSP),
)


def url_too_long(environ: WSGIEnvironment) -> bool:
    """Whether the request's path and query are over ``MAX_URL`` (answered 414)."""
    return len(environ.get("PATH_INFO", "")) + len(environ.get("QUERY_STRING", "")) > MAX_URL


def refuse_oversized() -> None:
    """Before every request: 414 past ``MAX_URL``, 413 past ``MAX_BODY``. Every route, even one
    that never reads its body: a declared huge body is refused at once."""
    if url_too_long(request.environ):
        raise RequestURITooLarge()
    length = request.content_length
    if length is not None and length > MAX_BODY:
        raise RequestEntityTooLarge()


def engine() -> App:
    """The App this Flask app serves (config, rules, state DB, the engine's clock)."""
    found: App = current_app.extensions[KEY]
    return found
