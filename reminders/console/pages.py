"""The console's pages, server-rendered from the same queries as the API (:mod:`reminders.stats`).

Every page works without a script and with the keyboard alone; forms that change something
carry the session's CSRF token and answer with a redirect (so a reload never repeats them).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flask import Blueprint, flash, redirect, render_template, request, url_for
from werkzeug.exceptions import Conflict, HTTPException, NotFound

from reminders import audit, clock, forecast, lifecycle, outbox, stats
from reminders.errors import RemindersError
from reminders.web.context import engine

from . import actions
from .auth import principal

blueprint = Blueprint("pages", __name__)

CHANNELS = ("sms", "email")
DAYS = 30
LABELS = {"sms": "Text messages", "email": "Emails"}


def _local(value: str | datetime | None, fmt: str = "%Y-%m-%d %H:%M") -> str:
    """An instant in the config's zone, e.g. ``2027-03-14 10:00 EDT``."""
    if not value:
        return "—"
    moment = clock.parse_instant(value) if isinstance(value, str) else value
    local = moment.astimezone(engine().config.tz())
    return f"{local.strftime(fmt)} {local.tzname()}"


def _age(seconds: int | None) -> str:
    if seconds is None:
        return "—"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


FILTERS = {"local": _local, "age": _age}


def _page(template: str, **context: Any) -> str:
    who = principal()
    return render_template(
        f"console/{template}",
        who=who,
        can_change=who.can_change,
        now=engine().now(),
        timezone=engine().config.timezone,
        **context,
    )


@blueprint.get("/")
def overview() -> Any:
    app = engine()
    with stats.reading(app.state) as conn:
        data = stats.overview(conn, app.config, app.now(), DAYS)
        waiting = outbox.summary(conn, app.config) if app.config.outbox_used else []
    days = data["days"]
    labels = [d["date"] for d in days]
    channels = sorted({c for d in days for c in d["sent"]}, key=lambda c: (c not in CHANNELS, c))
    sent = [(LABELS.get(c, c), [d["sent"].get(c, 0) for d in days]) for c in channels]
    outcomes = [
        ("delivered", [d["delivered"] for d in days]),
        ("failed", [d["failed"] for d in days]),
        ("canceled", [d["canceled"] for d in days]),
    ]
    opt_outs = [("opt-outs", [d["opted_out"] for d in days])]
    up = data["upcoming"]
    rules = sorted({name for d in up for name in d["by_rule"]})
    coming = [(name, [d["by_rule"].get(name, 0) for d in up]) for name in rules]
    return _page(
        "overview.html",
        data=data,
        labels=labels,
        sent=sent,
        outcomes=outcomes,
        opt_outs=opt_outs,
        up_labels=[d["date"] for d in up],
        coming=coming,
        channels=channels,
        outbox=waiting,
    )


@blueprint.get("/rules")
def rules() -> Any:
    app = engine()
    with stats.reading(app.state) as conn:
        found = stats.rules(conn, [r.name for r in app.ruleset.rules])
    configured = {r.name: r for r in app.ruleset.rules}
    return _page("rules.html", rules=found, configured=configured, statuses=lifecycle.STATUSES)


def _configured(name: str) -> Any:
    found = {r.name: r for r in engine().ruleset.rules}.get(name)
    if found is None:
        raise NotFound(f"There is no rule named {name}.")
    return found


@blueprint.get("/rules/<name>")
def rule(name: str) -> Any:
    app = engine()
    configured = _configured(name)
    days = 14
    now = app.now()
    period = request.args.get("outcomes", 30, type=int)
    period = min(max(period or 30, 1), 3660)
    with stats.reading(app.state) as conn:
        (summary,) = stats.rules(conn, [], rule=name)
        scans = stats.scans(conn, name)
        outcomes = stats.outcomes(conn, name, now, period)
        ahead = stats.pending_by_day(conn, app.config, name, configured.channels, now, days)
    preview = _preview(app, name)
    return _page(
        "rule.html",
        rule=configured,
        summary=summary,
        scans=scans,
        outcomes=outcomes,
        period=period,
        ahead=ahead,
        f_labels=[d["date"] for d in ahead],
        f_series=[(LABELS.get(c, c), [d[c] for d in ahead]) for c in configured.channels],
        preview=preview,
        statuses=lifecycle.STATUSES,
    )


@blueprint.get("/rules/<name>/forecast")
def rule_forecast(name: str) -> Any:
    configured = _configured(name)
    ahead = forecast.from_pending(engine(), name, 14)
    f_days = ahead["days"]
    series = [(LABELS.get(c, c), [d[c] for d in f_days]) for c in configured.channels]
    held = [
        ("quiet hours", [d["quiet_hours"] for d in f_days]),
        ("caps", [d["caps"] for d in f_days]),
        ("opted out", [d["opted_out"] for d in f_days]),
        ("turned off", [d["off"] for d in f_days]),
        ("no address", [d["no_address"] for d in f_days]),
    ]
    return _page(
        "forecast.html",
        rule=configured,
        forecast=ahead,
        labels=[d["date"] for d in f_days],
        series=series,
        held=held,
    )


def _preview(app: Any, name: str) -> dict[str, Any]:
    """Messages rendered for the rule's first rows (read from the business DB, nothing sent)."""
    from reminders.preview import preview_rule

    try:
        shown = preview_rule(app, name, limit=2)
    except RemindersError as exc:
        return {"items": [], "errors": [str(exc)], "notes": []}
    return {"items": shown.items, "errors": shown.errors, "notes": shown.notes[:5]}


_PAUSED = {
    "pause": "Rule {name} is paused: nothing of it is sent until it is resumed.",
    "resume": "Rule {name} is resumed: its due reminders go at the next dispatch.",
}


@blueprint.post("/rules/<name>/<any(pause, resume):action>")
def pause(name: str, action: str) -> Any:
    """Pause or resume a rule (the rule page's button)."""
    return _act(
        lambda: actions.set_paused(engine(), principal(), name, action == "pause"),
        _PAUSED[action].format(name=name),
        url_for("pages.rule", name=name),
    )


@blueprint.get("/reminders")
def search() -> Any:
    app = engine()
    args = {
        k: (request.args.get(k) or "").strip()
        for k in ("customer_id", "phone", "email", "rule", "status")
    }
    asked = any(args.values())
    found: list[dict[str, Any]] = []
    if asked:
        status = args["status"] if args["status"] in set(lifecycle.STATUSES) else None
        with stats.reading(app.state) as conn:
            found = stats.search(
                conn,
                app.config,
                customer_id=args["customer_id"] or None,
                phone_number=args["phone"] or None,
                email=args["email"] or None,
                rule=args["rule"] or None,
                status=status,
                limit=200,
            )
    return _page(
        "search.html",
        args=args,
        asked=asked,
        found=found,
        rules=[r.name for r in app.ruleset.rules],
        statuses=lifecycle.STATUSES,
    )


@blueprint.get("/reminders/<int:rid>")
def reminder(rid: int) -> Any:
    with stats.reading(engine().state) as conn:
        found = stats.reminder_detail(conn, rid)
    if found is None:
        raise NotFound(f"There is no reminder #{rid}.")
    return _page(
        "reminder.html",
        r=found,
        can_retry=found["status"] in actions.RETRYABLE,
        can_cancel=found["status"] in actions.CANCELABLE,
    )


@blueprint.post("/reminders/<int:rid>/retry")
def retry(rid: int) -> Any:
    return _act(
        lambda: actions.retry(engine(), principal(), rid),
        f"Reminder #{rid} is back to pending: the next dispatch sends it.",
        url_for("pages.reminder", rid=rid),
    )


@blueprint.post("/reminders/<int:rid>/cancel")
def cancel(rid: int) -> Any:
    return _act(
        lambda: actions.cancel(engine(), principal(), rid),
        f"Reminder #{rid} is canceled.",
        url_for("pages.reminder", rid=rid),
    )


def _act(change: Any, done: str, back: str) -> Any:
    try:
        change()
    except Conflict as exc:
        flash(str(exc.description), "error")
    else:
        flash(done, "ok")
    return redirect(back, code=303)


@blueprint.get("/missed")
def missed() -> Any:
    app = engine()
    try:
        days = int(request.args.get("days", "7"))
    except ValueError:
        days = 7
    days = min(max(days, 1), stats.MAX_DAYS)
    with stats.reading(app.state) as conn:
        found = stats.missed(conn, app.config, app.now(), days)
    return _page("missed.html", m=found, days=days)


@blueprint.get("/audit")
def audit_log() -> Any:
    before = request.args.get("before", type=int)
    with stats.reading(engine().state) as conn:
        events = audit.recent(conn, 100, before=before)
    return _page("audit.html", events=events)


__all__ = ["FILTERS", "HTTPException", "blueprint"]
