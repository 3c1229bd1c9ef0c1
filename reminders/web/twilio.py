"""Twilio's webhooks: delivery reports and inbound SMS.

Every request must carry a valid ``X-Twilio-Signature``, computed by Twilio over the URL it was
configured with (``web.public_url`` + path + query, never the address this app is bound to behind
a proxy) and the form's fields, with the account's auth token: 403 otherwise, before anything is
read or written. Both handlers are idempotent: Twilio retries a webhook that failed or timed out.
See https://www.twilio.com/docs/usage/security#validating-requests.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from flask import Blueprint, Response, abort, request
from sqlalchemy.engine import Connection
from twilio.request_validator import (
    SIGNATURE_HEADER,
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    get_signature_algorithm,
)
from twilio.twiml.messaging_response import MessagingResponse

from reminders import consent, fallback, replies, store
from reminders.models import DELIVERED, PENDING, SENT, UNDELIVERED, message, reminder
from reminders.phone import mask
from reminders.rules import RuleSet

from .context import engine

log = logging.getLogger(__name__)

blueprint = Blueprint("twilio", __name__, url_prefix="/webhooks/twilio")

# Permanent delivery errors: the number cannot take texts. It is suppressed, and the reminder
# falls back to its next channel. https://www.twilio.com/docs/api/errors/30005 (and 30004, 30006)
DEAD_NUMBER = {
    "30004": "message blocked",
    "30005": "unknown destination handset",
    "30006": "landline or unreachable carrier",
}
_FINAL = ("delivered", "undelivered", "failed")


def _verify() -> None:
    """Abort with 403 unless Twilio signed this request."""
    config = engine().config
    sms = config.channels.sms
    token = sms.auth_token if sms is not None and sms.provider == "twilio" else None
    signature = request.headers.get(SIGNATURE_HEADER, "")
    if not token or not signature or not config.web.public_url:
        abort(403)
    query = request.query_string.decode("latin-1")
    url = config.web.public_url + request.path + (f"?{query}" if query else "")
    algorithm = get_signature_algorithm(request.headers.get(SIGNATURE_SETTINGS_HEADER))
    if not RequestValidator(token).validate(url, request.form, signature, algorithm):
        log.warning("refused a %s with a bad Twilio signature", request.path)
        abort(403)


def _fields(*names: str) -> list[str]:
    missing = [n for n in names if n not in request.form]
    if missing:
        abort(400, description=f"missing {', '.join(missing)}")
    return [request.form[n] for n in names]


@blueprint.post("/status")
def status() -> Response:
    """A delivery report: update the message and its reminder."""
    _verify()
    sid, state = _fields("MessageSid", "MessageStatus")
    code = (request.form.get("ErrorCode") or "").strip()[:32] or None
    state = state.strip().lower()
    if state not in _FINAL:
        # queued, sending, sent, ...: two of every message's three reports; nothing to record,
        # so no transaction (on SQLite every write transaction takes the database's one lock).
        return Response(status=204)
    app = engine()
    with app.state.begin() as conn:
        outcome = apply_status(conn, app.ruleset, sid, state, code, app.now())
    log.info("status %s for %s: %s", state, sid, outcome)
    return Response(status=204)


@blueprint.post("/inbound")
def inbound() -> Response:
    """An SMS from a customer: a keyword (STOP, START, HELP, a rule's reply) or anything else."""
    _verify()
    number, body, sid = _fields("From", "Body", "MessageSid")
    app = engine()
    with app.state.begin() as conn:
        answer = replies.handle(conn, app.ruleset, app.config, number.strip(), body, sid, app.now())
    twiml = MessagingResponse()
    if answer.text:
        twiml.message(answer.text)
    return Response(str(twiml), mimetype="application/xml")


def apply_status(
    conn: Connection,
    ruleset: RuleSet,
    sid: str,
    state: str,
    code: str | None,
    now: datetime,
) -> str:
    """Apply one status callback; returns what it did (for the log).

    A final report (delivered, undelivered, failed) is applied once; reports that arrive late or
    twice, and intermediate ones (queued, sent, ...), change nothing. An undelivered or failed
    report with a dead-number code suppresses the number and falls back to the next channel.
    """
    found = conn.execute(
        sa.select(message)
        .where(message.c.provider_id == sid, message.c.channel == "sms")
        .order_by(message.c.id.desc())
        .limit(1)
    ).first()
    if found is None:
        return "unknown message"
    if found.status in _FINAL:
        return f"already {found.status}"
    if state not in _FINAL:
        return "intermediate status, nothing to do"
    changed = conn.execute(
        message.update()
        .where(message.c.id == found.id, message.c.status == found.status)
        .values(status=state, error_code=code, updated_at=now)
    )
    if changed.rowcount != 1:
        return "already updated"
    rem = conn.execute(sa.select(reminder).where(reminder.c.id == found.reminder_id)).first()
    if rem is None:
        return "message updated; its reminder is gone"
    if code in DEAD_NUMBER:
        why = f"Twilio {code}: {DEAD_NUMBER[code]}"
        consent.opt_out(conn, "sms", found.to_address, code, why, now, rem.customer_id)
        log.info("suppressed %s for sms: %s", mask(found.to_address), why)
    if rem.status != SENT or rem.channel != "sms":
        return f"message {state}; reminder {rem.status}, left alone"
    if state == "delivered":
        _move(conn, rem, DELIVERED, None, now)
        return "delivered"
    why = f"sms {state}" + (
        f" (Twilio {code}: {DEAD_NUMBER.get(code, 'see Twilio')})" if code else ""
    )
    if code in DEAD_NUMBER:
        # As for a permanent error at send time: the next channel while within grace.
        rule = ruleset.get(rem.rule)
        new = fallback.fall_back(
            conn, rem._mapping, rule, why, now, status=rem.status, otherwise=UNDELIVERED
        )
        if new == PENDING:
            following = rule.channels[rem.channel_index + 1] if rule else "?"
            return f"falls back to {following}"
        return "undelivered" if new else "already updated"
    _move(conn, rem, UNDELIVERED, why, now)
    return "undelivered"


def _move(conn: Connection, rem: Any, status: str, why: str | None, now: datetime) -> bool:
    values: dict[str, Any] = {"status": status, "updated_at": now}
    if why is not None:
        values["reason"] = why
    result = conn.execute(
        reminder.update().where(reminder.c.id == rem.id, reminder.c.status == rem.status),
        values,
    )
    if result.rowcount == 1:
        store.record(conn, [(rem.id, rem.status, status, why)], now)
        return True
    return False
