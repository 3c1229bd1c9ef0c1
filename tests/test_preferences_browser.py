"""The preferences page in a real headless Chromium (Debian's, driven by Playwright).

A customer turns text messages off for one kind of reminder; the next scan, dispatch and worker
(the real commands) send that kind to them by email instead, and everyone else's as before.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from reminders import lifecycle, links, models, state_db
from reminders.app import App
from tests import services
from tests.test_web import SECRET, Web, serve

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
REMINDERS = str(Path(sys.executable).with_name("reminders"))
SCANNED = datetime(2027, 3, 10, 15, 0, tzinfo=UTC)
SENDING = datetime(2027, 3, 11, 16, 0, tzinfo=UTC)  # the -3d reminders are due (10:00 EST)
REDIS_DB = 6

RULES = """\
rules:
  - name: refill-due
    description: Text patients 3 days before their prescription runs out.
    label: Your prescription refill
    query: |
      SELECT rx.id AS rx_id, rx.drug_name, rx.runs_out_on,
             p.id AS customer_id, p.first_name, p.phone, p.email, p.timezone
      FROM prescriptions rx JOIN patients p ON p.id = rx.patient_id
    occurrence: "{{ rx_id }}"
    due: runs_out_on
    offsets: [-3d, 0d]
    at: "10:00"
    channels: [sms, email]
"""


@pytest.fixture
def chromium() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        services.unavailable(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        services.unavailable("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def business(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A pharmacy: config, rules, templates, its database, a state DB and Redis db 6."""
    url = services.redis_url(REDIS_DB)
    client = redis.Redis.from_url(url)
    client.flushdb()
    db = sqlite3.connect(tmp_path / "business.db")
    db.executescript(
        """
        CREATE TABLE patients (id INTEGER PRIMARY KEY, first_name TEXT, phone TEXT, email TEXT,
                               timezone TEXT);
        CREATE TABLE prescriptions (id INTEGER PRIMARY KEY, patient_id INTEGER, drug_name TEXT,
                                    runs_out_on TEXT);
        INSERT INTO patients VALUES
            (7, 'Jane', '(415) 555-2671', 'jane@example.com', 'America/New_York'),
            (8, 'Bob', '+1 415 555 0199', 'bob@example.com', 'America/New_York');
        INSERT INTO prescriptions VALUES (1, 7, 'Lisinopril', '2027-03-14'),
                                         (2, 8, 'Metformin', '2027-03-14');
        """
    )
    db.commit()
    db.close()
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "refills.yaml").write_text(RULES)
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "refill-due.sms.j2").write_text(
        "Hi {{ first_name }}, your {{ drug_name }} runs out on {{ runs_out_on }}."
    )
    (tmp_path / "templates" / "refill-due.email.j2").write_text(
        "{% block subject %}Refill your {{ drug_name }}{% endblock %}"
        "{% block text %}Hi {{ first_name }}, it runs out on {{ runs_out_on }}.{% endblock %}"
    )
    (tmp_path / "config.yaml").write_text(
        "timezone: America/New_York\n"
        "source: {url: sqlite:///business.db}\n"
        "state: {url: sqlite:///state.db}\n"
        f"redis: {{url: '{url}'}}\n"
        "channels:\n"
        "  sms: {provider: outbox, path: outbox.jsonl}\n"
        "  email: {provider: outbox, path: outbox.jsonl}\n"
        "web: {public_url: 'https://reminders.example.com', business_name: Harbor Pharmacy}\n"
    )
    monkeypatch.setenv(links.SECRET_ENV, SECRET)
    monkeypatch.setenv("REMINDERS_NOW", SCANNED.isoformat())
    yield tmp_path
    client.flushdb()
    client.close()


def run(root: Path, now: datetime, *args: str) -> str:
    """Run a ``reminders`` command as ops would, on the engine clock ``now``."""
    env = dict(os.environ, REMINDERS_NOW=now.isoformat(), REMINDERS_SECRET=SECRET)
    env.pop("REMINDERS_CONFIG", None)
    done = subprocess.run(
        [REMINDERS, "-c", str(root / "config.yaml"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"reminders {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture
def web(business: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Web]:
    run(business, SCANNED, "db", "upgrade")
    yield from serve(App(business / "config.yaml"), monkeypatch)


def test_turning_texts_off_on_the_page_is_respected_by_the_next_scan_and_send(
    chromium: Any, web: Web, business: Path
) -> None:
    from playwright.sync_api import expect

    run(business, SCANNED, "scan")
    token = links.preferences_token("7", keys=[SECRET], now=SCANNED)
    page = chromium.new_page(viewport={"width": 390, "height": 844})  # a phone
    page.goto(f"{web.base}/preferences/{token}")

    expect(page.get_by_role("heading", level=1)).to_have_text("Your reminders from Harbor Pharmacy")
    upcoming = page.get_by_role("list", name="Coming up").get_by_role("listitem")
    expect(upcoming).to_have_count(2)  # Jane's two, never Bob's
    expect(upcoming.first).to_contain_text("Thursday, March 11, 2027")
    expect(upcoming.first).to_contain_text("10:00")
    expect(upcoming.first).to_contain_text("By text message")
    assert "Metformin" not in page.content() and "Bob" not in page.content()
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")

    expect(upcoming.first).to_contain_text("Your prescription refill")  # its label
    kind = page.get_by_role("group", name="Refill due")  # the rule's plain name
    texts = kind.get_by_role("checkbox", name="Text message")
    expect(texts).to_be_checked()
    expect(kind.get_by_role("checkbox", name="Email")).to_be_checked()
    texts.uncheck()
    page.get_by_role("button", name="Save my choices").click()

    expect(page.get_by_role("status")).to_have_text("Your choices are saved.")
    expect(kind.get_by_role("checkbox", name="Text message")).not_to_be_checked()
    expect(kind.get_by_role("checkbox", name="Email")).to_be_checked()
    expect(upcoming.first).to_contain_text("By email")
    with web.state.connect() as conn:
        saved = conn.execute(sa.select(models.preference)).all()
    assert [(p.customer_id, p.rule, p.channel, p.enabled) for p in saved] == [
        ("7", "refill-due", "sms", False)
    ]

    # The business fills a new prescription for Jane; the next scan and send respect her choice.
    with sqlite3.connect(business / "business.db") as db:
        db.execute("INSERT INTO prescriptions VALUES (3, 7, 'Atorvastatin', '2027-03-14')")
    run(business, SCANNED, "scan")
    run(business, SENDING, "dispatch")
    run(business, SENDING, "worker", "--burst")

    sent = [json.loads(line) for line in (business / "outbox.jsonl").read_text().splitlines()]
    by_to = sorted((m["to"], m["channel"]) for m in sent)
    assert by_to == [
        ("+14155550199", "sms"),  # Bob: unchanged
        ("jane@example.com", "email"),  # rx 1
        ("jane@example.com", "email"),  # rx 3, created by the scan after she chose
    ]
    with state_db.engine_for(web.app.config.state_url).connect() as conn:
        rows = conn.execute(
            sa.select(models.reminder.c.customer_id, models.reminder.c.channel).where(
                models.reminder.c.status == lifecycle.SENT
            )
        ).all()
    assert sorted(map(tuple, rows)) == [("7", "email"), ("7", "email"), ("8", "sms")]
