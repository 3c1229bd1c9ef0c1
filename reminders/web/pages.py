"""Customer pages: unsubscribe (RFC 8058 one-click, and a confirming page) and preferences.

The token in the URL is the customer's credential (signed, expiring: :mod:`reminders.links`); a
page shows and changes only what its token names. A GET never changes anything (mail scanners
follow links); forms carry a nonce derived from the token, so a POST needs the page first.
"""

from __future__ import annotations

import hashlib
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

from reminders import codec, consent, links, phone, sendtime
from reminders.app import App
from reminders.compose import label_of
from reminders.errors import PermanentError, TemplateError
from reminders.lifecycle import OPEN
from reminders.models import message, optout, reminder
from reminders.receipts import DEAD_NUMBER
from reminders.rules import Rule

from . import business_name, error_page
from .context import engine

log = logging.getLogger(__name__)

blueprint = Blueprint("pages", __name__)

ONE_CLICK = "One-Click"  # RFC 8058: the body is List-Unsubscribe=One-Click
CHANNEL_NAMES = {"sms": "Text message", "email": "Email"}
CHANNEL_PLURALS = {"sms": "Text messages", "email": "Emails"}
CHANNEL_ORDER = {"sms": 0, "email": 1}
DEAD_NUMBER_CODES = frozenset(DEAD_NUMBER)
MAX_UPCOMING = 50
MAX_RECENT = 200  # reminders read for the customer's addresses (newest first)


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
    rows = conn.execute(
        sa.select(reminder.c.rule, reminder.c.data).where(reminder.c.customer_id == customer_id)
    )
    for row in rows:
        rule = app.ruleset.get(row.rule)
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

    what: str  # the rule's label for this row ("Refill of Metformin, runs out Dec 9, 2026")
    date: str
    time: str
    zone: str
    channel: str | None  # None: it will not be sent (turned off or stopped everywhere)


@dataclass(frozen=True)
class Switch:
    rule: str
    channel: str
    label: str
    on: bool
    stopped: bool = False  # the channel is stopped for every address: the switch cannot act

    @property
    def key(self) -> str:
        return f"{self.rule}:{self.channel}"


@dataclass(frozen=True)
class Kind:
    """A rule the customer hears from, with a switch per channel."""

    rule: str
    what: str
    switches: list[Switch]


@dataclass(frozen=True)
class Reach:
    """One of the customer's addresses on a channel, and whether it is stopped: by what, when."""

    channel: str
    address: str  # as the state DB keeps it (never shown: see ``shown``)
    shown: str  # masked
    stopped: consent.OptOut | None
    why: str | None  # "You unsubscribed with the link in an email on December 6, 2026."
    resume: bool  # the page may lift the stop (not a STOP reply: only START lifts that)

    @property
    def ref(self) -> str:
        """The form's name for this address (not the address itself)."""
        digest = hashlib.blake2b(f"{self.channel}:{self.address}".encode(), digest_size=6)
        return f"{self.channel}:{digest.hexdigest()}"

    @property
    def name(self) -> str:
        return CHANNEL_PLURALS.get(self.channel, self.channel)


@dataclass
class Page:
    upcoming: list[Upcoming]
    kinds: list[Kind]
    reaches: list[Reach]


def _what(app: App, rule: Rule, data: dict[str, Any]) -> str:
    """The customer-facing title of one reminder: the rule's label over its row, else the
    rule's plain name (never the description: it is written for staff)."""
    try:
        return label_of(app.renderer, app.config, rule, data, app.now())
    except TemplateError as exc:
        log.warning("preferences page: %s", exc)
        return rule.plain_name


def _locale(value: Any) -> Locale:
    try:
        return Locale.parse(str(value).replace("-", "_")) if value else Locale.parse("en_US")
    except (UnknownLocaleError, ValueError, TypeError):
        return Locale.parse("en_US")


def _zone(value: Any, default: ZoneInfo) -> ZoneInfo:
    try:
        return sendtime.zone(str(value)) if value else default
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


def _why(stop: consent.OptOut, when: str) -> tuple[str, bool]:
    """What stopped an address, in the customer's words, and whether the page may lift it."""
    reason = stop.reason or ""
    if stop.source == consent.STOP:
        word = reason.removeprefix("replied ").strip() or "STOP"
        return f"You replied {word} to a text message on {when}.", False
    if stop.source == "21610":
        return f"This number replied STOP to our texts (recorded on {when}).", False
    if stop.source == consent.UNSUBSCRIBE:
        how = "on our unsubscribe page" if "page" in reason else "with the link in an email"
        return f"You unsubscribed {how} on {when}.", True
    if stop.source in DEAD_NUMBER_CODES:
        return f"Our texts to this number could not be delivered ({when}).", True
    return f"Our messages to this address could not be delivered ({when}).", True


def customer_page(conn: Connection, app: App, customer_id: str) -> Page:
    """A customer's upcoming reminders, their switches and the state of each of their addresses,
    read for ``customer_id`` only."""
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
    recent = list(
        conn.execute(
            sa.select(reminder.c.rule, reminder.c.data)
            .where(reminder.c.customer_id == customer_id)
            .order_by(reminder.c.id.desc())
            .limit(MAX_RECENT)
        )
    )
    choices = consent.preferences(conn, customer_id)
    heard |= {rule for rule, _channel in choices if rule != consent.ANY}
    decoded = [(row, codec.loads(row.data)) for row in rows]

    # The customer's addresses: from their rows (newest first), and any stop recorded for them.
    default_zone = app.config.tz()
    zone, locale, located = default_zone, _locale(None), False
    pairs: list[tuple[str, str]] = []
    for past in recent:
        rule = ruleset.get(past.rule)
        if rule is None:
            continue
        data = codec.loads(past.data)
        if not located:  # dates on the page in the zone and language of the newest row
            zone = _zone(data.get(rule.columns["timezone"]), default_zone)
            locale = _locale(data.get(rule.columns["locale"]))
            located = True
        for channel in rule.channels:
            address = _address(app, rule, channel, data)
            if address and (channel, address) not in pairs:
                pairs.append((channel, address))
    for kept in conn.execute(
        sa.select(optout.c.channel, optout.c.address).where(optout.c.customer_id == customer_id)
    ):
        if (kept.channel, kept.address) not in pairs:
            pairs.append((kept.channel, kept.address))
    reaches = []
    for channel, address in sorted(pairs, key=lambda p: (CHANNEL_ORDER.get(p[0], 9), p[1])):
        stop = consent.opted_out(conn, channel, address)
        why, resume = None, False
        if stop is not None:
            when = format_date(stop.created_at.astimezone(zone), format="long", locale=locale)
            why, resume = _why(stop, when)
        reaches.append(
            Reach(channel, address, phone.mask_address(channel, address), stop, why, resume)
        )
    stopped_channels = {
        channel
        for channel in {r.channel for r in reaches}
        if all(r.stopped is not None for r in reaches if r.channel == channel)
    }
    view = consent.View.load(conn, [customer_id], pairs)

    upcoming = []
    for row, data in decoded:
        rule = ruleset.get(row.rule)
        if rule is None:
            continue
        columns = rule.columns
        row_zone = _zone(data.get(columns["timezone"]), default_zone)
        row_locale = _locale(data.get(columns["locale"]))
        local = row.send_at.astimezone(row_zone)
        going = None
        for channel in rule.channels[row.channel_index :]:
            address = _address(app, rule, channel, data)
            if view.refusal(customer_id, rule.name, channel, address) is None:
                going = CHANNEL_NAMES.get(channel, channel)
                break
        upcoming.append(
            Upcoming(
                what=_what(app, rule, data),
                date=format_date(local, format="full", locale=row_locale),
                time=format_time(local, format="short", locale=row_locale),
                zone=row_zone.key,
                channel=going,
            )
        )

    kinds = []
    for name in sorted(heard):
        rule = ruleset.get(name)
        if rule is None:
            continue  # a rule the business removed: nothing left to switch
        switches = [
            Switch(
                name,
                ch,
                CHANNEL_NAMES.get(ch, ch),
                consent.resolve(choices, name, ch),
                stopped=ch in stopped_channels,
            )
            # In one order on every kind (the rule's order is its fallback order, not the page's).
            for ch in sorted(rule.channels, key=lambda c: CHANNEL_ORDER.get(c, 9))
        ]
        kinds.append(Kind(name, rule.plain_name, switches))
    return Page(upcoming, kinds, reaches)


def _customer(token: str) -> tuple[App, str]:
    app = engine()
    return app, links.read_preferences(token, now=app.now(), max_age=app.config.web.link_max_age)


@blueprint.get(f"{links.PREFERENCES_PATH}<token>")
def preferences_page(token: str) -> Response:
    """The customer's upcoming reminders, the state of each address and on/off switches per rule
    and channel."""
    app, customer_id = _customer(token)
    with app.state.connect() as conn:
        page = customer_page(conn, app, customer_id)
    resumed = request.args.get("resumed")
    html = render_template(
        "preferences.html",
        business=business_name(),
        upcoming=page.upcoming,
        kinds=page.kinds,
        reaches=page.reaches,
        nonce=links.form_nonce(token),
        saved=request.args.get("saved") == "1",
        resumed=CHANNEL_PLURALS.get(resumed or ""),
    )
    return Response(html, mimetype="text/html")


@blueprint.post(f"{links.PREFERENCES_PATH}<token>")
def preferences_save(token: str) -> Response | BaseResponse:
    """Save the switches shown on the page (unchecked boxes are sent as nothing: off), or, with
    ``resume``, lift the stop of one of the customer's addresses (recorded as an opt-in)."""
    app, customer_id = _customer(token)
    if "nonce" not in request.form:
        abort(400)
    if not links.check_nonce(token, request.form.get("nonce")):
        abort(403)
    now = app.now()
    resume = request.form.get("resume")
    with app.state.begin() as conn:
        page = customer_page(conn, app, customer_id)
        if resume is not None:
            # Only an address this customer's page shows as stopped, and that the page may lift.
            found = next((r for r in page.reaches if r.ref == resume), None)
            if found is None or found.stopped is None or not found.resume:
                abort(400)
            consent.opt_in(
                conn,
                found.channel,
                found.address,
                consent.PREFERENCES,
                "preferences page",
                now,
                customer_id,
            )
            log.info(
                "%s resumed on the preferences page",
                phone.mask_address(found.channel, found.address),
            )
            return redirect(
                url_for("pages.preferences_page", token=token, resumed=found.channel), code=303
            )
        checked = set(request.form.getlist("on"))
        # Only the switches this customer's page shows can be set, and not those of a stopped
        # channel (shown off and disabled: their own choice is kept for when it is resumed).
        choices = {
            (s.rule, s.channel): s.key in checked
            for k in page.kinds
            for s in k.switches
            if not s.stopped
        }
        changed = consent.set_preferences(conn, customer_id, choices, now)
    log.info("preferences saved (%d changed)", changed)
    return redirect(url_for("pages.preferences_page", token=token, saved=1), code=303)
