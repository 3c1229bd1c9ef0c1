"""The shipped example rules and templates, each on its own small data, end to end.

Each test writes a Harbor Market database with the demo's schema (``reminders.demo.data``),
points a config at the shipped ``rules/`` and ``templates/`` (as installed: ``reminders/demo/``),
and runs the real thing: scan, dispatch to a real Redis (the tests' database, conftest's
``redis_url``), a burst worker, the outbox.
The clock is the engine's (``REMINDERS_NOW``). New York customers unless said otherwise;
2027-03-14 is the day US clocks go forward, so reminders before it are at 15:00Z (10:00 EST) and
after it at 14:00Z.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from reminders import clock, codec, models, sms, state_db
from reminders.app import App
from reminders.demo import RULES, TEMPLATES, data
from tests.rules_fixtures import OUTBOX_CHANNELS, config_yaml

NOW = "2027-03-09T15:30:00Z"  # 10:30 in New York

CONFIG = config_yaml(
    "sqlite:///business.db",
    "sqlite:///reminders.db",
    redis="{redis}",
    rules="{rules}",
    templates="{templates}",
    channels=OUTBOX_CHANNELS + '    from: "Harbor Market <care@example.com>"\n',
)


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
        state_db.upgrade(self.app().config.state_url)

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

    def order(self, customer: int, sku: str, placed_at: datetime | str, **values: Any) -> int:
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
def shop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str) -> Shop:
    logging.getLogger("reminders").addHandler(logging.NullHandler())
    return Shop(tmp_path, redis_url, monkeypatch)


def utc(text: str) -> datetime:
    return clock.parse_instant(text)


def planned(rows: list[dict[str, Any]]) -> dict[str, str]:
    return {row["offset"]: clock.iso_utc(row["planned_at"]) for row in rows}


def one_segment(text: str) -> None:
    info = sms.segments(text)
    assert (info.encoding, info.segments) == ("GSM-7", 1), (info, text)


# --- the shipped files ----------------------------------------------------------------------------


def test_the_shipped_rules_and_templates_validate_without_warnings(
    tmp_path: Path, redis_url: str
) -> None:
    from reminders.validate import validate_all

    config = Path(__file__).resolve().parents[1] / "config.yaml"
    app = App(config)
    assert validate_all(app, business=False) == []  # its demo/business.db is made by `demo`
    # Against the demo business's schema: every query prepared, every template name returned.
    data.create(tmp_path / "business.db").close()
    (tmp_path / "config.yaml").write_text(
        CONFIG.format(redis=redis_url, rules=RULES, templates=TEMPLATES)
    )
    assert validate_all(App(tmp_path / "config.yaml")) == []
    assert {r.name for r in app.ruleset.rules} == {
        "renewal-due",
        "refill-due",
        "bill-due",
        "duplicate-purchase",
        "order-follow-up",
    }
    assert [c.name for c in app.ruleset.checks] == ["already-owned"]
    (daily,) = app.ruleset.digests  # examples/daily-digest.yaml, named by the config
    assert daily.rules == ["refill-due", "bill-due", "renewal-due"]
    # The package's copies are the repository's files (symlinks in a checkout, files in a wheel).
    top = Path(__file__).resolve().parents[1]
    for name in ("rules", "templates"):
        shipped = sorted(p.name for p in (top / name).iterdir())
        packaged = sorted(p.name for p in (RULES if name == "rules" else TEMPLATES).iterdir())
        assert packaged == shipped


def test_every_sms_of_the_demo_data_fits_one_gsm7_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """Rendered as a worker would (``reminders preview``), for every row of the demo business."""
    from reminders.preview import preview_rule

    monkeypatch.setenv(clock.ENV, NOW)
    data.generate(tmp_path / "business.db", utc(NOW))
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(redis=redis_url, rules=RULES, templates=TEMPLATES))
    app = App(config)
    texts = spanish = 0
    for rule in app.ruleset.rules:
        result = preview_rule(app, rule.name, limit=10_000)
        assert result.errors == []
        for item in result.items:
            greeting = "Hola" if item.get("locale") == "es" else "Hi"
            if item["channel"] == "sms" and "text" in item:
                one_segment(item["text"])  # Spanish too: the variants stay within GSM-7
                assert item["text"].startswith(f"{greeting} {item['text'].split()[1]}")
                texts += 1
                spanish += item.get("locale") == "es"
            elif item["channel"] == "email" and "text" in item:
                assert item["subject"] and item["html"] and "{{" not in item["text"]
                assert item["text"].startswith(greeting)
    assert texts > 200
    assert spanish > 10


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
        "UPDATE subscriptions SET expires_on = '2028-04-20', renewed_on = '2027-03-15' "
        "WHERE id = ?",
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


# --- refills --------------------------------------------------------------------------------------


def _prescription(shop: Shop, customer: int, last_filled_on: str, **values: Any) -> int:
    row = {
        "customer_id": customer,
        "drug_name": "Lisinopril 10 mg",
        "days_supply": 30,
        "last_filled_on": last_filled_on,
        "refills_left": 3,
    }
    row.update(values)
    return shop.add("prescriptions", **row)


def test_refill_reminds_3_days_before_the_supply_runs_out(shop: Shop) -> None:
    ava = shop.customer("Ava")
    rx = _prescription(shop, ava, "2027-02-10")  # 30 days: runs out on 2027-03-12
    shop.scan("2027-03-01T12:00:00Z")
    (row,) = shop.reminders("refill-due")
    assert (row["occurrence"], row["offset"]) == (f"{rx}:2027-02-10", "-3d")
    assert clock.iso_utc(row["planned_at"]) == "2027-03-09T15:00:00Z"
    assert shop.send("2027-03-09T14:55:00Z") == []  # not yet
    (text,) = shop.send(NOW)
    assert (text["channel"], text["to"]) == ("sms", "+12125550142")
    assert text["body"] == (
        "Hi Ava, your Lisinopril 10 mg runs out on Mar 12, 2027. Order your refill at "
        f"example.com/rx/{rx} or call (212) 555-0100. Thank you! Harbor Pharmacy"
    )
    one_segment(text["body"])


def test_a_spanish_speaking_patient_gets_the_spanish_variant(shop: Shop) -> None:
    """Locale es_US: refill-due.es.sms.j2, dates in Spanish, within one GSM-7 part; the email
    variant with CLDR plurals; the message records the variant."""
    sofia = shop.customer("Sofía", locale="es_US")
    rx = _prescription(shop, sofia, "2027-02-10", refills_left=1)
    shop.scan("2027-03-01T12:00:00Z")
    (text,) = shop.send(NOW)
    assert text["body"] == (
        "Hola Sofía, su Lisinopril 10 mg se acaba el 12 mar 2027. Pida su resurtido en "
        f"example.com/rx/{rx} o llame al (212) 555-0100. ¡Gracias! Farmacia Harbor"
    )
    assert sms.segments(text["body"]).encoding == "UCS-2"  # the name's í, not the template
    with shop.app().state.connect() as conn:
        assert conn.execute(sa.select(models.message.c.locale)).scalars().all() == ["es"]
    from reminders.preview import preview_rule

    (_, email) = preview_rule(shop.app(), "refill-due").items
    assert email["locale"] == "es" and email["subject"] == "Es hora de resurtir su Lisinopril 10 mg"
    assert "Le queda 1 resurtido en esta receta." in email["text"]


def test_no_refill_reminder_without_refills_left(shop: Shop) -> None:
    ava = shop.customer("Ava")
    _prescription(shop, ava, "2027-02-10", refills_left=0)
    assert shop.scan()["refill-due"]["rows"] == 0


def test_an_early_refill_cancels_the_reminder_at_send_time(shop: Shop) -> None:
    ava = shop.customer("Ava")
    rx = _prescription(shop, ava, "2027-02-10")
    shop.scan("2027-03-01T12:00:00Z")
    shop.execute(
        "UPDATE prescriptions SET last_filled_on = '2027-03-08', refills_left = 2 WHERE id = ?",
        rx,
    )
    assert shop.send(NOW) == []
    (row,) = shop.reminders("refill-due")
    assert row["status"] == "canceled" and "check" in row["reason"]
    # The new fill is an occurrence of its own: it runs out on 2027-04-07.
    shop.scan()
    new = [r for r in shop.reminders("refill-due") if r["status"] == "pending"]
    assert [(r["occurrence"], clock.iso_utc(r["planned_at"])) for r in new] == [
        (f"{rx}:2027-03-08", "2027-04-04T14:00:00Z")
    ]


def test_an_early_refill_seen_by_a_scan_cancels_the_reminder(shop: Shop) -> None:
    ava = shop.customer("Ava")
    rx = _prescription(shop, ava, "2027-02-10")
    shop.scan("2027-03-01T12:00:00Z")
    shop.execute("UPDATE prescriptions SET last_filled_on = '2027-03-05' WHERE id = ?", rx)
    counts = shop.scan("2027-03-06T12:00:00Z")["refill-due"]
    assert (counts["canceled"], counts["created"]) == (1, 1)
    assert shop.send(NOW) == []
    old = next(r for r in shop.reminders("refill-due") if r["occurrence"].endswith("02-10"))
    assert old["status"] == "canceled"


# --- due dates ------------------------------------------------------------------------------------


def _bill(shop: Shop, customer: int, due_on: str, **values: Any) -> int:
    row = {
        "customer_id": customer,
        "account": "Harbor Card ending 4821",
        "amount": "1284.20",
        "currency": "USD",
        "due_on": due_on,
    }
    row.update(values)
    return shop.add("bills", **row)


def test_the_shipped_daily_digest_sends_a_days_reminders_in_one_spanish_text(shop: Shop) -> None:
    """With examples/daily-digest.yaml: Sofía's refill (-3d) and bill (-5d) reminders fall on the
    same morning and go as one text, in the Spanish variant, each item its own Spanish text."""
    digest = Path(__file__).resolve().parents[1] / "examples" / "daily-digest.yaml"
    text = shop.config.read_text().replace(f"rules: {RULES}", f"rules: [{RULES}, {digest}]")
    shop.config.write_text(text)
    sofia = shop.customer("Sofia", locale="es_US")
    rx = _prescription(shop, sofia, "2027-02-10")  # runs out on 2027-03-12: -3d is the 9th
    _bill(shop, sofia, "2027-03-14")  # -5d is the 9th too
    shop.scan("2027-03-01T12:00:00Z")
    (message,) = shop.send(NOW)
    assert message["body"].splitlines() == [
        "Hola Sofia, 2 recordatorios de Harbor Market para hoy:",
        "1. Hola Sofia, su pago de Harbor Card ending 4821 de $1,284.20 vence el 14 mar 2027. "
        "Pague en example.com/pay o llame al (212) 555-0100. ¡Gracias!",
        "2. Hola Sofia, su Lisinopril 10 mg se acaba el 12 mar 2027. Pida su resurtido en "
        f"example.com/rx/{rx} o llame al (212) 555-0100. ¡Gracias! Farmacia Harbor",
    ]
    sent = [*shop.reminders("refill-due"), *shop.reminders("bill-due")]
    assert sorted(r["status"] for r in sent if r["offset"] in ("-3d", "-5d")) == ["sent", "sent"]


def test_bill_reminds_5_days_before_on_the_day_and_3_days_late(shop: Shop) -> None:
    liam = shop.customer("Liam")
    _bill(shop, liam, "2027-03-20")
    shop.scan()
    assert planned(shop.reminders("bill-due")) == {
        "-5d": "2027-03-15T14:00:00Z",
        "0d": "2027-03-20T14:00:00Z",
        "3d": "2027-03-23T14:00:00Z",
    }
    texts = [
        shop.send("2027-03-15T14:01:00Z"),
        shop.send("2027-03-20T14:01:00Z"),
        shop.send("2027-03-23T14:01:00Z"),
    ]
    bodies = [text["body"] for (text,) in texts]
    assert bodies == [
        "Hi Liam, your Harbor Card ending 4821 payment of $1,284.20 is due on Mar 20, 2027. "
        "Pay at example.com/pay or call (212) 555-0100. Thank you!",
        "Hi Liam, your Harbor Card ending 4821 payment of $1,284.20 is due today. "
        "Pay at example.com/pay or call (212) 555-0100. Thank you!",
        "Hi Liam, your Harbor Card ending 4821 payment of $1,284.20 was due on Mar 20, 2027. "
        "Pay today at example.com/pay to avoid a late fee. Thank you!",
    ]
    for body in bodies:
        one_segment(body)


def test_a_london_card_holder_is_reminded_at_10_in_london_in_pounds(shop: Shop) -> None:
    amelia = shop.customer(
        "Amelia", phone="+44 20 7946 0123", timezone="Europe/London", locale="en_GB"
    )
    _bill(shop, amelia, "2027-03-20", currency="GBP", amount="86.40")
    shop.scan()
    assert planned(shop.reminders("bill-due"))["-5d"] == "2027-03-15T10:00:00Z"
    (text,) = shop.send("2027-03-15T10:01:00Z")
    assert text["to"] == "+442079460123"
    assert "payment of £86.40 is due on 20 Mar 2027." in text["body"]
    one_segment(text["body"])


def test_a_paid_bill_gets_no_overdue_reminder(shop: Shop) -> None:
    liam = shop.customer("Liam")
    bill = _bill(shop, liam, "2027-03-20")
    shop.scan()
    assert len(shop.send("2027-03-15T14:01:00Z")) == 1
    assert len(shop.send("2027-03-20T14:01:00Z")) == 1
    shop.execute("UPDATE bills SET paid_on = '2027-03-21' WHERE id = ?", bill)
    assert shop.send("2027-03-23T14:01:00Z") == []
    overdue = shop.reminders("bill-due")[-1]
    assert (overdue["offset"], overdue["status"]) == ("3d", "canceled")
    assert "check" in overdue["reason"]


def test_a_bill_paid_early_cancels_its_reminders_at_the_next_scan(shop: Shop) -> None:
    liam = shop.customer("Liam")
    bill = _bill(shop, liam, "2027-03-20")
    shop.scan()
    shop.execute("UPDATE bills SET paid_on = '2027-03-10' WHERE id = ?", bill)
    assert shop.scan("2027-03-10T12:00:00Z")["bill-due"]["canceled"] == 3
    assert shop.send("2027-03-23T14:01:00Z") == []


def test_a_moved_due_date_moves_the_reminders(shop: Shop) -> None:
    liam = shop.customer("Liam")
    bill = _bill(shop, liam, "2027-03-20")
    shop.scan()
    ids = {r["offset"]: r["id"] for r in shop.reminders("bill-due")}
    shop.execute("UPDATE bills SET due_on = '2027-03-27' WHERE id = ?", bill)
    assert shop.scan()["bill-due"]["moved"] == 3
    rows = shop.reminders("bill-due")
    assert {r["offset"]: r["id"] for r in rows} == ids  # the same reminders, moved
    assert planned(rows) == {
        "-5d": "2027-03-22T14:00:00Z",
        "0d": "2027-03-27T14:00:00Z",
        "3d": "2027-03-30T14:00:00Z",
    }


def test_a_customer_with_no_contact_at_all_fails_visibly(shop: Shop) -> None:
    hiro = shop.customer("Hiroshi", phone=None, email=None)
    _bill(shop, hiro, "2027-03-14")
    shop.scan()
    assert shop.send() == []
    (row,) = [r for r in shop.reminders("bill-due") if r["offset"] == "-5d"]
    assert row["status"] == "failed" and "no usable channel" in row["reason"]


# --- duplicate purchases --------------------------------------------------------------------------


def test_duplicate_purchase_of_digital_goods_any_time_later(shop: Shop) -> None:
    mia = shop.customer("Mia")
    # Bought at 03:30 UTC on Dec 1, 2025: still Nov 30 in New York.
    first = shop.order(mia, "EB-1001", "2025-12-01T03:30:00Z", delivered_on="2025-12-01")
    again = shop.order(mia, "EB-1001", "2027-03-09T15:20:00Z", delivered_on="2027-03-09")
    shop.scan()
    (row,) = shop.reminders("duplicate-purchase")
    assert (row["occurrence"], row["offset"]) == (str(again), "0m")
    assert clock.iso_utc(row["planned_at"]) == "2027-03-09T15:20:00Z"  # right away
    (mail,) = shop.send()
    assert (mail["channel"], mail["to"]) == ("email", "mia.bennett@example.com")
    assert mail["subject"] == "You already own The Quiet Garden (e-book)"
    assert f"already bought it on November 30, 2025 (order {first})" in mail["body"]
    assert f"https://example.com/refund/{again}" in mail["body"]


def test_duplicate_purchase_of_physical_goods_only_within_the_window(shop: Shop) -> None:
    mia = shop.customer("Mia")
    noah = shop.customer("Noah", phone="(415) 555-0187", timezone="America/Los_Angeles")
    ella = shop.customer("Ella", phone="(312) 555-0111", timezone="America/Chicago")
    now = utc(NOW)
    # Mia: headphones 20 days ago and again today (within the 60-day window).
    shop.order(mia, "HW-4002", now - timedelta(days=20), delivered_on="2027-02-20")
    within = shop.order(mia, "HW-4002", now - timedelta(minutes=10))
    # Noah: a kettle 200 days ago, and a new one today: a replacement, not a mistake.
    shop.order(noah, "HW-4009", now - timedelta(days=200), delivered_on="2026-08-25")
    shop.order(noah, "HW-4009", now - timedelta(minutes=10))
    # Ella: coffee beans again after two weeks: consumables are bought again on purpose.
    shop.order(ella, "CN-5001", now - timedelta(days=14), delivered_on="2027-02-26")
    shop.order(ella, "CN-5001", now - timedelta(minutes=10))
    shop.scan()
    assert [r["occurrence"] for r in shop.reminders("duplicate-purchase")] == [str(within)]
    # The window is the business's setting: at 365 days Noah's kettle counts too.
    shop.execute("UPDATE settings SET value = '365' WHERE key = 'duplicate_window_days'")
    shop.scan()
    assert len(shop.reminders("duplicate-purchase")) == 2


def test_a_refunded_first_order_is_not_owned(shop: Shop) -> None:
    mia = shop.customer("Mia")
    now = utc(NOW)
    shop.order(mia, "SW-2001", now - timedelta(days=30), status="refunded")
    shop.order(mia, "SW-2001", now - timedelta(minutes=10))
    shop.scan()
    assert shop.reminders("duplicate-purchase") == []


def test_the_checkout_check_shares_the_definition_of_a_duplicate(shop: Shop) -> None:
    from reminders.checks import run_check

    mia = shop.customer("Mia")
    now = utc(NOW)
    book = shop.order(mia, "EB-1001", "2025-12-01T03:30:00Z")
    shop.order(mia, "HW-4002", now - timedelta(days=20))
    shop.order(mia, "HW-4009", now - timedelta(days=200))
    shop.order(mia, "CN-5001", now - timedelta(days=14))
    app = shop.app()

    def ask(sku: str, customer: int = mia) -> dict[str, Any]:
        return run_check(app, "already-owned", {"customer_id": customer, "sku": sku})

    answer = ask("EB-1001")
    assert answer["duplicate"] is True
    assert answer["match"]["order_id"] == book
    assert answer["match"]["placed_at"] == "2025-12-01T03:30:00Z"
    # The date in Mia's zone: 03:30 UTC on Dec 1 is still Nov 30 in New York.
    assert answer["message"] == (
        f"You already bought The Quiet Garden (e-book) on Nov 30, 2025 (order {book}). "
        "Buy it again anyway?"
    )
    assert ask("HW-4002")["duplicate"] is True
    assert ask("HW-4009") == {"duplicate": False}  # outside the window
    assert ask("CN-5001") == {"duplicate": False}  # a consumable
    assert ask("EB-1001", customer=mia + 1) == {"duplicate": False}  # someone else's
    shop.execute("UPDATE settings SET value = '365' WHERE key = 'duplicate_window_days'")
    assert ask("HW-4009")["duplicate"] is True
    # The check's "now" is the engine's clock: a year on, the headphones are no longer recent.
    shop.at("2028-03-09T15:30:00Z")
    assert ask("HW-4002") == {"duplicate": False}
    assert ask("EB-1001")["duplicate"] is True  # digital: still owned


# --- follow-up ------------------------------------------------------------------------------------


def test_follow_up_four_days_after_delivery(shop: Shop) -> None:
    noah = shop.customer("Noah")
    order = shop.order(noah, "HW-4001", "2027-03-01T16:00:00Z", delivered_on="2027-03-05")
    shop.order(noah, "EB-1002", "2027-03-01T16:00:00Z", delivered_on="2027-03-05")  # digital
    shop.scan("2027-03-06T12:00:00Z")
    (row,) = shop.reminders("order-follow-up")
    assert (row["occurrence"], row["offset"]) == (str(order), "4d")
    assert clock.iso_utc(row["planned_at"]) == "2027-03-09T15:00:00Z"
    (mail,) = shop.send(NOW)
    assert (mail["channel"], mail["to"]) == ("email", "noah.bennett@example.com")
    assert mail["subject"] == "How are you finding your new espresso machine?"
    assert f"Your espresso machine (order {order}) arrived on Mar 5, 2027." in mail["body"]


def test_no_follow_up_when_the_customer_already_contacted_support(shop: Shop) -> None:
    noah = shop.customer("Noah")
    ella = shop.customer("Ella")
    called = shop.order(noah, "HW-4001", "2027-03-01T16:00:00Z", delivered_on="2027-03-05")
    shop.add(
        "support_tickets",
        customer_id=noah,
        order_id=called,
        subject="It leaks",
        opened_at="2027-03-06T09:00:00Z",
    )
    later = shop.order(ella, "HW-4003", "2027-03-01T16:00:00Z", delivered_on="2027-03-05")
    shop.scan("2027-03-06T12:00:00Z")
    assert [r["occurrence"] for r in shop.reminders("order-follow-up")] == [str(later)]
    # Ella calls after the scan, before the check-in goes out: the check cancels it.
    shop.add(
        "support_tickets",
        customer_id=ella,
        order_id=later,
        subject="Which basket size?",
        opened_at="2027-03-08T18:00:00Z",
    )
    assert shop.send(NOW) == []
    (row,) = shop.reminders("order-follow-up")
    assert row["status"] == "canceled" and "check" in row["reason"]


def test_a_ticket_from_before_the_order_does_not_stop_the_follow_up(shop: Shop) -> None:
    noah = shop.customer("Noah")
    shop.add(
        "support_tickets",
        customer_id=noah,
        subject="Old question",
        opened_at="2026-12-01T10:00:00Z",
    )
    shop.order(noah, "HW-4001", "2027-03-01T16:00:00Z", delivered_on="2027-03-05")
    shop.scan("2027-03-06T12:00:00Z")
    assert len(shop.send(NOW)) == 1
