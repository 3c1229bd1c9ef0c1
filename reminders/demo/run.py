"""``reminders demo``: the whole flow on embedded defaults, in a folder of its own.

In ``folder`` (default ``./demo``): the config, the example rules and templates (copied once, so
the user may edit them and run again; ``--reset`` copies the shipped ones anew), the business's
database (generated fresh on every run, dated relative to now), the state DB, the embedded Redis'
files and the outbox. Then: migrate, scan, let a few customers act (one renews, one refills early,
one pays, one calls support), dispatch, run a worker in burst mode, and print what was sent, what
was not and why, what is scheduled for the next days, and a checkout's duplicate check.

Every run starts from fresh data: the previous run's databases, queue and outbox are removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from reminders import clock, codec, phone, store
from reminders.app import App
from reminders.config import Config
from reminders.errors import InputError, Problem
from reminders.lifecycle import CANCELED, FAILED, PENDING, SENT
from reminders.models import reminder

from . import RULES, TEMPLATES, data

MARKER = ".reminders-demo"  # marks a folder as the demo's: only such a folder is ever wiped
CONFIG = """\
# The demo's config, written by `reminders demo`. Edit rules/ and templates/ here and run the demo
# again: it keeps your copies (`reminders demo --reset` brings back the shipped ones).
timezone: America/New_York            # for customers whose row names no zone
send_window: "09:00-20:00"
source:
  url: sqlite:///business.db          # Harbor Market's data, regenerated on every run
state:
  url: sqlite:///reminders.db
# No redis.url: the embedded Redis (in .reminders/ beside this file) holds the queues.
rules: rules/
templates: templates/
channels:
  sms:
    provider: outbox                  # real texts: see the end of the demo's output
    path: outbox.jsonl
  email:
    provider: outbox
    path: outbox.jsonl
    from: "Harbor Market <care@example.com>"
"""
REAL_PROVIDERS = """\
To send for real, set the channels in {config} and the secrets in the environment:

  channels:
    sms:
      provider: twilio
      account_sid: ${{TWILIO_ACCOUNT_SID}}
      auth_token: ${{TWILIO_AUTH_TOKEN}}
      from: ${{TWILIO_FROM}}            # your Twilio number; or messaging_service_sid: MG...
    email:
      provider: smtp
      host: smtp.example.com
      port: 587
      security: starttls
      username: ${{SMTP_USERNAME}}
      password: ${{SMTP_PASSWORD}}
      from: "Harbor Market <care@example.com>"

  export TWILIO_ACCOUNT_SID=AC... TWILIO_AUTH_TOKEN=... TWILIO_FROM=+1...
  export SMTP_USERNAME=... SMTP_PASSWORD=...
  reminders -c {config} validate
  reminders -c {config} scan
  reminders -c {config} dispatch
  reminders -c {config} worker --burst
"""
# What a run leaves behind, removed before the next one.
RUN_FILES = ("business.db", "reminders.db", "outbox.jsonl")
SHOWN_PER_RULE = 6  # messages printed per rule; the outbox has them all
SCHEDULE_DAYS = 7


@dataclass
class Report:
    """What a demo run did, for the printout and for tests."""

    folder: Path
    now: datetime
    generated: data.Generated
    acts: list[str]
    scanned: list[dict[str, Any]]
    sent: list[dict[str, Any]]  # the outbox's lines
    reminders: list[dict[str, Any]]  # every reminder: id, rule, occurrence, offset, status, ...
    checks: list[tuple[dict[str, Any], dict[str, Any]]]  # (request, answer)
    console: dict[str, str] = field(default_factory=dict)  # user, password, secret
    seconds: float = 0.0
    statuses: Counter[str] = field(default_factory=Counter)

    @property
    def config_path(self) -> Path:
        return self.folder / "config.yaml"

    @property
    def outbox(self) -> Path:
        return self.folder / "outbox.jsonl"


# --- the folder -----------------------------------------------------------------------------------


def prepare(folder: Path, reset: bool = False) -> Path:
    """Make ``folder`` the demo's: config, rules and templates in place, last run's data gone.

    Refuses a folder that holds other files and is not the demo's (it would wipe them).
    """
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / MARKER
    if not marker.exists() and any(folder.iterdir()):
        raise InputError(
            Problem(
                f"{folder} is not empty and is not a demo folder: pick a new folder "
                "(reminders demo --dir PATH); the demo replaces the databases in it"
            )
        )
    marker.write_text("This folder is `reminders demo`'s: each run replaces its data.\n")
    from reminders.config import load_config

    config_file = folder / "config.yaml"
    if config_file.exists():
        # The previous run's embedded Redis may still be up: stop it before removing its files.
        # An edited config that no longer loads has no Redis to stop (--reset writes it anew).
        with contextlib.suppress(InputError):
            _stop_redis(load_config(config_file))
    shutil.rmtree(folder / ".reminders", ignore_errors=True)
    for name in RUN_FILES:
        for suffix in ("", "-wal", "-shm", "-journal"):
            (folder / f"{name}{suffix}").unlink(missing_ok=True)
    if reset or not config_file.exists():
        config_file.write_text(CONFIG)
    for source, name in ((RULES, "rules"), (TEMPLATES, "templates")):
        target = folder / name
        if reset and target.exists():
            shutil.rmtree(target)
        if not target.exists():
            shutil.copytree(source, target)
    return config_file


# --- the run --------------------------------------------------------------------------------------


def run(
    folder: Path | str = "demo",
    *,
    reset: bool = False,
    customers: int = 300,
    echo: Callable[[str], None] = print,
) -> Report:
    """Run the demo in ``folder`` and print as it goes; returns what happened."""
    from reminders.checks import run_check
    from reminders.dispatch import dispatch
    from reminders.jobs import resolve_queues, run_worker
    from reminders.scan import scan_all

    started = time.monotonic()
    folder = Path(folder).resolve()
    config_file = prepare(folder, reset)
    now = clock.now()
    shown = _relative(folder)
    echo(f"Harbor Market, a demo business, in {shown}/ (the time is {clock.iso_utc(now)})")
    echo("")

    generated = data.generate(folder / "business.db", now, customers=customers)
    counts = generated.counts
    echo(
        f"1. Generated its data in {shown}/business.db: {counts['customers']} customers in "
        f"{len(data.ZONES)} time zones, {counts['subscriptions']} subscriptions and warranties, "
        f"{counts['prescriptions']} prescriptions, {counts['bills']} card statements, "
        f"{counts['orders']} orders."
    )

    app = App(config_file)
    app.ruleset  # noqa: B018 - a broken edited rule stops the demo here, with file and line
    store.upgrade(app.config.state_url)
    echo(f"2. Created the state DB ({shown}/reminders.db) and scanned the rules:")
    scanned = []
    for result in scan_all(app):
        scanned.append(result.as_dict())
        echo(
            f"   {result.rule:20} {result.rows:4} rows -> {result.created:4} reminders scheduled"
            + (f", {result.too_late} already past" if result.too_late else "")
            + (f", {result.skipped} rows skipped" if result.skipped else "")
        )
        if result.error:
            echo(f"   error: {result.error}")

    acts = data.meanwhile(folder / "business.db", generated.story, now)
    echo("3. Meanwhile, before anything was sent:")
    for act in acts:
        echo(f"   - {act}")

    dispatched = dispatch(app, now)
    echo(
        f"4. Dispatched {dispatched.enqueued} due reminders to the embedded Redis; "
        "a worker (burst mode) sent them to the outbox."
    )
    # The report below says what failed and why; the worker's own log lines would repeat it.
    quiet = logging.NullHandler()
    logging.getLogger("reminders").addHandler(quiet)
    try:
        run_worker(app, resolve_queues(app.config, ()), burst=True, logging_level="WARNING")
    finally:
        logging.getLogger("reminders").removeHandler(quiet)

    sent = _outbox(folder / "outbox.jsonl")
    rows = _reminders(app)
    checks = []
    for customer_id, sku in (generated.story.checkout_owned, generated.story.checkout_new):
        request = {"customer_id": customer_id, "sku": sku}
        checks.append((request, run_check(app, "already-owned", request)))
    _stop_redis(app.config)
    login = _console_login(app, folder, now)

    report = Report(folder, now, generated, acts, scanned, sent, rows, checks, login)
    report.statuses = Counter(r["status"] for r in rows)
    report.seconds = time.monotonic() - started
    _print(report, echo)
    return report


CONSOLE_LOGIN = "console-login.json"  # the demo's console user and secret, kept across runs


def _console_login(app: App, folder: Path, now: datetime) -> dict[str, str]:
    """A console user on the demo's state DB (an operator), with a password and a session
    secret made on the first run and kept in the demo folder, so every run prints the same."""
    from reminders import accounts

    path = folder / CONSOLE_LOGIN
    try:
        login = json.loads(path.read_text())
    except (OSError, ValueError):
        login = {}
    if not isinstance(login, dict) or not {"user", "password", "secret"} <= set(login):
        login = {
            "user": "demo",
            "password": secrets.token_urlsafe(12),
            "secret": secrets.token_urlsafe(32),
        }
        path.write_text(json.dumps(login) + "\n")
        os.chmod(path, 0o600)
    with app.state.begin() as conn:
        accounts.add_user(conn, login["user"], "operator", login["password"], now=now)
    return {k: str(login[k]) for k in ("user", "password", "secret")}


def _stop_redis(config: Config) -> None:
    """Shut the config's embedded Redis down, if it runs; its data is not needed again."""
    from reminders import redis_conn

    redis_conn.embedded(config).stop(save=False)


def _relative(folder: Path) -> str:
    try:
        return str(folder.relative_to(Path.cwd())) or "."
    except ValueError:
        return str(folder)


def _outbox(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _reminders(app: App) -> list[dict[str, Any]]:
    r = reminder
    query = sa.select(
        r.c.id,
        r.c.rule,
        r.c.occurrence,
        r.c.offset,
        r.c.customer_id,
        r.c.planned_at,
        r.c.send_at,
        r.c.status,
        r.c.channel,
        r.c.reason,
        r.c.data,
    ).order_by(r.c.send_at, r.c.id)
    with app.state.connect() as conn:
        found = []
        for row in conn.execute(query).mappings():
            item = dict(row)
            item["data"] = codec.loads(item["data"]) if item["data"] else {}
            found.append(item)
    return found


# --- the printout ---------------------------------------------------------------------------------


def _print(report: Report, echo: Callable[[str], None]) -> None:
    shown = _relative(report.folder)
    echo("")
    echo(f"SENT: {len(report.sent)} messages (all of them in {shown}/outbox.jsonl)")
    by_rule: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in report.sent:
        by_rule[line["rule"]].append(line)
    for rule in sorted(by_rule):
        lines = by_rule[rule]
        echo(f"  {rule} ({len(lines)})")
        for line in lines[:SHOWN_PER_RULE]:
            to = phone.mask_address(line["channel"], line["to"])
            text = line["body"] if line["channel"] == "sms" else f"Subject: {line['subject']}"
            echo(f"    {line['channel']:5} {to:24} {text}")
        if len(lines) > SHOWN_PER_RULE:
            echo(f"    ... and {len(lines) - SHOWN_PER_RULE} more")
    email = next((line for line in report.sent if line["channel"] == "email"), None)
    if email:
        echo("")
        echo(f"  One email in full, to {phone.mask_address('email', email['to'])}:")
        echo(f"    Subject: {email['subject']}")
        for text in email["body"].splitlines():
            echo(f"    {text}".rstrip())

    echo("")
    echo("NOT SENT, or not as planned, and why:")
    due = [r for r in report.reminders if r["planned_at"] <= report.now]
    for item in sorted(
        (
            r
            for r in due
            if r["status"] in (CANCELED, FAILED) or (r["reason"] and r["status"] == SENT)
        ),
        key=lambda r: (r["status"], r["rule"], r["id"]),
    ):
        name = item["data"].get("first_name", "?")
        why = item["reason"] or f"{item['status']}: no reason recorded"
        if item["status"] == SENT:
            why = f"sent by {item['channel']}: {why}"
        elif item["status"] == CANCELED and "check" in why:
            why += " (see 3. above)"
        echo(
            f"  {item['rule']:20} {item['offset']:4} {name} (customer {item['customer_id']}): {why}"
        )
    deferred = Counter(
        str(r["reason"]) for r in due if r["status"] == PENDING and r["send_at"] > report.now
    )
    for reason, count in sorted(deferred.items()):
        echo(f"  {count} text{'s' if count > 1 else ''} {reason}")
    too_late = sum(s["too_late"] for s in report.scanned)
    if too_late:
        echo(f"  ({too_late} reminders were already more than a day late at the scan: not created)")

    echo("")
    echo(f"SCHEDULED for the next {SCHEDULE_DAYS} days (UTC dates):")
    horizon = report.now + timedelta(days=SCHEDULE_DAYS)
    upcoming = [
        r
        for r in report.reminders
        if r["status"] == PENDING and report.now < r["planned_at"] <= horizon
    ]
    per_day: dict[str, Counter[str]] = defaultdict(Counter)
    for item in upcoming:
        per_day[item["send_at"].strftime("%a %b %d")][item["rule"]] += 1
    for day, rules in per_day.items():
        parts = ", ".join(f"{count} {rule}" for rule, count in sorted(rules.items()))
        echo(f"  {day}: {parts}")
    later = sum(1 for r in report.reminders if r["status"] == PENDING and r["send_at"] > horizon)
    echo(f"  and {later} more later on (reminders -c {shown}/config.yaml list --status pending)")

    echo("")
    echo("CHECKOUT: before the customer pays, the shop asks whether they already own the item")
    for request, answer in report.checks:
        echo(f"  POST /v1/checks/already-owned {json.dumps(request)}")
        echo(f"    -> {json.dumps(answer)}")
    echo(
        f"  (the same from the command line: reminders -c {shown}/config.yaml check "
        "already-owned customer_id=... sku=...)"
    )

    echo("")
    echo(f"Outbox: {report.outbox}")
    echo(
        f"Look around: reminders -c {shown}/config.yaml status | list | preview RULE; "
        f"edit {shown}/rules/ and {shown}/templates/ and run the demo again."
    )
    echo("")
    echo(REAL_PROVIDERS.format(config=f"{shown}/config.yaml").rstrip())
    echo("")
    echo(f"Done in {report.seconds:.1f} s.")
    login = report.console
    if login:
        echo("")
        echo("CONSOLE: see all of this in a browser (the secret signs its session cookies)")
        echo(f"  export REMINDERS_SECRET={login['secret']}")
        echo(f"  reminders -c {shown}/config.yaml console")
        echo(
            f"  then open http://127.0.0.1:8001 and log in as {login['user']}, password "
            f"{login['password']} (an operator; kept in {shown}/{CONSOLE_LOGIN})"
        )
