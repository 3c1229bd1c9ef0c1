"""Forecast: what a rule would send, day by day, and what would hold its messages back.

``reminders forecast RULE`` runs the rule's query and plans every row as a scan would, **without
writing anything** (so a rule can be tried before it is turned on); the console shows the same
for an existing rule from its pending reminders. Per day in the config's zone (by send day):

- ``sms``, ``email``: the messages that would go by each channel (the first of the rule's
  channels with a usable address, not opted out, not turned off by the customer), those held
  for a while by quiet hours or caps included;
- ``quiet_hours``: of those, how many fall in the channel's quiet hours (deferred to their end);
- ``caps``: how many are past the customer's ``caps.per_day`` that day, counting this rule's
  own messages only (deferred to a later day);
- ``opted_out``, ``off``: not sent: every usable channel opted out, or turned off (or both);
- ``no_address``: not sent: no channel has a usable address (the reminder would fail).
- ``digest`` (a rule in a digest only): reminders that would go inside a digest led by an earlier
  reminder of the customer's (this rule's or another of the digest's pending ones), not as
  messages of their own; the digest's messages are counted on the day of their lead.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import business_db, consent, sendtime, stats
from .compose import address_for, customer_of, customer_zone
from .config import Config
from .errors import PermanentError
from .lifecycle import PENDING, QUEUED
from .models import reminder
from .rules import Rule

FIELDS = ("sms", "email", "quiet_hours", "caps", "opted_out", "off", "no_address")
MAX_DAYS = 366


def count(
    conn: Connection,
    config: Config,
    rule: Rule,
    items: Iterable[tuple[datetime, int, dict[str, Any]]],
    now: datetime,
    days: int,
    inside: set[int] | None = None,
) -> list[dict[str, Any]]:
    """Count ``items`` (send time, channel index, row values) by send day and outcome;
    ``inside``: the positions of the items that would go inside a digest (counted as such)."""
    tz = config.tz()
    first = stats.today(config, now)
    bounds = stats.day_bounds(first, days, tz)
    fields = FIELDS if inside is None else (*FIELDS, "digest")
    out: list[dict[str, Any]] = [
        {"date": (first + timedelta(days=i)).isoformat(), **dict.fromkeys(fields, 0)}
        for i in range(days)
    ]
    plans: list[tuple[int, datetime, str, list[tuple[str, Any]], dict[str, Any]]] = []
    customers: set[str] = set()
    addresses: set[tuple[str, str]] = set()
    known: dict[tuple[str, Any], Any] = {}  # (channel, raw address) -> address or its error
    for position, (send_at, index, values) in enumerate(items):
        if send_at >= bounds[-1]:
            continue
        day = 0
        while day + 1 < len(bounds) - 1 and send_at >= bounds[day + 1]:
            day += 1
        if inside is not None and position in inside:
            out[day]["digest"] += 1
            continue
        customer = customer_of(rule, values)
        cid = str(customer.get("id"))
        candidates: list[tuple[str, Any]] = []
        for name in rule.channels[index:]:
            raw = customer.get("phone" if name == "sms" else "email")
            address = known.get((name, raw))
            if address is None:
                try:
                    address = known[(name, raw)] = address_for(config, name, customer)
                except PermanentError as exc:
                    address = known[(name, raw)] = exc
            if not isinstance(address, PermanentError):
                addresses.add((name, address))
            candidates.append((name, address))
        customers.add(cid)
        plans.append((day, max(send_at, now), cid, candidates, customer))
    view = consent.View.load(conn, customers, addresses)
    per_day = config.caps.per_day if config.caps is not None and rule.caps is not False else None
    used: dict[tuple[str, Any], int] = defaultdict(int)
    for day, send_at, cid, candidates, customer in sorted(plans, key=lambda p: p[1]):
        row = out[day]
        chosen = None
        refusals: list[str] = []
        for name, address in candidates:
            if isinstance(address, PermanentError):
                continue
            refused = view.refusal(cid, rule.name, name, address)
            if refused is None:
                chosen = name
                break
            refusals.append(refused)
        if chosen is None:
            if not refusals:
                row["no_address"] += 1
            elif any("opted out" in x for x in refusals):
                row["opted_out"] += 1
            else:
                row["off"] += 1
            continue
        row[chosen] = row.get(chosen, 0) + 1
        zone = customer_zone(config, customer)
        quiet = rule.quiet_window(config, chosen)
        if quiet is not None and sendtime.quiet_until(send_at, zone, quiet) is not None:
            row["quiet_hours"] += 1
        elif per_day is not None:
            key = (cid, send_at.astimezone(zone).date())
            used[key] += 1
            if used[key] > per_day:
                row["caps"] += 1
    return out


def from_query(app: Any, rule_name: str, days: int) -> dict[str, Any]:
    """Run the rule's query and plan it as a scan would, writing nothing."""
    from .scan import Planner, RowError, _check_columns, _query_params

    config: Config = app.config
    rule: Rule = app.ruleset.rule(rule_name)
    now = app.now()
    planner = Planner(rule, config, now)
    params = _query_params(rule.query, now, config)
    skipped: dict[str, int] = defaultdict(int)
    rows = 0
    items: list[tuple[datetime, int, dict[str, Any]]] = []
    for keys, batch in business_db.stream_rows(
        app.business, rule.query, params, what=f"rule {rule.name}"
    ):
        if rows == 0:
            _check_columns(rule, keys)
            planner.bind(keys)
        for values in batch:
            rows += 1
            mapping = dict(zip(keys, values, strict=True))
            try:
                occurrence, customer, digest = planner.identify(values)
                planned, _late = planner.plan(mapping, occurrence, customer, digest.hex())
            except RowError as exc:
                skipped[stats._skip_kind(exc.column, exc.reason)] += 1
                continue
            for p in planned:
                items.append((p.planned_at, 0, mapping))
    with app.state.connect() as conn:
        found = _result(app, conn, rule, items, days, "query")
    return {**found, "rows": rows, "skipped": dict(skipped), "days": found.pop("days")}


def from_pending(app: Any, rule_name: str, days: int) -> dict[str, Any]:
    """The same counts from the rule's pending (and queued) reminders."""
    config: Config = app.config
    rule: Rule = app.ruleset.rule(rule_name)
    now = app.now()
    first = stats.today(config, now)
    bounds = stats.day_bounds(first, days, config.tz())
    with stats.reading(app.state) as conn:
        items = list(
            stats.pending_items(conn, rule.name, bounds[0] - timedelta(days=3650), bounds[-1])
        )
        return _result(app, conn, rule, items, days, "pending")


def _result(
    app: Any,
    conn: Connection,
    rule: Rule,
    items: list[tuple[datetime, int, dict[str, Any]]],
    days: int,
    source: str,
) -> dict[str, Any]:
    """The forecast of ``items`` (the rule's planned reminders) from ``source``."""
    now = app.now()
    inside = _inside(app, conn, rule, items, now)
    found = app.ruleset.digest_of(rule.name)
    return {
        "rule": rule.name,
        "timezone": app.config.timezone,
        "digest": None if found is None else found.name,
        "source": source,
        "days": count(conn, app.config, rule, items, now, days, inside),
    }


def _inside(
    app: Any,
    conn: Connection,
    rule: Rule,
    items: list[tuple[datetime, int, dict[str, Any]]],
    now: datetime,
) -> set[int] | None:
    """Which of ``items`` (the rule's) would go inside a digest led by an earlier reminder (None:
    the rule is in no digest): planned with the pending reminders of the digest's other rules."""
    from . import codec, digest

    found = app.ruleset.digest_of(rule.name)
    if found is None:
        return None
    config: Config = app.config

    def planned(key: Any, of: Rule, send_at: datetime, index: int, values: Any) -> Any:
        customer = customer_of(of, values)
        return digest.Planned(
            key,
            str(customer.get("id")),
            digest.channel_of(of, index),
            max(send_at, now),
            customer_zone(config, customer),
        )

    entries = [planned(i, rule, *item) for i, item in enumerate(items)]
    others = [n for n in found.rules if n != rule.name and app.ruleset.get(n) is not None]
    if others:
        r = reminder
        for row in conn.execute(
            sa.select(r.c.id, r.c.rule, r.c.send_at, r.c.channel_index, r.c.data).where(
                r.c.rule.in_(others), r.c.status.in_([PENDING, QUEUED])
            )
        ):
            other = app.ruleset.rule(row.rule)
            values = codec.loads(row.data)
            entries.append(
                planned(("pending", row.id), other, row.send_at, row.channel_index, values)
            )
    return {
        one.key
        for message in digest.plan(found, entries)
        for one in message[1:]
        if isinstance(one.key, int)
    }


def format_forecast(result: dict[str, Any]) -> str:
    """The forecast as a table."""
    fields = FIELDS if result.get("digest") is None else (*FIELDS, "digest")
    head = f"{'date':10}  " + "  ".join(f"{f:>11}" for f in fields)
    lines = [f"forecast for {result['rule']} (days in {result['timezone']})", head]
    total = dict.fromkeys(fields, 0)
    for day in result["days"]:
        lines.append(f"{day['date']:10}  " + "  ".join(f"{day[f]:>11}" for f in fields))
        for f in fields:
            total[f] += day[f]
    lines.append(f"{'total':10}  " + "  ".join(f"{total[f]:>11}" for f in fields))
    if result.get("digest") is not None:
        lines.append(
            f"in digest {result['digest']}: digest counts the reminders that would go inside "
            "an earlier one's message, not on their own"
        )
    if result.get("rows") is not None:
        lines.append(f"{result['rows']} rows read; nothing written")
    for reason, n in result.get("skipped", {}).items():
        lines.append(f"  {n} rows would be skipped: {reason}")
    return "\n".join(lines)
