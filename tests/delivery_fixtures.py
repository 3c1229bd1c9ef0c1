"""A business project wired for delivery: real Redis, the Twilio stub, an SMTP server.

``Shop`` extends the rules engine's ``Project``: ``n`` patients whose prescriptions all run out on
``DUE`` (a reminder each at 10:00 New York time, ``SEND_AT``), a config whose SMS channel is the
real ``twilio`` library pointed at :class:`tests.twilio_stub.TwilioStub` and whose email channel is
SMTP to an aiosmtpd server, and Redis database 3, 4 or 5 (the delivery tests' own, one per test run
at a time).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from reminders import models
from tests import services
from tests.channel_fixtures import Mailbox, SmtpServer, _start
from tests.rules_fixtures import SCHEMA, Project, Result, config_yaml, made_at, refills_yaml
from tests.twilio_stub import ACCOUNT_SID, AUTH_TOKEN, TwilioStub

REDIS_DBS = (3, 4, 5)  # the delivery tests' own Redis databases
OWN_DB = os.environ.get("REMINDERS_TEST_DELIVERY_REDIS_DB")  # pin one instead
REDIS_DB = int(OWN_DB or REDIS_DBS[0])
DUE = "2027-03-10"
SCAN_AT = "2027-03-10T12:00:00Z"  # 07:00 in New York: before the reminders
SEND_AT = "2027-03-10T15:00:00Z"  # 10:00 EST, when the reminders are due
SENDER = "+15005550006"

CONFIG = config_yaml(
    redis="{redis}",
    settings="""\
requeue_after: 5m
batch_size: {batch_size}
retries:
  max_attempts: {max_attempts}
  backoff: 10s
  max_backoff: 1m
""",
    channels="""\
channels:
  sms:
    provider: twilio
    account_sid: {account_sid}
    auth_token: {auth_token}
    from: "{sender}"
    api_url: {twilio}
{sms_extra}  email:
    provider: smtp
    host: 127.0.0.1
    port: {smtp_port}
    from: "Acme Pharmacy <care@example.com>"
    timeout: 5s
""",
)

RULES = refills_yaml(description=None, offsets="[0d]")


def rules_with_check(query: str) -> str:
    """``RULES`` with a ``check`` query after the template."""
    return RULES.replace(
        "    template: refill-due\n", f"    template: refill-due\n    check: {query}\n"
    )


SMS_TEMPLATE = "Hi {{ first_name }}, your {{ drug_name }} runs out on {{ runs_out_on|date }}.\n"
EMAIL_TEMPLATE = """\
{% block subject %}Your {{ drug_name }} runs out soon{% endblock %}
{% block text %}Hi {{ first_name }}, your {{ drug_name }} runs out on {{ runs_out_on|date }}.
{% endblock %}
"""


def phone_of(number: int) -> str:
    """A valid US number for patient ``number`` (NANP 555-01xx style, spread over area codes)."""
    return f"+1{212 + number // 10000:03d}555{number % 10000:04d}"


class Shop(Project):
    """A project whose reminders go out through real servers."""

    def __init__(
        self,
        root: Path,
        redis_url: str,
        stub: TwilioStub,
        smtp: SmtpServer,
        backend: str = "sqlite",
        pg_url: str | None = None,
    ) -> None:
        super().__init__(root, backend, pg_url)
        self.redis_url = redis_url
        self.stub = stub
        self.smtp = smtp

    def configure(
        self,
        *,
        batch_size: int = 100,
        max_attempts: int = 5,
        sms_extra: str = "",
        extra: str = "",
        rules: str = RULES,
        sms_template: str = SMS_TEMPLATE,
    ) -> Shop:
        """Write config, rules and templates; ``extra`` is appended to the config (YAML)."""
        body = CONFIG.format(
            source=self.source_config_url,
            state=self.state_config_url,
            redis=self.redis_url,
            batch_size=batch_size,
            max_attempts=max_attempts,
            account_sid=ACCOUNT_SID,
            auth_token=AUTH_TOKEN,
            sender=SENDER,
            twilio=self.stub.url,
            smtp_port=self.smtp.port,
            sms_extra=sms_extra,
        )
        self.write("config.yaml", body + extra)
        self.write("rules/refills.yaml", rules)
        self.write("templates/refill-due.sms.j2", sms_template)
        self.write("templates/refill-due.email.j2", EMAIL_TEMPLATE)
        return self

    def patients(self, count: int, **overrides: Any) -> list[dict[str, Any]]:
        """Create ``count`` patients, one prescription each, all due on ``DUE``."""
        people = [
            {
                "id": i,
                "first_name": f"P{i}",
                "phone": phone_of(i),
                "email": f"p{i}@example.com",
                "timezone": None,
                **{k: (v(i) if callable(v) else v) for k, v in overrides.items()},
            }
            for i in range(1, count + 1)
        ]
        with self.business.begin() as conn:
            for ddl in SCHEMA:
                conn.exec_driver_sql(ddl)
            conn.execute(
                sa.text(
                    "INSERT INTO patients (id, first_name, phone, email, timezone) "
                    "VALUES (:id, :first_name, :phone, :email, :timezone)"
                ),
                people,
            )
            conn.execute(
                sa.text(
                    "INSERT INTO prescriptions (id, patient_id, drug_name, runs_out_on) "
                    "VALUES (:id, :id, 'Lisinopril', :due)"
                ),
                [{"id": p["id"], "due": self.due(DUE)} for p in people],
            )
        return people

    def prepare(self, count: int, **overrides: Any) -> list[dict[str, Any]]:
        """Patients, the state DB and a scan: ``count`` reminders pending for ``SEND_AT``."""
        people = self.patients(count, **overrides)
        self.ok("db", "upgrade", now=SCAN_AT)
        self.ok("scan", now=SCAN_AT)
        return people

    def worker(self, *args: str, now: str = SEND_AT) -> Result:
        """Run ``reminders worker --burst`` in this process."""
        return self.ok("worker", "--burst", *args, now=now)

    def status_of(self) -> dict[int, dict[str, Any]]:
        return {r["id"]: r for r in self.rows(models.reminder)}

    def statuses(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for row in self.rows(models.reminder):
            found[row["status"]] = found.get(row["status"], 0) + 1
        return found

    def messages(self) -> list[dict[str, Any]]:
        return self.rows(models.message)

    def spawn_worker(self, *args: str, now: str = SEND_AT) -> subprocess.Popen[str]:
        return self.spawn("worker", "--burst", *args, now=now, start_new_session=True)


@contextlib.contextmanager
def shop_at(
    root: Path, backend: str, redis_url: str, stub: TwilioStub, smtp: SmtpServer
) -> Iterator[Shop]:
    """A shop on ``backend`` ("sqlite", or a throw-away PostgreSQL database holding the business
    and state DB alike), closed afterwards."""

    def make(folder: Path, *database: str) -> Shop:
        return Shop(folder, redis_url, stub, smtp, *database)

    with made_at(root, backend, make) as shop:
        yield shop


def finish(process: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    """Wait for a child process; kill it (and fail) when it overruns ``timeout`` seconds."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"child process overran {timeout} s\n{out}\n{err}")
    return process.returncode, out, err


def wait_until(predicate: Any, timeout: float = 60, interval: float = 0.02) -> None:
    """Poll ``predicate`` until it is true; fail after ``timeout`` seconds (no timing asserted)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not reached within {timeout} s")
        time.sleep(interval)


@contextlib.contextmanager
def _locked_db() -> Iterator[int]:
    """One of the delivery tests' Redis databases, held with a file lock for this test.

    Two test runs on one machine (two shells, two engineers) would otherwise flush each other's
    database and run each other's jobs; each takes a free one of 3, 4 and 5, or waits for 3.
    """
    candidates = [REDIS_DB] if OWN_DB else list(REDIS_DBS)
    folder = Path(tempfile.gettempdir())
    handle = None
    for db in candidates:
        handle = (folder / f"reminders-test-redis-{db}.lock").open("w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            handle.close()
            handle = None
    if handle is None:  # every one is busy: wait for the first
        db = candidates[0]
        handle = (folder / f"reminders-test-redis-{db}.lock").open("w")
        fcntl.flock(handle, fcntl.LOCK_EX)
    try:
        yield db
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


@pytest.fixture
def delivery_redis() -> Iterator[str]:
    """A flushed Redis database of the delivery tests (3, 4 or 5), flushed afterwards."""
    with _locked_db() as db, services.flushed_redis(db) as url:
        yield url


@pytest.fixture
def mailbox_server() -> Iterator[SmtpServer]:
    """A plain SMTP server recording what it accepts."""
    controller, server = _start(Mailbox())
    try:
        yield server
    finally:
        controller.stop()


@pytest.fixture
def stub() -> Iterator[TwilioStub]:
    with TwilioStub() as running:
        yield running


@pytest.fixture(params=["sqlite", "postgresql"])
def any_shop(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    delivery_redis: str,
    stub: TwilioStub,
    mailbox_server: SmtpServer,
) -> Iterator[Shop]:
    """The shop on SQLite, and with its business and state DB on PostgreSQL; batches of 5."""
    with shop_at(tmp_path, request.param, delivery_redis, stub, mailbox_server) as project:
        yield project.configure(batch_size=5)


@pytest.fixture
def shop(
    tmp_path: Path, delivery_redis: str, stub: TwilioStub, mailbox_server: SmtpServer
) -> Iterator[Shop]:
    project = Shop(tmp_path, delivery_redis, stub, mailbox_server)
    try:
        yield project.configure()
    finally:
        project.close()
