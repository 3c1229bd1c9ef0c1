"""``GET /metrics`` and ``reminders metrics``: every family read from real state (SQLite and
PostgreSQL, real Redis, RQ's own registries) after a scan, sends, a failure, delivery reports,
opt-outs and a pause, parsed back with ``prometheus_client.parser``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import redis
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from rq import Queue, Worker

from reminders import receipts
from reminders.app import App
from reminders.metrics import metrics_app
from reminders.rules import load_rules
from tests.delivery_fixtures import RULES, SCAN_AT, Shop
from tests.twilio_stub import UNSUBSCRIBED

SMS_ONLY = RULES.replace("channels: [sms, email]", "channels: [sms]")
RULE = "refill-due"
LATE = "2027-03-10T15:10:00Z"  # ten minutes after the reminders' send time
STATUSES = (
    "canceled",
    "delivered",
    "failed",
    "pending",
    "queued",
    "sending",
    "sent",
    "undelivered",
    "unknown",
)


def epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def parse(text: str) -> Samples:
    """Every sample of the exposition: name -> sorted labels -> value."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def scrape(shop: Shop, now: str) -> Samples:
    return parse(shop.ok("metrics", now=now).out)


def by(samples: Samples, name: str, label: str) -> dict[str, float]:
    """A family's samples keyed by one label's value (the others must be constant)."""
    return {dict(labels)[label]: value for labels, value in samples[name].items()}


@pytest.fixture
def any_shop(any_shop: Shop) -> Shop:
    """The shop with SMS only, its state DB on SQLite, and on PostgreSQL."""
    return any_shop.configure(rules=SMS_ONLY)


def pause(shop: Shop, rule: str) -> None:
    """Pause ``rule`` as the console's pause button does."""
    from reminders.clock import parse_instant
    from reminders.pause import set_paused

    with shop.state.begin() as conn:
        set_paused(conn, rule, True, by="ops", now=parse_instant(SCAN_AT))


def report(shop: Shop, to: str, state: str, code: str | None) -> None:
    """A delivery report for the message sent to ``to``, applied as the webhook applies it."""
    sid = next(m["provider_id"] for m in shop.messages() if m["to_address"] == to)
    ruleset = load_rules(App(shop.root / "config.yaml").config)
    with shop.state.begin() as conn:
        receipts.apply_report(
            conn, ruleset, sid, state, code, datetime(2027, 3, 10, 16, tzinfo=UTC)
        )


def test_every_family_is_counted_exactly_from_real_state(any_shop: Shop) -> None:
    shop = any_shop
    people = shop.prepare(4)

    after_scan = scrape(shop, SCAN_AT)
    assert by(after_scan, "reminders_reminders", "status") == {
        s: (4 if s == "pending" else 0) for s in STATUSES
    }
    assert after_scan["reminders_scan_last_success_timestamp_seconds"] == {
        (("rule", RULE),): epoch(SCAN_AT)
    }
    assert after_scan["reminders_scan_duration_seconds"] == {(("rule", RULE),): 0.0}
    assert after_scan["reminders_scan_rows"] == {(("rule", RULE),): 4.0}
    assert after_scan["reminders_due_unsent"] == {(("rule", RULE),): 0.0}
    assert after_scan["reminders_oldest_due_unsent_seconds"] == {(): 0.0}
    assert by(after_scan, "reminders_queue_jobs", "queue") == {
        "reminders-sms": 0.0,
        "reminders-email": 0.0,
    }
    assert after_scan["reminders_workers"] == {(): 0.0}
    assert after_scan["reminders_rule_paused"] == {(("rule", RULE),): 0.0}
    for family in ("reminders_messages_total", "reminders_provider_errors_total"):
        assert family not in after_scan
    assert "reminders_opt_outs_total" not in after_scan

    # Ten minutes late and not dispatched: the lag alert's gauge.
    late = scrape(shop, LATE)
    assert late["reminders_due_unsent"] == {(("rule", RULE),): 4.0}
    assert late["reminders_oldest_due_unsent_seconds"] == {(): 600.0}

    shop.stub.respond(people[0]["phone"], UNSUBSCRIBED)  # 21610: fails and opts out
    shop.ok("dispatch", now=LATE)
    queued = scrape(shop, LATE)
    assert by(queued, "reminders_queue_jobs", "queue")["reminders-sms"] == 1.0
    assert queued["reminders_due_unsent"] == {(("rule", RULE),): 4.0}
    # A live worker registered in Redis (as RQ registers one) is counted.
    connection = redis.Redis.from_url(shop.redis_url)
    idle = Worker([Queue("reminders-sms", connection=connection)], connection=connection)
    idle.register_birth()
    try:
        assert scrape(shop, LATE)["reminders_workers"] == {(): 1.0}
    finally:
        idle.register_death()

    shop.worker(now=LATE)
    report(shop, people[1]["phone"], "delivered", None)
    report(shop, people[2]["phone"], "undelivered", "30005")
    pause(shop, RULE)

    done = scrape(shop, "2027-03-10T16:00:00Z")
    assert by(done, "reminders_reminders", "status") == {
        s: (1 if s in {"sent", "delivered", "undelivered", "failed"} else 0) for s in STATUSES
    }
    assert done["reminders_due_unsent"] == {(("rule", RULE),): 0.0}
    assert done["reminders_oldest_due_unsent_seconds"] == {(): 0.0}
    assert set(by(done, "reminders_queue_jobs", "queue").values()) == {0.0}
    assert done["reminders_workers"] == {(): 0.0}
    assert done["reminders_messages_total"] == {
        (("channel", "sms"), ("outcome", "sent"), ("rule", RULE)): 3.0,
        (("channel", "sms"), ("outcome", "delivered"), ("rule", RULE)): 1.0,
        (("channel", "sms"), ("outcome", "undelivered"), ("rule", RULE)): 1.0,
        (("channel", "sms"), ("outcome", "failed"), ("rule", RULE)): 0.0,
    }
    assert done["reminders_provider_errors_total"] == {(("channel", "sms"), ("code", "30005")): 1.0}
    assert done["reminders_opt_outs_total"] == {
        (("channel", "sms"), ("source", "21610")): 1.0,
        (("channel", "sms"), ("source", "30005")): 1.0,
    }
    assert done["reminders_rule_paused"] == {(("rule", RULE),): 1.0}

    # Bounded labels: rules, statuses, channels, queues, codes; never an address or a customer.
    text = shop.ok("metrics", now="2027-03-10T16:00:00Z").out
    for person in people:
        assert person["phone"] not in text and person["email"] not in text
        assert person["phone"][-4:] not in text
    labels = {k for samples in done.values() for key in samples for k, _ in key}
    assert labels == {"rule", "status", "channel", "outcome", "code", "queue", "source"}

    # status --json reports the same lag as the gauge.
    status = json.loads(shop.ok("status", "--json", now=LATE).out)
    assert status["oldest_due_unsent_seconds"] == 0.0


def test_status_json_and_healthz_report_the_oldest_due_unsent_age(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop.configure(rules=SMS_ONLY)
    shop.prepare(2)
    status = json.loads(shop.ok("status", "--json", now=LATE).out)
    assert status["oldest_due_unsent_seconds"] == 600.0
    assert status["due_now"] == 2

    from flask import Flask

    from reminders.web import health
    from reminders.web.context import KEY

    flask = Flask(__name__)
    flask.extensions[KEY] = App(shop.root / "config.yaml")
    flask.register_blueprint(health.blueprint)
    monkeypatch.setenv("REMINDERS_NOW", LATE)
    answer = flask.test_client().get("/healthz")
    assert answer.status_code == 200
    assert answer.get_json()["oldest_due_unsent_seconds"] == 600.0


def test_healthz_without_the_tables_is_up_without_the_age(shop: Shop) -> None:
    from flask import Flask

    from reminders.web import health
    from reminders.web.context import KEY

    shop.configure(rules=SMS_ONLY)  # the state DB reachable, not migrated
    flask = Flask(__name__)
    flask.extensions[KEY] = App(shop.root / "config.yaml")
    flask.register_blueprint(health.blueprint)
    answer = flask.test_client().get("/healthz")
    assert answer.status_code == 200
    assert answer.get_json() == {"status": "ok", "state_db": "ok", "redis": "ok"}


def test_the_blueprint_asks_for_the_bearer_key_when_one_is_set(shop: Shop) -> None:
    key = "k" * 24
    shop.configure(rules=SMS_ONLY, extra=f"console:\n  metrics_key: {key}\n")
    shop.prepare(1)
    from flask import Flask

    flask = Flask(__name__)
    flask.register_blueprint(metrics_app(App(shop.root / "config.yaml")))
    client = flask.test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    answer = client.get("/metrics", headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200
    assert answer.content_type.startswith("text/plain; version=0.0.4")
    samples = parse(answer.get_data(as_text=True))
    assert by(samples, "reminders_reminders", "status")["pending"] == 1.0


def test_messages_sent_before_0003_get_their_reminders_rule(state_url: str) -> None:
    from reminders import state_db

    state_db.upgrade(state_url, "0002")
    engine = state_db.engine_for(state_url)
    at = datetime(2027, 3, 10, 15, tzinfo=UTC)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                'INSERT INTO reminders_reminder (id, rule, occurrence, "offset", customer_id, '
                "planned_at, send_at, status, channel_index, attempts, data, row_hash, "
                "created_at, updated_at) VALUES (1, 'refill-due', '1', '0d', '7', :at, :at, "
                "'sent', 0, 1, '{}', 'x', :at, :at)"
            ),
            {"at": at},
        )
        conn.execute(
            sa.text(
                "INSERT INTO reminders_message (reminder_id, channel, to_address, status, "
                "created_at, updated_at) VALUES (1, 'sms', '+12125550001', 'sent', :at, :at)"
            ),
            {"at": at},
        )
    state_db.upgrade(state_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT rule FROM reminders_message")).scalar_one() == (
            "refill-due"
        )
