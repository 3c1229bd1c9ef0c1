"""Delivery reports: what the provider says became of a message, and what that does.

The provider's webhook (:mod:`reminders.web.twilio`) only verifies and parses the report; this
module decides. A final report (delivered, undelivered, failed) is applied once to the message and
its reminder; reports that arrive late or twice, and intermediate ones (queued, sent, ...), change
nothing. A dead-number code suppresses the number (an opt-out with the code as its source) and
falls back to the reminder's next channel while within grace (:mod:`reminders.fallback`), as a
permanent error at send time does.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import consent, counts, fallback
from .lifecycle import DELIVERED, FAILED, PENDING, SENT, UNDELIVERED, move
from .models import message, reminder
from .phone import mask
from .rules import RuleSet

log = logging.getLogger(__name__)

# Permanent delivery errors: the number cannot take texts. It is suppressed, and the reminder
# falls back to its next channel. https://www.twilio.com/docs/api/errors/30005 (and 30004, 30006)
DEAD_NUMBER = {
    "30004": "message blocked",
    "30005": "unknown destination handset",
    "30006": "landline or unreachable carrier",
}
# The provider's message states that end a message's life (Twilio's MessageStatus values, which a
# message row keeps as its status).
FINAL_REPORTS = frozenset({DELIVERED, UNDELIVERED, FAILED})


def apply_report(
    conn: Connection,
    ruleset: RuleSet,
    sid: str,
    state: str,
    code: str | None,
    now: datetime,
) -> str:
    """Apply one SMS delivery report for the message ``sid``; returns what it did (for the log).

    A digest is one message for several reminders, a ``message`` row each: the report applies
    to each of them."""
    rows = conn.execute(
        sa.select(message)
        .where(message.c.provider_id == sid, message.c.channel == "sms")
        .order_by(message.c.id)
    ).all()
    if not rows:
        return "unknown message"
    done = [_apply(conn, ruleset, found, sid, state, code, now) for found in rows]
    return done[0] if len(set(done)) == 1 else "; ".join(done)


def _apply(
    conn: Connection,
    ruleset: RuleSet,
    found: sa.Row[Any],
    sid: str,
    state: str,
    code: str | None,
    now: datetime,
) -> str:
    """Apply the report to one message row and its reminder."""
    if found.status in FINAL_REPORTS:
        return f"already {found.status}"
    if state not in FINAL_REPORTS:
        return "intermediate status, nothing to do"
    changed = conn.execute(
        message.update()
        .where(message.c.id == found.id, message.c.status == found.status)
        .values(status=state, error_code=code, updated_at=now)
    )
    if changed.rowcount != 1:
        return "already updated"
    old = dict(found._mapping)
    counts.message_changed(conn, old, {**old, "status": state, "error_code": code})
    rem = conn.execute(sa.select(reminder).where(reminder.c.id == found.reminder_id)).first()
    if rem is None:
        return "message updated; its reminder is gone"
    if code in DEAD_NUMBER:
        why = f"Twilio {code}: {DEAD_NUMBER[code]}"
        consent.opt_out(conn, "sms", found.to_address, code, why, now, rem.customer_id)
        log.info(
            "suppressed %s for sms: %s",
            mask(found.to_address),
            why,
            extra={
                "reminder_id": rem.id,
                "rule": rem.rule,
                "channel": "sms",
                "customer_id": rem.customer_id,
                "provider_id": sid,
                "error_code": code,
            },
        )
    if rem.status != SENT or rem.channel != "sms":
        return f"message {state}; reminder {rem.status}, left alone"
    if state == DELIVERED:
        move(conn, [rem.id], source=SENT, target=DELIVERED, now=now)
        return DELIVERED
    why = f"sms {state}" + (
        f" (Twilio {code}: {DEAD_NUMBER.get(code, 'see Twilio')})" if code else ""
    )
    if code in DEAD_NUMBER:
        # As for a permanent error at send time: the next channel while within grace.
        rule = ruleset.get(rem.rule)
        new = fallback.fall_back(
            conn, rem._mapping, rule, why, now, status=SENT, otherwise=UNDELIVERED
        )
        if new == PENDING:
            following = rule.channels[rem.channel_index + 1] if rule else "?"
            return f"falls back to {following}"
        return UNDELIVERED if new else "already updated"
    move(conn, [rem.id], source=SENT, target=UNDELIVERED, now=now, reason=why)
    return UNDELIVERED
