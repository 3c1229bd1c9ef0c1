"""Who may use the console, and how: log-in, sessions, CSRF, API keys, roles, slowdown.

- **Sessions**: a signed cookie (``HttpOnly``, ``SameSite=Strict``, ``Secure`` when the request
  came over https, directly or through a proxy saying ``X-Forwarded-Proto: https``) holding the
  user's name, when they logged in and a CSRF token. A session ends ``SESSION_HOURS`` after the
  log-in (on the engine's clock, like everything else) or when the user is removed.
- **API keys**: ``Authorization: Bearer rk_...`` (see :mod:`reminders.accounts`).
- **Access**: no credentials: 401 (pages redirect to the log-in form); a viewer asking to change
  anything: 403. A request that changes something on the strength of the session cookie must
  carry its CSRF token (form field ``csrf_token`` or header ``X-CSRF-Token``), whatever its path;
  a bearer key needs none (a browser never sends one on its own).
- **Slowdown**: after ``FREE_FAILURES`` failed log-ins for a name within ``FAILURE_WINDOW``, each
  further try must wait twice as long as the last (from 2 s, at most ``MAX_WAIT``): 429 with
  ``Retry-After`` until then. Failures are read from the audit log, so every worker process of
  the console sees them.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Flask, abort, g, redirect, render_template, request, session, url_for
from flask.sessions import SecureCookieSessionInterface
from werkzeug.exceptions import Forbidden, TooManyRequests, Unauthorized
from werkzeug.wrappers import Response as BaseResponse

from reminders import accounts, audit, clock
from reminders.accounts import Principal
from reminders.web.context import engine

blueprint = Blueprint("auth", __name__)

SESSION_HOURS = 12
FREE_FAILURES = 5
FAILURE_WINDOW = timedelta(minutes=15)
MAX_WAIT = timedelta(minutes=15)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Paths anyone may read: the log-in form, the stylesheet, the API's description.
# /metrics is Prometheus's: guarded by its own optional bearer key (console.metrics_key), not by
# a user's session or an API key.
OPEN_PATHS = ("/login", "/static/", "/api/v1/openapi.json", "/metrics")


class SessionInterface(SecureCookieSessionInterface):
    """Flask's signed cookie, marked ``Secure`` whenever the request came over https."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return request.is_secure or request.headers.get("X-Forwarded-Proto", "") == "https"


def csrf_token() -> str:
    """The session's CSRF token (made on first use)."""
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return str(token)


def _csrf_ok() -> bool:
    expected = session.get("csrf")
    given = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token", "")
    return bool(expected) and secrets.compare_digest(str(expected), given)


def principal() -> Principal:
    """Who is asking (set by :func:`guard`)."""
    found: Principal = g.principal
    return found


def _from_session(now: datetime) -> Principal | None:
    name = session.get("user")
    at = session.get("at")
    if not name or not at:
        return None
    try:
        since = clock.parse_instant(str(at))
    except ValueError:
        return None
    if now - since > timedelta(hours=SESSION_HOURS) or since > now + timedelta(minutes=5):
        session.pop("user", None)
        return None
    with engine().state.connect() as conn:
        return accounts.find_user(conn, str(name))


def _from_key(header: str) -> Principal | None:
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    with engine().state.connect() as conn:
        return accounts.key_principal(conn, token.strip())


def guard() -> BaseResponse | None:
    """Before every request: find who is asking; refuse what they may not do."""
    path = request.path
    if path.startswith(OPEN_PATHS):
        return None
    header = request.headers.get("Authorization")
    if header:
        found = _from_key(header)
        if found is None:
            raise Unauthorized("the API key is not valid, or was revoked")
        g.principal = found
        g.by_key = True
    else:
        found = _from_session(engine().now())
        if found is None:
            if path.startswith("/api/"):
                raise Unauthorized("log in, or send Authorization: Bearer <key>")
            return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
        g.principal = found
        g.by_key = False
        if request.method not in SAFE_METHODS and not _csrf_ok():
            raise Forbidden("the form's CSRF token is missing or wrong: reload the page")
    if request.method not in SAFE_METHODS and not found.can_change and path != "/logout":
        raise Forbidden(f"{found.name} is a {found.role.value}: viewers cannot change anything")
    return None


def _wait(conn: Any, name: str, now: datetime) -> int:
    """Seconds ``name`` must still wait before another log-in try (0: go ahead)."""
    failures, last = audit.failures_since(conn, name, now - FAILURE_WINDOW)
    if failures < FREE_FAILURES or last is None:
        return 0
    delay = min(MAX_WAIT, timedelta(seconds=2 ** (failures - FREE_FAILURES + 1)))
    left = (last + delay - now).total_seconds()
    return max(0, int(left + 0.999))


def _next(target: str | None) -> str:
    """Where to go after logging in: a path of this console only."""
    if target:
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc and target.startswith("/") and "\\" not in target:
            return target
    return url_for("pages.overview")


@blueprint.route("/login", methods=["GET", "POST"])
def login() -> Any:
    app = engine()
    target = request.values.get("next")
    if request.method == "GET":
        return render_template("console/login.html", next=target, error=None, name="")
    if not _csrf_ok():
        raise Forbidden("the form's CSRF token is missing or wrong: reload the page")
    name = request.form.get("name", "").strip()[:100]
    password = request.form.get("password", "")
    now = app.now()
    with app.state.connect() as conn:
        wait = _wait(conn, name, now)
    if wait:
        page = render_template(
            "console/login.html",
            next=target,
            name=name,
            error=f"Too many failed log-ins for this name: try again in {wait} s.",
        )
        exc = TooManyRequests()
        response = exc.get_response()
        response.set_data(page)
        response.mimetype = "text/html"
        response.headers["Retry-After"] = str(wait)
        return response
    with app.state.begin() as conn:
        found = accounts.authenticate(conn, name, password) if name else None
        if found is None:
            audit.record(
                conn,
                actor=name or "-",
                action=audit.LOGIN_FAILED,
                detail=request.remote_addr,
                now=now,
            )
        else:
            audit.record(
                conn, actor=found.actor, action=audit.LOGIN, detail=request.remote_addr, now=now
            )
    if found is None:
        page = render_template(
            "console/login.html", next=target, name=name, error="Wrong name or password."
        )
        return page, 401
    session.clear()
    session["user"] = found.name
    session["at"] = clock.iso_utc(now)
    csrf_token()
    return redirect(_next(target))


@blueprint.route("/logout", methods=["POST"])
def logout() -> Any:
    if not _csrf_ok():
        abort(403)
    name = session.get("user")
    if name:
        app = engine()
        with app.state.begin() as conn:
            audit.record(conn, actor=str(name), action=audit.LOGOUT, now=app.now())
    session.clear()
    return redirect(url_for("auth.login"))
