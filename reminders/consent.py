"""Consent, in one place: who may be contacted, on which channel, about what.

Two kinds of record decide it:

- an **opt-out** (``optout`` table) stops one address on one channel, for every rule: a STOP
  reply, Twilio's 21610, a dead number (30004/30005/30006), a one-click unsubscribe;
- a **preference** (``preference`` table) is a customer's own on/off for a rule (``*`` = every
  rule) on a channel (``*`` = every channel), set on their preferences page. The most specific
  record wins; no record means on.

Both are applied **at send time**, before every message (the worker asks :func:`refusal`, or a
:class:`View` for a batch), and by nothing else: a pending reminder is not canceled when its
customer replies STOP or turns a kind off, it is skipped or moved to its next channel when its
time comes. So START, or switching a kind back on, before that time simply lets it go, and no
canceled reminder ever has to be brought back (which could resurrect one whose occurrence
vanished meanwhile). A scan may also ask :func:`turned_off` to not create reminders a customer
has switched off entirely.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import outbox, state_db
from .links import normalize_address
from .models import consent_event, optout, preference

ANY = "*"
TURNED_OFF = "turned off by the customer"
_CHUNK = 5000  # customers or addresses a query (View.load)

# opt-out sources (optout.source): who or what stopped the address
STOP = "stop"
UNSUBSCRIBE = "unsubscribe"
# opt-in sources: what lifted an opt-out
START = "start"
PREFERENCES = "preferences"
# consent_event.action
OPT_OUT, OPT_IN = "opt_out", "opt_in"


@dataclass(frozen=True)
class OptOut:
    """One stopped address."""

    channel: str
    address: str
    source: str
    reason: str | None
    customer_id: str | None
    created_at: datetime


def opt_out(
    conn: Connection,
    channel: str,
    address: str,
    source: str,
    reason: str | None,
    now: datetime,
    customer_id: str | None = None,
) -> bool:
    """Stop ``address`` on ``channel`` (every rule). Returns False when it was already stopped.

    The first record is kept (its source and time are the record of when and why): a second
    STOP, a retried webhook or a later bounce changes nothing.
    """
    row = {
        "channel": channel,
        "address": normalize_address(channel, address),
        "customer_id": None if customer_id is None else str(customer_id),
        "source": source[:32],
        "reason": reason,
        "created_at": now,
    }
    if state_db.insert_ignoring_conflicts(conn, optout, [row]) == 0:
        return False
    _record(conn, OPT_OUT, row)
    return True


def opt_in(
    conn: Connection,
    channel: str,
    address: str,
    source: str,
    reason: str | None,
    now: datetime,
    customer_id: str | None = None,
) -> bool:
    """Let ``address`` be contacted on ``channel`` again (START, the preferences page), recorded
    with its source. False when it was not stopped (nothing is recorded then)."""
    address = normalize_address(channel, address)
    result = conn.execute(
        optout.delete().where(optout.c.channel == channel, optout.c.address == address)
    )
    if result.rowcount == 0:
        return False
    row = {
        "channel": channel,
        "address": address,
        "customer_id": None if customer_id is None else str(customer_id),
        "source": source[:32],
        "reason": reason,
        "created_at": now,
    }
    _record(conn, OPT_IN, row)
    return True


def _record(conn: Connection, action: str, row: Mapping[str, object]) -> None:
    """One line of the consent history, in the transaction of the change it records, and its
    outbox event (write-back, webhooks) when one is wanted."""
    conn.execute(
        consent_event.insert().values(
            channel=row["channel"],
            address=row["address"],
            customer_id=row["customer_id"],
            action=action,
            source=row["source"],
            reason=row["reason"],
            at=row["created_at"],
        )
    )
    outbox.on_consent(conn, "opted_out" if action == OPT_OUT else "opted_in", row)


def history(conn: Connection, channel: str, address: str) -> list[dict[str, object]]:
    """The consent history of ``address`` on ``channel``, oldest first."""
    rows = conn.execute(
        sa.select(consent_event)
        .where(
            consent_event.c.channel == channel,
            consent_event.c.address == normalize_address(channel, address),
        )
        .order_by(consent_event.c.at, consent_event.c.id)
    ).mappings()
    return [dict(row) for row in rows]


def opted_out(conn: Connection, channel: str, address: str) -> OptOut | None:
    """The opt-out of ``address`` on ``channel``, or None."""
    row = (
        conn.execute(
            sa.select(optout).where(
                optout.c.channel == channel,
                optout.c.address == normalize_address(channel, address),
            )
        )
        .mappings()
        .first()
    )
    if row is None:
        return None
    return OptOut(
        row["channel"],
        row["address"],
        row["source"],
        row["reason"],
        row["customer_id"],
        row["created_at"],
    )


def is_opted_out(conn: Connection, channel: str, address: str) -> bool:
    """Whether ``address`` may not be contacted on ``channel``."""
    return opted_out(conn, channel, address) is not None


# --- preferences -----------------------------------------------------------------------------


def resolve(choices: Mapping[tuple[str, str], bool], rule: str, channel: str) -> bool:
    """Whether ``rule`` on ``channel`` is on, given a customer's (rule, channel) -> enabled.

    The most specific choice wins: (rule, channel), then (rule, *), then (*, channel), then
    (*, *); with none, it is on.
    """
    for key in ((rule, channel), (rule, ANY), (ANY, channel), (ANY, ANY)):
        if key in choices:
            return choices[key]
    return True


def preferences(conn: Connection, customer_id: str) -> dict[tuple[str, str], bool]:
    """A customer's stored choices: (rule or *, channel or *) -> enabled."""
    rows = conn.execute(
        sa.select(preference.c.rule, preference.c.channel, preference.c.enabled).where(
            preference.c.customer_id == str(customer_id)
        )
    )
    return {(r.rule, r.channel): bool(r.enabled) for r in rows}


def enabled(conn: Connection, customer_id: str, rule: str, channel: str) -> bool:
    """Whether the customer lets ``rule`` reach them on ``channel``."""
    return resolve(preferences(conn, customer_id), rule, channel)


def set_preferences(
    conn: Connection,
    customer_id: str,
    choices: Mapping[tuple[str, str], bool],
    now: datetime,
) -> int:
    """Store a customer's choices ((rule or *, channel or *) -> enabled); returns how many changed.

    Writes only what changes the outcome: saving an unchanged page writes nothing, and a switch
    left on where nothing turned it off leaves no record.
    """
    customer_id = str(customer_id)
    stored = preferences(conn, customer_id)
    changed = 0
    for (rule, channel), on in choices.items():
        if (rule, channel) in stored:
            if stored[(rule, channel)] == on:
                continue
        elif resolve(stored, rule, channel) == on:
            continue
        changed += 1
        existed = (rule, channel) in stored
        stored[(rule, channel)] = on  # later choices of this call resolve against this one
        if existed:
            conn.execute(
                preference.update()
                .where(
                    preference.c.customer_id == customer_id,
                    preference.c.rule == rule,
                    preference.c.channel == channel,
                )
                .values(enabled=on, updated_at=now)
            )
        else:
            row = {
                "customer_id": customer_id,
                "rule": rule,
                "channel": channel,
                "enabled": on,
                "updated_at": now,
            }
            if state_db.insert_ignoring_conflicts(conn, preference, [row]) == 0:
                # Two saves of one page at once: the other inserted first; this one wins.
                conn.execute(
                    preference.update()
                    .where(
                        preference.c.customer_id == customer_id,
                        preference.c.rule == rule,
                        preference.c.channel == channel,
                    )
                    .values(enabled=on, updated_at=now)
                )
    return changed


def turned_off(conn: Connection, rule: str, channels: Iterable[str]) -> set[str]:
    """Customers who turned ``rule`` off on every one of ``channels`` (for a scan to skip)."""
    channels = list(channels)
    rows = conn.execute(
        sa.select(preference.c.customer_id, preference.c.rule, preference.c.channel).where(
            preference.c.rule.in_([rule, ANY]),
            preference.c.enabled == sa.false(),
        )
    )
    view = View.load(conn, {r.customer_id for r in rows}, [])
    return {
        customer_id
        for customer_id, choices in view.choices.items()
        if not any(resolve(choices, rule, channel) for channel in channels)
    }


# --- send time --------------------------------------------------------------------------------


@dataclass
class View:
    """Consent for a batch of reminders, read in two queries (the worker's per-batch check)."""

    stopped: dict[tuple[str, str], str] = field(default_factory=dict)
    choices: dict[str, dict[tuple[str, str], bool]] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        conn: Connection,
        customer_ids: Iterable[str],
        addresses: Iterable[tuple[str, str]],
    ) -> View:
        """Read the opt-outs of ``addresses`` ((channel, address) pairs) and the customers'
        choices."""
        view = cls()
        pairs = {(ch, normalize_address(ch, a)) for ch, a in addresses if a}
        by_channel: dict[str, list[str]] = {}
        for channel, address in pairs:
            by_channel.setdefault(channel, []).append(address)
        # Each list as one parameter (state_db.in_values): the console's forecast asks for
        # thousands at once, which 500 placeholders a query took 0.24 s to read at 7,500.
        for channel, found in by_channel.items():
            for start in range(0, len(found), _CHUNK):
                rows = conn.execute(
                    sa.select(optout.c.address, optout.c.source).where(
                        optout.c.channel == channel,
                        state_db.in_values(conn, optout.c.address, found[start : start + _CHUNK]),
                    )
                )
                for row in rows:
                    view.stopped[(channel, row.address)] = row.source
        ids = sorted({str(c) for c in customer_ids})
        for customer_id in ids:
            view.choices.setdefault(customer_id, {})
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            rows = conn.execute(
                sa.select(
                    preference.c.customer_id,
                    preference.c.rule,
                    preference.c.channel,
                    preference.c.enabled,
                ).where(state_db.in_values(conn, preference.c.customer_id, chunk))
            )
            for row in rows:
                view.choices[row.customer_id][(row.rule, row.channel)] = bool(row.enabled)
        return view

    def refusal(self, customer_id: str, rule: str, channel: str, address: str | None) -> str | None:
        """Why this message may not be sent, or None when it may."""
        if address:
            source = self.stopped.get((channel, normalize_address(channel, address)))
            if source is not None:
                return f"opted out of {channel} ({source})"
        if not resolve(self.choices.get(str(customer_id), {}), rule, channel):
            return f"{rule} by {channel} {TURNED_OFF}"
        return None


def refusal(
    conn: Connection, customer_id: str, rule: str, channel: str, address: str | None
) -> str | None:
    """Why ``rule`` may not reach ``customer_id`` at ``address`` on ``channel`` now, or None.

    The worker asks this before every message; a reason means "skip this channel" (the next
    channel is tried; with none left the reminder is canceled with the reason).
    """
    pairs = [(channel, address)] if address else []
    return View.load(conn, [customer_id], pairs).refusal(customer_id, rule, channel, address)
