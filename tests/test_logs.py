"""``--log-format json``: a worker's every line is one JSON object with the fields the line is
about, and phone numbers masked as in the text lines."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess

import pytest

from reminders import clock, logs
from tests.delivery_fixtures import RULES, SEND_AT, Shop
from tests.twilio_stub import INVALID_NUMBER, TOO_MANY_REQUESTS

SMS_ONLY = RULES.replace("channels: [sms, email]", "channels: [sms]")
# A patient's number in any form: E.164, national digits, or split by punctuation.
NUMBER = re.compile(r"\+?1?[\s.()-]*\d{3}[\s.()-]*555[\s.-]*\d{4}")


def worker_lines(shop: Shop, *options: str, env: dict[str, str] | None = None) -> list[str]:
    argv = shop.command(*options, "worker", "--burst", now=SEND_AT)
    environ = {k: v for k, v in os.environ.items() if k not in (clock.ENV, logs.ENV)}
    done = subprocess.run(
        argv,
        cwd=shop.root,
        env={**environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


@pytest.mark.parametrize("how", ["option", "environment"])
def test_a_worker_logs_one_json_object_a_line_with_masked_numbers(shop: Shop, how: str) -> None:
    shop.configure(rules=SMS_ONLY)
    people = shop.prepare(3)
    shop.stub.respond(people[0]["phone"], INVALID_NUMBER)  # 21211: fails, the number in its text
    shop.stub.respond(people[1]["phone"], TOO_MANY_REQUESTS)  # 20429: retried later
    shop.ok("dispatch", now=SEND_AT)
    if how == "option":
        lines = worker_lines(shop, "--log-format", "json")
    else:
        lines = worker_lines(shop, env={logs.ENV: "json"})

    records = [json.loads(line) for line in lines]  # every line is a JSON object
    assert records
    for record in records:
        assert {"ts", "level", "logger", "message"} <= set(record)
        assert record["level"] in {"debug", "info", "warning", "error", "critical"}
    text = "\n".join(lines)
    assert not NUMBER.search(text), text
    assert "Hi P" not in text and "Lisinopril" not in text  # no message body, no row values

    failed = [r for r in records if r.get("error_code") == "21211"]
    assert len(failed) == 1
    assert failed[0]["reminder_id"] == 1 and failed[0]["customer_id"] == "1"
    assert failed[0]["channel"] == "sms" and failed[0]["rule"] == "refill-due"
    assert failed[0]["attempt"] == 1 and failed[0]["level"] == "warning"
    assert "+1******0001" in failed[0]["message"]
    retried = [r for r in records if r.get("error_code") == "20429"]
    assert [(r["reminder_id"], r["attempt"]) for r in retried] == [(2, 1)]
    summary = [r for r in records if r["logger"] == "reminders.delivery" and "job_id" in r]
    assert summary and summary[-1]["channel"] == "sms"
    assert any(r["logger"].startswith("rq.") for r in records)  # RQ's own lines too


def test_text_stays_the_default(shop: Shop) -> None:
    shop.configure(rules=SMS_ONLY)
    people = shop.prepare(1)
    shop.stub.respond(people[0]["phone"], INVALID_NUMBER)
    shop.ok("dispatch", now=SEND_AT)
    lines = worker_lines(shop)
    failed = [line for line in lines if "reminder 1: sms to +1******0001 failed" in line]
    assert failed and not failed[0].startswith("{")
    assert not NUMBER.search("\n".join(lines))


def test_an_unknown_format_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(logs.ENV, "xml")
    with pytest.raises(ValueError, match="text or json"):
        logs.setup(logging.INFO)
