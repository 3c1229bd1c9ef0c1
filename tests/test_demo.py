"""``reminders demo``: it runs, sends every kind of reminder, nothing twice, and says what it did.

The demo runs for real: its generated business, SQLite state DB, embedded Redis, burst worker and
outbox. The clock is fixed (``REMINDERS_NOW``) at a time when it is daytime in most of the demo's
zones, so the story's texts are not held back by quiet hours.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from reminders import clock, links, phone, sms
from reminders.config import load_config
from reminders.demo import data, run
from reminders.errors import PermanentError
from reminders.lifecycle import CANCELED, FAILED, SENT

NOW = "2027-03-09T17:00:00Z"  # noon in New York, 9:00 in Los Angeles, 17:00 in London
RULES = {"renewal-due", "refill-due", "bill-due", "duplicate-purchase", "order-follow-up"}
FULL_NUMBER = re.compile(r"\+\d{10,}")
FULL_EMAIL = re.compile(r"\b[a-z]+\.[a-z]+\d*@example\.com")


@pytest.fixture
def demo_now(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(clock.ENV, NOW)
    # The demo's env_file puts its REMINDERS_SECRET in this process' environment: set and
    # removed here, so it is removed again after the test (monkeypatch restores the absence).
    monkeypatch.setenv(links.SECRET_ENV, "restored after the test")
    monkeypatch.delenv(links.SECRET_ENV)
    return NOW


@pytest.fixture
def report(tmp_path: Path, demo_now: str) -> run.Report:
    printed: list[str] = []
    result = run.run(tmp_path / "demo", echo=printed.append)
    result.printed = printed  # type: ignore[attr-defined]
    return result


def _by_id(report: run.Report) -> dict[int, dict]:
    return {r["id"]: r for r in report.reminders}


def test_the_demo_sends_every_kind_of_reminder_once(report: run.Report) -> None:
    sent_rules = Counter(line["rule"] for line in report.sent)
    assert set(sent_rules) == RULES
    ids = [line["reminder_id"] for line in report.sent]
    assert len(ids) == len(set(ids)), "a reminder was sent twice"
    reminders = _by_id(report)
    keys = [(line["rule"], reminders[line["reminder_id"]]["occurrence"]) for line in report.sent]
    offsets = [(k, reminders[i]["offset"]) for k, i in zip(keys, ids, strict=True)]
    assert len(offsets) == len(set(offsets))
    # Every reminder the outbox has is recorded as sent, on the channel it went by, and back.
    assert {r["id"] for r in report.reminders if r["status"] == SENT} == set(ids)
    for line in report.sent:
        assert reminders[line["reminder_id"]]["channel"] == line["channel"]
        if line["channel"] == "sms":
            info = sms.segments(line["body"])
            assert (info.encoding, info.segments) == ("GSM-7", 1), line["body"]
        else:
            assert line["subject"] and line["body"].startswith(("Hi ", "Hola "))


def test_the_demo_shows_what_customers_did_meanwhile(report: run.Report) -> None:
    story = report.generated.story
    assert len(report.acts) == 4
    sent_ids = {line["reminder_id"] for line in report.sent}
    expected = {
        ("renewal-due", f"{story.renews}:"),
        ("refill-due", f"{story.refills}:"),
        ("bill-due", str(story.pays)),
        ("order-follow-up", str(story.calls_support)),
    }
    due = [r for r in report.reminders if r["planned_at"] <= report.now]
    for rule, key in expected:
        (row,) = [
            r
            for r in due
            if r["rule"] == rule
            and (r["occurrence"].startswith(key) if key.endswith(":") else r["occurrence"] == key)
        ]
        assert row["status"] == CANCELED and "check" in row["reason"], row
        assert row["id"] not in sent_ids


def test_the_demo_falls_back_and_fails_visibly(report: run.Report) -> None:
    story = report.generated.story
    due = [r for r in report.reminders if r["planned_at"] <= report.now]
    (typo,) = [r for r in due if r["customer_id"] == str(story.invalid_phone)]
    assert (typo["rule"], typo["status"], typo["channel"]) == ("refill-due", SENT, "email")
    assert "not a valid number" in typo["reason"]
    (nobody,) = [r for r in due if r["customer_id"] == str(story.no_contact)]
    assert nobody["status"] == FAILED and "no usable channel" in nobody["reason"]


def test_the_demo_tells_duplicates_from_purchases_made_on_purpose(report: run.Report) -> None:
    story = report.generated.story
    told = {int(r["occurrence"]) for r in report.reminders if r["rule"] == "duplicate-purchase"}
    assert told == set(story.duplicates)
    sent = {line["reminder_id"] for line in report.sent if line["rule"] == "duplicate-purchase"}
    assert len(sent) == len(story.duplicates)
    (owned_request, owned), (new_request, new) = report.checks
    assert owned_request == {
        "customer_id": story.checkout_owned[0],
        "sku": story.checkout_owned[1],
    }
    assert owned["duplicate"] is True and "You already bought" in owned["message"]
    assert new_request["sku"] == story.checkout_new[1] and new == {"duplicate": False}


def test_the_demo_prints_its_story_with_masked_addresses(report: run.Report) -> None:
    printed = "\n".join(report.printed)  # type: ignore[attr-defined]
    for heading in ("SENT:", "NOT SENT", "SCHEDULED for the next 7 days", "CHECKOUT:"):
        assert heading in printed
    assert str(report.outbox) in printed
    assert "provider: twilio" in printed and "provider: smtp" in printed
    assert FULL_NUMBER.findall(printed) == []
    assert FULL_EMAIL.findall(printed) == []
    assert "+1******" in printed and "@example.com" in printed
    # The story's acts, and each reason a reminder was not sent as planned, are in the printout.
    for act in report.acts:
        assert act in printed
    assert "no usable channel" in printed and "not a valid number" in printed
    assert re.search(r"Done in \d+\.\d s\.", printed)


def test_the_demo_ends_with_the_way_to_a_customers_pages(report: run.Report) -> None:
    printed = report.printed  # type: ignore[attr-defined]
    start = printed.index(
        "SEE IT AS A CUSTOMER: the links in the emails open pages served by the web endpoint."
    )
    door = printed[start:]
    assert door[1].startswith("  Start each in a terminal")
    assert door.pop(2) == f"    web endpoint  reminders -c {report.folder}/config.yaml web"
    assert door.pop(2) == f"    console       reminders -c {report.folder}/config.yaml console"
    email = next(line for line in report.sent if line["channel"] == "email")
    customer = next(r for r in report.reminders if r["id"] == email["reminder_id"])
    assert door[2] == (
        f"  then open the pages of {customer['data']['first_name']} (customer "
        f"{customer['customer_id']}), who got the email above:"
    )
    doors = dict(report.doors)
    assert door[3] == f"    preferences  {doors['preferences']}"
    assert door[4] == f"    unsubscribe  {doors['unsubscribe']}"
    assert door[5] == "    health       http://127.0.0.1:8000/healthz"
    assert re.fullmatch(r"Done in \d+\.\d s\.", printed[-1])
    # The links are the customer's own, signed with the demo's secret, and in the email itself.
    config = load_config(report.config_path)
    token = doors["preferences"].removeprefix("http://127.0.0.1:8000/preferences/")
    assert links.read_preferences(token) == str(customer["customer_id"])
    link = links.read_unsubscribe(doors["unsubscribe"].rsplit("/", 1)[1])
    assert (link.channel, link.address) == ("email", None)  # no address in the link itself
    stop = links.match_address(link, [email["to"]])
    assert stop is not None and (stop.channel, stop.address) == ("email", email["to"])
    assert "Stop these emails: http://127.0.0.1:8000/unsubscribe/" in email["body"]
    assert config.web.business_name == "Harbor Market"


def test_the_demo_keeps_its_secret_readable_by_its_owner_only(tmp_path: Path) -> None:
    assert _demo(tmp_path).returncode == 0
    env = tmp_path / "demo" / ".env"
    assert env.stat().st_mode & 0o777 == 0o600
    secret = env.read_text()
    assert re.search(r"^REMINDERS_SECRET=[\w-]{43}$", secret, re.MULTILINE)
    assert _demo(tmp_path).returncode == 0
    assert env.read_text() == secret  # kept: links from the last run still open


def test_the_demo_leaves_no_server_running(report: run.Report) -> None:
    from reminders import redis_conn

    server = redis_conn.embedded(load_config(report.config_path))
    assert not server.running()


def _demo(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, REMINDERS_NOW=NOW)
    env.pop("REMINDERS_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-c", "from reminders.cli import main; main()", "demo", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _outbox(folder: Path) -> list[dict]:
    with (folder / "outbox.jsonl").open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_the_command_runs_twice_with_fresh_data(tmp_path: Path) -> None:
    first = _demo(tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""
    folder = tmp_path / "demo"
    sent = _outbox(folder)
    assert {line["rule"] for line in sent} == RULES
    second = _demo(tmp_path)
    assert second.returncode == 0, second.stderr
    again = _outbox(folder)
    # Fresh data, the same seed and clock: the same messages, not appended to the last run's.
    assert [(m["rule"], m["to"], m["body"]) for m in again] == [
        (m["rule"], m["to"], m["body"]) for m in sent
    ]
    strip = re.compile(r"Done in .*")
    assert strip.sub("", second.stdout) == strip.sub("", first.stdout)


def test_the_demo_keeps_edited_templates_until_reset(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    done = _demo(tmp_path, "--dir", "mine")
    assert done.returncode == 0, done.stdout + done.stderr
    template = folder / "templates" / "duplicate-purchase.email.j2"
    template.write_text(
        template.read_text().replace("You already own", "Bought twice? You already own")
    )
    done = _demo(tmp_path, "--dir", "mine")
    assert done.returncode == 0, done.stdout + done.stderr
    subjects = [m["subject"] for m in _outbox(folder) if m["rule"] == "duplicate-purchase"]
    assert subjects and all(s.startswith("Bought twice? ") for s in subjects), done.stdout
    done = _demo(tmp_path, "--dir", "mine", "--reset")
    assert done.returncode == 0, done.stdout + done.stderr
    subjects = [m["subject"] for m in _outbox(folder) if m["rule"] == "duplicate-purchase"]
    assert subjects and all(s.startswith("You already own ") for s in subjects), done.stdout


def test_the_demo_refuses_a_folder_that_is_not_its_own(tmp_path: Path) -> None:
    (tmp_path / "project").mkdir()
    precious = tmp_path / "project" / "reminders.db"
    precious.write_text("not the demo's")
    result = _demo(tmp_path, "--dir", "project")
    assert result.returncode == 2
    assert "not a demo folder" in result.stderr
    assert precious.read_text() == "not the demo's"


def test_the_generator_dates_everything_relative_to_now(tmp_path: Path) -> None:
    """Two clocks 30 days apart (no DST change between): the same business, dates moved alike."""
    import sqlite3

    first = data.generate(tmp_path / "a.db", clock.parse_instant(NOW))
    later = data.generate(tmp_path / "b.db", clock.parse_instant("2027-02-07T17:00:00Z"))
    assert first.counts == later.counts and first.story == later.story
    a, b = sqlite3.connect(tmp_path / "a.db"), sqlite3.connect(tmp_path / "b.db")
    for table, column in (("bills", "due_on"), ("subscriptions", "expires_on")):
        query = f"SELECT julianday({column}) FROM {table} ORDER BY id"
        shifts = {
            round(y - x) for (x,), (y,) in zip(a.execute(query), b.execute(query), strict=True)
        }
        assert shifts == {-30}
    phones = [p for (p,) in a.execute("SELECT phone FROM customers WHERE phone IS NOT NULL")]
    assert len(phones) == len(set(phones))
    assert sum(1 for p in phones if p == data.INVALID_PHONE) == 1
    for number in phones:  # fictional, yet valid to the SMS channel: all but the one typo
        if number != data.INVALID_PHONE:
            phone.normalize(number)
    with pytest.raises(PermanentError):
        phone.normalize(data.INVALID_PHONE)
    zones = {z for (z,) in a.execute("SELECT DISTINCT timezone FROM customers")}
    assert len(zones - {None}) == len(data.ZONES) and None in zones


def test_the_demo_ends_with_how_to_open_its_console_and_its_user_logs_in(
    report: run.Report, tmp_path: Path
) -> None:
    """``reminders console`` (granian, 2 workers) on the demo's data, as the printout says."""
    import re as re_
    import signal
    import time

    import requests

    from tests import services

    printed = report.printed  # type: ignore[attr-defined]
    text = "\n".join(printed)
    login = report.console
    assert f"    console       reminders -c {report.folder}/config.yaml console" in printed
    assert (
        f"  and the console, for staff: http://127.0.0.1:8001, log in as demo, password "
        f"{login['password']} (an operator; kept in " in text
    )
    port = services.free_port()
    # Nothing to export: the console reads the demo's secret from its env_file, as `web` does.
    env = {k: v for k, v in os.environ.items() if k != "REMINDERS_SECRET"}
    env["REMINDERS_NOW"] = NOW
    env.pop("REMINDERS_CONFIG", None)
    command = [sys.executable, "-c", "from reminders.cli import main; main()"]
    log = tmp_path / "console.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [*command, "-c", str(report.config_path), "console", "--port", str(port),
             "--workers", "2"],
            env=env, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        client = requests.Session()
        deadline = time.monotonic() + 60
        while True:
            try:
                form = client.get(f"{base}/login", timeout=5)
                break
            except requests.ConnectionError:
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        token = re_.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert token is not None
        done = client.post(
            f"{base}/login",
            data={"name": "demo", "password": login["password"], "csrf_token": token.group(1)},
            allow_redirects=False,
        )
        assert done.status_code == 302, done.text
        overview = client.get(f"{base}/")
        assert "Needs attention" in overview.text
        stats = client.get(f"{base}/api/v1/stats?days=1").json()
        assert sum(stats["days"][0]["sent"].values()) == len(report.sent)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
