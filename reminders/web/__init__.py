"""The web endpoint: Twilio webhooks, unsubscribe links, the preferences page, checks, health.

:func:`create_app` builds the Flask app for an engine :class:`~reminders.app.App`; each group of
paths is a blueprint, so another feature adds its own (``app.register_blueprint``) without
touching this one. The checkout's checks (``/v1/checks/``) are answered by a lean WSGI app in
front of Flask (:mod:`reminders.web.checks`). ``reminders web`` serves it all with granian
(:mod:`reminders.web.server`).

Defaults that keep it safe: request bodies over 64 KiB are refused (413) before anything reads
them, paths and queries over 4 KiB too (414); pages forbid framing, scripts and referrers (the
token in their URL is a credential); errors answer HTML on customer pages, plain text on webhooks
and JSON under ``/v1/``.
"""

from __future__ import annotations

import json
import logging
from email.utils import parseaddr

from flask import Flask, Response, render_template, request
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as BaseResponse

from reminders import links
from reminders.app import App
from reminders.errors import ConfigError, Problem

from .context import KEY, MAX_BODY, SECURE_HEADERS, engine, refuse_oversized

log = logging.getLogger(__name__)

__all__ = ["MAX_BODY", "business_name", "create_app", "engine", "error_page"]


def create_app(app: App) -> Flask:
    """The Flask app for ``app``. Raises ``ConfigError`` when the endpoint cannot work safely.

    Needs ``REMINDERS_SECRET`` (links are signed with it) and ``web.public_url`` (webhook
    signatures are checked against it, never against the bound address); loads the rules so a
    broken rule file fails here rather than on a customer's click.
    """
    config = app.config
    links.secrets()
    if not config.web.public_url:
        raise ConfigError(
            Problem(
                "web.public_url is not set: the web endpoint checks Twilio's signatures against "
                "it and puts it in links (e.g. web: {public_url: https://reminders.example.com})",
                config.file,
            )
        )
    app.ruleset  # noqa: B018 - load and validate now, not on the first request
    sms = config.channels.sms
    if sms is None or sms.provider != "twilio" or not sms.auth_token:
        log.warning("no Twilio auth token configured: every Twilio webhook will get 403")

    flask = Flask(__name__)
    flask.config.update(
        MAX_CONTENT_LENGTH=MAX_BODY,
        MAX_FORM_MEMORY_SIZE=MAX_BODY,
        MAX_FORM_PARTS=100,
        JSON_SORT_KEYS=False,
    )
    flask.extensions[KEY] = app

    from . import checks, health, pages, twilio

    flask.register_blueprint(twilio.blueprint)
    flask.register_blueprint(pages.blueprint)
    flask.register_blueprint(health.blueprint)
    flask.before_request(refuse_oversized)
    flask.after_request(_secure_headers)
    flask.register_error_handler(HTTPException, _error)
    flask.wsgi_app = checks.ChecksEndpoint(app, flask.wsgi_app)  # type: ignore[method-assign]
    return flask


def _secure_headers(response: Response) -> Response:
    headers = response.headers
    for name, value in SECURE_HEADERS:
        headers.setdefault(name, value)
    if request.path.startswith((links.UNSUBSCRIBE_PATH, links.PREFERENCES_PATH)):
        headers["Cache-Control"] = "no-store"
    return response


_MESSAGES = {
    400: "The request is missing something it needs.",
    403: "This link is not valid, or it has expired.",
    404: "There is nothing here. The link may be incomplete: try copying the whole link.",
    405: "This address does not take that kind of request.",
    413: "The request is too large.",
    414: "This link is too long: it cannot be one of ours.",
}


def _error(exc: HTTPException) -> BaseResponse:
    code = exc.code or 500
    path = request.path
    if path.startswith("/v1/"):
        response = exc.get_response()
        response.set_data(json.dumps({"error": exc.name}))
        response.mimetype = "application/json"
        return response
    if path.startswith((links.UNSUBSCRIBE_PATH, links.PREFERENCES_PATH)) and code in _MESSAGES:
        response = exc.get_response()  # keeps headers such as a 405's Allow
        response.set_data(error_page(code, _MESSAGES[code], exc.name))
        response.mimetype = "text/html"
        return response
    response = exc.get_response()
    response.set_data(f"{code} {exc.name}\n")
    response.mimetype = "text/plain"
    return response


def error_page(code: int, message: str, title: str | None = None) -> str:
    """The HTML of a customer-facing error page."""
    return render_template(
        "error.html",
        code=code,
        title=title or _MESSAGES.get(code, ""),
        message=message,
        business=business_name(),
    )


def business_name() -> str | None:
    """The business's name on every customer page: ``web.business_name``, else the display name
    of the email sender (``"Harbor Market <care@example.com>"``), else None (the pages then
    say "us")."""
    config = engine().config
    if config.web.business_name:
        return config.web.business_name
    email = config.channels.email
    if email is not None and email.from_:
        name = parseaddr(email.from_)[0].strip()
        if name:
            return name
    return None
