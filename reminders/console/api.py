"""The console's JSON API, ``/api/v1/`` (described by ``/api/v1/openapi.json``).

Datetimes are ISO 8601 UTC (``2027-03-14T14:00:00Z``); dates ``YYYY-MM-DD`` in the config's zone.
Every answer is computed on the engine's clock (``REMINDERS_NOW`` honoured).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request
from werkzeug.exceptions import BadRequest, NotFound

from reminders import audit, forecast, lifecycle, stats
from reminders.errors import RuleError
from reminders.web.context import engine

from . import actions
from .auth import principal
from .openapi import document

blueprint = Blueprint("api", __name__, url_prefix="/api/v1")


def _int(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a whole number from {lo} to {hi}") from None
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be a whole number from {lo} to {hi}")
    return value


def _rule(name: str) -> None:
    try:
        engine().ruleset.rule(name)
    except (RuleError, KeyError, ValueError):
        raise NotFound(f"no rule {name}") from None


@blueprint.get("/openapi.json")
def openapi() -> Any:
    return jsonify(document())


@blueprint.get("/stats")
def get_stats() -> Any:
    app = engine()
    days = _int("days", 30, 1, stats.MAX_DAYS)
    with stats.reading(app.state) as conn:
        return jsonify(stats.overview(conn, app.config, app.now(), days))


@blueprint.get("/rules")
def get_rules() -> Any:
    app = engine()
    with stats.reading(app.state) as conn:
        found = stats.rules(conn, [r.name for r in app.ruleset.rules])
    return jsonify({"rules": found})


@blueprint.get("/rules/<name>")
def get_rule(name: str) -> Any:
    app = engine()
    _rule(name)
    with stats.reading(app.state) as conn:
        (found,) = stats.rules(conn, [], rule=name)
        found["scans"] = stats.scans(conn, name)
    return jsonify(found)


@blueprint.get("/rules/<name>/forecast")
def get_forecast(name: str) -> Any:
    _rule(name)
    days = _int("days", 30, 1, forecast.MAX_DAYS)
    return jsonify(forecast.from_pending(engine(), name, days))


@blueprint.get("/rules/<name>/outcomes")
def get_outcomes(name: str) -> Any:
    _rule(name)
    app = engine()
    days = _int("days", 90, 1, 3660)
    with stats.reading(app.state) as conn:
        return jsonify(stats.outcomes(conn, name, app.now(), days))


@blueprint.post("/rules/<name>/pause")
def pause(name: str) -> Any:
    return jsonify(actions.set_paused(engine(), principal(), name, True))


@blueprint.post("/rules/<name>/resume")
def resume(name: str) -> Any:
    return jsonify(actions.set_paused(engine(), principal(), name, False))


@blueprint.get("/reminders")
def get_reminders() -> Any:
    app = engine()
    status = request.args.get("status") or None
    if status is not None and status not in {s.value for s in lifecycle.STATUSES}:
        raise BadRequest(f"status must be one of {', '.join(lifecycle.STATUSES)}")
    with stats.reading(app.state) as conn:
        found = stats.search(
            conn,
            app.config,
            customer_id=request.args.get("customer_id") or None,
            phone_number=request.args.get("phone") or None,
            email=request.args.get("email") or None,
            rule=request.args.get("rule") or None,
            status=status,
            limit=_int("limit", 100, 1, 1000),
        )
    return jsonify({"reminders": found})


@blueprint.get("/reminders/<int:rid>")
def get_reminder(rid: int) -> Any:
    with stats.reading(engine().state) as conn:
        found = stats.reminder_detail(conn, rid)
    if found is None:
        raise NotFound(f"no reminder #{rid}")
    return jsonify(found)


@blueprint.post("/reminders/<int:rid>/retry")
def retry(rid: int) -> Any:
    return jsonify(actions.retry(engine(), principal(), rid))


@blueprint.post("/reminders/<int:rid>/cancel")
def cancel(rid: int) -> Any:
    return jsonify(actions.cancel(engine(), principal(), rid))


@blueprint.get("/missed")
def get_missed() -> Any:
    app = engine()
    days = _int("days", 7, 1, stats.MAX_DAYS)
    with stats.reading(app.state) as conn:
        return jsonify(stats.missed(conn, app.config, app.now(), days))


@blueprint.get("/audit")
def get_audit() -> Any:
    limit = _int("limit", 100, 1, 1000)
    with stats.reading(engine().state) as conn:
        return jsonify({"events": audit.recent(conn, limit)})
