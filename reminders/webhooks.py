"""Signed webhooks: an event POSTed as JSON to the business's endpoint.

The body is ``{"id": "evt_...", "type": "reminder.sent", "created": ISO-8601, "data": {...}}``;
the id stays the same across retries (receivers drop what they have seen). The header
``Reminders-Signature: t=<unix>,v1=<hex>`` is Stripe's scheme: the HMAC-SHA256, keyed with the
endpoint's secret, of ``"<t>.<body>"`` over the exact bytes sent; ``t`` is the real time of the
attempt (receivers compare it with their own clock), never the engine clock. A 2xx answer
delivers; anything else, or no answer within 10 s, is retried (see reminders.outbox).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Mapping
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import requests

from . import clock
from .config import WebhookConfig
from .outbox import Outcome, webhook_data

SIGNATURE_HEADER = "Reminders-Signature"
TIMEOUT = 10.0  # seconds for the whole answer
USER_AGENT = "reminders-webhooks/1"

_local = threading.local()


def _session() -> requests.Session:
    session = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
    return session


def signature(secret: str, body: bytes, timestamp: int) -> str:
    """The ``Reminders-Signature`` header of ``body`` sent at ``timestamp`` (Unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return clock.iso_utc(value) if value.tzinfo else value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} in a webhook's data")


def body(event_id: str, event_type: str, created: datetime, data: Mapping[str, Any]) -> bytes:
    """The JSON body, as the bytes that are signed and sent."""
    envelope = {
        "id": event_id,
        "type": event_type,
        "created": clock.iso_utc(created.astimezone(UTC)),
        "data": dict(data),
    }
    return json.dumps(envelope, default=_plain, ensure_ascii=False, separators=(",", ":")).encode()


def deliver(hook: WebhookConfig, event_id: str, event_type: str, payload: Mapping[str, Any]) -> int:
    """POST one event to ``hook``; returns the HTTP status. Raises :class:`Outcome` (to retry)
    on anything but a 2xx answer within :data:`TIMEOUT`."""
    created = payload["facts"]["at"]
    sent = body(event_id, event_type, created, webhook_data(payload, hook.include_addresses))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        SIGNATURE_HEADER: signature(hook.secret, sent, int(time.time())),
    }
    try:
        answer = _session().post(
            hook.url, data=sent, headers=headers, timeout=TIMEOUT, allow_redirects=False
        )
    except requests.Timeout:
        raise Outcome(f"no answer within {TIMEOUT:g} s") from None
    except requests.RequestException as exc:
        raise Outcome(f"could not connect: {type(exc).__name__}") from None
    if not 200 <= answer.status_code < 300:
        raise Outcome(f"HTTP {answer.status_code}")
    return answer.status_code
