"""The console's pages in a real headless Chromium (Debian's, driven by Playwright), on the known
data of tests/console_fixtures.py: log in, every page renders its charts and tables with no
console error and no request leaving the machine, an operator retries, cancels and pauses with
the keyboard, and a phone-sized viewport never scrolls sideways. Screenshots are kept in
tests/artifacts/console/ (desktop 1280x800, phone 390x844)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.console_fixtures import OPERATOR, PASSWORD, Console, serve_console
from tests.test_preferences_browser import chromium  # noqa: F401 - a fixture

ARTIFACTS = Path(__file__).parent / "artifacts" / "console"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
PAGES = {
    "overview": "/",
    "rules": "/rules",
    "rule": "/rules/refill-due",
    "forecast": "/rules/refill-due/forecast",
    "search": "/reminders?customer_id=7",
    "reminder": "/reminders/1",
    "missed": "/missed?days=3",
    "audit": "/audit",
}


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Console]:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    yield from serve_console(tmp_path, url, monkeypatch)


class Watched:
    """A page whose console errors and requests are recorded; requests off the machine fail."""

    def __init__(self, browser: Any, site: Console, viewport: dict[str, int]) -> None:
        self.site = site
        self.errors: list[str] = []
        self.elsewhere: list[str] = []
        self.page = browser.new_page(viewport=viewport)
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.route("**/*", self._route)

    def _route(self, route: Any) -> None:
        url = route.request.url
        if url.startswith(self.site.base) or url.startswith("data:"):
            route.continue_()
        else:
            self.elsewhere.append(url)
            route.abort()

    def goto(self, path: str) -> Any:
        self.page.goto(f"{self.site.base}{path}")
        return self.page

    def log_in(self) -> None:
        page = self.goto("/")
        assert page.url.startswith(f"{self.site.base}/login")
        page.get_by_label("Name").fill(OPERATOR)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_label("Password").press("Enter")
        page.wait_for_url(f"{self.site.base}/")

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def clean(self) -> None:
        assert self.errors == []
        assert self.elsewhere == []


def test_every_page_on_a_desktop_and_an_operators_day(
    chromium: Any,  # noqa: F811 - the fixture imported above
    site: Console,
) -> None:
    from playwright.sync_api import expect

    w = Watched(chromium, site, DESKTOP)
    w.goto("/")
    w.shot("desktop-login")
    w.log_in()
    page = w.page
    expect(page.get_by_role("heading", level=1)).to_have_text("Overview")
    attention = page.get_by_role("region", name="Needs attention")
    expect(attention).to_contain_text("2 failed")
    expect(attention).to_contain_text("1 stuck in sending")
    expect(attention).to_contain_text("1 due, not sent")
    expect(attention).to_contain_text("oldest 2 h")
    expect(page.locator("svg.chart")).to_have_count(4)
    sent = page.get_by_role("img", name="Messages sent per day by channel")
    expect(sent.locator("rect")).to_have_count(2)  # one text on 03-09, one email on 03-08
    expect(page.get_by_role("img", name="Pending reminders per send day by rule").locator(
        "rect")).to_have_count(3)  # fmt: skip
    w.shot("desktop-overview")

    page.get_by_role("navigation", name="Console").get_by_role("link", name="Rules").click()
    rows = page.locator("table tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.first).to_contain_text("refill-due")
    w.shot("desktop-rules")
    page.get_by_role("link", name="refill-due").click()
    expect(page.get_by_role("heading", level=1)).to_contain_text("refill-due")
    coming = page.get_by_role("region", name="Coming up, next 14 days")
    expect(coming.locator("svg rect")).to_have_count(2)  # 03-10 by text, 03-11 by text
    outcomes = page.get_by_role("region", name="Outcomes")
    expect(outcomes.locator("tbody tr")).to_have_count(1)
    expect(outcomes.locator("tbody tr")).to_contain_text("-3d")
    scans = page.get_by_role("region", name="Last scans")
    expect(scans).to_contain_text("1 × runs_out_on: not a date or datetime")
    preview = page.get_by_role("region", name="Preview on real rows")
    expect(preview.locator("article").first).to_contain_text("Hi Jane, your Lisinopril runs out")
    w.shot("desktop-rule")
    coming.get_by_role("link", name="The forecast").click()
    rows = page.locator("tbody tr")
    expect(rows).to_have_count(14)
    # 03-10: reminder 6, Ann's number opted out: by email; 03-11: reminder 7 by text.
    expect(rows.nth(0)).to_have_text("2027-03-10 0 1 0 0 0 0 0".replace(" ", ""))
    expect(rows.nth(1)).to_have_text("2027-03-11 1 0 0 0 0 0 0".replace(" ", ""))
    w.shot("desktop-forecast")
    page.go_back()

    # Pause with the keyboard: focus the button, press Enter.
    page.get_by_role("button", name="Pause refill-due").focus()
    page.keyboard.press("Enter")
    expect(page.get_by_role("status")).to_contain_text("Rule refill-due is paused")
    expect(page.get_by_role("button", name="Resume refill-due")).to_be_visible()

    page.get_by_role("link", name="Search").click()
    page.get_by_label("Customer id").fill("7")
    page.get_by_label("Customer id").press("Enter")
    expect(page.get_by_role("status")).to_have_text("3 reminders")
    w.shot("desktop-search")
    page.get_by_role("link", name="1", exact=True).click()
    timeline = page.get_by_role("region", name="Timeline").locator("li")
    expect(timeline).to_have_count(6)
    expect(timeline.last).to_contain_text("replied 'DONE' (done)")
    expect(page.get_by_role("region", name="Messages")).to_contain_text("SM0001")
    expect(page.get_by_role("button", name="Retry")).to_have_count(0)  # delivered
    w.shot("desktop-reminder")

    w.goto("/reminders/3")
    page.get_by_role("button", name="Retry").focus()
    page.keyboard.press("Enter")
    expect(page.get_by_role("status")).to_contain_text("Reminder #3 is back to pending")
    expect(page.get_by_role("heading", level=1)).to_contain_text("pending")
    w.goto("/reminders/6")
    page.get_by_role("button", name="Cancel").click()
    expect(page.get_by_role("status")).to_contain_text("Reminder #6 is canceled")

    w.goto(PAGES["missed"])
    expect(page.locator(".cards")).to_contain_text("1 expired past grace")
    expect(page.get_by_role("region", name="Rows the scans skipped, by reason")).to_contain_text(
        "customer_id"
    )
    w.shot("desktop-missed")
    w.goto("/audit")
    rows = page.locator("tbody tr")
    expect(rows.nth(0)).to_contain_text("cancel")
    expect(rows.nth(1)).to_contain_text("retry")
    expect(rows.nth(2)).to_contain_text("pause")
    expect(rows.nth(0)).to_contain_text(OPERATOR)
    w.shot("desktop-audit")
    w.goto("/")
    expect(page.get_by_role("region", name="Needs attention")).to_contain_text("1 paused rule")
    w.clean()


def test_every_page_on_a_phone(
    chromium: Any,  # noqa: F811 - the fixture imported above
    site: Console,
) -> None:
    w = Watched(chromium, site, PHONE)
    w.log_in()
    for name, path in PAGES.items():
        page = w.goto(path)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), name
        w.shot(f"phone-{name}")
    w.clean()


def test_the_keyboard_reaches_everything_from_the_top(
    chromium: Any,  # noqa: F811 - the fixture imported above
    site: Console,
) -> None:
    w = Watched(chromium, site, DESKTOP)
    w.log_in()
    page = w.goto("/rules")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    order = []
    for _ in range(8):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.textContent.trim()"))
    assert order[:7] == ["reminders", "Overview", "Rules", "Search", "Missed", "Audit", "Log out"]
    w.clean()
