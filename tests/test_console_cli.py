"""The console's commands as ops run them (``users``, ``keys``, ``forecast``, ``status``), and a
paused rule under a running worker: nothing of it is dispatched or sent, a worker already holding
its reminders puts them back, and resume lets them go."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
import requests
import sqlalchemy as sa

from reminders import consent, models, state_db
from reminders.app import App
from reminders.console import create_console
from tests import services
from tests.console_fixtures import SECRET, write_project

REMINDERS = str(Path(sys.executable).with_name("reminders"))
T = datetime(2027, 3, 10, 16, 30, tzinfo=UTC)  # 11:30 in New York, 10:30 in Chicago
REDIS_DB = 9


@pytest.fixture
def shop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The console project, its reminders all due on 2027-03-10, with a Redis of its own."""
    url = services.redis_url(REDIS_DB)
    client = redis.Redis.from_url(url)
    client.flushdb()
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    config = write_project(tmp_path, state_url)
    config.write_text(config.read_text() + f"redis: {{url: '{url}'}}\n")
    with sqlite3.connect(tmp_path / "business.db") as db:
        db.execute("UPDATE prescriptions SET runs_out_on = '2027-03-13'")
        db.execute("UPDATE members SET renews_on = '2027-03-17'")
    monkeypatch.setenv("REMINDERS_SECRET", SECRET)
    monkeypatch.setenv("REMINDERS_NOW", T.isoformat())
    yield tmp_path
    client.flushdb()
    client.close()
    state_db.dispose_engines(state_url)


def run(root: Path, *args: str, stdin: str | None = None, code: int = 0) -> str:
    env = dict(os.environ, REMINDERS_NOW=T.isoformat(), REMINDERS_SECRET=SECRET)
    env.pop("REMINDERS_CONFIG", None)
    done = subprocess.run(
        [REMINDERS, "-c", str(root / "config.yaml"), *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == code, f"reminders {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout + done.stderr


def outbox(root: Path) -> list[dict[str, str]]:
    path = root / "outbox.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_users_and_keys(shop: Path) -> None:
    run(shop, "db", "upgrade")
    out = run(shop, "users", "add", "ana", "--role", "operator", "--password-stdin",
              stdin="a long enough password\n")  # fmt: skip
    assert "user ana (operator) saved" in out
    run(shop, "users", "add", "bo", "--role", "viewer", "--password-stdin", stdin="short\n", code=2)
    run(shop, "users", "add", "bo", "--role", "admin", "--password-stdin", stdin="x" * 12, code=2)
    assert "ana" in run(shop, "users", "list") and "operator" in run(shop, "users", "list")
    key = run(shop, "keys", "add", "nightly", "--role", "viewer").splitlines()[0]
    assert key.startswith("rk_") and len(key) > 50
    listed = run(shop, "keys", "list")
    assert "nightly" in listed and key not in listed and key.split("_", 2)[2] not in listed
    run(shop, "keys", "add", "nightly", "--role", "viewer", code=2)  # one key a name
    app = App(shop / "config.yaml")
    with services.serving(create_console(app)) as port:
        headers = {"Authorization": f"Bearer {key}"}
        assert requests.get(f"http://127.0.0.1:{port}/api/v1/rules", headers=headers).ok
        run(shop, "keys", "revoke", "nightly")
        again = requests.get(f"http://127.0.0.1:{port}/api/v1/rules", headers=headers)
        assert again.status_code == 401
    assert "revoked" in run(shop, "keys", "list")
    run(shop, "keys", "revoke", "nightly", code=2)
    run(shop, "users", "remove", "ana")
    run(shop, "users", "remove", "ana", code=2)
    with app.state.connect() as conn:
        actions = conn.execute(
            sa.select(models.audit.c.action, models.audit.c.target).order_by(models.audit.c.id)
        ).all()
    assert [tuple(a) for a in actions] == [
        ("user.added", "ana"),
        ("key.created", "nightly"),
        ("key.revoked", "nightly"),
        ("user.removed", "ana"),
    ]


def test_forecast_plans_a_rule_never_scanned_and_writes_nothing(shop: Path) -> None:
    run(shop, "db", "upgrade")
    app = App(shop / "config.yaml")
    with app.state.begin() as conn:  # Ann's number is opted out: her texts go by email
        consent.opt_out(conn, "sms", "+14155550100", "stop", None, T, customer_id="11")
    got = json.loads(run(shop, "forecast", "refill-due", "--days", "4", "--json"))
    zero = {"sms": 0, "email": 0, "quiet_hours": 0, "caps": 0, "opted_out": 0, "off": 0,
            "no_address": 0}  # fmt: skip
    assert got["rows"] == 3 and got["source"] == "query"
    assert got["days"] == [
        # -3d: Jane by text, Ann by email, Bob has no usable address.
        {"date": "2027-03-10", **zero, "sms": 1, "email": 1, "no_address": 1},
        {"date": "2027-03-11", **zero},
        {"date": "2027-03-12", **zero},
        {"date": "2027-03-13", **zero, "sms": 1, "email": 1, "no_address": 1},  # 0d
    ]
    table = run(shop, "forecast", "refill-due", "--days", "4")
    assert "2027-03-13" in table and "nothing written" in table
    with app.state.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(models.reminder)).scalar() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(models.scan_run)).scalar() == 0
    run(shop, "forecast", "nope", code=2)


def test_a_paused_rule_sends_nothing_under_a_running_worker(shop: Path) -> None:
    run(shop, "db", "upgrade")
    run(shop, "scan")
    app = App(shop / "config.yaml")
    with app.state.begin() as conn:
        from reminders import accounts

        key = accounts.add_key(conn, "ops-script", "operator", now=T)
    env = dict(os.environ, REMINDERS_NOW=T.isoformat(), REMINDERS_SECRET=SECRET)
    worker = subprocess.Popen(
        [REMINDERS, "-c", str(shop / "config.yaml"), "worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with services.serving(create_console(app)) as port:
            api = requests.Session()
            api.headers["Authorization"] = f"Bearer {key}"
            base = f"http://127.0.0.1:{port}/api/v1"
            assert api.post(f"{base}/rules/refill-due/pause").json()["paused"] is True
            assert "paused (nothing sent until resumed): refill-due" in run(shop, "status")
            assert "1 enqueued" in run(shop, "dispatch")  # the renewal only
            wait_for(lambda: len(outbox(shop)) == 1, worker)
            assert outbox(shop)[0]["rule"] == "renewal"
            statuses = api.get(f"{base}/rules").json()["rules"][0]["counts"]
            assert statuses["pending"] == 6 and statuses["queued"] == 0
            got = api.get(f"{base}/stats?days=1").json()["attention"]
            assert got["paused_rules"] == ["refill-due"] and got["due_unsent"] == 3
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)

    # Queued before the pause, held by a worker after it: put back to pending, unsent.
    set_paused(app, False)
    assert "3 enqueued" in run(shop, "dispatch")
    set_paused(app, True)
    run(shop, "worker", "--burst")
    assert len(outbox(shop)) == 1
    with app.state.connect() as conn:
        rows = conn.execute(
            sa.select(models.reminder.c.status, models.reminder.c.reason).where(
                models.reminder.c.rule == "refill-due", models.reminder.c.send_at <= T
            )
        ).all()
        events = conn.execute(
            sa.select(models.event.c.from_status, models.event.c.to_status)
            .where(models.event.c.reason == "paused")
        ).all()  # fmt: skip
    assert [tuple(r) for r in rows] == [("pending", "paused")] * 3
    assert [tuple(e) for e in events] == [("queued", "pending")] * 3
    assert "0 enqueued" in run(shop, "dispatch")

    # Resumed: they go, each still subject to grace.
    set_paused(app, False)
    assert "3 enqueued" in run(shop, "dispatch")
    run(shop, "worker", "--burst")
    sent = sorted((m["rule"], m["to"]) for m in outbox(shop))
    assert sent == [
        ("refill-due", "+14155550100"),
        ("refill-due", "+14155552671"),
        ("renewal", "jane@example.com"),
    ]


def set_paused(app: App, paused: bool) -> None:
    from reminders import pause

    with app.state.begin() as conn:
        pause.set_paused(conn, "refill-due", paused, by="test", now=T)


def wait_for(done: object, worker: subprocess.Popen[bytes], limit: float = 90) -> None:
    """Wait until ``done()`` (the worker's work is seen), failing if the worker exits."""
    end = time.monotonic() + limit
    while not done():  # type: ignore[operator]
        assert worker.poll() is None, "the worker exited"
        assert time.monotonic() < end, "the worker did not send in time"
        time.sleep(0.2)


def test_forecast_counts_caps_and_turned_off_preferences(shop: Path) -> None:
    config = shop / "config.yaml"
    config.write_text(config.read_text() + "caps: {per_day: 1}\n")
    with sqlite3.connect(shop / "business.db") as db:  # a second prescription for Jane, same day
        db.execute("INSERT INTO prescriptions VALUES (9, 7, 'Metoprolol', '2027-03-13')")
    run(shop, "db", "upgrade")
    app = App(config)
    with app.state.begin() as conn:  # Ann turned this rule off on both channels
        consent.set_preferences(conn, "11", {("refill-due", "*"): False}, T)
    got = json.loads(run(shop, "forecast", "refill-due", "--days", "4", "--json"))
    zero = {"sms": 0, "email": 0, "quiet_hours": 0, "caps": 0, "opted_out": 0, "off": 0,
            "no_address": 0}  # fmt: skip
    # Jane's two texts a day: one past her cap of 1; Ann's turned off; Bob's has no address.
    assert got["days"][0] == {"date": "2027-03-10", **zero, "sms": 2, "caps": 1, "off": 1,
                              "no_address": 1}  # fmt: skip
    assert got["days"][3] == {"date": "2027-03-13", **zero, "sms": 2, "caps": 1, "off": 1,
                              "no_address": 1}  # fmt: skip


def test_forecast_counts_texts_that_quiet_hours_would_hold(shop: Path) -> None:
    rules = shop / "rules" / "rules.yaml"
    rules.write_text(rules.read_text().replace(
        "    channels: [sms, email]\n", "    channels: [sms, email]\n"
        "    quiet_hours: {sms: \"09:30-12:00\"}\n", 1))  # fmt: skip
    run(shop, "db", "upgrade")
    got = json.loads(run(shop, "forecast", "refill-due", "--days", "1", "--json"))
    # Both texts are due, so they would go now: 11:30 for Jane in New York, 10:30 for Ann in
    # Chicago, each in her own zone's quiet hours. Bob has no address.
    assert got["days"] == [
        {"date": "2027-03-10", "sms": 2, "email": 0, "quiet_hours": 2, "caps": 0,
         "opted_out": 0, "off": 0, "no_address": 1},
    ]  # fmt: skip
