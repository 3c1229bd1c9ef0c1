"""``reminders preview``: a rule's messages for real customers, rendered exactly as a worker would,
sent to no one.

The rule's query runs against the business DB (read-only); for the first rows (or the one
``--occurrence``), each of the rule's channels is rendered with the context a worker builds. SMS
shows its segments and encoding, with a warning when a character forces UCS-2 or the text runs
past ``channels.sms.max_segments``; a template error names the template and line. Addresses are
masked: the output is safe to paste into a ticket.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import business_db, clock, phone, sms
from .compose import address_for, label_of, render, template_context
from .errors import InputError, PermanentError, Problem, TemplateError
from .planner import Planner, RowError, parse_due
from .rules import Rule

if TYPE_CHECKING:
    from .app import App

MAX_ROWS_READ = 100_000  # rows looked through for an --occurrence before giving up


@dataclass
class PreviewResult:
    """The rendered messages (one dict each), the errors and warnings met."""

    rule: str
    items: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the business's input: exit 2
    failures: list[str] = field(default_factory=list)  # a query failed at the database: exit 1
    notes: list[str] = field(default_factory=list)


def preview_rule(
    app: App,
    rule_name: str,
    *,
    occurrence: str | None = None,
    limit: int = 3,
    locale: str | None = None,
) -> PreviewResult:
    """Render ``rule_name``'s messages for the first ``limit`` rows (or one occurrence); with
    ``locale``, in the variant that locale chooses, whatever the customers' own."""
    config = app.config
    rule: Rule = app.ruleset.rule(rule_name)
    notes: list[str] = []
    if locale is not None:
        from . import locales

        tag = locales.normalize(locale)
        if tag is None:
            raise InputError(Problem(f'--locale: "{locale}" is not a locale (examples: es, fr-CA)'))
        renderer = app.renderer
        missing = [c for c in rule.channels if renderer.choose(rule.template_name, c, tag) is None]
        for channel in missing:
            known = ", ".join(renderer.variants(rule.template_name, channel)) or "none"
            default_file = _shown(config, renderer.path(rule.template_name, channel))
            wanted = _shown(config, renderer.path(rule.template_name, channel, tag))
            said = (
                f"{default_file} has no variant for {tag} (its variants: {known}; write {wanted})"
            )
            if len(missing) == len(rule.channels):
                raise TemplateError(said)
            notes.append(f"{said}: the default template is shown")
        locale = tag
    now = app.now()
    planner = Planner(rule, config, now)
    result = PreviewResult(rule.name, notes=notes)
    params = business_db.time_params(rule.query, now, config.tz())
    seen = 0
    shown = 0
    for batch in business_db.stream(app.business, rule.query, params, what=f"rule {rule.name}"):
        for row in batch:
            seen += 1
            try:
                key, customer_id, digest = planner.identity(row)
            except RowError as exc:
                if occurrence is None:
                    result.notes.append(f"row {seen} would be skipped: {exc.reason}")
                continue
            if occurrence is not None and key != occurrence:
                continue
            try:
                planned, _late = planner.plan(row, key, customer_id, digest)
            except RowError as exc:
                result.notes.append(f"occurrence {key} would be skipped: {exc.reason}")
                continue
            _preview_row(app, rule, dict(row), key, customer_id, planned, now, result, locale)
            shown += 1
            if shown >= limit:
                return result
        if seen >= MAX_ROWS_READ:
            break
    if occurrence is not None and shown == 0:
        result.errors.append(
            f'rule {rule.name}: no row of its query has the occurrence "{occurrence}"'
        )
    elif shown == 0:
        result.notes.append(f"rule {rule.name}: its query returned no usable row")
    return result


def _preview_row(
    app: App,
    rule: Rule,
    values: dict[str, Any],
    key: str,
    customer_id: str,
    planned: list[Any],
    now: Any,
    result: PreviewResult,
    locale: str | None = None,
) -> None:
    config = app.config
    values[rule.due] = _typed_due(values, rule)
    upcoming = [p for p in planned if p.planned_at >= now] or planned
    first = upcoming[0] if upcoming else None
    row: dict[str, Any] = {
        "id": None,
        "occurrence": key,
        "offset": first.offset if first else None,
        "send_at": first.planned_at if first else None,
        "planned_at": first.planned_at if first else None,
    }
    base = {
        "rule": rule.name,
        "occurrence": key,
        "customer_id": customer_id,
        "offset": row["offset"],
        "send_at": clock.iso_utc(row["send_at"]) if row["send_at"] else None,
    }
    if rule.label is not None:
        try:
            base["label"] = label_of(app.renderer, config, rule, values, now)
        except TemplateError as exc:
            base["label_error"] = "; ".join(str(p) for p in exc.problems)
            result.errors.append(base["label_error"])
    if rule.check:
        base["check"] = _recheck(app, rule, values, now, result)
    for channel in rule.channels:
        item: dict[str, Any] = dict(base, channel=channel)
        customer = {k: values.get(c) for k, c in rule.columns.items()}
        try:
            address = address_for(config, channel, customer)
        except PermanentError as exc:
            item["unusable"] = exc.message
            result.items.append(item)
            continue
        item["to"] = phone.mask_address(channel, address)
        context = template_context(config, rule, row, values, now, channel, address)
        try:
            rendered = render(app.renderer, config, rule, row, context, channel, address, locale)
        except TemplateError as exc:
            item["error"] = "; ".join(str(p) for p in exc.problems)
            result.errors.append(f"{rule.name} {key} {channel}: {item['error']}")
            result.items.append(item)
            continue
        _message_fields(item, rendered)
        result.items.append(item)


def _message_fields(item: dict[str, Any], rendered: Any) -> None:
    """What a preview shows of a rendered message: its locale, text (SMS: its segments; email:
    subject and HTML), and warnings."""
    message = rendered.message
    item["locale"] = rendered.locale
    if message.channel == "sms":
        info = sms.segments(message.body)
        item.update(
            text=message.body, segments=info.segments, encoding=info.encoding, length=info.length
        )
    else:
        item.update(subject=message.subject, text=message.body, html=message.html)
    if rendered.warnings:
        item["warnings"] = rendered.warnings


def _shown(config: Any, path: Path) -> str:
    """A template's path relative to the config's folder, as validate names it."""
    try:
        return str(path.resolve().relative_to(Path(config.root).resolve()))
    except ValueError:
        return str(path)


def _typed_due(values: dict[str, Any], rule: Rule) -> Any:
    return parse_due(values.get(rule.due), rule.due)


def _recheck(app: App, rule: Rule, values: dict[str, Any], now: Any, result: PreviewResult) -> str:
    """What the rule's check query says now, in words; a failure is also kept in ``result``
    (once), so the command does not exit 0 on a check that would fail every send."""
    from .compose import RecheckFailed, RecheckInvalid, recheck

    try:
        with app.business.connect() as conn:
            found = recheck(conn, rule, values, now, app.config)
    except RecheckInvalid as exc:
        if str(exc) not in result.errors:
            result.errors.append(str(exc))
        return f"failed: {exc}"
    except RecheckFailed as exc:
        said = (
            f"rule {rule.name}: check query failed: {str(exc).removeprefix(f'rule {rule.name}: ')}"
        )
        if said not in result.failures:
            result.failures.append(said)
        return f"failed: {exc}"
    return "returns a row: would send" if found else "no row: would be canceled"


def format_preview(result: PreviewResult) -> str:
    """The preview as readable text."""
    lines: list[str] = []
    for item in result.items:
        head = (
            f"== {item['rule']} {item['occurrence']} (customer {item['customer_id']}) "
            f"{item['channel']}"
        )
        if "digest" in item:
            head = (
                f"== digest {item['digest']} (customer {item['customer_id']}) {item['channel']}, "
                f"{len(item['items'])} reminders from {item['send_at']}"
            )
        elif item.get("offset"):
            head += f", offset {item['offset']} at {item['send_at']}"
        if item.get("locale"):
            head += f", in {item['locale']}"
        lines.append(head)
        if "label" in item:
            lines.append(f"label: {item['label']}")
        if "label_error" in item:
            lines.append(f"error: {item['label_error']}")
        if "check" in item:
            lines.append(f"check: {item['check']}")
        if "items" in item:
            lines.append(f"items: {'; '.join(item['items'])}")
        if "unusable" in item:
            lines.append(f"not sendable: {item['unusable']}")
            continue
        lines.append(f"to: {item['to']}")
        if "error" in item:
            lines.append(f"error: {item['error']}")
            continue
        if item["channel"] == "sms":
            lines.append(
                f"segments: {item['segments']} ({item['encoding']}, {item['length']} units)"
            )
        else:
            lines.append(f"subject: {item['subject']}")
        lines.append(item["text"])
        if item.get("html"):
            lines.append(f"(and an HTML part, {len(item['html'])} characters)")
        for warning in item.get("warnings", []):
            lines.append(f"warning: {warning}")
        lines.append("")
    lines.extend(f"note: {note}" for note in result.notes)
    return "\n".join(lines).rstrip()


def preview_digest(
    app: App, name: str, *, limit: int = 3, locale: str | None = None
) -> PreviewResult:
    """Render the first ``limit`` messages of digest ``name`` that would carry several of a
    customer's pending reminders (as a worker would gather them, send-time checks aside); with
    ``locale``, in the variant that locale chooses."""
    import sqlalchemy as sa

    from . import codec
    from .compose import customer_of, customer_zone
    from .digest import Planned, channel_of, plan
    from .lifecycle import PENDING, QUEUED
    from .models import reminder

    config = app.config
    digest = app.ruleset.digest(name)
    result = PreviewResult(rule=digest.name)
    now = app.now()
    r = reminder
    with app.state.connect() as conn:
        rows = [
            dict(row)
            for row in conn.execute(
                sa.select(r)
                .where(r.c.rule.in_(digest.rules), r.c.status.in_([PENDING, QUEUED]))
                .order_by(r.c.send_at, r.c.id)
            ).mappings()
        ]
    entries = []
    for row in rows:
        rule = app.ruleset.get(row["rule"])
        if rule is None:
            continue
        row["values"] = codec.loads(row["data"])
        customer = customer_of(rule, row["values"])
        zone = customer_zone(config, customer)
        channel = channel_of(rule, row["channel_index"])
        entries.append(Planned(row, str(row["customer_id"]), channel, row["send_at"], zone))
    messages = [m for m in plan(digest, entries) if len(m) > 1]
    for message in messages[:limit]:
        _preview_message(app, digest, [one.key for one in message], now, locale, result)
    if not messages:
        result.notes.append(
            f"digest {digest.name}: no customer has two pending reminders of "
            f"{', '.join(digest.rules)} on one channel within its window"
        )
    return result


def _preview_message(
    app: App,
    digest: Any,
    rows: list[dict[str, Any]],
    now: Any,
    locale: str | None,
    result: PreviewResult,
) -> None:
    """One digest's message for ``rows`` (pending reminders, the lead first) into ``result``."""
    from .compose import customer_of
    from .digest import Part, channel_of, render_digest

    config = app.config
    lead = rows[0]
    channel = channel_of(app.ruleset.rule(lead["rule"]), lead["channel_index"])
    item: dict[str, Any] = {
        "digest": digest.name,
        "rule": lead["rule"],
        "occurrence": lead["occurrence"],
        "customer_id": str(lead["customer_id"]),
        "channel": channel,
        "offset": lead["offset"],
        "send_at": clock.iso_utc(lead["send_at"]),
        "items": [f"{row['rule']} {row['occurrence']} {row['offset']}" for row in rows],
    }
    result.items.append(item)
    try:
        parts = []
        for row in rows:
            rule = app.ruleset.rule(row["rule"])
            address = address_for(config, channel, customer_of(rule, row["values"]))
            context = template_context(config, rule, row, row["values"], now, channel, address)
            own = render(app.renderer, config, rule, row, context, channel, address, locale)
            parts.append(Part(rule, row, row["values"], channel, address, own.message))
        rendered = render_digest(app.renderer, config, digest, parts, now, locale)
    except PermanentError as exc:
        item["unusable"] = exc.message
        return
    except TemplateError as exc:
        item["error"] = "; ".join(str(p) for p in exc.problems)
        result.errors.append(f"digest {digest.name} {lead['occurrence']}: {item['error']}")
        return
    item["to"] = phone.mask_address(channel, rendered.message.to)
    _message_fields(item, rendered)
