"""A business project in a temporary folder, for the rules engine's tests.

``Project`` builds what a business has: its own database (SQLite, PostgreSQL or MariaDB) with
patients and
prescriptions, ``config.yaml``, ``rules/*.yaml`` and ``templates/``; it runs the real command line
in-process (``reminders.cli.main``) or as a child process, and reads the state DB back.

The default data, at the default ``NOW`` (2027-03-10 12:00 UTC), in America/New_York:

| rx | patient | drug        | runs_out_on | zone              |
| -- | ------- | ----------- | ----------- | ----------------- |
| 1  | 1 Ann   | Lisinopril  | 2027-03-17  | (config default)  |
| 2  | 2 Bob   | Metformin   | 2027-03-20  | America/Chicago   |
| 3  | 3 Cy    | Atorvastatin| 2027-03-25  | Europe/Berlin     |

US daylight saving time starts on 2027-03-14, so "-3d at 10:00" for rx 1 is 10:00 EDT = 14:00Z.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa

from reminders import business_db, clock, models, mysql, state_db
from tests import services

NOW = "2027-03-10T12:00:00Z"

# Both channels write to one outbox file.
OUTBOX_CHANNELS = """\
channels:
  sms:
    provider: outbox
    path: outbox.jsonl
  email:
    provider: outbox
    path: outbox.jsonl
"""


def config_yaml(
    source: str = "{source}",
    state: str = "{state}",
    *,
    redis: str | None = None,
    rules: str = "rules/",
    templates: str = "templates/",
    settings: str = "",
    channels: str = OUTBOX_CHANNELS,
) -> str:
    """The tests' ``config.yaml`` text (New York, sending 09:00-20:00); ``settings`` is YAML put
    between ``templates`` and ``channels``. Left as ``{source}``/``{state}`` by default, to be
    filled in with ``str.format``."""
    text = (
        "timezone: America/New_York\n"
        'send_window: "09:00-20:00"\n'
        f"source:\n  url: {source}\nstate:\n  url: {state}\n"
    )
    if redis is not None:
        text += f"redis:\n  url: {redis}\n"
    return text + f"rules: {rules}\ntemplates: {templates}\n" + settings + channels


CONFIG = config_yaml()


def refills_yaml(
    *,
    description: str | None = "Text patients 3 days before their prescription runs out.",
    offsets: str = "[-3d, 0d]",
) -> str:
    """The ``refill-due`` rule file: each refillable prescription, at 10:00 by SMS and email."""
    head = "rules:\n  - name: refill-due\n"
    if description is not None:
        head += f"    description: {description}\n"
    return head + (
        """\
    query: |
      SELECT rx.id AS rx_id, rx.drug_name, rx.runs_out_on,
             p.id AS customer_id, p.first_name, p.phone, p.email, p.timezone
      FROM prescriptions rx JOIN patients p ON p.id = rx.patient_id
      WHERE rx.refills_left > 0
      ORDER BY rx.id
    occurrence: "{{ rx_id }}"
    due: runs_out_on
"""
        f"    offsets: {offsets}\n"
        """\
    at: "10:00"
    channels: [sms, email]
    template: refill-due
"""
    )


# Line numbers matter: tests point at them (offsets is line 12).
REFILLS = refills_yaml()

SMS_TEMPLATE = "Hi {{ first_name }}, your {{ drug_name }} runs out on {{ runs_out_on }}.\n"
EMAIL_TEMPLATE = """\
{% block subject %}Your {{ drug_name }} runs out soon{% endblock %}
{% block text %}Hi {{ first_name }}, your {{ drug_name }} runs out on {{ runs_out_on }}.
{% endblock %}
"""

SCHEMA = (
    """CREATE TABLE patients (
        id INTEGER PRIMARY KEY, first_name TEXT, phone TEXT, email TEXT, timezone TEXT)""",
    """CREATE TABLE prescriptions (
        id INTEGER PRIMARY KEY, patient_id INTEGER NOT NULL, drug_name TEXT NOT NULL,
        runs_out_on DATE, refills_left INTEGER NOT NULL DEFAULT 1)""",
)
PATIENTS = [
    {"id": 1, "first_name": "Ann", "phone": "+15005550006", "email": "ann@example.com",
     "timezone": None},
    {"id": 2, "first_name": "Bob", "phone": "+15005550007", "email": "bob@example.com",
     "timezone": "America/Chicago"},
    {"id": 3, "first_name": "Cy", "phone": "+15005550008", "email": "cy@example.com",
     "timezone": "Europe/Berlin"},
]  # fmt: skip
PRESCRIPTIONS = [
    {"id": 1, "patient_id": 1, "drug_name": "Lisinopril", "runs_out_on": "2027-03-17"},
    {"id": 2, "patient_id": 2, "drug_name": "Metformin", "runs_out_on": "2027-03-20"},
    {"id": 3, "patient_id": 3, "drug_name": "Atorvastatin", "runs_out_on": "2027-03-25"},
]

STATE_TABLES = (
    models.reminder,
    models.event,
    models.scan_run,
    models.skipped_row,
    models.message,
    models.optout,
    models.preference,
    models.inbound,
)


@dataclass
class Result:
    """What one command did: its exit code and its output."""

    code: int
    out: str
    err: str

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}--- stderr\n{self.err}"


def date_value(text: str | None, backend: str) -> Any:
    """A due date as the business DB would hold it (text in SQLite, a date in PostgreSQL)."""
    if text is None or backend == "sqlite":
        return text
    from datetime import date

    return date.fromisoformat(text)


class Project:
    """A business's project folder: its DB, config, rules and templates; runs the CLI on it."""

    def __init__(self, root: Path, backend: str = "sqlite", pg_url: str | None = None) -> None:
        """``pg_url``: the server database of a "postgresql" or "mariadb" backend."""
        self.root = root
        self.backend = backend
        if backend in ("sqlite", "mariadb"):
            self.source_config_url = "sqlite:///business.db"
            self.state_config_url = "sqlite:///reminders.db"
            self.business_url = f"sqlite:///{root / 'business.db'}"
            self.state_url = f"sqlite:///{(root / 'reminders.db').resolve()}"
        if backend == "mariadb":
            # The engine's own tables cannot live in MySQL or MariaDB: the state DB stays SQLite.
            assert pg_url is not None
            self.source_config_url = self.business_url = pg_url
        elif backend == "postgresql":
            assert pg_url is not None
            # The engine's tables live in the business's own database, under their prefix.
            self.source_config_url = self.state_config_url = pg_url
            self.business_url = pg_url
            self.state_url = pg_url.replace("postgresql://", "postgresql+psycopg://")
        self._business: sa.Engine | None = None
        self._state: sa.Engine | None = None

    # -- files ---------------------------------------------------------------------------------

    def write(self, relative: str, text: str) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text) if text.startswith("\n") else text)
        return path

    def read(self, relative: str) -> str:
        return (self.root / relative).read_text()

    def write_config(self, text: str | None = None, **fields: str) -> Path:
        body = (text or CONFIG).format(
            source=self.source_config_url, state=self.state_config_url, **fields
        )
        return self.write("config.yaml", body)

    def setup(self, *, rules: str = REFILLS, data: bool = True) -> Project:
        """The default project: config, one rule file, its templates and the business DB."""
        self.write_config()
        self.write("rules/refills.yaml", rules)
        self.write("templates/refill-due.sms.j2", SMS_TEMPLATE)
        self.write("templates/refill-due.email.j2", EMAIL_TEMPLATE)
        if data:
            self.create_business()
        return self

    # -- the business DB -----------------------------------------------------------------------

    @property
    def business(self) -> sa.Engine:
        """A writable engine on the business DB, for the test's own changes."""
        if self._business is None:
            url = self.business_url
            self._business = sa.create_engine(
                mysql.engine_url(url) if self.backend == "mariadb" else url
            )
        return self._business

    def create_business(self) -> None:
        with self.business.begin() as conn:
            for ddl in SCHEMA:
                conn.exec_driver_sql(ddl)
            conn.execute(sa.text(_insert_sql("patients", PATIENTS[0])), PATIENTS)
            conn.execute(
                sa.text(_insert_sql("prescriptions", PRESCRIPTIONS[0])),
                [dict(p, runs_out_on=self.due(p["runs_out_on"])) for p in PRESCRIPTIONS],
            )

    def due(self, text: str | None) -> Any:
        return date_value(text, self.backend)

    def refillable(self, count: int) -> None:
        """Only ``count`` patients, one refillable prescription each, due 2027-03-20 (with the
        default rule's two offsets, two reminders each)."""
        self.sql("DELETE FROM prescriptions")
        self.sql("DELETE FROM patients")
        self.sql(
            "INSERT INTO patients (id, first_name, phone, email, timezone) "
            "VALUES (:id, :name, :phone, :email, NULL)",
            [
                {
                    "id": i,
                    "name": f"P{i}",
                    "phone": f"+1212555{i:04d}",
                    "email": f"p{i}@example.com",
                }
                for i in range(1, count + 1)
            ],
        )
        self.sql(
            "INSERT INTO prescriptions (id, patient_id, drug_name, runs_out_on) "
            "VALUES (:id, :id, 'Lisinopril', :due)",
            [{"id": i, "due": self.due("2027-03-20")} for i in range(1, count + 1)],
        )

    def sql(self, statement: str, params: Mapping[str, Any] | list[Any] | None = None) -> None:
        """Run a statement on the business DB, committed."""
        with self.business.begin() as conn:
            conn.execute(sa.text(statement), params or {})

    def business_rows(self, statement: str) -> list[tuple[Any, ...]]:
        with self.business.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(statement))]

    # -- the state DB --------------------------------------------------------------------------

    @property
    def state(self) -> sa.Engine:
        if self._state is None:
            self._state = sa.create_engine(self.state_url)
        return self._state

    def rows(self, table: sa.Table, *order: Any) -> list[dict[str, Any]]:
        with self.state.connect() as conn:
            query = sa.select(table).order_by(*(order or (table.c.id,)))
            return [dict(r) for r in conn.execute(query).mappings()]

    def reminders(self) -> list[dict[str, Any]]:
        r = models.reminder
        return self.rows(r, r.c.rule, r.c.occurrence, r.c.offset)

    def by_key(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Reminders by (occurrence, offset)."""
        return {(r["occurrence"], r["offset"]): r for r in self.reminders()}

    def events(self) -> list[dict[str, Any]]:
        return self.rows(models.event)

    def skipped(self) -> list[dict[str, Any]]:
        return self.rows(models.skipped_row)

    def scan_runs(self) -> list[dict[str, Any]]:
        return self.rows(models.scan_run)

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        """Every row of every state table (empty lists before `db upgrade`), to compare."""
        found: dict[str, list[dict[str, Any]]] = {}
        inspector = sa.inspect(self.state)
        names = set(inspector.get_table_names())
        for table in STATE_TABLES:
            found[table.name] = self.rows(table) if table.name in names else []
        found["tables"] = [{"name": n} for n in sorted(names)]
        return found

    # -- the command line ----------------------------------------------------------------------

    def run(
        self,
        *args: str,
        now: str | None = NOW,
        config: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> Result:
        """Run ``reminders [-c config.yaml] [--now NOW] ARGS`` in this process.

        The environment (``--now`` sets REMINDERS_NOW in-process) is restored afterwards, so one
        command's clock never leaks into the next.
        """
        from reminders.cli import main

        argv: list[str] = []
        if config:
            argv += ["-c", str(self.root / "config.yaml")]
        if now is not None:
            argv += ["--now", now]
        argv += list(args)
        saved = {k: os.environ.get(k) for k in (clock.ENV, "REMINDERS_CONFIG", *(env or {}))}
        out, err = io.StringIO(), io.StringIO()
        code: int | str | None = 0
        # Each command is a fresh process in real life: templates compiled by an earlier command
        # of this test (cached per process) must not hide the test's edits.
        from reminders import render

        getattr(render, "_ENVIRONMENTS", {}).clear()
        try:
            os.environ.update(env or {})
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    main(argv)
                except SystemExit as exc:
                    code = exc.code
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        return Result(code if isinstance(code, int) else 1, out.getvalue(), err.getvalue())

    def ok(self, *args: str, **kwargs: Any) -> Result:
        """Run a command that must exit 0."""
        result = self.run(*args, **kwargs)
        assert result.code == 0, str(result)
        return result

    def command(self, *args: str, now: str | None = NOW) -> list[str]:
        """The argv of the installed ``reminders`` command (for child processes)."""
        argv = [sys.executable, "-c", "from reminders.cli import main; main()"]
        argv += ["-c", str(self.root / "config.yaml")]
        if now is not None:
            argv += ["--now", now]
        return argv + list(args)

    def spawn(self, *args: str, now: str | None = NOW, **kwargs: Any) -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if k not in (clock.ENV, "REMINDERS_CONFIG")}
        return subprocess.Popen(
            self.command(*args, now=now),
            cwd=self.root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kwargs,
        )

    def close(self) -> None:
        for engine in (self._business, self._state):
            if engine is not None:
                engine.dispose()
        # The engine keeps one engine per URL for the process; a finished test's are let go.
        database = "/" + self.business_url.rsplit("/", 1)[-1]
        mine = str(self.root) if self.backend == "sqlite" else database
        state_db.dispose_engines(str(self.root) if self.backend == "mariadb" else mine)
        business_db.dispose_engines(mine)


def _insert_sql(table: str, example: Mapping[str, Any]) -> str:
    columns = ", ".join(example)
    values = ", ".join(f":{c}" for c in example)
    return f"INSERT INTO {table} ({columns}) VALUES ({values})"


P = TypeVar("P", bound=Project)


@contextlib.contextmanager
def made_at(root: Path, backend: str, make: Callable[..., P]) -> Iterator[P]:
    """A project made by ``make`` on ``backend``, closed afterwards: ``make(root)`` on SQLite,
    ``make(root, backend, url)`` on a throw-away PostgreSQL or MariaDB database."""
    if backend == "sqlite":
        project = make(root)
        try:
            yield project
        finally:
            project.close()
        return
    with services.business_database(backend) as url:
        project = make(root, backend, url)
        try:
            yield project
        finally:
            project.close()


@contextlib.contextmanager
def project_at(root: Path, backend: str) -> Iterator[Project]:
    """A project on ``backend`` ("sqlite", or "postgresql" or "mariadb": a throw-away database)."""
    with made_at(root, backend, Project) as project:
        yield project


# The business DBs the engine reads. On MariaDB the state DB is SQLite (its tables need SQLite or
# PostgreSQL); on the others it is the same kind of database as the business's.
BUSINESS_BACKENDS = ["sqlite", "postgresql", "mariadb"]
BACKENDS = pytest.mark.parametrize("backend", BUSINESS_BACKENDS)


@pytest.fixture(params=BUSINESS_BACKENDS)
def project(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Project]:
    """The default project on SQLite, PostgreSQL (business DB and state DB alike) and MariaDB
    (the state DB on SQLite)."""
    with project_at(tmp_path, request.param) as made:
        yield made.setup()


@pytest.fixture
def lite(tmp_path: Path) -> Iterator[Project]:
    """The default project on SQLite only (for what does not depend on the database)."""
    with project_at(tmp_path, "sqlite") as made:
        yield made.setup()
