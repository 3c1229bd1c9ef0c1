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

from . import phone, schedule, sms, source
from .channels.base import Channel, Message
from .config import Config
from .errors import PermanentError, TemplateError
from .rules import Rule


def open_channel(config: Config, name: str) -> Channel:
    """The provider of channel ``name`` as configured (raises ``ConfigError`` if it is not)."""
    from .channels import OutboxChannel, SmtpChannel, TwilioChannel
    from .config import EmailConfig, SmsConfig

    cfg = config.channel(name)
    if cfg.provider == "outbox":
        assert cfg.path is not None
        return OutboxChannel(name, config.path(cfg.path))
    if isinstance(cfg, SmsConfig):
        assert cfg.account_sid and cfg.auth_token  # the config requires them for twilio
        return TwilioChannel(
            cfg.account_sid,
            cfg.auth_token,
            from_=cfg.from_,
            messaging_service_sid=cfg.messaging_service_sid,
            api_url=cfg.api_url,
            concurrency=cfg.concurrency,
            timeout=cfg.timeout.total_seconds(),
        )
    assert isinstance(cfg, EmailConfig) and cfg.from_
    return SmtpChannel(
        cfg.host,
        cfg.port,
        cfg.from_,
        username=cfg.username,
        password=cfg.password,
        security=cfg.security,
        timeout=cfg.timeout.total_seconds(),
    )


# -- the customer and the template context -----------------------------------------------------


def customer_of(rule: Rule, values: Mapping[str, Any]) -> dict[str, Any]:
    """The customer's fields (id, phone, email, timezone, locale, first_name) from a row."""
    return {key: values.get(column) for key, column in rule.columns.items()}


def customer_zone(config: Config, customer: Mapping[str, Any]) -> Any:
    """The customer's zone: their row's IANA name, else the config's default."""
    name = customer.get("timezone")
    if name:
        try:
            return schedule.zone(str(name))
        except ValueError:
            pass  # the scan skips rows with unknown zones; an edited row falls back
    return config.tz()


def address_for(config: Config, channel: str, customer: Mapping[str, Any]) -> str:
    """The customer's address on ``channel``: E.164 for SMS, a lowercased email.

    Raises ``PermanentError`` when there is none or it cannot be valid.
    """
    if channel == "sms":
        raw = customer.get("phone")
        return phone.normalize("" if raw is None else str(raw), config.default_region)
    raw = customer.get("email")
    text = "" if raw is None else str(raw).strip()
    if not text:
        raise PermanentError("no email address", code="invalid_address")
    local, at, domain = text.rpartition("@")
    if not at or not local or "." not in domain or any(c.isspace() for c in text):
        raise PermanentError(
            f"not an email address: {phone.mask_email(text)}", code="invalid_address"
        )
    return text.lower()


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
        **_links(config, str(customer.get("id")), channel, address, now),
    )
    return context


@dataclass
class Rendered:
    """A rendered message before sending: the channel's ``Message`` and its SMS segments."""

    message: Message
    segments: int | None
    warnings: list[str] = field(default_factory=list)


def render(
    renderer: Any,
    config: Config,
    rule: Rule,
    row: Mapping[str, Any],
    context: Mapping[str, Any],
    channel: str,
    address: str,
) -> Rendered:
    """Render the rule's template for ``channel``; raises ``TemplateError`` naming file and line."""
    rid = int(row.get("id") or 0)
    name = rule.template_name
    if channel == "sms":
        body = renderer.render_sms(name, context)
        if not body:
            raise TemplateError(f"{renderer.path(name, 'sms')}: the text is empty")
        info = sms.segments(body)
        warnings = []
        if info.offending:
            warnings.append(sms.describe_offending(info))
        limit = config.channels.sms.max_segments if config.channels.sms else None
        if limit and info.segments > limit:
            warnings.append(
                f"{info.segments} segments ({info.length} {info.encoding} units), "
                f"more than channels.sms.max_segments = {limit}"
            )
        callback = None
        if config.web.public_url:
            callback = config.web.public_url + "/webhooks/twilio/status"
        msg = Message(rid, rule.name, "sms", address, body, status_callback=callback)
        return Rendered(msg, info.segments, warnings)
    email = renderer.render_email(name, context)
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
    return Rendered(msg, None)


class CheckFailed(Exception):
    """The rule's check query could not be answered (a transient failure)."""


class CheckInvalid(Exception):
    """The rule's check query cannot be asked for this reminder (a parameter is missing)."""


def run_check(
    conn: Connection, rule: Rule, values: Mapping[str, Any], now: datetime, config: Config
) -> bool:
    """Ask the rule's check query again; True when it returns a row."""
    assert rule.check is not None
    available = dict(values)
    available.setdefault("now", now)
    available.setdefault("today", now.astimezone(config.tz()).date())
    wanted = source.parameters(rule.check)
    missing = wanted - set(available)
    if missing:
        raise CheckInvalid(
            f"rule {rule.name} ({rule.file}:{rule.line}): the check query uses "
            f":{', :'.join(sorted(missing))}, which the rule's query does not return"
        )
    try:
        result = conn.execute(source.query(rule.check), {k: available[k] for k in wanted})
        found = result.first() is not None
        result.close()
        return found
    except sa.exc.DBAPIError as exc:
        conn.rollback()
        text = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise CheckFailed(f"rule {rule.name}: {text}") from None
