"""Scanning, end to end through the command line, on SQLite, PostgreSQL and MariaDB.

Every test here runs the real ``reminders`` command on a real business DB and a real state DB (both
SQLite, or both PostgreSQL: the engine's tables then live in the business's database under their
prefix; or MariaDB and a SQLite state DB), at a fixed ``--now``. See ``tests/rules_fixtures.py``
for the data.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from reminders import codec, lifecycle, models
from reminders.clock import parse_instant
from tests.rules_fixtures import NOW, REFILLS, Project, lite, project, project_at

__all__ = ["lite", "project"]


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def scan(p: Project, *args: str, now: str = NOW) -> list[dict[str, Any]]:
    """Run ``scan --json`` (exit 0 required) and return its counts, one dict a rule."""
    return p.ok("scan", "--json", *args, now=now).json_lines()


def counts(p: Project, *args: str, now: str = NOW) -> dict[str, int]:
    (only,) = scan(p, *args, now=now)
    return {k: v for k, v in only.items() if k not in ("rule", "error", "kind")}


def send_times(p: Project) -> dict[tuple[str, str], tuple[str, str]]:
    """(occurrence, offset) -> (status, planned time as ISO UTC)."""
    from reminders.clock import iso_utc

    return {k: (r["status"], iso_utc(r["planned_at"])) for k, r in p.by_key().items()}


EXPECTED = {
    ("1", "-3d"): ("pending", "2027-03-14T14:00:00Z"),  # 10:00 EDT, the day DST starts
    ("1", "0d"): ("pending", "2027-03-17T14:00:00Z"),
    ("2", "-3d"): ("pending", "2027-03-17T15:00:00Z"),  # 10:00 CDT (the row's zone)
    ("2", "0d"): ("pending", "2027-03-20T15:00:00Z"),
    ("3", "-3d"): ("pending", "2027-03-22T09:00:00Z"),  # 10:00 CET, Berlin is not on DST yet
    ("3", "0d"): ("pending", "2027-03-25T09:00:00Z"),
}


@pytest.fixture
def scanned(project: Project) -> Project:
    """The default project, migrated and scanned once at NOW."""
    project.ok("db", "upgrade")
    assert counts(project)["created"] == 6
    return project


# --- creating, idempotence ------------------------------------------------------------------------


def test_a_scan_creates_one_reminder_per_row_and_offset(scanned: Project) -> None:
    assert send_times(scanned) == EXPECTED
    reminder = scanned.by_key()[("1", "-3d")]
    assert reminder["customer_id"] == "1"
    assert reminder["send_at"] == reminder["planned_at"]
    assert (reminder["channel"], reminder["reason"], reminder["attempts"]) == (None, None, 0)
    data = codec.loads(reminder["data"])
    assert data["first_name"] == "Ann" and data["drug_name"] == "Lisinopril"
    assert str(data["runs_out_on"]) == "2027-03-17"
    (run,) = scanned.scan_runs()
    assert (run["rule"], run["status"], run["rows"], run["created"]) == ("refill-due", "done", 3, 6)


def test_scanning_three_times_creates_nothing_more(scanned: Project) -> None:
    before = scanned.reminders()
    for _ in range(2):
        assert counts(scanned) == {
            "rows": 3,
            "created": 0,
            "moved": 0,
            "canceled": 0,
            "unchanged": 6,
            "skipped": 0,
            "too_late": 0,
            "off": 0,
            "restored": 0,
            "held": 0,
        }
    assert scanned.reminders() == before
    assert scanned.events() == []
    assert [r["status"] for r in scanned.scan_runs()] == ["done"] * 3


def test_the_human_output_prints_counts(scanned: Project) -> None:
    result = scanned.ok("scan")
    assert result.out == (
        "refill-due: 3 rows, 0 created, 0 moved, 0 canceled, 6 unchanged, 0 skipped, 0 too late\n"
    )


def _barrier_scan(p: Project, go: Path, ready: Path) -> subprocess.Popen[str]:
    """A child process that imports the engine, says it is ready, waits for ``go``, then scans."""
    script = (
        "import pathlib, sys, time\n"
        "from reminders.cli import main\n"
        "pathlib.Path(sys.argv[1]).touch()\n"
        "go = pathlib.Path(sys.argv[2])\n"
        "while not go.exists():\n"
        "    time.sleep(0.002)\n"
        "main(sys.argv[3:])\n"
    )
    argv = p.command("scan", "--json")[3:]  # drop the interpreter and its -c script
    return subprocess.Popen(
        [sys.executable, "-c", script, str(ready), str(go), *argv],
        cwd=p.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def scans_at_once(p: Project) -> list[dict[str, Any]]:
    """Two ``scan --json`` processes let go at the same moment; each one's counts (exit 0)."""
    go = p.root / "go"
    readies = [p.root / f"ready-{i}" for i in range(2)]
    children = [_barrier_scan(p, go, ready) for ready in readies]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in readies) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    outputs = [child.communicate(timeout=300) for child in children]
    for child, (out, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, f"{out}\n{err}"
    return [json.loads(out) for out, _ in outputs]


def test_two_scans_at_once_create_no_duplicates(project: Project) -> None:
    """Two real processes scan one business DB into one state DB at the same moment."""
    rows = 3000
    project.sql("DELETE FROM prescriptions")
    project.sql(
        "INSERT INTO prescriptions (id, patient_id, drug_name, runs_out_on) "
        "VALUES (:id, :patient, :drug, :due)",
        [
            {"id": i, "patient": 1 + i % 3, "drug": f"drug {i}", "due": project.due("2027-04-01")}
            for i in range(1, rows + 1)
        ],
    )
    project.ok("db", "upgrade")
    results = scans_at_once(project)
    assert sum(r["created"] for r in results) == 2 * rows
    assert all(r["rows"] == rows and r["error"] is None for r in results)
    assert all(r["created"] + r["unchanged"] <= 2 * rows for r in results)
    reminders = project.reminders()
    assert len(reminders) == 2 * rows
    assert len({(r["occurrence"], r["offset"]) for r in reminders}) == 2 * rows
    assert {r["status"] for r in reminders} == {"pending"}
    assert project.events() == []
    assert [r["status"] for r in project.scan_runs()] == ["done", "done"]
    after = counts(project)  # and the state they left is whole: a rescan finds it all in line
    assert (after["created"], after["unchanged"]) == (0, 2 * rows)


# --- moves, new occurrences, vanished rows --------------------------------------------------------

MOVED = "moved: the due date changed"
VANISHED = "canceled: the occurrence is no longer returned by the rule's query"


def _events(p: Project) -> list[tuple[str, str, str | None, str, str | None]]:
    """(occurrence, offset, from, to, reason) of every recorded change, in order."""
    keys = {r["id"]: (r["occurrence"], r["offset"]) for r in p.reminders()}
    return [
        (*keys[e["reminder_id"]], e["from_status"], e["to_status"], e["reason"]) for e in p.events()
    ]


def test_a_changed_due_date_moves_the_pending_reminders(scanned: Project) -> None:
    ids = {k: r["id"] for k, r in scanned.by_key().items()}
    scanned.sql(
        "UPDATE prescriptions SET runs_out_on = :d WHERE id = 1", {"d": scanned.due("2027-03-19")}
    )
    assert counts(scanned) == {
        "rows": 3,
        "created": 0,
        "moved": 2,
        "canceled": 0,
        "unchanged": 4,
        "skipped": 0,
        "too_late": 0,
        "off": 0,
        "restored": 0,
        "held": 0,
    }
    after = scanned.by_key()
    assert {k: r["id"] for k, r in after.items()} == ids  # the same reminders, moved
    assert send_times(scanned) == EXPECTED | {
        ("1", "-3d"): ("pending", "2027-03-16T14:00:00Z"),
        ("1", "0d"): ("pending", "2027-03-19T14:00:00Z"),
    }
    assert after[("1", "-3d")]["send_at"] == utc("2027-03-16T14:00:00Z")
    assert after[("1", "-3d")]["reason"] == MOVED
    assert str(codec.loads(after[("1", "0d")]["data"])["runs_out_on"]) == "2027-03-19"
    assert _events(scanned) == [
        ("1", "-3d", "pending", "pending", MOVED),
        ("1", "0d", "pending", "pending", MOVED),
    ]


def test_a_date_in_the_occurrence_key_makes_a_new_occurrence_and_cancels_the_old(
    project: Project,
) -> None:
    project.write(
        "rules/refills.yaml",
        REFILLS.replace('"{{ rx_id }}"', '"{{ rx_id }}:{{ runs_out_on }}"'),
    )
    project.ok("db", "upgrade")
    assert counts(project)["created"] == 6
    assert ("1:2027-03-17", "-3d") in project.by_key()
    project.sql(
        "UPDATE prescriptions SET runs_out_on = :d WHERE id = 1", {"d": project.due("2027-04-16")}
    )
    assert counts(project) | {"unchanged": 0} == {
        "rows": 3,
        "created": 2,
        "moved": 0,
        "canceled": 2,
        "unchanged": 0,
        "skipped": 0,
        "too_late": 0,
        "off": 0,
        "restored": 0,
        "held": 0,
    }
    found = send_times(project)
    assert found[("1:2027-03-17", "-3d")] == ("canceled", "2027-03-14T14:00:00Z")
    assert found[("1:2027-03-17", "0d")] == ("canceled", "2027-03-17T14:00:00Z")
    assert found[("1:2027-04-16", "-3d")] == ("pending", "2027-04-13T14:00:00Z")
    assert found[("1:2027-04-16", "0d")] == ("pending", "2027-04-16T14:00:00Z")
    assert project.by_key()[("1:2027-03-17", "0d")]["reason"] == VANISHED
    assert _events(project) == [
        ("1:2027-03-17", "-3d", "pending", "canceled", VANISHED),
        ("1:2027-03-17", "0d", "pending", "canceled", VANISHED),
    ]


def test_a_vanished_row_cancels_its_open_reminders_with_the_reason(scanned: Project) -> None:
    state = scanned.state
    with state.begin() as conn:  # a dispatcher has queued one of them already
        conn.execute(
            models.reminder.update()
            .where(models.reminder.c.occurrence == "3", models.reminder.c.offset == "-3d")
            .values(status=lifecycle.QUEUED, job_id="job-1")
        )
    scanned.sql("UPDATE prescriptions SET refills_left = 0 WHERE id = 3")
    assert counts(scanned)["canceled"] == 2
    after = scanned.by_key()
    assert (after[("3", "-3d")]["status"], after[("3", "-3d")]["job_id"]) == ("canceled", None)
    assert after[("3", "0d")]["reason"] == VANISHED
    assert _events(scanned) == [
        ("3", "-3d", "queued", "canceled", VANISHED),
        ("3", "0d", "pending", "canceled", VANISHED),
    ]
    assert counts(scanned)["canceled"] == 0  # a canceled reminder stays canceled, once


def test_sent_and_final_reminders_are_left_alone(scanned: Project) -> None:
    with scanned.state.begin() as conn:
        conn.execute(
            models.reminder.update()
            .where(models.reminder.c.occurrence == "1")
            .values(status=lifecycle.SENT)
        )
    scanned.sql(
        "UPDATE prescriptions SET runs_out_on = :d WHERE id = 1", {"d": scanned.due("2027-03-19")}
    )
    assert counts(scanned)["moved"] == 0
    scanned.sql("DELETE FROM prescriptions WHERE id = 1")
    assert counts(scanned)["canceled"] == 0
    assert send_times(scanned)[("1", "-3d")] == ("sent", "2027-03-14T14:00:00Z")
    assert scanned.events() == []


def test_a_rescan_keeps_a_deferred_send_time_and_refreshes_the_row(scanned: Project) -> None:
    """Quiet hours or a retry moved send_at; the planned time is what a rescan compares."""
    deferred = utc("2027-03-15T12:00:00Z")
    with scanned.state.begin() as conn:
        conn.execute(
            models.reminder.update()
            .where(models.reminder.c.occurrence == "1", models.reminder.c.offset == "-3d")
            .values(send_at=deferred, attempts=1)
        )
    scanned.sql("UPDATE prescriptions SET drug_name = 'Lisinopril 10mg' WHERE id = 1")
    assert counts(scanned)["moved"] == 0
    reminder = scanned.by_key()[("1", "-3d")]
    assert reminder["send_at"] == deferred
    assert codec.loads(reminder["data"])["drug_name"] == "Lisinopril 10mg"


def test_an_offset_removed_from_the_rule_cancels_its_reminders(scanned: Project) -> None:
    scanned.write("rules/refills.yaml", REFILLS.replace("[-3d, 0d]", "[-3d]"))
    assert counts(scanned)["canceled"] == 3
    reasons = {r["reason"] for r in scanned.reminders() if r["offset"] == "0d"}
    assert reasons == {"canceled: offset 0d is no longer planned for it"}
    assert {r["status"] for r in scanned.reminders() if r["offset"] == "-3d"} == {"pending"}


def test_a_changed_send_time_in_the_rule_moves_every_reminder(scanned: Project) -> None:
    scanned.write("rules/refills.yaml", REFILLS.replace('at: "10:00"', 'at: "11:30"'))
    assert counts(scanned)["moved"] == 6
    assert send_times(scanned)[("1", "-3d")] == ("pending", "2027-03-14T15:30:00Z")


# --- grace ----------------------------------------------------------------------------------------


def test_a_reminder_already_past_grace_is_not_created(project: Project) -> None:
    project.ok("db", "upgrade")
    # rx 1's -3d was due 2027-03-14 14:00Z, 46 hours before this scan: past the 1d grace.
    later = "2027-03-16T12:00:00Z"
    assert counts(project, now=later) == {
        "rows": 3,
        "created": 5,
        "moved": 0,
        "canceled": 0,
        "unchanged": 0,
        "skipped": 0,
        "too_late": 1,
        "off": 0,
        "restored": 0,
        "held": 0,
    }
    assert ("1", "-3d") not in project.by_key()
    assert send_times(project)[("1", "0d")] == ("pending", "2027-03-17T14:00:00Z")
    # A new prescription whose -3d was 2 hours ago: within grace, so it is created.
    project.sql(
        "INSERT INTO prescriptions (id, patient_id, drug_name, runs_out_on) VALUES (4, 2, 'x', :d)",
        {"d": project.due("2027-03-19")},
    )
    assert counts(project, now="2027-03-16T17:00:00Z")["created"] == 2
    assert send_times(project)[("4", "-3d")] == ("pending", "2027-03-16T15:00:00Z")


def test_an_existing_reminder_past_grace_is_left_alone(scanned: Project) -> None:
    later = "2027-03-16T12:00:00Z"
    scanned.sql(
        "UPDATE prescriptions SET runs_out_on = :d WHERE id = 1", {"d": scanned.due("2027-03-18")}
    )
    result = counts(scanned, now=later)
    assert (result["moved"], result["canceled"], result["created"]) == (1, 0, 0)
    found = send_times(scanned)
    assert found[("1", "-3d")] == ("pending", "2027-03-14T14:00:00Z")  # past grace: untouched
    assert found[("1", "0d")] == ("pending", "2027-03-18T14:00:00Z")  # within: moved
    scanned.sql("DELETE FROM prescriptions WHERE id = 1")
    assert counts(scanned, now=later)["canceled"] == 1
    found = send_times(scanned)
    assert found[("1", "-3d")] == ("pending", "2027-03-14T14:00:00Z")
    assert found[("1", "0d")] == ("canceled", "2027-03-18T14:00:00Z")


# --- bad rows -------------------------------------------------------------------------------------

VISITS = """\
rules:
  - name: visit
    query: |
      SELECT ref, customer_id, due, tz AS timezone, phone, email FROM visits ORDER BY id
    occurrence: "{{ ref }}"
    due: due
    offsets: [-1d]
    at: "10:00"
    channels: [sms, email]
    template: refill-due
"""


def _visits(p: Project, rows: list[tuple[Any, ...]]) -> None:
    p.sql(
        "CREATE TABLE visits (id INTEGER PRIMARY KEY, ref TEXT, customer_id TEXT, due TEXT, "
        "tz TEXT, phone TEXT, email TEXT)"
    )
    p.sql(
        "INSERT INTO visits (id, ref, customer_id, due, tz, phone, email) "
        "VALUES (:id, :ref, :customer, :due, :tz, :phone, :email)",
        [
            dict(zip(("id", "ref", "customer", "due", "tz", "phone", "email"), r, strict=True))
            for r in rows
        ],
    )


def test_bad_rows_are_skipped_with_the_reason_recorded_and_the_scan_goes_on(
    project: Project,
) -> None:
    project.write("rules/refills.yaml", VISITS)
    _visits(
        project,
        [
            (1, "v1", "c1", "2027-03-20", None, "+15005550006", "a@example.com"),
            (2, "v2", "c2", None, None, "+15005550006", None),
            (3, "v3", "c3", "next tuesday", None, None, None),
            (4, "v4", "c4", "2027-03-20", "Mars/Olympus", None, None),
            (5, None, "c5", "2027-03-20", None, None, None),
            (6, "v6", None, "2027-03-20", None, None, None),
            (7, "v7", "c7", "2027-03-20T16:30:00", "Europe/Paris", None, None),  # no contact
            (8, "v8", "", "2027-03-20", None, None, None),
        ],
    )
    project.ok("db", "upgrade")
    result = project.ok("scan")
    assert result.out.splitlines() == [
        "visit: 8 rows, 2 created, 0 moved, 0 canceled, 0 unchanged, 6 skipped, 0 too late",
        "  skipped occurrence v2: due is empty: no due date",
        "  skipped occurrence v3: due = 'next tuesday' is not a date or datetime",
        '  skipped occurrence v4: timezone = "Mars/Olympus" is not an IANA time zone',
        "  skipped row 5: no occurrence key: column ref is missing or empty",
        "  skipped occurrence v6: no customer id: column customer_id is missing or empty",
        "  skipped occurrence v8: no customer id: column customer_id is missing or empty",
    ]
    skipped = [(s["row_number"], s["occurrence"], s["column"]) for s in project.skipped()]
    assert skipped == [
        (2, "v2", "due"),
        (3, "v3", "due"),
        (4, "v4", "timezone"),
        (5, None, "ref"),
        (6, "v6", "customer_id"),
        (8, "v8", "customer_id"),
    ]
    (run,) = project.scan_runs()
    assert {s["scan_run_id"] for s in project.skipped()} == {run["id"]}
    assert (run["status"], run["skipped"], run["created"]) == ("done", 6, 2)
    # A customer without a phone or an email is not a bad row: the reminder exists and will fail
    # visibly at send time.
    assert send_times(project) == {
        ("v1", "-1d"): ("pending", "2027-03-19T14:00:00Z"),
        ("v7", "-1d"): ("pending", "2027-03-19T09:00:00Z"),  # 10:00 Paris (CET)
    }
    assert counts(project)["skipped"] == 6  # every scan reports them again


def test_a_rule_query_without_the_due_column_fails_that_rule(project: Project) -> None:
    project.write("rules/refills.yaml", REFILLS.replace("rx.runs_out_on,", ""))
    project.ok("db", "upgrade")
    result = project.run("scan")
    assert result.code == 1
    assert result.err == (
        "error: rule refill-due (rules/refills.yaml:2): the query returns no column runs_out_on "
        "(it returns: rx_id, drug_name, customer_id, first_name, phone, email, timezone)\n"
    )
    assert project.reminders() == []


# --- failing and writing queries ------------------------------------------------------------------

BROKEN = """\
rules:
  - name: broken
    query: SELECT rx_id, due FROM no_such_table
    occurrence: "{{ rx_id }}"
    due: due
    offsets: [0d]
    channels: [sms]
    template: refill-due
"""


def test_a_failing_query_fails_its_rule_only_and_exits_1(project: Project) -> None:
    project.write("rules/broken.yaml", BROKEN)
    project.ok("db", "upgrade")
    result = project.run("scan")
    assert result.code == 1, result
    database = project.business_url.rsplit("/", 1)[-1]
    message = {
        "sqlite": "no such table: no_such_table",
        "postgresql": 'relation "no_such_table" does not exist',
        "mariadb": f"Table '{database}.no_such_table' doesn't exist",
    }[project.backend]
    assert result.err == f"error: rule broken: the query failed: {message}\n"
    assert "refill-due: 3 rows, 6 created" in result.out
    assert len(project.reminders()) == 6
    runs = {r["rule"]: r for r in project.scan_runs()}
    assert runs["broken"]["status"] == "failed"
    assert runs["broken"]["error"] == f"rule broken: the query failed: {message}"
    assert runs["refill-due"]["status"] == "done"


def test_a_rule_query_cannot_write_to_the_business_db(project: Project) -> None:
    write = {
        "sqlite": "UPDATE prescriptions SET refills_left = 0 RETURNING id AS rx_id, runs_out_on",
        "postgresql": "WITH w AS (UPDATE prescriptions SET refills_left = 0 RETURNING *) "
        "SELECT id AS rx_id, runs_out_on FROM w",
        "mariadb": "DELETE FROM prescriptions RETURNING id AS rx_id, runs_out_on",
    }[project.backend]
    project.write(
        "rules/broken.yaml",
        BROKEN.replace("SELECT rx_id, due FROM no_such_table", write).replace(
            "due: due", "due: runs_out_on"
        ),
    )
    project.ok("db", "upgrade")
    result = project.run("scan")
    assert result.code == 1
    assert result.err.startswith("error: rule broken: the query failed: ")
    assert project.business_rows("SELECT id FROM prescriptions WHERE refills_left > 0") == [
        (1,),
        (2,),
        (3,),
    ]
    assert {r["rule"] for r in project.reminders()} == {"refill-due"}


def test_a_sqlite_rule_query_cannot_attach_a_file_and_its_error_names_the_business_db(
    lite: Project,
) -> None:
    elsewhere = lite.root / "elsewhere.db"
    lite.write(
        "rules/broken.yaml",
        BROKEN.replace(
            "SELECT rx_id, due FROM no_such_table", f"ATTACH DATABASE '{elsewhere}' AS e"
        ),
    )
    lite.ok("db", "upgrade")
    result = lite.run("scan")
    assert result.code == 1, result
    assert result.err.startswith("error: rule broken: the query failed: not authorized: "), result
    assert "state DB" not in result.err
    assert not elsewhere.exists()


# --- recurrence -----------------------------------------------------------------------------------

MONTHLY = """\
rules:
  - name: statement
    query: SELECT id AS account_id, id AS customer_id, opened_on FROM accounts
    occurrence: "{{ account_id }}"
    due: opened_on
    recurrence: FREQ=MONTHLY;BYMONTHDAY=1
    offsets: [-2d]
    at: "10:00"
    channels: [email]
    template: refill-due
"""


def test_a_monthly_rule_makes_an_occurrence_per_date_within_the_horizon(project: Project) -> None:
    project.write("rules/refills.yaml", MONTHLY)
    project.sql("CREATE TABLE accounts (id INTEGER PRIMARY KEY, opened_on DATE)")
    project.sql("INSERT INTO accounts VALUES (7, :d)", {"d": project.due("2026-11-15")})
    project.ok("db", "upgrade")
    # Now 2027-03-10, horizon 60 days: the statements of April 1 and May 1 (March 1's is past).
    assert counts(project)["created"] == 2
    assert send_times(project) == {
        ("7@2027-04-01", "-2d"): ("pending", "2027-03-30T14:00:00Z"),
        ("7@2027-05-01", "-2d"): ("pending", "2027-04-29T14:00:00Z"),
    }
    assert counts(project)["created"] == 0
    # Four weeks later June 1 comes within the horizon; April's reminder is left alone.
    later = "2027-04-07T12:00:00Z"
    assert counts(project, now=later)["created"] == 1
    assert send_times(project)[("7@2027-06-01", "-2d")] == ("pending", "2027-05-30T14:00:00Z")
    assert send_times(project)[("7@2027-04-01", "-2d")] == ("pending", "2027-03-30T14:00:00Z")
    # The account is closed: its open reminders are canceled, the past one is left alone.
    project.sql("DELETE FROM accounts")
    assert counts(project, now=later)["canceled"] == 2
    statuses = {k[0]: v[0] for k, v in send_times(project).items()}
    assert statuses == {
        "7@2027-04-01": "pending",
        "7@2027-05-01": "canceled",
        "7@2027-06-01": "canceled",
    }


def test_a_date_becomes_an_occurrence_once_its_first_reminder_is_within_the_horizon(
    project: Project,
) -> None:
    rule = MONTHLY.replace("offsets: [-2d]", "offsets: [5d]").replace(
        "    offsets:", "    horizon: 24d\n    offsets:"
    )
    project.write("rules/refills.yaml", rule)
    project.sql("CREATE TABLE accounts (id INTEGER PRIMARY KEY, opened_on DATE)")
    project.sql("INSERT INTO accounts VALUES (7, :d)", {"d": project.due("2026-11-15")})
    project.ok("db", "upgrade")
    # Now 2027-03-10, horizon 24 days (to April 3): April 1's reminder, April 6, is beyond it.
    assert counts(project)["created"] == 0
    # On March 13 the horizon reaches April 6: its reminder is created; May 1's is not.
    assert counts(project, now="2027-03-13T16:00:00Z")["created"] == 1
    assert send_times(project) == {
        ("7@2027-04-01", "5d"): ("pending", "2027-04-06T14:00:00Z"),
    }
    # A reminder before the due date: May 1's statement, 49 days ahead, is created with 24 days
    # of horizon, as its reminder (April 1) is within it and must go out on time. (April 1's
    # reminder, March 2, is too late; June 1's, May 2, beyond the horizon.)
    project.write("rules/refills.yaml", rule.replace("offsets: [5d]", "offsets: [-30d]"))
    project.sql("DELETE FROM accounts")
    project.sql("INSERT INTO accounts VALUES (8, :d)", {"d": project.due("2026-11-15")})
    counts(project, now="2027-03-13T16:00:00Z")
    pending = {k for k, v in send_times(project).items() if v[0] == "pending"}
    assert pending == {("8@2027-05-01", "-30d")}


def test_a_utc_until_is_accepted_and_ends_the_recurrence_at_that_instant(project: Project) -> None:
    # RFC 5545 asks UNTIL in UTC when the start is zoned. 2027-05-01T03:00Z is April 30, 23:00
    # in New York: the May 1 statement (local midnight) is past it, April 1's is not.
    until = "FREQ=MONTHLY;BYMONTHDAY=1;UNTIL=20270501T030000Z"
    project.write("rules/refills.yaml", MONTHLY.replace("FREQ=MONTHLY;BYMONTHDAY=1", until))
    project.write(
        "templates/refill-due.email.j2",
        "{% block subject %}Statement{% endblock %}{% block text %}{{ account_id }}{% endblock %}",
    )
    project.sql("CREATE TABLE accounts (id INTEGER PRIMARY KEY, opened_on DATE)")
    project.sql("INSERT INTO accounts VALUES (7, :d)", {"d": project.due("2026-11-15")})
    assert project.ok("validate").err == ""
    project.ok("db", "upgrade")
    assert counts(project)["created"] == 1
    assert send_times(project) == {
        ("7@2027-04-01", "-2d"): ("pending", "2027-03-30T14:00:00Z"),
    }


def test_a_recurring_row_keeps_its_reminders_when_its_other_values_change(
    project: Project,
) -> None:
    project.write("rules/refills.yaml", MONTHLY)
    project.sql("CREATE TABLE accounts (id INTEGER PRIMARY KEY, opened_on DATE)")
    project.sql("INSERT INTO accounts VALUES (7, :d)", {"d": project.due("2026-11-15")})
    project.ok("db", "upgrade")
    scan(project)
    before = {k: r["id"] for k, r in project.by_key().items()}
    result = counts(project)
    assert (result["created"], result["moved"], result["canceled"]) == (0, 0, 0)
    assert {k: r["id"] for k, r in project.by_key().items()} == before


# --- bad input: a clear error, exit 2, and nothing changed ----------------------------------------


def _config(p: Project, old: str, new: str) -> None:
    text = p.read("config.yaml")
    assert old in text
    p.write("config.yaml", text.replace(old, new))


def _rules(p: Project, old: str, new: str) -> None:
    text = p.read("rules/refills.yaml")
    assert old in text
    p.write("rules/refills.yaml", text.replace(old, new))


BAD_INPUT = {
    "yaml-syntax": (
        lambda p: _rules(p, "    offsets:", "  offsets:"),
        "rules/refills.yaml:12: not valid YAML: ",
    ),
    "unknown-rule-key": (
        lambda p: _rules(p, "    offsets:", "    ofsets:"),
        "rules/refills.yaml:12: rule refill-due: ofsets: unknown key",
    ),
    "bad-offset": (
        lambda p: _rules(p, "[-3d, 0d]", "[-3d, 3 dayz]"),
        'rules/refills.yaml:12: rule refill-due: offsets[1]: "3 dayz" is not an offset '
        "(examples: -3d, 2w, -1mo, 0d)",
    ),
    "bad-name": (
        lambda p: _rules(p, "name: refill-due", "name: Refill Due"),
        'rules/refills.yaml:2: rule Refill Due: name: "Refill Due" is not a rule name',
    ),
    "duplicate-name": (
        lambda p: p.write("rules/again.yaml", REFILLS),
        'rules/refills.yaml:2: name "refill-due" is used twice (first at rules/again.yaml:2)',
    ),
    "unconfigured-channel": (
        lambda p: _config(p, "  email:\n    provider: outbox\n    path: outbox.jsonl\n", ""),
        "rules/refills.yaml:14: rule refill-due: channel email is not configured in ",
    ),
    "bad-rule-window": (
        lambda p: _rules(p, '    at: "10:00"\n', '    at: "10:00"\n    send_window: "9-5"\n'),
        'rules/refills.yaml:14: rule refill-due: send_window: "9-5" is not a time window',
    ),
    "bad-config-window": (
        lambda p: _config(p, 'send_window: "09:00-20:00"', 'send_window: "nine to eight"'),
        'config.yaml:2: send_window: "nine to eight" is not a time window',
    ),
    "missing-variable": (
        lambda p: _config(
            p, "path: outbox.jsonl\n  email", "path: ${OUTBOX_DIR}/sms.jsonl\n  email"
        ),
        "config.yaml:12: environment variable OUTBOX_DIR is not set",
    ),
    "unknown-config-key": (
        lambda p: _config(p, "timezone:", "timezon:"),
        "config.yaml:1: timezon: unknown key",
    ),
    "at-a-number": (
        lambda p: _rules(p, 'at: "10:00"', "at: 1000"),
        "rules/refills.yaml:13: rule refill-due: at: 1000 is not a time of day",
    ),
    "unknown-query-parameter": (
        lambda p: _rules(p, "WHERE rx.refills_left > 0", "WHERE rx.refills_left > :least"),
        "rules/refills.yaml:4: rule refill-due: query: :least is not a parameter",
    ),
    "missing-template": (
        lambda p: (p.root / "templates" / "refill-due.email.j2").unlink(),
        "templates/refill-due.email.j2: template file is missing",
    ),
    "template-syntax": (
        lambda p: p.write("templates/refill-due.sms.j2", "Hi\n{{ first_name }\n"),
        "templates/refill-due.sms.j2:2: unexpected '}'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_named_exits_2_and_changes_nothing(scanned: Project, case: str) -> None:
    change, expected = BAD_INPUT[case]
    scanned.sql(
        "UPDATE prescriptions SET runs_out_on = :d WHERE id = 1", {"d": scanned.due("2027-03-19")}
    )
    scanned.sql("DELETE FROM prescriptions WHERE id = 3")
    before = scanned.snapshot()
    change(scanned)
    result = scanned.run("scan")
    assert result.code == 2, result
    assert result.out == ""
    shown = result.err.replace(f"{scanned.root}/", "").splitlines()
    assert any(line.startswith(expected) for line in shown), result.err
    assert scanned.snapshot() == before
    validated = scanned.run("validate")
    assert validated.code == 2
    assert validated.err.replace(f"{scanned.root}/", "").splitlines() == shown


def test_at_outside_the_window_is_only_a_warning(scanned: Project) -> None:
    _rules(scanned, 'at: "10:00"', 'at: "21:30"')
    validated = scanned.run("validate")
    assert validated.code == 0, validated
    assert validated.err == (
        "rules/refills.yaml:13: warning: rule refill-due: at 21:30 is outside the send window "
        "09:00-20:00; day reminders move to the next opening\n"
    )
    assert counts(scanned)["moved"] == 6
    # 21:30 is after the window's close: the next day's opening, 09:00 local.
    assert send_times(scanned)[("1", "-3d")] == ("pending", "2027-03-15T13:00:00Z")


def test_an_unquoted_time_of_day_works_like_a_quoted_one(scanned: Project) -> None:
    _rules(scanned, 'at: "10:00"', "at: 10:00")
    assert counts(scanned)["unchanged"] == 6
    assert send_times(scanned) == EXPECTED


def test_the_engine_parameters_now_and_today(project: Project) -> None:
    _rules(project, "WHERE rx.refills_left > 0", "WHERE rx.runs_out_on >= :today")
    project.ok("db", "upgrade")
    assert counts(project)["rows"] == 3
    assert counts(project, now="2027-03-21T12:00:00Z")["rows"] == 1  # only rx 3 (Mar 25)


# --- what a rescan compares ---------------------------------------------------------------------


def test_a_row_whose_reminders_are_all_past_grace_stays_unchanged(scanned: Project) -> None:
    # On 2027-03-19 rx 1's reminders (Mar 14 and 17) and rx 2's -3d (Mar 17) are past grace:
    # out of the scan's reach, so not counted; the 3 still to come are unchanged.
    later = "2027-03-19T12:00:00Z"
    assert counts(scanned, now=later) == {
        "rows": 3,
        "created": 0,
        "moved": 0,
        "canceled": 0,
        "unchanged": 3,
        "skipped": 0,
        "too_late": 0,
        "off": 0,
        "restored": 0,
        "held": 0,
    }
    # Changed after its reminders went by: nothing to move, nothing new (the keys exist).
    scanned.sql(
        "UPDATE prescriptions SET runs_out_on = :d WHERE id = 1", {"d": scanned.due("2027-03-21")}
    )
    result = counts(scanned, now=later)
    assert (result["created"], result["moved"], result["canceled"]) == (0, 0, 0)
    assert send_times(scanned)[("1", "-3d")] == ("pending", "2027-03-14T14:00:00Z")
    assert scanned.events() == []


def test_an_occurrence_template_with_an_expression(project: Project) -> None:
    _rules(project, '"{{ rx_id }}"', "\"{{ 'rx-' ~ rx_id ~ '-' ~ drug_name|lower }}\"")
    project.ok("db", "upgrade")
    assert counts(project)["created"] == 6
    assert ("rx-2-metformin", "0d") in project.by_key()
    assert counts(project)["unchanged"] == 6
    project.sql("UPDATE prescriptions SET drug_name = 'Metformin XR' WHERE id = 2")
    result = counts(project)
    assert (result["created"], result["canceled"]) == (2, 2)
    assert send_times(project)[("rx-2-metformin", "0d")][0] == "canceled"


def test_an_occurrence_column_the_query_does_not_return_skips_every_row(lite: Project) -> None:
    _rules(lite, '"{{ rx_id }}"', '"{{ rx_id }}:{{ refill_number }}"')
    lite.ok("db", "upgrade")
    result = counts(lite)
    assert (result["rows"], result["skipped"], result["created"]) == (3, 3, 0)
    assert {s["reason"] for s in lite.skipped()} == {
        "no occurrence key: column refill_number is missing or empty"
    }


TWICE = "UNION ALL SELECT 1, 'Lisinopril', '2027-03-17', 1, 'Ann', NULL, NULL, NULL"


def test_a_row_returned_twice_makes_one_set_of_reminders(project: Project) -> None:
    """On a rule's first scan PostgreSQL copies the batch straight into the table; a row
    returned twice makes that copy fail, and the batch is inserted skipping what exists."""
    _rules(project, "ORDER BY rx.id", TWICE)
    project.ok("db", "upgrade")
    assert counts(project)["created"] == 6
    assert counts(project)["created"] == 0
    assert len(project.reminders()) == 6


@pytest.mark.parametrize("chunk", [1, 2])
def test_a_row_returned_twice_in_another_batch_makes_one_set_of_reminders(
    project: Project, chunk: int
) -> None:
    """The repeat in a later batch of the first scan than the row's first time (chunk 1: each
    row a batch; 2: the repeat with a new row, whose reminders are made all the same)."""
    from reminders.app import App
    from reminders.scan import scan_rule

    _rules(project, "ORDER BY rx.id", TWICE)
    project.ok("db", "upgrade")
    app = App(project.root / "config.yaml")
    rule = app.ruleset.rule("refill-due")
    now = parse_instant(NOW)
    first = scan_rule(app.config, rule, app.state, app.business, now, chunk=chunk)
    assert (first.rows, first.created, first.error) == (4, 6, None)
    keys = [(r["occurrence"], r["offset"]) for r in project.reminders()]
    assert len(keys) == len(set(keys)) == 6
    again = scan_rule(app.config, rule, app.state, app.business, now, chunk=chunk)
    assert (again.rows, again.created, again.moved, again.canceled, again.error) == (
        4,
        0,
        0,
        0,
        None,
    )
    assert [(r["occurrence"], r["offset"]) for r in project.reminders()] == keys


def test_a_reminder_whose_stored_digest_is_not_ours_is_refreshed(scanned: Project) -> None:
    with scanned.state.begin() as conn:
        conn.execute(
            models.reminder.update()
            .where(models.reminder.c.occurrence == "1")
            .values(row_hash="from an older version")
        )
    result = counts(scanned)
    assert (result["unchanged"], result["moved"], result["created"]) == (6, 0, 0)
    digests = {r["row_hash"] for r in scanned.reminders()}
    assert len(digests) == 3 and all(len(d) == 24 and int(d, 16) >= 0 for d in digests)
    assert counts(scanned)["unchanged"] == 6


@pytest.mark.parametrize(
    ("column", "value"),
    [("runs_out_on", None), ("runs_out_on", "soon"), ("timezone", "Mars/Olympus")],
)
def test_a_row_gone_bad_keeps_its_reminders_and_is_reported(
    lite: Project, column: str, value: str | None
) -> None:
    lite.ok("db", "upgrade")
    scan(lite)
    before = lite.reminders()
    table = "patients" if column == "timezone" else "prescriptions"
    lite.sql(f"UPDATE {table} SET {column} = :v WHERE id = 1", {"v": value})
    result = counts(lite)
    assert (result["skipped"], result["canceled"], result["moved"]) == (1, 0, 0)
    assert lite.reminders() == before
    assert lite.skipped()[-1]["occurrence"] == "1"


def test_a_row_without_its_customer_keeps_its_reminders_and_is_reported(lite: Project) -> None:
    without = "CASE WHEN rx.id = {} THEN NULL ELSE p.id END"
    _rules(lite, "p.id AS customer_id", without.format(1) + " AS customer_id")
    lite.ok("db", "upgrade")
    assert counts(lite)["created"] == 4  # rx 1 has no customer
    _rules(lite, without.format(1), without.format(2))  # now it has, and rx 2 has none
    result = counts(lite)
    assert (result["skipped"], result["canceled"], result["created"]) == (1, 0, 2)
    assert {r["status"] for r in lite.reminders()} == {"pending"}


# --- interrupted scans ----------------------------------------------------------------------------

# Millions of generated rows: a scan that is still running when the test stops it.
ENDLESS = REFILLS.replace(
    """      SELECT rx.id AS rx_id, rx.drug_name, rx.runs_out_on,
             p.id AS customer_id, p.first_name, p.phone, p.email, p.timezone
      FROM prescriptions rx JOIN patients p ON p.id = rx.patient_id
      WHERE rx.refills_left > 0
      ORDER BY rx.id
""",
    """      WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000000)
      SELECT i AS rx_id, 'Lisinopril' AS drug_name, '2027-03-17' AS runs_out_on,
             i AS customer_id, 'Ann' AS first_name, '+15005550006' AS phone,
             'ann@example.com' AS email, NULL AS timezone
      FROM n
""",
)


@pytest.fixture(params=["sqlite", "postgresql"])
def endless(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Project]:
    """The default project on SQLite and PostgreSQL, whose recursive query runs long enough to
    be stopped mid-scan. (MariaDB stops a recursive CTE at cte_max_recursion_depth, 1,000 rows by
    default: no endless query there; what is tested here is the engine's, not the database's.)"""
    with project_at(tmp_path, request.param) as made:
        yield made.setup()


def _running_scan(project: Project) -> subprocess.Popen[str]:
    """A ``reminders scan`` child process, once it has started its scan run and some rows."""
    project.write("rules/refills.yaml", ENDLESS)
    project.ok("db", "upgrade")
    child = project.spawn("scan")
    deadline = time.monotonic() + 120
    while not any(r["status"] == "running" and r["rows"] == 0 for r in project.scan_runs()):
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "the scan did not start"
        time.sleep(0.05)
    while not project.reminders():  # a first batch is written: the scan is well under way
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "the scan wrote nothing"
        time.sleep(0.05)
    return child


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_scan_stopped_by_a_signal_ends_its_run_interrupted(endless: Project, sig: int) -> None:
    project = endless
    child = _running_scan(project)
    child.send_signal(sig)
    _out, err = child.communicate(timeout=120)
    assert child.returncode == 128 + sig, err
    assert f"interrupted by {signal.Signals(sig).name}" in err
    (run,) = project.scan_runs()
    assert run["status"] == "interrupted", err
    assert run["finished_at"] is not None
    assert run["error"] == (
        f"interrupted by {signal.Signals(sig).name} before the scan finished; "
        "the next scan completes it"
    )
    assert run["rows"] > 0  # what it had done is counted


def test_a_scan_run_left_running_by_a_killed_process_is_seen_as_interrupted(
    endless: Project,
) -> None:
    project = endless
    child = _running_scan(project)
    child.kill()
    child.communicate(timeout=120)
    (run,) = project.scan_runs()
    assert run["status"] == "running"  # nothing could record it: the process was killed

    def last_scan() -> dict[str, Any]:
        (report,) = project.ok("status", "--json").json_lines()
        (last,) = report["last_scans"]
        return dict(last)

    # On PostgreSQL the lock is the killed session's until the server notices it is gone (the
    # next rows it sends to a closed socket): seconds at most.
    deadline = time.monotonic() + 60
    while (last := last_scan())["status"] != "interrupted" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert last["status"] == "interrupted"
    assert last["error"] == "no scan holds the rule's lock: its process stopped without finishing"
    assert "refill-due 2027-03-10T12:00:00Z interrupted" in project.ok("status").out
    # The next scan of the rule ends the stale run for good (its query now returns 3 rows of the
    # killed scan's 4,000: canceling the rest is meant).
    project.write("rules/refills.yaml", REFILLS)
    project.ok("scan", "--allow-mass-cancel")
    first, second = sorted(project.scan_runs(), key=lambda r: r["id"])
    assert (first["status"], second["status"]) == ("interrupted", "done")
    assert first["error"] == "no scan holds the rule's lock: its process stopped without finishing"


def test_status_knows_a_running_scan_from_a_stale_one(endless: Project) -> None:
    project = endless
    child = _running_scan(project)
    try:
        (report,) = project.ok("status", "--json").json_lines()
        assert report["last_scans"][0]["status"] == "running"
    finally:
        child.kill()
        child.communicate(timeout=120)
