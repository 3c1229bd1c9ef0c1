"""Composing a message: who it goes to, what its template sees, what it says, whether it is still
wanted.

Shared by the workers (:mod:`reminders.delivery`) and ``reminders preview``, so a preview shows
exactly what a worker would send. Nothing here writes anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import business_db, dberrors, email_address, phone, sendtime, sms
from .channels.base import Channel, Message
from .config import Config
from .errors import Problem, RuleError, RuntimeFailure, TemplateError
from .rules import Rule


def open_channel(config: Config, name: str) -> Channel:
    """The provider of channel ``name`` as configured (raises ``ConfigError`` if it is not)."""
    from .channels import PROVIDERS

    cfg = config.channel(name)
    return PROVIDERS[cfg.provider].from_config(name, cfg, config)


# -- the customer and the template context -----------------------------------------------------


def customer_of(rule: Rule, values: Mapping[str, Any]) -> dict[str, Any]:
    """The customer's fields (id, phone, email, timezone, locale, first_name) from a row."""
    return {key: values.get(column) for key, column in rule.columns.items()}


def customer_zone(config: Config, customer: Mapping[str, Any]) -> Any:
    """The customer's zone: their row's IANA name, else the config's default."""
    name = customer.get("timezone")
    if name:
        try:
            return sendtime.zone(str(name))
        except ValueError:
            pass  # the scan skips rows with unknown zones; an edited row falls back
    return config.tz()


def address_for(config: Config, channel: str, customer: Mapping[str, Any]) -> str:
    """The customer's address on ``channel``: E.164 for SMS; an email with its local part as
    written (see :mod:`reminders.email_address`).

    Raises ``PermanentError`` when there is none or it cannot be valid, saying why.
    """
    if channel == "sms":
        raw = customer.get("phone")
        return phone.normalize("" if raw is None else str(raw), config.default_region)
    raw = customer.get("email")
    return email_address.check("" if raw is None else str(raw))


def _links(
    config: Config, customer_id: str, channel: str, address: str, now: datetime
) -> dict[str, Any]:
    """Signed unsubscribe and preferences links, when the web app has a public address."""
    if not config.web.public_url:
        return {"unsubscribe_url": None, "preferences_url": None}
    from . import links

    # A missing REMINDERS_SECRET raises ConfigError here: it fails the job, loudly, and the
    # reminders wait (queued, enqueued again later) until ops set it.
    return {
        "unsubscribe_url": links.unsubscribe_url(config, customer_id, channel, address, now=now),
        "preferences_url": links.preferences_url(config, customer_id, now=now),
    }


def template_context(
    config: Config,
    rule: Rule,
    row: Mapping[str, Any],
    values: Mapping[str, Any],
    now: datetime,
    channel: str,
    address: str,
) -> dict[str, Any]:
    """What a template sees: the row's values, ``customer``, ``reminder``, ``now`` and links."""
    customer = customer_of(rule, values)
    context = dict(values)
    context.update(
        customer=customer,
        reminder={
            "id": row.get("id"),
            "rule": rule.name,
            "occurrence": row.get("occurrence"),
            "offset": row.get("offset"),
            "due": values.get(rule.due),
            "send_at": row.get("send_at"),
            "planned_at": row.get("planned_at"),
            "channel": channel,
        },
        now=now,
        default_timezone=config.timezone,
        default_locale=config.default_locale,
        template_locale=None,
        **_links(config, str(customer.get("id")), channel, address, now),
    )
    return context


def label_of(
    renderer: Any, config: Config, rule: Rule, values: Mapping[str, Any], now: datetime
) -> str:
    """What the customer's page calls this row's reminder: the rule's ``label`` over the row, or
    its plain name without one. Raises ``TemplateError`` (rule, file, line) when it fails."""
    if rule.label is None:
        return rule.plain_name
    context = dict(values)
    context.update(customer=customer_of(rule, values), default_timezone=config.timezone, now=now)
    return str(renderer.render_label(rule.name, rule.label, context, rule.file, rule.line))


@dataclass
class Rendered:
    """A rendered message before sending: the channel's ``Message``, its SMS segments and the
    template variant's locale (None: the default template)."""

    message: Message
    segments: int | None
    warnings: list[str] = field(default_factory=list)
    locale: str | None = None


def render(
    renderer: Any,
    config: Config,
    rule: Rule,
    row: Mapping[str, Any],
    context: Mapping[str, Any],
    channel: str,
    address: str,
    locale: str | None = None,
    template: str | None = None,
) -> Rendered:
    """Render the rule's template (or ``template``: a digest's) for ``channel`` in the variant
    the customer's locale chooses (``locale`` stands in for the customer's, for previews); raises
    ``TemplateError`` naming file and line."""
    rid = int(row.get("id") or 0)
    name = template or rule.template_name
    customer = context.get("customer")
    wanted = locale or (customer.get("locale") if isinstance(customer, Mapping) else None)
    chosen = renderer.choose(name, channel, wanted, config.default_locale)
    context = {**context, "template_locale": chosen}
    if channel == "sms":
        body = renderer.render_sms(name, context, chosen)
        if not body:
            raise TemplateError(f"{renderer.path(name, 'sms', chosen)}: the text is empty")
        info = sms.segments(body)
        warnings = []
        if info.offending:
            warnings.append(sms.describe_offending(info))
        limit = config.channels.sms.max_segments if config.channels.sms else None
        if limit and info.segments > limit:
            # Each part is billed: a runaway template must not become a hundred texts.
            raise TemplateError(
                Problem(
                    f"{info.segments} segments ({info.length} {info.encoding} units), "
                    f"more than channels.sms.max_segments = {limit}: not sent",
                    str(renderer.path(name, "sms")),
                )
            )
        callback = None
        if config.web.public_url:
            callback = config.web.public_url + "/webhooks/twilio/status"
        msg = Message(rid, rule.name, "sms", address, body, status_callback=callback)
        return Rendered(msg, info.segments, warnings, chosen)
    email = renderer.render_email(name, context, chosen)
    size = sum(len(part.encode("utf-8")) for part in (email.subject, email.text, email.html or ""))
    limit = config.channels.email.max_bytes if config.channels.email else None
    if limit and size > limit:
        raise TemplateError(
            Problem(
                f"{size:,} bytes (subject, text and HTML), more than "
                f"channels.email.max_bytes = {limit:,}: not sent",
                str(renderer.path(name, "email")),
            )
        )
    msg = Message(
        rid,
        rule.name,
        "email",
        address,
        email.text,
        subject=email.subject,
        html=email.html,
        unsubscribe_url=context.get("unsubscribe_url"),
    )
    return Rendered(msg, None, locale=chosen)


# The send-time re-check: a rule's ``check:`` query, asked again before each message. Not to be
# confused with the checkout's checks (reminders.checks), asked by the business.


class RecheckFailed(RuntimeFailure):
    """The rule's check query could not be answered (a transient failure)."""


class RecheckInvalid(RuleError):
    """The rule's check query cannot be asked for this reminder (a parameter is missing)."""


def recheck(
    conn: Connection, rule: Rule, values: Mapping[str, Any], now: datetime, config: Config
) -> bool:
    """Ask the rule's ``check`` query again at send time; True when it returns a row."""
    assert rule.check is not None
    available = {**business_db.time_params(rule.check, now, config.tz()), **values}
    wanted = business_db.parameters(rule.check)
    missing = wanted - set(available)
    if missing:
        raise RecheckInvalid(
            f"rule {rule.name} ({rule.file}:{rule.line}): the check query uses "
            f":{', :'.join(sorted(missing))}, which the rule's query does not return"
        )
    try:
        result = conn.execute(business_db.query(rule.check), {k: available[k] for k in wanted})
        found = result.first() is not None
        result.close()
        return found
    except sa.exc.DBAPIError as exc:
        conn.rollback()
        raise RecheckFailed(f"rule {rule.name}: {dberrors.message(exc)}") from None
