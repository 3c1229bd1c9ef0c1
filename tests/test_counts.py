"""The counts kept as the rows change (reminders.counts) equal a COUNT(*) of the rows: after scans,
sends by concurrent workers, fallbacks, failures, cancels, moves, delivery reports, ops' retries,
folds, and after migration 0012 counted the rows already there.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from reminders import counts, lifecycle, models, receipts, state_db, stats
from reminders.app import App
from reminders.rules import load_rules
from tests.delivery_fixtures import SEND_AT, Shop, finish
from tests.twilio_stub import INVALID_NUMBER, UNSUBSCRIBED

NOW = datetime(2027, 3, 10, 16, tzinfo=UTC)


def assert_exact(engine: sa.Engine) -> dict[tuple[str, str], int]:
    """Both families' kept counts equal COUNT(*) of their rows; returns the reminders'."""
    with engine.connect() as conn:
        for family in counts.FAMILIES:
            assert family.totals(conn) == family.count_rows(conn), family.table.name
        return counts.reminders(conn)


def fold(engine: sa.Engine) -> int:
    with engine.begin() as conn:
        return counts.fold(conn)


def test_counts_equal_count_star_through_a_day_of_work(
    any_shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop = any_shop
    # 40 patients: one with a number Twilio calls invalid and one unsubscribed (both fall back
    # to email), one with no usable address at all (fails), the rest sent by SMS.
    people = shop.prepare(
        40,
        phone=lambda i: "12" if i == 3 else f"+1212555{i:04d}",
        email=lambda i: None if i == 3 else f"p{i}@example.com",
    )
    shop.stub.respond(people[4]["phone"], INVALID_NUMBER)
    shop.stub.respond(people[5]["phone"], UNSUBSCRIBED)
    assert assert_exact(shop.state) == {("refill-due", "pending"): 40}

    # Two workers at once, on batches of 5.
    shop.ok("dispatch", now=SEND_AT)
    assert_exact(shop.state)
    workers = [shop.spawn_worker(), shop.spawn_worker()]
    for process in workers:
        code, _out, err = finish(process)
        assert code == 0, err
    after_send = assert_exact(shop.state)
    assert after_send == {("refill-due", "sent"): 39, ("refill-due", "failed"): 1}
    assert shop.statuses() == {"sent": 39, "failed": 1}

    # Delivery reports: delivered, undelivered with a code (messages by status and code).
    ruleset = load_rules(App(shop.root / "config.yaml").config)
    sms = [m for m in shop.messages() if m["channel"] == "sms"]
    with shop.state.begin() as conn:
        receipts.apply_report(conn, ruleset, sms[0]["provider_id"], "delivered", None, NOW)
        receipts.apply_report(conn, ruleset, sms[1]["provider_id"], "undelivered", "30003", NOW)
    assert_exact(shop.state)

    # Tomorrow's refills: scanned, one moved, two vanish (canceled), then ops retry the failed.
    shop.sql(
        "INSERT INTO prescriptions (id, patient_id, drug_name, runs_out_on) VALUES "
        "(101, 1, 'A', '2027-03-12'), (102, 2, 'B', '2027-03-12'), (103, 6, 'C', '2027-03-12'), "
        "(104, 7, 'D', '2027-03-12')"
    )
    shop.ok("scan", now=SEND_AT)
    shop.sql("UPDATE prescriptions SET runs_out_on = '2027-03-13' WHERE id = 101")
    shop.sql("DELETE FROM prescriptions WHERE id IN (102, 103)")
    shop.ok("scan", now=SEND_AT)
    kept = assert_exact(shop.state)
    assert kept[("refill-due", "pending")] == 2 and kept[("refill-due", "canceled")] == 2
    shop.ok("retry", "--status", "failed", now=SEND_AT)
    assert assert_exact(shop.state)[("refill-due", "pending")] == 3

    # Folding leaves the counts as they are, and keeps one row a key.
    assert fold(shop.state) > 0
    assert_exact(shop.state)
    with shop.state.connect() as conn:
        for family in counts.FAMILIES:
            rows = conn.execute(sa.select(sa.func.count()).select_from(family.table)).scalar()
            assert rows == len(family.totals(conn))
    assert fold(shop.state) == 0  # nothing left to fold

    # The next day's sends go on top of the folded rows.
    later = "2027-03-12T15:00:00Z"
    shop.ok("dispatch", now=later)
    shop.worker(now=later)
    final = assert_exact(shop.state)
    assert sum(final.values()) == len(shop.reminders())

    # The console's days from the counts by hour are the days counted from the rows.
    config = App(shop.root / "config.yaml").config
    moment = datetime(2027, 3, 13, 12, tzinfo=UTC)
    with stats.reading(shop.state) as conn:
        kept_days = stats.daily(conn, config, moment, 5)
        monkeypatch.setattr(stats, "_on_hours", lambda bounds: False)
        counted_days = stats.daily(conn, config, moment, 5)
    assert kept_days == counted_days
    assert sum(sum(d["sent"].values()) for d in kept_days) == len(shop.messages())
    assert sum(d["delivered"] for d in kept_days) == 1


def test_migration_0012_counts_the_rows_already_there(state_url: str) -> None:
    state_db.upgrade(state_url, "0007")
    engine = state_db.engine_for(state_url)
    now = datetime(2027, 3, 1, tzinfo=UTC)
    statuses = ["pending", "queued", "sent", "sent", "delivered", "canceled", "failed"]
    with engine.begin() as conn:
        for i in range(70):
            rule = ("refill-due", "renewal-due")[i % 2]
            status = statuses[i % len(statuses)]
            conn.execute(
                models.reminder.insert().values(
                    rule=rule,
                    occurrence=str(i),
                    offset="0d",
                    customer_id=str(i % 9),
                    planned_at=now,
                    send_at=now,
                    status=status,
                    data="{}",
                    row_hash="0" * 32,
                    created_at=now,
                    updated_at=now,
                )
            )
        ids = [row.id for row in conn.execute(sa.select(models.reminder.c.id))]
        conn.execute(
            models.message.insert(),
            [
                {
                    "reminder_id": rid,
                    "channel": ("sms", "email")[rid % 2],
                    "rule": None if rid % 5 == 0 else "refill-due",
                    "to_address": "+12125550100",
                    "status": ("sent", "delivered", "undelivered")[rid % 3],
                    "error_code": "30003" if rid % 3 == 2 else None,
                    "created_at": now,
                    "updated_at": now,
                }
                for rid in ids[:40]
            ],
        )
        conn.execute(
            models.event.insert(),
            [
                {
                    "reminder_id": rid,
                    "at": now + timedelta(minutes=37 * rid),
                    "from_status": "sent",
                    "to_status": ("delivered", "canceled", "failed", "sent")[rid % 4],
                }
                for rid in ids
            ],
        )
    state_db.upgrade(state_url)
    found = assert_exact(engine)
    with engine.connect() as conn:
        by_hour = counts.HOURS.totals(conn)
    assert sum(n for (_, what), n in by_hour.items() if what == "delivered") == 17
    assert sum(n for (_, what), n in by_hour.items() if what.startswith("sent:")) == 40
    assert sum(found.values()) == 70
    assert found[("refill-due", "pending")] == 5
    # Changes after the migration add to what it counted.
    with engine.begin() as conn:
        pending = sorted(
            row.id
            for row in conn.execute(
                sa.select(models.reminder.c.id).where(models.reminder.c.status == "pending")
            )
        )
        lifecycle.move(conn, pending, source=lifecycle.PENDING, target=lifecycle.CANCELED, now=now)
    assert assert_exact(engine).get(("refill-due", "pending")) is None
    # Retention deletes final reminders with their messages, taking them off the counts first.
    with engine.begin() as conn:
        old = sorted(
            row.id
            for row in conn.execute(
                sa.select(models.reminder.c.id).where(models.reminder.c.status == "sent")
            )
        )[:15]
        counts.deleting(conn, old)
        conn.execute(sa.delete(models.event).where(models.event.c.reminder_id.in_(old)))
        conn.execute(sa.delete(models.message).where(models.message.c.reminder_id.in_(old)))
        conn.execute(sa.delete(models.reminder).where(models.reminder.c.id.in_(old)))
    with engine.connect() as conn:
        for family in (counts.REMINDERS, counts.MESSAGES):
            assert family.totals(conn) == family.count_rows(conn)
        assert sum(counts.reminders(conn).values()) == 55
    from alembic import command

    with engine.connect() as conn:  # and back down
        cfg = state_db.alembic_config(state_url)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0007")
        conn.commit()
        assert models.reminder_count.name not in sa.inspect(conn).get_table_names()


def test_concurrent_changes_and_folds_on_postgresql_keep_the_counts_exact(pg_url: str) -> None:
    """Four threads move their own reminders through the lifecycle, each change its own
    transaction, while a fifth folds: no change is lost or counted twice, and no adder waits
    on another (they only insert)."""
    url = pg_url.replace("postgresql://", "postgresql+psycopg://")
    state_db.upgrade(url)
    engine = state_db.engine_for(url)
    now = datetime(2027, 3, 1, tzinfo=UTC)
    per_thread = 30
    with engine.begin() as conn:
        rows = [
            {
                "rule": f"rule-{i % 3}",
                "occurrence": str(i),
                "offset": "0d",
                "customer_id": "1",
                "planned_at": now,
                "send_at": now,
                "status": "pending",
                "data": "{}",
                "row_hash": "0" * 32,
                "created_at": now,
                "updated_at": now,
            }
            for i in range(4 * per_thread)
        ]
        conn.execute(models.reminder.insert(), rows)
        for rule in ("rule-0", "rule-1", "rule-2"):
            counts.created(conn, rule, "pending", per_thread * 4 // 3)
        ids = sorted(row.id for row in conn.execute(sa.select(models.reminder.c.id)))
    path = [
        (lifecycle.PENDING, lifecycle.QUEUED),
        (lifecycle.QUEUED, lifecycle.SENDING),
        (lifecycle.SENDING, lifecycle.SENT),
    ]
    done = threading.Event()
    errors: list[BaseException] = []

    def work(mine: list[int]) -> None:
        try:
            for rid in mine:
                for source, target in path:
                    with engine.begin() as conn:
                        moved = lifecycle.move(
                            conn, [rid], source=source, target=target, now=now + timedelta(1)
                        )
                        assert moved == [rid]
        except BaseException as exc:  # reported below
            errors.append(exc)

    def folder() -> None:
        try:
            while not done.is_set():
                fold(engine)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(ids[k::4],)) for k in range(4)]
    folding = threading.Thread(target=folder)
    folding.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    folding.join()
    assert errors == []
    assert assert_exact(engine) == {
        ("rule-0", "sent"): 40,
        ("rule-1", "sent"): 40,
        ("rule-2", "sent"): 40,
    }
    state_db.dispose_engines(url)
