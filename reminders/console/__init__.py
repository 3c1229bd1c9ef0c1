"""The console: an internal web app for the people who run the engine, and the API it stands on.

:func:`create_console` builds the Flask app for an engine :class:`~reminders.app.App`: the JSON
API under ``/api/v1/`` (:mod:`.api`, described by the OpenAPI document it serves at
``/api/v1/openapi.json``), the server-rendered pages (:mod:`.pages`), log-in and access
(:mod:`.auth`). ``reminders console`` serves it with granian (:mod:`.server`), apart from the
public ``web`` endpoint so it can stay on an internal network.

Pages need no script and no CDN: charts are inline SVG drawn on the server (:mod:`.charts`), the
one stylesheet is served from the package. The answers forbid framing and load nothing from
elsewhere (``Content-Security-Policy``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging

from flask import Flask, Response, render_template, request
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as BaseResponse

from reminders import links
from reminders.app import App
from reminders.web.context import KEY, MAX_BODY, refuse_oversized

log = logging.getLogger(__name__)

CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; connect-src 'self'"
)
HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy", CSP),
    ("Cache-Control", "no-store"),
)


def session_key(secret: str) -> bytes:
    """The console's cookie-signing key, derived from ``REMINDERS_SECRET`` (so a session cookie
    is never a valid customer link token, nor the reverse)."""
    return hmac.new(secret.encode(), b"reminders console session", hashlib.sha256).digest()


def create_console(app: App) -> Flask:
    """The console's Flask app for ``app``; raises ``ConfigError`` without ``REMINDERS_SECRET``."""
    secret = links.secrets()[-1]
    app.ruleset  # noqa: B018 - load and validate now, not on the first request
    flask = Flask(__name__)
    flask.config.update(
        SECRET_KEY=session_key(secret),
        MAX_CONTENT_LENGTH=MAX_BODY,
        MAX_FORM_MEMORY_SIZE=MAX_BODY,
        MAX_FORM_PARTS=100,
        SESSION_COOKIE_NAME="reminders_console",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
    )
    flask.json.sort_keys = False  # type: ignore[attr-defined]
    flask.extensions[KEY] = app

    from ..metrics import metrics_app
    from . import api, auth, charts, pages

    flask.session_interface = auth.SessionInterface()
    flask.register_blueprint(auth.blueprint)
    flask.register_blueprint(api.blueprint)
    flask.register_blueprint(pages.blueprint)
    flask.register_blueprint(metrics_app(app))  # GET /metrics, for Prometheus
    flask.before_request(refuse_oversized)
    flask.before_request(auth.guard)
    flask.after_request(_headers)
    flask.register_error_handler(HTTPException, _error)
    flask.jinja_env.globals.update(csrf_token=auth.csrf_token, chart=charts)
    flask.jinja_env.filters.update(pages.FILTERS)
    return flask


def _headers(response: Response) -> Response:
    for name, value in HEADERS:
        response.headers.setdefault(name, value)
    return response


def _error(exc: HTTPException) -> BaseResponse:
    code = exc.code or 500
    response = exc.get_response()
    if request.path.startswith("/api/"):
        body = {"error": exc.name, "detail": exc.description}
        response.set_data(json.dumps(body))
        response.mimetype = "application/json"
        return response
    response.set_data(
        render_template("console/error.html", code=code, title=exc.name, message=exc.description)
    )
    response.mimetype = "text/html"
    return response
