"""The console API's OpenAPI 3.1 document, served at ``/api/v1/openapi.json``.

Written by hand beside the code it describes; the tests check every answer of the
implementation against it (openapi-core) and the document itself against the OpenAPI schema.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from reminders.lifecycle import STATUSES

VERSION = "1.0.0"


def _obj(props: dict[str, Any], required: list[str] | None = None, **more: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        **more,
    }


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


INT = {"type": "integer", "minimum": 0}
TEXT = {"type": "string"}
NTEXT = {"type": ["string", "null"]}
INSTANT = {"type": "string", "format": "date-time", "description": "ISO 8601, UTC"}
NINSTANT = {"type": ["string", "null"], "format": "date-time"}
DAY = {"type": "string", "format": "date", "description": "YYYY-MM-DD in the config's zone"}
STATUS = {"type": "string", "enum": [s.value for s in STATUSES]}
COUNTS = {"type": "object", "additionalProperties": INT}

SCHEMAS: dict[str, Any] = {
    "Error": _obj({"error": TEXT, "detail": NTEXT}, ["error"]),
    "Day": _obj(
        {
            "date": DAY,
            "sent": {**COUNTS, "description": "messages sent that day, by channel"},
            "delivered": INT,
            "failed": INT,
            "canceled": INT,
            "opted_out": INT,
        }
    ),
    "Upcoming": _obj(
        {
            "date": DAY,
            "pending": {
                **INT,
                "description": "pending reminders by send day (today: also overdue)",
            },
            "by_rule": COUNTS,
        }
    ),
    "Attention": _obj(
        {
            "failed": INT,
            "stuck": {**INT, "description": "in sending for over 10 minutes"},
            "due_unsent": INT,
            "oldest_due_unsent_seconds": {"type": ["integer", "null"]},
            "deferred": INT,
            "deferred_by_reason": COUNTS,
            "paused_rules": {"type": "array", "items": TEXT},
        }
    ),
    "Stats": _obj(
        {
            "timezone": TEXT,
            "now": INSTANT,
            "days": {"type": "array", "items": _ref("Day")},
            "upcoming": {"type": "array", "items": _ref("Upcoming")},
            "attention": _ref("Attention"),
        }
    ),
    "Scan": _obj(
        {
            "id": INT,
            "at": INSTANT,
            "status": TEXT,
            "rows": INT,
            "created": INT,
            "moved": INT,
            "canceled": INT,
            "unchanged": INT,
            "skipped": INT,
            "too_late": INT,
            "error": NTEXT,
            "skipped_by_reason": {
                "type": "array",
                "items": _obj(
                    {"reason": TEXT, "count": INT, "examples": {"type": "array", "items": TEXT}}
                ),
            },
        },
        ["id", "at", "status", "rows", "created", "moved", "canceled", "skipped"],
    ),
    "Rule": _obj(
        {
            "name": TEXT,
            "paused": {"type": "boolean"},
            "paused_at": NINSTANT,
            "paused_by": NTEXT,
            "counts": {**COUNTS, "description": "reminders by status"},
            "last_scan": {"oneOf": [_ref("Scan"), {"type": "null"}]},
            "next_due": NINSTANT,
            "scans": {"type": "array", "items": _ref("Scan")},
        },
        ["name", "paused", "counts", "last_scan", "next_due"],
    ),
    "RuleList": _obj({"rules": {"type": "array", "items": _ref("Rule")}}),
    "ForecastDay": _obj(
        {
            "date": DAY,
            "sms": INT,
            "email": INT,
            "quiet_hours": INT,
            "caps": INT,
            "opted_out": INT,
            "off": INT,
            "no_address": INT,
            "digest": INT,  # a rule in a digest: the reminders inside an earlier one's message
        },
        ["date", "sms", "email", "quiet_hours", "caps", "opted_out", "off", "no_address"],
    ),
    "Forecast": _obj(
        {
            "rule": TEXT,
            "timezone": TEXT,
            "digest": NTEXT,  # the digest the rule is in
            "source": {"type": "string", "enum": ["pending", "query"]},
            "days": {"type": "array", "items": _ref("ForecastDay")},
        },
        ["rule", "timezone", "source", "days"],
    ),
    "Outcome": _obj(
        {
            "offset": TEXT,
            "reminded": INT,
            "done": INT,
            "done_before_due": INT,
            "open": INT,
            "expired": INT,
            "no_sign": INT,
        }
    ),
    "Outcomes": _obj(
        {"rule": TEXT, "since": INSTANT, "offsets": {"type": "array", "items": _ref("Outcome")}}
    ),
    "Paused": _obj({"rule": TEXT, "paused": {"type": "boolean"}}),
    "Reminder": _obj(
        {
            "id": INT,
            "rule": TEXT,
            "occurrence": TEXT,
            "customer_id": TEXT,
            "offset": TEXT,
            "send_at": INSTANT,
            "status": STATUS,
            "channel": NTEXT,
            "reason": NTEXT,
            "sent_at": NINSTANT,
            "locale": {**NTEXT, "description": "the template variant of its latest message"},
        }
    ),
    "ReminderList": _obj({"reminders": {"type": "array", "items": _ref("Reminder")}}),
    "Event": _obj({"at": INSTANT, "status": TEXT, "from": NTEXT, "reason": NTEXT}),
    "Message": _obj(
        {
            "channel": TEXT,
            "to": {**TEXT, "description": "masked"},
            "provider_id": NTEXT,
            "status": TEXT,
            "error_code": NTEXT,
            "at": INSTANT,
            "updated_at": INSTANT,
        }
    ),
    "ReminderDetail": {
        "allOf": [
            _ref("Reminder"),
            _obj(
                {
                    "planned_at": INSTANT,
                    "created_at": INSTANT,
                    "attempts": INT,
                    "provider_id": NTEXT,
                    "events": {"type": "array", "items": _ref("Event")},
                    "messages": {"type": "array", "items": _ref("Message")},
                }
            ),
        ]
    },
    "Changed": _obj({"id": INT, "status": STATUS}),
    "Missed": _obj(
        {
            "from": DAY,
            "to": DAY,
            "timezone": TEXT,
            "failed": _obj(
                {
                    "total": INT,
                    "by_error": {
                        "type": "array",
                        "items": _obj({"error": TEXT, "count": INT}),
                    },
                }
            ),
            "expired": INT,
            "suppressed": _obj({"opted_out": INT, "off": INT, "no_address": INT}),
            "due_unsent": INT,
            "skipped": _obj(
                {
                    "total": INT,
                    "by_reason": {
                        "type": "array",
                        "items": _obj(
                            {
                                "rule": TEXT,
                                "reason": TEXT,
                                "count": INT,
                                "examples": {"type": "array", "items": {"type": "object"}},
                            }
                        ),
                    },
                }
            ),
            "reminders": {
                "type": "array",
                "items": {
                    "allOf": [
                        _ref("Reminder"),
                        _obj(
                            {
                                "why": {
                                    "type": "string",
                                    "enum": [
                                        "failed",
                                        "expired",
                                        "opted_out",
                                        "off",
                                        "no_address",
                                        "due_unsent",
                                    ],
                                }
                            }
                        ),
                    ]
                },
            },
        }
    ),
    "AuditEvent": _obj(
        {"id": INT, "at": INSTANT, "actor": TEXT, "action": TEXT, "target": NTEXT, "detail": NTEXT}
    ),
    "Audit": _obj({"events": {"type": "array", "items": _ref("AuditEvent")}}),
}


def _json(schema: str, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


ERRORS = {
    "401": _json("Error", "no credentials, or they are not valid"),
    "403": _json("Error", "a viewer asked to change something, or the CSRF token is missing"),
}


def _q(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


DAYS = _q("days", {"type": "integer", "minimum": 1, "maximum": 366}, "how many days")
RULE = {"name": "name", "in": "path", "required": True, "schema": TEXT}
RID = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}


def _get(
    summary: str, schema: str, params: list[dict[str, Any]] | None = None, not_found: bool = False
) -> dict[str, Any]:
    responses = {"200": _json(schema), **ERRORS}
    if params:
        responses["400"] = _json("Error", "a parameter is out of range")
    if not_found:
        responses["404"] = _json("Error", "not found")
    return {"get": {"summary": summary, "parameters": params or [], "responses": responses}}


def _post(
    summary: str, schema: str, params: list[dict[str, Any]], conflict: bool
) -> dict[str, Any]:
    responses = {"200": _json(schema), **ERRORS, "404": _json("Error", "not found")}
    if conflict:
        responses["409"] = _json("Error", "the reminder's status does not allow it")
    return {
        "post": {
            "summary": summary,
            "description": "Operators only. With the session cookie, send the CSRF token "
            "(header X-CSRF-Token or form field csrf_token); a bearer key needs none.",
            "parameters": params,
            "responses": responses,
        }
    }


@cache
def document() -> dict[str, Any]:
    """The OpenAPI document (built once)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "reminders console API",
            "version": VERSION,
            "description": "JSON; datetimes ISO 8601 UTC; dates YYYY-MM-DD in the config's "
            "zone. A day's sent, delivered, failed, canceled and opted_out count what reached "
            "that state on that day; upcoming and forecasts count by send day.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"session": []}],
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "reminders keys add"},
                "session": {"type": "apiKey", "in": "cookie", "name": "reminders_console"},
            },
        },
        "paths": {
            "/api/v1/stats": _get(
                "Messages by day, what is coming, what needs attention", "Stats", [DAYS]
            ),
            "/api/v1/rules": _get("Every rule with its counts and last scan", "RuleList"),
            "/api/v1/rules/{name}": _get("One rule, with its last scans", "Rule", [RULE], True),
            "/api/v1/rules/{name}/forecast": _get(
                "What the rule's pending reminders would send, by send day",
                "Forecast",
                [RULE, DAYS],
                True,
            ),
            "/api/v1/rules/{name}/outcomes": _get(
                "Per offset: of the occurrences reminded, how many were done afterwards",
                "Outcomes",
                [
                    RULE,
                    _q(
                        "days",
                        {"type": "integer", "minimum": 1, "maximum": 3660},
                        "the reminders sent in the last N days (default 90)",
                    ),
                ],
                True,
            ),
            "/api/v1/rules/{name}/pause": _post(
                "Stop a rule's sending at once", "Paused", [RULE], False
            ),
            "/api/v1/rules/{name}/resume": _post(
                "Let a paused rule's reminders go", "Paused", [RULE], False
            ),
            "/api/v1/reminders": _get(
                "Search reminders (newest send time first)",
                "ReminderList",
                [
                    _q("customer_id", TEXT, "the business's customer id"),
                    _q("phone", TEXT, "a phone number messages were sent to"),
                    _q("email", TEXT, "an email address messages were sent to"),
                    _q("rule", TEXT, "a rule's name"),
                    _q("status", STATUS, "a status"),
                    _q("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "at most"),
                ],
            ),
            "/api/v1/reminders/{id}": _get(
                "A reminder, its timeline and messages", "ReminderDetail", [RID], True
            ),
            "/api/v1/reminders/{id}/retry": _post(
                "Put a failed or stuck reminder back to pending", "Changed", [RID], True
            ),
            "/api/v1/reminders/{id}/cancel": _post(
                "Cancel a pending or queued reminder", "Changed", [RID], True
            ),
            "/api/v1/missed": _get(
                "Who should have been reminded and was not, and why", "Missed", [DAYS]
            ),
            "/api/v1/audit": _get(
                "Who changed what, newest first",
                "Audit",
                [_q("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "at most")],
            ),
            "/api/v1/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "OK",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
    }
