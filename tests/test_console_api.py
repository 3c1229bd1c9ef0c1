"""The console's API over real HTTP, on SQLite and PostgreSQL state DBs holding known data
(tests/console_fixtures.py): every endpoint's counts checked exactly, every answer checked
against the OpenAPI document the console serves."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import requests
from openapi_core import OpenAPI
from openapi_core.contrib.requests import RequestsOpenAPIRequest, RequestsOpenAPIResponse
from openapi_spec_validator import validate

from reminders.console.openapi import document
from tests.console_fixtures import NOW, Console


@pytest.fixture(scope="module")
def spec() -> OpenAPI:
    validate(document())  # the document itself is valid OpenAPI 3.1
    return OpenAPI.from_dict(document())


def call(
    console: Console,
    spec: OpenAPI,
    method: str,
    path: str,
    client: requests.Session | None = None,
    status: int = 200,
    **kwargs: Any,
) -> Any:
    """Call the API and check the answer's status and its shape against the OpenAPI document."""
    client = client or console.key(console.operator_key)
    answer = client.request(method, f"{console.base}{path}", **kwargs)
    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    sent = requests.Request(
        method, f"{console.base}{path}", headers=dict(answer.request.headers)
    ).prepare()
    spec.validate_response(RequestsOpenAPIRequest(sent), RequestsOpenAPIResponse(answer))
    return answer.json()


def test_openapi_is_served_without_credentials(console: Console) -> None:
    answer = requests.get(f"{console.base}/api/v1/openapi.json")
    assert answer.status_code == 200
    assert answer.json() == document()
    assert set(answer.json()["paths"]) >= {
        "/api/v1/stats",
        "/api/v1/rules",
        "/api/v1/rules/{name}/forecast",
        "/api/v1/rules/{name}/outcomes",
        "/api/v1/rules/{name}/pause",
        "/api/v1/rules/{name}/resume",
        "/api/v1/reminders",
        "/api/v1/reminders/{id}",
        "/api/v1/reminders/{id}/retry",
        "/api/v1/reminders/{id}/cancel",
        "/api/v1/missed",
        "/api/v1/audit",
    }


def test_stats_count_by_local_day(console: Console, spec: OpenAPI) -> None:
    got = call(console, spec, "GET", "/api/v1/stats?days=3", console.key(console.viewer_key))
    assert got["timezone"] == "America/New_York"
    assert got["days"] == [
        {"date": "2027-03-08", "sent": {"sms": 0, "email": 1}, "delivered": 0, "failed": 1,
         "canceled": 0, "opted_out": 0},
        {"date": "2027-03-09", "sent": {"sms": 1, "email": 0}, "delivered": 1, "failed": 0,
         "canceled": 2, "opted_out": 1},
        {"date": "2027-03-10", "sent": {"sms": 0, "email": 0}, "delivered": 0, "failed": 1,
         "canceled": 1, "opted_out": 0},
    ]  # fmt: skip
    assert got["upcoming"] == [
        {"date": "2027-03-10", "pending": 1, "by_rule": {"refill-due": 1}},
        {"date": "2027-03-11", "pending": 1, "by_rule": {"refill-due": 1}},
        {"date": "2027-03-12", "pending": 1, "by_rule": {"renewal": 1}},
    ]
    assert got["attention"] == {
        "failed": 2,
        "stuck": 1,
        "due_unsent": 1,
        "oldest_due_unsent_seconds": 7200,
        "deferred": 1,
        "deferred_by_reason": {"quiet hours": 1},
        "paused_rules": [],
    }
    assert len(call(console, spec, "GET", "/api/v1/stats")["days"]) == 30
    call(console, spec, "GET", "/api/v1/stats?days=0", status=400)
    call(console, spec, "GET", "/api/v1/stats?days=many", status=400)


def test_rules_with_counts_scans_forecast_and_outcomes(console: Console, spec: OpenAPI) -> None:
    got = call(console, spec, "GET", "/api/v1/rules")
    by_name = {r["name"]: r for r in got["rules"]}
    assert list(by_name) == ["refill-due", "renewal"]
    refill = by_name["refill-due"]
    assert refill["counts"] == {
        "pending": 2, "queued": 0, "sending": 1, "sent": 0, "delivered": 1,
        "undelivered": 0, "canceled": 2, "failed": 2, "unknown": 0,
    }  # fmt: skip
    assert refill["paused"] is False
    assert refill["next_due"] == "2027-03-10T13:00:00Z"
    assert refill["last_scan"]["rows"] == 9 and refill["last_scan"]["skipped"] == 2
    assert by_name["renewal"]["last_scan"] is None
    assert by_name["renewal"]["counts"]["sent"] == 1

    one = call(console, spec, "GET", "/api/v1/rules/refill-due")
    assert one["scans"][0]["skipped_by_reason"] == [
        {"reason": "runs_out_on: not a date or datetime", "count": 1,
         "examples": ["runs_out_on = 'soon' is not a date or datetime"]},
        {"reason": "customer_id: no customer id: column customer_id is missing or empty",
         "count": 1, "examples": ["no customer id: column customer_id is missing or empty"]},
    ]  # fmt: skip
    call(console, spec, "GET", "/api/v1/rules/nope", status=404)

    ahead = call(console, spec, "GET", "/api/v1/rules/refill-due/forecast?days=2")
    zero = {"sms": 0, "email": 0, "quiet_hours": 0, "caps": 0, "opted_out": 0, "off": 0,
            "no_address": 0}  # fmt: skip
    # Reminder 6 (due, Ann: her number opted out, so by email); 7 (tomorrow, Jane, by SMS).
    assert ahead["days"] == [
        {"date": "2027-03-10", **zero, "email": 1},
        {"date": "2027-03-11", **zero, "sms": 1},
    ]
    outcomes = call(console, spec, "GET", "/api/v1/rules/refill-due/outcomes")
    assert outcomes == {
        "rule": "refill-due",
        "since": "2026-12-10T15:00:00Z",
        "offsets": [
            {"offset": "-3d", "reminded": 1, "done": 1, "done_before_due": 1, "open": 0,
             "expired": 0, "no_sign": 0},
        ],
    }  # fmt: skip
    recent = call(console, spec, "GET", "/api/v1/rules/refill-due/outcomes?days=1")
    assert recent["offsets"] == outcomes["offsets"]  # sent 03-09 15:00: a day ago, included
    console.set_now(NOW + timedelta(minutes=1))
    assert call(console, spec, "GET", "/api/v1/rules/refill-due/outcomes?days=1")["offsets"] == []
    console.set_now(NOW)
    renewal = call(console, spec, "GET", "/api/v1/rules/renewal/outcomes")
    assert renewal["offsets"] == [
        {"offset": "-7d", "reminded": 1, "done": 0, "done_before_due": 0, "open": 0,
         "expired": 0, "no_sign": 1},
    ]  # fmt: skip


def test_search_by_customer_phone_email_rule_and_status(console: Console, spec: OpenAPI) -> None:
    def ids(query: str) -> list[int]:
        got = call(console, spec, "GET", f"/api/v1/reminders?{query}")
        return [r["id"] for r in got["reminders"]]

    assert ids("customer_id=7") == [2, 8, 1]  # the latest send time first
    assert ids("phone=(415)%20555-2671") == [2, 8, 1]  # as messages went to it
    assert ids("email=Jane.Doe@example.com") == [9]
    assert ids("customer_id=7&rule=refill-due") == [2, 1]
    assert ids("status=failed") == [3, 4]
    assert ids("status=failed&limit=1") == [3]
    assert ids("phone=+19995550000") == []
    got = call(console, spec, "GET", "/api/v1/reminders?customer_id=7&limit=1")
    assert got["reminders"] == [
        {"id": 2, "rule": "refill-due", "occurrence": "1", "customer_id": "7", "offset": "0d",
         "send_at": "2027-03-12T15:00:00Z", "status": "canceled", "channel": None,
         "sent_at": None, "locale": None,
         "reason": "canceled: the rule's check query returned no row"},
    ]  # fmt: skip
    call(console, spec, "GET", "/api/v1/reminders?status=lost", status=400)


def test_a_reminders_timeline_and_messages(console: Console, spec: OpenAPI) -> None:
    got = call(console, spec, "GET", "/api/v1/reminders/1")
    assert got["status"] == "delivered"
    assert [(e["at"], e["status"]) for e in got["events"]] == [
        ("2027-03-01T12:00:00Z", "created"),
        ("2027-03-09T14:59:00Z", "queued"),
        ("2027-03-09T14:59:30Z", "sending"),
        ("2027-03-09T15:00:00Z", "sent"),
        ("2027-03-09T15:01:00Z", "delivered"),
        ("2027-03-09T20:00:00Z", "replied"),
    ]
    assert got["events"][-1]["reason"] == "replied 'DONE' (done)"
    assert got["messages"] == [
        {"channel": "sms", "to": "+1******2671", "provider_id": "SM0001", "status": "delivered",
         "error_code": None, "at": "2027-03-09T15:00:00Z", "updated_at": "2027-03-09T15:01:00Z"},
    ]  # fmt: skip
    call(console, spec, "GET", "/api/v1/reminders/999", status=404)


def test_missed_says_who_and_why(console: Console, spec: OpenAPI) -> None:
    got = call(console, spec, "GET", "/api/v1/missed?days=3")
    assert (got["from"], got["to"]) == ("2027-03-08", "2027-03-10")
    assert got["failed"] == {
        "total": 1,
        "by_error": [{"error": "failed after 5 attempts: sms: HTTP 500", "count": 1}],
    }
    assert got["expired"] == 1
    assert got["suppressed"] == {"opted_out": 1, "off": 0, "no_address": 1}
    assert got["due_unsent"] == 1
    assert got["skipped"]["total"] == 2
    assert sorted((r["id"], r["why"]) for r in got["reminders"]) == [
        (3, "no_address"),
        (4, "failed"),
        (6, "due_unsent"),
        (10, "expired"),
        (11, "opted_out"),
    ]
    one_day = call(console, spec, "GET", "/api/v1/missed?days=1")
    assert sorted(r["id"] for r in one_day["reminders"]) == [3, 6, 11]


def test_retry_and_cancel_follow_the_lifecycle_and_are_audited(
    console: Console, spec: OpenAPI
) -> None:
    assert call(console, spec, "POST", "/api/v1/reminders/3/retry") == {
        "id": 3,
        "status": "pending",
    }
    assert call(console, spec, "POST", "/api/v1/reminders/5/retry")["status"] == "pending"
    got = call(console, spec, "POST", "/api/v1/reminders/1/retry", status=409)
    assert "delivered" in got["detail"]
    assert call(console, spec, "POST", "/api/v1/reminders/6/cancel") == {
        "id": 6,
        "status": "canceled",
    }
    call(console, spec, "POST", "/api/v1/reminders/6/cancel", status=409)
    call(console, spec, "POST", "/api/v1/reminders/9/cancel", status=409)
    call(console, spec, "POST", "/api/v1/reminders/999/cancel", status=404)

    detail = call(console, spec, "GET", "/api/v1/reminders/6")
    assert detail["events"][-1] == {
        "at": "2027-03-10T15:00:00Z",
        "status": "canceled",
        "from": "pending",
        "reason": "canceled by key:deploy from the console",
    }
    retried = call(console, spec, "GET", "/api/v1/reminders/3")
    assert retried["events"][-1]["status"] == "pending"
    assert retried["events"][-1]["reason"].startswith("retry requested by ops (was failed")
    audit = call(console, spec, "GET", "/api/v1/audit?limit=3")
    assert [(e["actor"], e["action"], e["target"]) for e in audit["events"]] == [
        ("key:deploy", "cancel", "reminder 6"),
        ("key:deploy", "retry", "reminder 5"),
        ("key:deploy", "retry", "reminder 3"),
    ]
    assert audit["events"][0]["at"] == "2027-03-10T15:00:00Z"


def test_pause_and_resume_show_everywhere(console: Console, spec: OpenAPI) -> None:
    assert call(console, spec, "POST", "/api/v1/rules/refill-due/pause") == {
        "rule": "refill-due",
        "paused": True,
    }
    call(console, spec, "POST", "/api/v1/rules/refill-due/pause")  # again: no change, no entry
    rules = call(console, spec, "GET", "/api/v1/rules")["rules"]
    assert [(r["name"], r["paused"], r["paused_by"]) for r in rules] == [
        ("refill-due", True, "key:deploy"),
        ("renewal", False, None),
    ]
    stats = call(console, spec, "GET", "/api/v1/stats?days=1")
    assert stats["attention"]["paused_rules"] == ["refill-due"]
    assert call(console, spec, "POST", "/api/v1/rules/refill-due/resume")["paused"] is False
    call(console, spec, "POST", "/api/v1/rules/nope/pause", status=404)
    audit = call(console, spec, "GET", "/api/v1/audit")["events"]
    assert [(e["action"], e["target"]) for e in audit[:2]] == [
        ("resume", "rule refill-due"),
        ("pause", "rule refill-due"),
    ]
