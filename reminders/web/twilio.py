"""Twilio's webhooks: delivery reports and inbound SMS.

Every request must carry a valid ``X-Twilio-Signature``, computed by Twilio over the URL it was
configured with (``web.public_url`` + path + query, never the address this app is bound to behind
a proxy) and the form's fields, with the account's auth token: 403 otherwise, before anything is
read or written. Both handlers are idempotent: Twilio retries a webhook that failed or timed out.
See https://www.twilio.com/docs/usage/security#validating-requests.
"""

from __future__ import annotations

import logging

from flask import Blueprint, Response, abort, request
from twilio.request_validator import (
    SIGNATURE_HEADER,
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    get_signature_algorithm,
)
from twilio.twiml.messaging_response import MessagingResponse

from reminders import replies
from reminders.receipts import FINAL_REPORTS, apply_report

from .context import engine

log = logging.getLogger(__name__)

blueprint = Blueprint("twilio", __name__, url_prefix="/webhooks/twilio")


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
    """A delivery report: verified and parsed here, applied by :mod:`reminders.receipts`."""
    _verify()
    sid, state = _fields("MessageSid", "MessageStatus")
    code = (request.form.get("ErrorCode") or "").strip()[:32] or None
    state = state.strip().lower()
    if state not in FINAL_REPORTS:
        # queued, sending, sent, ...: two of every message's three reports; nothing to record,
        # so no transaction (on SQLite every write transaction takes the database's one lock).
        return Response(status=204)
    app = engine()
    with app.state.begin() as conn:
        outcome = apply_report(conn, app.ruleset, sid, state, code, app.now())
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
