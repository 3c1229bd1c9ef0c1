"""Digests: several of a customer's reminders in one message.

A digest (``digests:`` beside ``rules:`` in a rules file, :class:`~reminders.rules.Digest`) names
rules whose reminders go together. When a worker is about to send one of them (the *lead*: the
customer's earliest), it gathers the customer's other reminders of the digest's rules that wait
for the same channel and address and whose send time is within ``window`` of the lead's (``day``:
the same local day), at most ``max_items`` in all, and sends them as one message rendered by the
digest's template. Nothing goes later than planned; some go earlier, within the window.

Each gathered reminder is asked the send-time policies like a single one (:mod:`reminders.policies`:
grace, consent, quiet hours, its rule's ``check`` query) and is left out when one objects: a
``check`` that finds no row cancels it, as it would alone; any other objection leaves it where it
was, to be sent on its own time. When no other reminder is left, the lead goes alone with its own
template. The lead has been through the policies already (its quiet hours decided for the whole
digest) and the caps count the digest as one message.

Exactly once, as for a single reminder: the lead and the others are claimed in one transaction
(``queued``/``pending`` -> ``sending``, each conditional on its status, so no reminder is in two
digests), each carrying the attempt (when, by which worker, the SHA-256 of the digest's text) and
``digest_id`` (the lead's id). The one provider answer is then recorded on every item (``sent``
with the same provider id, each its own ``message`` row), or decides them all (retry, fallback to
the next channel, where the items meet again as a digest). A worker that dies in between leaves
them ``sending``; :mod:`reminders.reconcile` finds the one message for all of them.

Without ``digests:`` none of this runs: the single-reminder path is unchanged.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from . import caps, codec, consent, pause, policies
from .channels.base import Message, body_digest
from .compose import Rendered, customer_of, customer_zone, render, template_context
from .config import Config
from .dispatch import release
from .errors import InputError, TemplateError
from .lifecycle import CANCELED, PENDING, QUEUED, SENDING, move
from .models import reminder
from .replies import SNOOZED
from .rules import DAY_WINDOW, Digest, Rule
from .validate import RULE_CONTEXT

if TYPE_CHECKING:
    from .delivery import Counts, Delivery, _Ready

log = logging.getLogger(__name__)

# What a digest's template sees besides ``items`` and ``digest``: a rule template's names but
# the one reminder (taken from the lead's context).
SHARED = tuple(sorted(RULE_CONTEXT - {"reminder"}))
CONTEXT = frozenset({*SHARED, "items", "digest"})
GATHERED = (PENDING, QUEUED)  # what a digest may take besides its lead


# -- the window (pure) ----------------------------------------------------------------------------


def window_end(digest: Digest, start: datetime, zone: ZoneInfo) -> datetime:
    """The latest send time (inclusive) of a reminder that goes with one sent at ``start``: the
    window after it, or (``window: day``) the end of its local day in ``zone``."""
    if digest.window == DAY_WINDOW:
        day = start.astimezone(zone).date() + timedelta(days=1)
        return caps.start_of(day, zone) - timedelta(microseconds=1)
    assert isinstance(digest.window, timedelta)
    return start + digest.window


def channel_of(rule: Rule, index: int) -> str:
    """The channel a reminder of ``rule`` at ``index`` waits for."""
    return rule.channels[min(max(index, 0), len(rule.channels) - 1)]


def gather(
    digest: Digest,
    lead: Mapping[str, Any],
    rows: Iterable[Mapping[str, Any]],
    zone: ZoneInfo,
    rules: Mapping[str, Rule],
) -> list[Mapping[str, Any]]:
    """The reminders among ``rows`` that go with ``lead`` (a reminder row of the digest), in
    send-time order: the same customer and channel, a rule of the digest, due within the window.
    Every one of them, ``max_items`` aside: the caller drops what its checks refuse first."""
    end = window_end(digest, lead["send_at"], zone)
    rule = rules[lead["rule"]]
    wanted = channel_of(rule, lead["channel_index"])
    found = []
    for row in rows:
        other = rules.get(row["rule"])
        if (
            row["id"] == lead["id"]
            or other is None
            or row["rule"] not in digest.rules
            or str(row["customer_id"]) != str(lead["customer_id"])
            or row["send_at"] > end
            or channel_of(other, row["channel_index"]) != wanted
        ):
            continue
        found.append(row)
    return sorted(found, key=lambda r: (r["send_at"], r["id"]))


class Planned(NamedTuple):
    """A reminder as a plan sees it (forecast, preview): ``key`` is the caller's handle."""

    key: Any
    customer_id: str
    channel: str
    send_at: datetime
    zone: ZoneInfo


def plan(digest: Digest, reminders: Iterable[Planned]) -> list[list[Planned]]:
    """How ``reminders`` (of the digest's rules) would go out: a list of messages, each the
    reminders it carries, the earliest (the lead) first; one alone is a message of its own.

    Per customer and channel, in send-time order, each message takes the next reminder not yet
    taken and the others within its window, ``max_items`` at most (send-time checks aside)."""
    groups: dict[tuple[str, str], list[Planned]] = defaultdict(list)
    for one in reminders:
        groups[(one.customer_id, one.channel)].append(one)
    messages: list[list[Planned]] = []
    for group in groups.values():
        rest = sorted(group, key=lambda p: p.send_at)
        while rest:
            lead = rest[0]
            end = window_end(digest, lead.send_at, lead.zone)
            taken = [lead, *(p for p in rest[1:] if p.send_at <= end)][: digest.max_items]
            messages.append(taken)
            rest = [p for p in rest if all(p is not t for t in taken)]
    return sorted(messages, key=lambda m: (m[0].send_at, m[0].customer_id))


def item(
    rule: Rule, values: Mapping[str, Any], variables: Mapping[str, Any], own: Message
) -> dict[str, Any]:
    """One reminder as a digest's template sees it: the row's columns, ``rule``, ``reminder``,
    ``text`` (its own message, rendered by its rule's template: an SMS, or an email's text) and
    ``subject`` (an email's; None for SMS); the engine's names win over columns of the same name
    (the row is also whole in ``row``)."""
    return {
        **values,
        "row": dict(values),
        "rule": rule.name,
        "reminder": variables["reminder"],
        "text": own.body,
        "subject": own.subject,
    }


def context(
    lead_variables: Mapping[str, Any], digest: Digest, items: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """A digest template's context: ``items``, ``digest`` (its name and item count), and the
    lead's customer, clock, locale defaults and links."""
    found = {key: lead_variables[key] for key in SHARED}
    found.update(items=list(items), digest={"name": digest.name, "count": len(items)})
    return found


# -- the worker's side ------------------------------------------------------------------------


def deliver_digests(
    delivery: Delivery,
    channel: str,
    ready: list[_Ready],
    job_id: str,
    counts: Counts,
    worker: str | None,
) -> tuple[list[_Ready], set[int]]:
    """Send as digests the reminders of ``ready`` that have company; returns what goes alone
    (the ordinary path) and the reminders moved to another channel's queue."""
    ruleset = delivery.app.ruleset
    leads = [r for r in ready if ruleset.digest_of(r.rule.name) is not None]
    if not leads:
        return ready, set()
    rows = _candidates(delivery, leads)
    if not rows:
        return ready, set()
    taken: set[int] = set()
    alone: list[_Ready] = [r for r in ready if ruleset.digest_of(r.rule.name) is None]
    moved: set[int] = set()
    rules = {rule.name: rule for rule in ruleset.rules}
    now = delivery.app.now()
    for lead in sorted(leads, key=lambda r: (r.row["send_at"], r.row["id"])):
        if lead.row["id"] in taken:
            continue  # gathered by an earlier one of this batch
        digest = ruleset.digest_of(lead.rule.name)
        assert digest is not None
        values = codec.loads(lead.row["data"])
        zone = customer_zone(delivery.config, customer_of(lead.rule, values))
        company = [r for r in gather(digest, lead.row, rows, zone, rules) if r["id"] not in taken]
        members = _check(delivery, lead, company, digest, now) if company else []
        if not members:
            alone.append(lead)
            continue
        claimed, gone = _send(delivery, channel, digest, lead, members, job_id, counts, worker)
        taken.update(claimed)  # one of this batch left out goes on its own, or leads another
        moved |= gone
    return alone, moved


def _candidates(delivery: Delivery, leads: list[_Ready]) -> list[Mapping[str, Any]]:
    """The open reminders of the leads' customers and digests' rules, due by the widest window's
    end (a day for ``window: day``): one query for the batch."""
    ruleset = delivery.app.ruleset
    names: set[str] = set()
    latest = max(lead.row["send_at"] for lead in leads)
    widest = timedelta(0)
    for lead in leads:
        digest = ruleset.digest_of(lead.rule.name)
        assert digest is not None
        names.update(digest.rules)
        span = timedelta(days=2) if digest.window == DAY_WINDOW else digest.window
        assert isinstance(span, timedelta)
        widest = max(widest, span)
    customers = sorted({str(lead.row["customer_id"]) for lead in leads})
    r = reminder
    with delivery.app.state.connect() as conn:
        paused = pause.paused_rules(conn)
        found = (
            conn.execute(
                sa.select(r).where(
                    r.c.customer_id.in_(customers),
                    r.c.rule.in_(sorted(names - set(paused))),
                    r.c.status.in_(GATHERED),
                    r.c.send_at <= latest + widest,
                    # Snoozed by the customer: not earlier than they asked.
                    sa.or_(r.c.reason.is_(None), r.c.reason.not_like(f"{SNOOZED}%")),
                )
            )
            .mappings()
            .all()
        )
    return [dict(row) for row in found]


def _check(
    delivery: Delivery,
    lead: _Ready,
    company: list[Mapping[str, Any]],
    digest: Digest,
    now: datetime,
) -> list[_Ready]:
    """The reminders of ``company`` that pass their send-time policies, rendered, at most
    ``max_items - 1``; one whose ``check`` finds no row is canceled, as it would be alone."""
    from .delivery import _Business

    ruleset = delivery.app.ruleset
    config = delivery.config
    plans = []
    for row in company:
        rule = ruleset.get(row["rule"])
        assert rule is not None
        values = codec.loads(row["data"])
        customer = customer_of(rule, values)
        found = policies.candidates(config, rule, row["channel_index"], customer)
        plans.append((row, rule, values, customer, found))
    addresses = {(c.channel, c.address) for *_, cs in plans for c in cs}
    with delivery.app.state.connect() as conn:
        view = consent.View.load(
            conn,
            {str(lead.row["customer_id"])},
            {(n, a) for n, a in addresses if isinstance(a, str)},
        )
    business = _Business(delivery._business)
    batch = policies.Batch(config, now, lead.channel, view, business)
    members: list[_Ready] = []
    canceled: list[tuple[int, str]] = []
    try:
        for row, rule, values, customer, found in plans:
            if len(members) >= digest.max_items - 1:
                break
            try:
                decision, ctx = policies.decide(
                    policies.Context(batch, row, rule, values, customer, found)
                )
                if isinstance(decision, policies.Cancel):
                    canceled.append((row["id"], decision.reason))
                    continue
                if decision is not None or ctx.candidate is None:
                    continue  # deferred, moved, retried: it goes on its own time
                if ctx.candidate.address != lead.address:
                    continue
                members.append(delivery._render(ctx))
            except InputError:
                raise  # a configuration mistake fails the job, visibly
            except Exception:  # it goes alone, on its own time, and meets its error there
                log.exception(
                    "reminder %s: left out of a digest", row["id"], extra={"reminder_id": row["id"]}
                )
    finally:
        business.close()
    if canceled:
        with delivery.app.state.begin() as conn:
            for rid, why in canceled:
                move(conn, [rid], source=GATHERED, target=CANCELED, now=now, reason=why)
    return members


class Part(NamedTuple):
    """One reminder of a digest about to be rendered, its own message included."""

    rule: Rule
    row: Mapping[str, Any]
    values: Mapping[str, Any]
    channel: str
    address: str
    own: Message


def render_digest(
    renderer: Any,
    config: Config,
    digest: Digest,
    parts: Sequence[Part],
    now: datetime,
    locale: str | None = None,
) -> Rendered:
    """The digest's message for ``parts`` (the lead first), in the variant the lead customer's
    locale chooses (``locale`` stands in for it, for previews); raises ``TemplateError``."""
    items = []
    lead_variables: Mapping[str, Any] = {}
    for part in parts:
        variables = template_context(
            config, part.rule, part.row, part.values, now, part.channel, part.address
        )
        lead_variables = lead_variables or variables
        items.append(item(part.rule, part.values, variables, part.own))
    lead = parts[0]
    return render(
        renderer,
        config,
        lead.rule,
        lead.row,
        context(lead_variables, digest, items),
        lead.channel,
        lead.address,
        locale,
        template=digest.template_name,
    )


def _render(
    delivery: Delivery, digest: Digest, lead: _Ready, members: Sequence[_Ready], now: datetime
) -> Rendered:
    """The digest's message for the lead and ``members``; raises ``TemplateError``."""
    parts = [
        Part(
            one.rule,
            one.row,
            codec.loads(one.row["data"]),
            one.channel,
            one.address,
            one.rendered.message,
        )
        for one in (lead, *members)
    ]
    return render_digest(delivery.app.renderer, delivery.config, digest, parts, now)


def _send(
    delivery: Delivery,
    channel: str,
    digest: Digest,
    lead: _Ready,
    members: list[_Ready],
    job_id: str,
    counts: Counts,
    worker: str | None,
) -> tuple[set[int], set[int]]:
    """Claim the lead and its members in one transaction, send one message, record it on each;
    returns the reminders claimed and those moved to another channel's queue."""
    from .delivery import _Ready

    now = delivery.app.now()
    try:
        rendered = _render(delivery, digest, lead, members, now)
    except TemplateError as exc:
        log.warning(
            "digest %s: %s; reminder %s goes alone",
            digest.name,
            "; ".join(str(p) for p in exc.problems),
            lead.row["id"],
            extra={"reminder_id": lead.row["id"]},
        )
        rendered = lead.rendered
        members = []
    claimed = _claim(delivery, lead, members, rendered, job_id, counts, worker, now)
    if not claimed:
        return {lead.row["id"]}, set()  # deferred, released or taken: not to be sent here
    if len(claimed) < 1 + len(members):  # some were taken meanwhile: the text of the rest
        ids = {one.row["id"] for one in claimed}
        won = [m for m in members if m.row["id"] in ids]
        rendered = _render(delivery, digest, lead, won, now) if won else lead.rendered
        with delivery.app.state.begin() as conn:
            conn.execute(
                sa.update(reminder)
                .where(reminder.c.id.in_([one.row["id"] for one in claimed]))
                .values(body_digest=body_digest(rendered.message.body))
            )
    # Each item records the one message; its segments are counted once, on the lead.
    items = [
        _Ready(
            one.row,
            one.rule,
            one.index,
            one.channel,
            one.address,
            rendered if one is lead else Rendered(rendered.message, None, [], rendered.locale),
        )
        for one in claimed
    ]
    result = delivery._send(channel, items[:1], delivery.limiter(channel))[0]
    if isinstance(result, str) and len(items) > 1:
        counts.digests += 1
    gone = delivery._record(items, [result] * len(items), counts)
    return {one.row["id"] for one in claimed}, gone


def _claim(
    delivery: Delivery,
    lead: _Ready,
    members: list[_Ready],
    rendered: Rendered,
    job_id: str,
    counts: Counts,
    worker: str | None,
    now: datetime,
) -> list[_Ready]:
    """``queued -> sending`` for the lead (under this job) and ``pending``/``queued ->
    sending`` for its members, in one transaction; returns those won, the lead first (none
    when the lead was not). The caps count the lead alone: the digest is one message."""
    customer = str(lead.row["customer_id"])
    attempt: dict[str, Any] = {
        "attempt_at": datetime.now(UTC),
        "claimed_by": worker,
        "body_digest": body_digest(rendered.message.body),
        "channel": lead.channel,
        "digest_id": lead.row["id"],
    }
    lead_id = lead.row["id"]
    with delivery.app.state.begin() as conn:
        # One claim at a time per customer (PostgreSQL; SQLite's write lock does it already):
        # two leads of one customer in two workers must not each take half of the other's.
        caps.lock(conn, [customer])
        if lead.rule.name in pause.paused_rules(conn):  # paused since it was prepared
            counts.released += len(release(conn, [lead_id], job_id, now, pause.PAUSED_REASON))
            return []
        held = caps.enforce(
            conn, delivery.config, delivery.app.ruleset, [(lead.row, lead.rule)], job_id, now
        )
        if held:
            counts.deferred += 1
            return []
        won = move(
            conn,
            [lead_id],
            source=QUEUED,
            target=SENDING,
            now=now,
            values={**attempt, "channel_index": lead.index},
            where=[reminder.c.job_id == job_id],
        )
        if not won:
            counts.not_claimed += 1
            return []
        by_index: dict[int, list[int]] = defaultdict(list)
        for member in members:
            by_index[member.index].append(member.row["id"])
        got: set[int] = set()
        for index, ids in by_index.items():
            got.update(
                move(
                    conn,
                    ids,
                    source=GATHERED,
                    target=SENDING,
                    now=now,
                    reason=f"gathered into a digest with reminder {lead_id}",
                    keep_reason=True,
                    values={**attempt, "channel_index": index},
                )
            )
    return [lead, *(m for m in members if m.row["id"] in got)]
