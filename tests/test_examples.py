"""The shipped example rules and templates, each on its own small data, end to end.

Each test writes a Harbor Market database with the demo's schema (``reminders.demo.data``), points a
config at the shipped ``rules/`` and ``templates/`` (as installed: ``reminders/demo/``), and runs the
real thing: scan, dispatch to a real Redis (database 8), a burst worker, the outbox. The clock is
the engine's (``REMINDERS_NOW``). New York customers unless said otherwise; 2027-03-14 is the day
US clocks go forward, so reminders before it are at 15:00Z (10:00 EST) and after it at 14:00Z.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from reminders import clock, codec, models, sms, store
from reminders.app import App
from reminders.demo import RULES, TEMPLATES, data
from tests import services

REDIS_DB = 8
NOW = "2027-03-09T15:30:00Z"  # 10:30 in New York

CONFIG = """\
timezone: America/New_York
send_window: "09:00-20:00"
source:
  url: sqlite:///business.db
state:
  url: sqlite:///reminders.db
redis:
  url: {redis}
rules: {rules}
templates: {templates}
channels:
  sms:
    provider: outbox
    path: outbox.jsonl
  email:
    provider: outbox
    path: outbox.jsonl
    from: "Harbor Market <care@example.com>"
"""


class Shop:
    """Harbor Market's database and an engine over it, driven step by step."""

    def __init__(self, folder: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.folder = folder
        self.monkeypatch = monkeypatch
        self.db = data.create(folder / "business.db")
        self.db.commit()
        self.config = folder / "config.yaml"
        self.config.write_text(CONFIG.format(redis=redis_url, rules=RULES, templates=TEMPLATES))
        self.outbox = folder / "outbox.jsonl"
        self._read = 0
        self.at(NOW)
        store.upgrade(self.app().config.state_url)

    # -- the business's side --

    def add(self, table: str, **values: Any) -> int:
        rid = data.insert(self.db, table, **values)
        self.db.commit()
        return rid

    def execute(self, sql: str, *params: Any) -> None:
        self.db.execute(sql, params)
        self.db.commit()

    def customer(self, first_name: str = "Olivia", **values: Any) -> int:
        row: dict[str, Any] = {
            "first_name": first_name,
            "last_name": "Bennett",
            "phone": "(212) 555-0142",
            "email": f"{first_name.lower()}.bennett@example.com",
            "timezone": "America/New_York",
            "locale": "en_US",
            "created_at": "2024-01-01T00:00:00Z",
        }
        row.update(values)
        return self.add("customers", **row)

    def order(
        self, customer: int, sku: str, placed_at: datetime | str, **values: Any
    ) -> int:
        title, price = next((p[1], p[3]) for p in data.PRODUCTS if p[0] == sku)
        return self.add(
            "orders",
            customer_id=customer,
            sku=sku,
            title=title,
            amount=price,
            placed_at=placed_at,
            **values,
        )

    # -- the engine's side --

    def at(self, moment: str) -> None:
        self.monkeypatch.setenv(clock.ENV, moment)

    def app(self) -> App:
        return App(self.config)

    def scan(self, moment: str | None = None) -> dict[str, dict[str, Any]]:
        from reminders.scan import scan_all

        if moment:
            self.at(moment)
        results = {c.rule: c.as_dict() for c in scan_all(self.app())}
        assert all(c["error"] is None for c in results.values()), results
        return results

    def send(self, moment: str | None = None) -> list[dict[str, Any]]:
        """Dispatch what is due and run a burst worker; the outbox lines written meanwhile."""
        from reminders.dispatch import dispatch
        from reminders.jobs import resolve_queues, run_worker

        if moment:
            self.at(moment)
        app = self.app()
        dispatch(app)
        run_worker(app, resolve_queues(app.config, ()), burst=True, logging_level="WARNING")
        lines = []
        if self.outbox.exists():
            with self.outbox.open(encoding="utf-8") as handle:
                lines = [json.loads(line) for line in handle if line.strip()]
        new, self._read = lines[self._read :], len(lines)
        return new

    def reminders(self, rule: str) -> list[dict[str, Any]]:
        r = models.reminder
        with self.app().state.connect() as conn:
            rows = conn.execute(
                sa.select(r).where(r.c.rule == rule).order_by(r.c.planned_at, r.c.id)
            ).mappings()
            return [dict(row, data=codec.loads(row["data"])) for row in rows]


@pytest.fixture
def shop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shop]:
    url = services.redis_url(REDIS_DB)
    client = redis.Redis.from_url(url)
    client.flushdb()
    logging.getLogger("reminders").addHandler(logging.NullHandler())
    try:
        yield Shop(tmp_path, url, monkeypatch)
    finally:
        client.flushdb()
        client.close()


def utc(text: str) -> datetime:
    return clock.parse_instant(text)


def planned(rows: list[dict[str, Any]]) -> dict[str, str]:
    return {row["offset"]: clock.iso_utc(row["planned_at"]) for row in rows}


def one_segment(text: str) -> None:
    info = sms.segments(text)
    assert (info.encoding, info.segments) == ("GSM-7", 1), (info, text)


# --- the shipped files ----------------------------------------------------------------------------


def test_the_shipped_rules_and_templates_validate_without_warnings() -> None:
    from reminders.validate import validate_all

    config = Path(__file__).resolve().parents[1] / "config.yaml"
    app = App(config)
    assert validate_all(app) == []
    assert {r.name for r in app.ruleset.rules} == {
        "renewal-due",
        "refill-due",
        "bill-due",
        "duplicate-purchase",
        "order-follow-up",
    }
    assert [c.name for c in app.ruleset.checks] == ["already-owned"]
    # The package's copies are the repository's files (symlinks in a checkout, files in a wheel).
    top = Path(__file__).resolve().parents[1]
    for name in ("rules", "templates"):
        shipped = sorted(p.name for p in (top / name).iterdir())
        packaged = sorted(p.name for p in (RULES if name == "rules" else TEMPLATES).iterdir())
        assert packaged == shipped


def test_every_sms_of_the_demo_data_fits_one_gsm7_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rendered as a worker would (``reminders preview``), for every row of the demo business."""
    from reminders.preview import preview_rule

    monkeypatch.setenv(clock.ENV, NOW)
    data.generate(tmp_path / "business.db", utc(NOW))
    config = tmp_path / "config.yaml"
    config.write_text(
        CONFIG.format(redis="redis://127.0.0.1:6379/8", rules=RULES, templates=TEMPLATES)
    )
    app = App(config)
    texts = 0
    for rule in app.ruleset.rules:
        result = preview_rule(app, rule.name, limit=10_000)
        assert result.errors == []
        for item in result.items:
            if item["channel"] == "sms" and "text" in item:
                one_segment(item["text"])
                assert item["text"].startswith(f"Hi {item['text'].split()[1]}")
                texts += 1
            elif item["channel"] == "email" and "text" in item:
                assert item["subject"] and item["html"] and "{{" not in item["text"]
    assert texts > 200


# --- renewals -------------------------------------------------------------------------------------


def _subscription(shop: Shop, customer: int, expires_on: str, **values: Any) -> int:
    row = {
        "customer_id": customer,
        "kind": "subscription",
        "product": "Harbor+ membership",
        "price": "49.00",
        "started_on": "2026-04-20",
        "expires_on": expires_on,
    }
    row.update(values)
    return shop.add("subscriptions", **row)


def test_renewal_reminds_30_7_and_1_days_before_expiry(shop: Shop) -> None:
    olivia = shop.customer("Olivia")
    _subscription(shop, olivia, "2027-04-20")
    shop.scan()
    assert planned(shop.reminders("renewal-due")) == {
        "-30d": "2027-03-21T14:00:00Z",
        "-7d": "2027-04-13T14:00:00Z",
        "-1d": "2027-04-19T14:00:00Z",
    }
    (first,) = shop.send("2027-03-21T14:05:00Z")
    assert (first["channel"], first["to"]) == ("email", "olivia.bennett@example.com")
    assert first["subject"] == "Your Harbor+ membership ends in 30 days"
    assert "Hi Olivia," in first["body"] and "ends on Apr 20, 2027" in first["body"]
    assert "$49.00" in first["body"] and "https://example.com/renew/1" in first["body"]
    (last,) = shop.send("2027-04-19T14:05:00Z")  # the 7-day one went by grace: expired
    assert last["subject"] == "Your Harbor+ membership ends tomorrow"
    statuses = {r["offset"]: r["status"] for r in shop.reminders("renewal-due")}
    assert statuses == {"-30d": "sent", "-7d": "canceled", "-1d": "sent"}


def test_a_warranty_holder_without_email_gets_a_text(shop: Shop) -> None:
    noah = shop.customer("Noah", email=None)
    _subscription(shop, noah, "2027-03-16", kind="warranty", product="espresso machine")
    counts = shop.scan()["renewal-due"]
    assert (counts["created"], counts["too_late"]) == (2, 1)  # -30d was weeks ago
    (text,) = shop.send()  # the -7d reminder, due at 10:00 today
    assert (text["channel"], text["to"]) == ("sms", "+12125550142")
    assert text["body"] == (
        "Hi Noah, the extended warranty on your espresso machine ends on Mar 16, 2027. "
        "Renew it at example.com/renew/1. Thank you! Harbor Market"
    )
    one_segment(text["body"])


def test_renewed_subscription_is_canceled_by_the_check(shop: Shop) -> None:
    olivia = shop.customer("Olivia")
    sub = _subscription(shop, olivia, "2027-04-20")
    shop.scan()
    # She renews after the scan: the term now ends a year later.
    shop.execute(
        "UPDATE subscriptions SET expires_on = '2028-04-20', renewed_on = '2027-03-15' WHERE id = ?",
        sub,
    )
    assert shop.send("2027-03-21T14:05:00Z") == []
    rows = {r["offset"]: r for r in shop.reminders("renewal-due")}
    assert rows["-30d"]["status"] == "canceled"
    assert "check" in rows["-30d"]["reason"]
    # The next scan cancels the old term's other reminders and schedules the new term's.
    counts = shop.scan()["renewal-due"]
    assert (counts["canceled"], counts["created"]) == (2, 3)
    by_occurrence = {
        (r["occurrence"], r["offset"]): r["status"] for r in shop.reminders("renewal-due")
    }
    assert by_occurrence[(f"{sub}:2027-04-20", "-7d")] == "canceled"
    assert by_occurrence[(f"{sub}:2028-04-20", "-30d")] == "pending"


def test_canceled_subscription_gets_no_renewal_reminder(shop: Shop) -> None:
    olivia = shop.customer("Olivia")
    _subscription(shop, olivia, "2027-04-20", status="canceled")
    assert shop.scan()["renewal-due"]["rows"] == 0
    assert shop.reminders("renewal-due") == []
