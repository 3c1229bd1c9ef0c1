"""Customer pages: unsubscribe (RFC 8058 one-click, and a confirming page) and preferences.

The token in the URL is the customer's credential (signed, expiring: :mod:`reminders.links`); a
page shows and changes only what its token names. A GET never changes anything (mail scanners
follow links); forms carry a nonce derived from the token, so a POST needs the page first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from babel import Locale, UnknownLocaleError
from babel.dates import format_date, format_time
from flask import Blueprint, Response, abort, redirect, render_template, request, url_for
from sqlalchemy.engine import Connection
from werkzeug.wrappers import Response as BaseResponse

from reminders import codec, consent, links, phone, schedule
from reminders.app import App
from reminders.errors import PermanentError
from reminders.lifecycle import OPEN
from reminders.models import message, reminder
from reminders.rules import Rule

from . import business_name, error_page
from .context import engine

log = logging.getLogger(__name__)

blueprint = Blueprint("pages", __name__)

ONE_CLICK = "One-Click"  # RFC 8058: the body is List-Unsubscribe=One-Click
CHANNEL_NAMES = {"sms": "Text message", "email": "Email"}
MAX_UPCOMING = 50


@blueprint.errorhandler(links.LinkError)
def _refused(exc: links.LinkError) -> Response:
    """A forged, altered or expired token in any page's URL: 403 or 404, nothing changed."""
    if exc.expired:
        message = (
            "This link has expired. Use the link in a more recent message from us, or reply "
            "STOP to a text message."
        )
        return Response(error_page(403, message, "Link expired"), 403, mimetype="text/html")
    return Response(
        error_page(404, "This link is not valid. Try copying the whole link.", "Link not valid"),
        404,
        mimetype="text/html",
    )


# --- unsubscribe ------------------------------------------------------------------------------


def _sent_addresses(conn: Connection, customer_id: str, channel: str) -> list[str]:
    """The addresses ``customer_id`` was sent messages at on ``channel``."""
    rows = conn.execute(
        sa.select(message.c.to_address)
        .join(reminder, reminder.c.id == message.c.reminder_id)
        .where(reminder.c.customer_id == customer_id, message.c.channel == channel)
        .distinct()
    )
    return list(rows.scalars())


def _row_addresses(conn: Connection, app: App, customer_id: str, channel: str) -> Iterator[str]:
    """The addresses on ``customer_id``'s reminders' rows: a message whose record was lost (its
    worker died after sending) still has its address there."""
    rules = {r.name: r for r in app.ruleset.rules}
    rows = conn.execute(
        sa.select(reminder.c.rule, reminder.c.data).where(reminder.c.customer_id == customer_id)
    )
    for row in rows:
        rule = rules.get(row.rule)
        if rule is not None and channel in rule.channels:
            address = _address(app, rule, channel, codec.loads(row.data))
            if address:
                yield address


def unsubscribe_target(
    conn: Connection, app: App, link: links.UnsubscribeLink
) -> links.Unsubscribe:
    """The address ``link`` stops, found among its customer's own; raises ``LinkError`` when
    none is its (a link names no other customer's address)."""
    for addresses in (
        _sent_addresses(conn, link.customer_id, link.channel),
        _row_addresses(conn, app, link.customer_id, link.channel),
    ):
        found = links.match_address(link, addresses)
        if found is not None:
            return found
    raise links.LinkError("this link is not valid")


@blueprint.get(f"{links.UNSUBSCRIBE_PATH}<token>")
def unsubscribe_page(token: str) -> Response:
    """A page confirming what the link stops, with a button that POSTs. Changes nothing."""
    app = engine()
    link = links.read_unsubscribe(token, now=app.now(), max_age=app.config.web.link_max_age)
    with app.state.connect() as conn:
        target = unsubscribe_target(conn, app, link)
        done = consent.is_opted_out(conn, target.channel, target.address)
    html = render_template(
        "unsubscribe.html",
        business=business_name(),
        channel=CHANNEL_NAMES.get(target.channel, target.channel).lower(),
        address=phone.mask_address(target.channel, target.address),
        done=done,
        nonce=links.form_nonce(token),
        preferences=links.preferences_url(app.config, target.customer_id, now=app.now()),
    )
    return Response(html, mimetype="text/html")


@blueprint.post(f"{links.UNSUBSCRIBE_PATH}<token>")
def unsubscribe(token: str) -> Response:
    """RFC 8058 one-click (``List-Unsubscribe=One-Click``) or the page's form: stop the address."""
    app = engine()
    link = links.read_unsubscribe(token, now=app.now(), max_age=app.config.web.link_max_age)
    one_click = request.form.get("List-Unsubscribe") == ONE_CLICK
    if not one_click:
        if "nonce" not in request.form:
            abort(400)
        if not links.check_nonce(token, request.form.get("nonce")):
            abort(403)
    how = "one-click unsubscribe" if one_click else "unsubscribe page"
    now = app.now()
    with app.state.begin() as conn:
        target = unsubscribe_target(conn, app, link)
        new = consent.opt_out(
            conn, target.channel, target.address, consent.UNSUBSCRIBE, how, now, target.customer_id
        )
    log.info(
        "unsubscribed %s from %s (%s)%s",
        phone.mask_address(target.channel, target.address),
        target.channel,
        how,
        "" if new else ", already",
    )
    html = render_template(
        "unsubscribed.html",
        business=business_name(),
        channel=CHANNEL_NAMES.get(target.channel, target.channel).lower(),
        address=phone.mask_address(target.channel, target.address),
        preferences=links.preferences_url(app.config, target.customer_id, now=now),
    )
    return Response(html, mimetype="text/html")


# --- preferences ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upcoming:
    """One upcoming reminder as the customer sees it."""

    what: str
    date: str
    time: str
    zone: str
    channel: str | None  # None: it will not be sent (turned off or opted out everywhere)


@dataclass(frozen=True)
class Switch:
    rule: str
    channel: str
    label: str
    on: bool

    @property
    def key(self) -> str:
        return f"{self.rule}:{self.channel}"


@dataclass(frozen=True)
class Kind:
    """A rule the customer hears from, with a switch per channel."""

    rule: str
    what: str
    switches: list[Switch]


def _what(rule: Rule | None, name: str) -> str:
    if rule is not None and rule.description:
        return rule.description
    return name.replace("-", " ").capitalize()


def _locale(value: Any) -> Locale:
    try:
        return Locale.parse(str(value).replace("-", "_")) if value else Locale.parse("en_US")
    except (UnknownLocaleError, ValueError, TypeError):
        return Locale.parse("en_US")


def _zone(value: Any, default: ZoneInfo) -> ZoneInfo:
    try:
        return schedule.zone(str(value)) if value else default
    except ValueError:
        return default


def _address(app: App, rule: Rule, channel: str, data: dict[str, Any]) -> str | None:
    raw = data.get(rule.columns["phone" if channel == "sms" else "email"])
    if not raw:
        return None
    if channel == "sms":
        try:
            return phone.normalize(str(raw), app.config.default_region)
        except PermanentError:  # an unusable number: the worker reports it; the page shows "off"
            return None
    return links.normalize_address(channel, str(raw))


def customer_page(
    conn: Connection, app: App, customer_id: str
) -> tuple[list[Upcoming], list[Kind]]:
    """A customer's upcoming reminders and their switches, read for ``customer_id`` only."""
    ruleset = app.ruleset
    rows = list(
        conn.execute(
            sa.select(
                reminder.c.rule,
                reminder.c.send_at,
                reminder.c.channel_index,
                reminder.c.data,
            )
            .where(reminder.c.customer_id == customer_id, reminder.c.status.in_(OPEN))
            .order_by(reminder.c.send_at, reminder.c.id)
            .limit(MAX_UPCOMING)
        )
    )
    heard = set(
        conn.execute(
            sa.select(reminder.c.rule).where(reminder.c.customer_id == customer_id).distinct()
        ).scalars()
    )
    choices = consent.preferences(conn, customer_id)
    heard |= {rule for rule, _channel in choices if rule != consent.ANY}
    decoded = [(row, codec.loads(row.data)) for row in rows]
    pairs = []
    for row, data in decoded:
        rule = ruleset.get(row.rule)
        if rule is not None:
            for channel in rule.channels:
                address = _address(app, rule, channel, data)
                if address:
                    pairs.append((channel, address))
    view = consent.View.load(conn, [customer_id], pairs)

    upcoming = []
    default_zone = app.config.tz()
    for row, data in decoded:
        rule = ruleset.get(row.rule)
        if rule is None:
            continue
        columns = rule.columns
        zone = _zone(data.get(columns["timezone"]), default_zone)
        locale = _locale(data.get(columns["locale"]))
        local = row.send_at.astimezone(zone)
        going = None
        for channel in rule.channels[row.channel_index :]:
            address = _address(app, rule, channel, data)
            if view.refusal(customer_id, rule.name, channel, address) is None:
                going = CHANNEL_NAMES.get(channel, channel)
                break
        upcoming.append(
            Upcoming(
                what=_what(rule, row.rule),
                date=format_date(local, format="full", locale=locale),
                time=format_time(local, format="short", locale=locale),
                zone=zone.key,
                channel=going,
            )
        )

    kinds = []
    for name in sorted(heard):
        rule = ruleset.get(name)
        if rule is None:
            continue  # a rule the business removed: nothing left to switch
        switches = [
            Switch(name, ch, CHANNEL_NAMES.get(ch, ch), consent.resolve(choices, name, ch))
            for ch in rule.channels
        ]
        kinds.append(Kind(name, _what(rule, name), switches))
    return upcoming, kinds


def _customer(token: str) -> tuple[App, str]:
    app = engine()
    return app, links.read_preferences(token, now=app.now(), max_age=app.config.web.link_max_age)


@blueprint.get(f"{links.PREFERENCES_PATH}<token>")
def preferences_page(token: str) -> Response:
    """The customer's upcoming reminders and on/off switches per rule and channel."""
    app, customer_id = _customer(token)
    with app.state.connect() as conn:
        upcoming, kinds = customer_page(conn, app, customer_id)
    html = render_template(
        "preferences.html",
        business=business_name(),
        upcoming=upcoming,
        kinds=kinds,
        nonce=links.form_nonce(token),
        saved=request.args.get("saved") == "1",
    )
    return Response(html, mimetype="text/html")


@blueprint.post(f"{links.PREFERENCES_PATH}<token>")
def preferences_save(token: str) -> Response | BaseResponse:
    """Save the switches shown on the page (unchecked boxes are sent as nothing: off)."""
    app, customer_id = _customer(token)
    if "nonce" not in request.form:
        abort(400)
    if not links.check_nonce(token, request.form.get("nonce")):
        abort(403)
    checked = set(request.form.getlist("on"))
    now = app.now()
    with app.state.begin() as conn:
        _upcoming, kinds = customer_page(conn, app, customer_id)
        # Only the switches this customer's page shows can be set: nothing else in the form counts.
        choices = {(s.rule, s.channel): s.key in checked for k in kinds for s in k.switches}
        changed = consent.set_preferences(conn, customer_id, choices, now)
    log.info("preferences saved (%d changed)", changed)
    return redirect(url_for("pages.preferences_page", token=token, saved=1), code=303)
