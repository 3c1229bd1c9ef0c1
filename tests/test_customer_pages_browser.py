"""The demo's links, opened in a real headless Chromium against ``reminders web`` on the demo's
folder: the preferences page, the unsubscribe page, and the opt-out / opt-in round trip.

Nothing is exported first: the web endpoint finds the demo's secret through its config's
``env_file``, and starts the embedded Redis itself (``/healthz`` answers 200). Each page state is
saved as a screenshot, desktop (1280x800) and phone (390x844), under ``tests/artifacts/``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from reminders import models, redis_conn, state_db
from tests import services
from tests.test_demo import NOW
from tests.test_preferences_browser import REMINDERS, chromium  # noqa: F401 - a fixture

ARTIFACTS = Path(__file__).parent / "artifacts" / "customer-pages"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
DEMO_BASE = "http://127.0.0.1:8000"
# The staff-facing descriptions of the demo's rules: never on a customer's page.
DESCRIPTIONS = ("Tell customers", "Text patients", "Remind card holders", "Right after an order")


@dataclass
class DemoWeb:
    folder: Path
    base: str
    preferences: str
    unsubscribe: str
    customer: str

    def local(self, url: str) -> str:
        """A link of the demo's messages, on the port this test serves it on."""
        return url.replace(DEMO_BASE, self.base)


def _environment() -> dict[str, str]:
    env = dict(os.environ, REMINDERS_NOW=NOW)
    for name in ("REMINDERS_CONFIG", "REMINDERS_SECRET", "REMINDERS_SECRET_PREVIOUS"):
        env.pop(name, None)  # the demo's own secret, from its folder, is the one that counts
    return env


@pytest.fixture
def demo_web(tmp_path: Path) -> Iterator[DemoWeb]:
    done = subprocess.run(
        [REMINDERS, "demo"],
        cwd=tmp_path,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    doors = dict(
        re.findall(r"^    (preferences|unsubscribe) +(http\S+)$", done.stdout, re.MULTILINE)
    )
    customer = re.search(r"then open the pages of (\w+) \(customer (\d+)\)", done.stdout)
    assert customer and set(doors) == {"preferences", "unsubscribe"}, done.stdout
    folder = tmp_path / "demo"
    port = services.free_port()
    web = subprocess.Popen(
        [REMINDERS, "-c", "demo/config.yaml", "web", "--port", str(port), "--workers", "1"],
        cwd=tmp_path,
        env=_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(web, base)
        yield DemoWeb(folder, base, doors["preferences"], doors["unsubscribe"], customer.group(2))
    finally:
        web.send_signal(signal.SIGTERM)
        try:
            web.wait(30)
        except subprocess.TimeoutExpired:
            web.kill()
            web.wait(10)
        redis_conn.EmbeddedRedis(folder / ".reminders").stop(save=False)


def _wait_until_up(web: subprocess.Popen[str], base: str) -> None:
    """Until the endpoint answers (or the process exits, with what it said)."""
    for _ in range(600):
        if web.poll() is not None:
            pytest.fail(f"reminders web exited {web.returncode}: {web.stdout.read()}")  # type: ignore[union-attr]
        try:
            requests.get(f"{base}/healthz", timeout=2)
            return
        except requests.ConnectionError:
            time.sleep(0.1)
    pytest.fail("reminders web did not answer within 60 s")


def _shoot(page: Any, name: str) -> None:
    """The page as it stands, desktop then phone (checked for sideways scrolling on a phone)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size(DESKTOP)
    page.screenshot(path=str(ARTIFACTS / f"{name}-desktop.png"), full_page=True)
    page.set_viewport_size(PHONE)
    page.screenshot(path=str(ARTIFACTS / f"{name}-phone.png"), full_page=True)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), name
    page.set_viewport_size(DESKTOP)


def _history(folder: Path) -> list[tuple[str, str, str]]:
    engine = state_db.engine_for(f"sqlite:///{folder / 'reminders.db'}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    models.consent_event.c.channel,
                    models.consent_event.c.action,
                    models.consent_event.c.source,
                ).order_by(models.consent_event.c.id)
            )
            return [tuple(r) for r in rows]
    finally:
        engine.dispose()


def test_the_demos_links_open_the_customers_pages_and_round_trip_an_opt_out(
    chromium: Any,  # noqa: F811
    demo_web: DemoWeb,
) -> None:
    from playwright.sync_api import expect

    health = requests.get(f"{demo_web.base}/healthz", timeout=10)
    assert (health.status_code, health.json()["redis"]) == (200, "ok")  # web started Redis

    page = chromium.new_page(viewport=DESKTOP)
    page.goto(demo_web.local(demo_web.preferences))
    expect(page.get_by_role("banner")).to_have_text("Harbor Market")
    expect(page.get_by_role("heading", level=1)).to_have_text("Your reminders from Harbor Market")
    cards = page.locator("ul.upcoming li")
    for text in cards.all_inner_texts():
        assert not any(d in text for d in DESCRIPTIONS), text
    emails = page.locator("ul.reach li").filter(has_text="Emails")
    expect(emails).to_contain_text("on")
    kinds = page.get_by_role("group")
    expect(kinds.first.get_by_role("checkbox", name="Email")).to_be_checked()
    _shoot(page, "01-preferences")

    # The unsubscribe link: a page that asks, and a button that stops the emails.
    page.goto(demo_web.local(demo_web.unsubscribe))
    expect(page.get_by_role("heading", level=1)).to_have_text("Unsubscribe from Harbor Market")
    _shoot(page, "02-unsubscribe")
    page.get_by_role("button", name="Unsubscribe").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("You are unsubscribed")
    expect(page.get_by_role("status")).to_contain_text("no more emails from Harbor Market")
    _shoot(page, "03-unsubscribed")

    # The preferences page now says so: stopped, by what and when; the email switches are off.
    # Its link points at web.public_url (the demo's port 8000): followed on this test's port.
    href = page.get_by_role("link", name="Your reminder preferences").get_attribute("href")
    assert href is not None and href.startswith(f"{DEMO_BASE}/preferences/")
    page.goto(demo_web.local(href))
    emails = page.locator("ul.reach li").filter(has_text="Emails")
    expect(emails).to_contain_text("stopped")
    expect(emails).to_contain_text("You unsubscribed on our unsubscribe page on March 9, 2027.")
    email_switch = kinds.first.get_by_role("checkbox", name="Email")
    expect(email_switch).not_to_be_checked()
    expect(email_switch).to_be_disabled()
    _shoot(page, "04-preferences-email-stopped")

    # Opting back in, on the page: recorded as an opt-in from the preferences page.
    page.get_by_role("button", name="Send me emails again").click()
    expect(page.get_by_role("status")).to_have_text("Emails are back on.")
    expect(page.locator("ul.reach li").filter(has_text="Emails")).not_to_contain_text("stopped")
    expect(kinds.first.get_by_role("checkbox", name="Email")).to_be_checked()
    _shoot(page, "05-preferences-resumed")
    assert _history(demo_web.folder) == [
        ("email", "opt_out", "unsubscribe"),
        ("email", "opt_in", "preferences"),
    ]

    # A switch turned off and saved.
    kinds.first.get_by_role("checkbox", name="Email").uncheck()
    page.get_by_role("button", name="Save my choices").click()
    expect(page.get_by_role("status")).to_have_text("Your choices are saved.")
    expect(kinds.first.get_by_role("checkbox", name="Email")).not_to_be_checked()
    _shoot(page, "06-preferences-saved")

    # A link cut short: the customer's error page, with the business's name.
    page.goto(demo_web.local(demo_web.preferences)[:-6])
    expect(page.get_by_role("heading", level=1)).to_have_text("Link not valid")
    expect(page.get_by_role("banner")).to_have_text("Harbor Market")
    _shoot(page, "07-link-not-valid")
