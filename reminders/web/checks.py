"""``POST /v1/checks/<name>``: the checkout's synchronous questions, over HTTP.

JSON in (the check's parameters), JSON out (the answer of :func:`reminders.checks.ask`).
``Authorization: Bearer <key>`` with a key from ``REMINDERS_API_KEYS`` (comma-separated, read at
each request and compared in constant time); with no key configured every request is refused.

Statuses: 200 answered or ``unknown`` (timed out: the checkout decides, nothing broke); 401 no or
a wrong key; 403 no keys configured; 404 no such check; 400 a body that is not JSON; 422 bad
parameters (each one named, with the allowed ones and their types); 500 the check's query or
message is broken; 503 the business DB is unreachable.
"""

from __future__ import annotations

import hmac
import json
import os
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, request

from ..checks import CheckParamError, ask
from ..errors import InputError

if TYPE_CHECKING:
    from ..app import App

API_KEYS_ENV = "REMINDERS_API_KEYS"


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


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    return Response(text, status=status, mimetype="application/json", headers=headers)


def _refused() -> Response | None:
    """A 401/403 answer when the request has no valid API key, else None."""
    keys = api_keys()
    if not keys:
        return _json(
            403,
            {"error": f"checks are disabled: no API key is configured (set {API_KEYS_ENV})"},
        )
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return _json(
            401,
            {"error": "an API key is required: send the header Authorization: Bearer <key>"},
            {"WWW-Authenticate": 'Bearer realm="reminders"'},
        )
    if not key_is_valid(token.encode(), keys):
        return _json(
            401,
            {"error": "the API key is not valid"},
            {"WWW-Authenticate": 'Bearer realm="reminders", error="invalid_token"'},
        )
    return None


def blueprint(app: App) -> Blueprint:
    """The checks endpoint of ``app``: register it with ``flask_app.register_blueprint``."""
    bp = Blueprint("checks", __name__)

    @bp.post("/v1/checks/<name>")
    def check(name: str) -> Response:
        refused = _refused()
        if refused is not None:
            return refused
        try:
            ruleset = app.ruleset
        except InputError as exc:
            return _json(500, {"error": "the rules are invalid", "problems": _texts(exc)})
        known = [c.name for c in ruleset.checks]
        if name not in known:
            return _json(404, {"error": f'no check named "{name}"', "checks": known})
        try:
            given = json.loads(request.get_data(cache=False) or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            return _json(400, {"error": f"the body is not JSON: {exc}"})
        if not isinstance(given, dict):
            return _json(
                422,
                {
                    "error": "the body must be a JSON object of parameters",
                    "allowed": dict(ruleset.check(name).params),
                },
            )
        try:
            answer = ask(app, name, given)
        except CheckParamError as exc:
            return _json(
                422,
                {
                    "error": f"bad parameters for check {name}",
                    "params": exc.errors,
                    "allowed": exc.allowed,
                },
            )
        except InputError as exc:
            return _json(500, {"error": "the check is invalid", "problems": _texts(exc)})
        status = 200
        if answer.status == "error":
            status = 503 if answer.unreachable else 500
        return _json(status, answer.as_dict())

    return bp


def _texts(exc: InputError) -> list[str]:
    return [str(problem) for problem in exc.problems]
