"""The command line's contract: output formats, the clock, the config's place, exit codes."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from reminders import clock, lifecycle, models, state_db
from reminders import report as report_
from tests.rules_fixtures import CONFIG, NOW, REFILLS, Project, lite, project, project_at

__all__ = ["lite", "project"]


@pytest.fixture
def scanned(project: Project) -> Project:
    project.ok("db", "upgrade")
    project.ok("scan")
    return project


# --- list -----------------------------------------------------------------------------------------


def test_list_json_is_one_object_a_line_in_send_time_order(scanned: Project) -> None:
    lines = scanned.ok("list", "--json").out.splitlines()
    assert lines[:3] == [
        '{"id":1,"rule":"refill-due","occurrence":"1","customer_id":"1","offset":"-3d",'
        '"send_at":"2027-03-14T14:00:00Z","status":"pending","channel":null,"reason":null,'
        '"sent_at":null,"locale":null}',
        '{"id":2,"rule":"refill-due","occurrence":"1","customer_id":"1","offset":"0d",'
        '"send_at":"2027-03-17T14:00:00Z","status":"pending","channel":null,"reason":null,'
        '"sent_at":null,"locale":null}',
        '{"id":3,"rule":"refill-due","occurrence":"2","customer_id":"2","offset":"-3d",'
        '"send_at":"2027-03-17T15:00:00Z","status":"pending","channel":null,"reason":null,'
        '"sent_at":null,"locale":null}',
    ]
    rows = scanned.ok("list", "--json").json_lines()
    assert [(r["occurrence"], r["offset"]) for r in rows] == [
        ("1", "-3d"),
        ("1", "0d"),
        ("2", "-3d"),
        ("2", "0d"),
        ("3", "-3d"),
        ("3", "0d"),
    ]
    assert all(list(r) == list(rows[0]) for r in rows)


def test_list_orders_equal_send_times_by_id_and_filters(scanned: Project) -> None:
    # rx 4 runs out the same day as rx 1 for a patient in the same zone: the same send times.
    scanned.sql(
        "INSERT INTO prescriptions (id, patient_id, drug_name, runs_out_on) VALUES (4, 1, 'x', :d)",
        {"d": scanned.due("2027-03-17")},
    )
    scanned.sql("UPDATE prescriptions SET refills_left = 0 WHERE id = 3")
    scanned.ok("scan")
    rows = scanned.ok("list", "--json").json_lines()
    send_ats = [(r["send_at"], r["id"]) for r in rows]
    assert send_ats == sorted(send_ats)
    same = [(r["occurrence"], r["id"]) for r in rows if r["send_at"] == "2027-03-14T14:00:00Z"]
    assert same == [("1", 1), ("4", 7)]
    canceled = scanned.ok("list", "--status", "canceled", "--json").json_lines()
    assert [(r["occurrence"], r["status"]) for r in canceled] == [
        ("3", "canceled"),
        ("3", "canceled"),
    ]
    assert canceled[0]["reason"] == (
        "canceled: the occurrence is no longer returned by the rule's query"
    )
    assert scanned.ok("list", "--rule", "other", "--json").out == ""
    assert len(scanned.ok("list", "--customer", "1", "--json").json_lines()) == 4


def test_list_without_json_is_a_table(scanned: Project) -> None:
    lines = scanned.ok("list").out.splitlines()
    assert lines[0].split() == [
        "id",
        "send",
        "at",
        "(UTC)",
        "status",
        "sent",
        "at",
        "(UTC)",
        "rule",
        "offset",
        "customer",
        "channel",
        "occurrence",
        "/",
        "reason",
    ]
    assert lines[1].split() == [
        "1",
        "2027-03-14T14:00:00Z",
        "pending",
        "-",
        "refill-due",
        "-3d",
        "1",
        "-",
        "1",
    ]
    assert len(lines) == 7


def test_list_rejects_an_unknown_status(scanned: Project) -> None:
    result = scanned.run("list", "--status", "lost")
    assert result.code == 2
    assert "'lost' is not one of pending, queued, sending" in result.err


def test_list_limits_the_table_and_says_how_many_more(scanned: Project) -> None:
    lines = scanned.ok("list", "--limit", "2").out.splitlines()
    assert len(lines) == 4 and [line.split()[0] for line in lines[1:3]] == ["1", "2"]
    assert lines[3] == (
        "... and 4 more (--limit 0 shows all; --rule, --status or --customer narrow them)"
    )
    assert len(scanned.ok("list", "--limit", "0").out.splitlines()) == 7
    assert len(scanned.ok("list", "--json", "--limit", "2").json_lines()) == 2
    assert len(scanned.ok("list", "--json").json_lines()) == 6  # --json: every row by default


def test_list_shows_when_a_message_went_out(scanned: Project) -> None:
    with scanned.state.begin() as conn:
        conn.execute(
            models.reminder.update()
            .where(models.reminder.c.id == 1)
            .values(
                status="sent", channel="sms", sent_at=datetime(2027, 3, 14, 14, 0, 5, tzinfo=UTC)
            )
        )
    row = scanned.ok("list", "--json").json_lines()[0]
    assert (row["status"], row["sent_at"]) == ("sent", "2027-03-14T14:00:05Z")
    line = scanned.ok("list").out.splitlines()[1]
    assert line.split()[1:4] == ["2027-03-14T14:00:00Z", "sent", "2027-03-14T14:00:05Z"]


def test_colours_only_on_a_terminal_and_never_with_no_color(scanned: Project) -> None:
    import click

    from reminders import cli

    assert "\x1b[" not in scanned.ok("list").out  # piped: plain text
    assert click.style("sent", fg=cli.STATUS_COLORS["sent"]) == "\x1b[32msent\x1b[0m"
    assert cli.color() is None  # click decides by the terminal
    os.environ["NO_COLOR"] = "1"
    try:
        assert cli.color() is False
    finally:
        del os.environ["NO_COLOR"]


def test_every_option_of_every_command_has_help_text() -> None:
    import click

    from reminders.cli import cli

    def walk(group: click.Group, path: str) -> list[str]:
        missing = []
        for name, command in group.commands.items():
            where = f"{path} {name}"
            if isinstance(command, click.Group):
                missing += walk(command, where)
            missing += [
                f"{where} {p.opts[0]}"
                for p in command.params
                if isinstance(p, click.Option) and not p.help
            ]
        return missing

    assert walk(cli, "reminders") == []


# --- status ---------------------------------------------------------------------------------------


def test_status_json(scanned: Project) -> None:
    scanned.sql("UPDATE prescriptions SET refills_left = 0 WHERE id = 3")
    scanned.ok("scan")
    (report,) = scanned.ok("status", "--json", now="2027-03-15T12:00:00Z").json_lines()
    assert report == {
        "now": "2027-03-15T12:00:00Z",
        "counts": {"refill-due": {"pending": 4, "canceled": 2}},
        "totals": {"pending": 4, "canceled": 2},
        "next_due": {"id": 1, "rule": "refill-due", "send_at": "2027-03-14T14:00:00Z"},
        "due_now": 1,
        "oldest_due_unsent_seconds": 22 * 3600.0,  # reminder 1, due 22 hours ago
        "stuck_sending": [],
        "unknown": [],
        "recent_failures": [],
        "last_scans": [
            {
                "rule": "refill-due",
                "at": NOW,
                "kind": "full",
                "status": "done",
                "rows": 2,
                "created": 0,
                "moved": 0,
                "canceled": 2,
                "skipped": 0,
                "error": None,
            }
        ],
        "opt_outs": {},
        "suppressed": {"total": 0, "by_source": {}, "recent": []},
        "deferred": {"total": 0, "by_reason": {}, "next": None},
        "failed_jobs": {"total": 0, "by_queue": {}, "recent": []},
        "paused_rules": [],
        "outbox": [],  # no write-back, no webhooks
    }


def test_status_shows_failures_and_stuck_sends(scanned: Project) -> None:
    r = models.reminder
    with scanned.state.begin() as conn:
        conn.execute(r.update().where(r.c.id == 2).values(status=lifecycle.SENDING, channel="sms"))
        conn.execute(
            r.update()
            .where(r.c.id == 3)
            .values(status=lifecycle.FAILED, channel="email", reason="no email address")
        )
    (report,) = scanned.ok("status", "--json").json_lines()
    assert report["stuck_sending"] == [
        {"id": 2, "rule": "refill-due", "channel": "sms", "since": NOW, "cause": report_.NO_WORKER}
    ]
    assert report["recent_failures"] == [
        {"id": 3, "rule": "refill-due", "channel": "email", "reason": "no email address", "at": NOW}
    ]
    text = scanned.ok("status").out
    assert "stuck in sending" in text and "#2 refill-due sms since" in text
    assert "its worker is not known" in text
    assert "#3 refill-due email 2027-03-10T12:00:00Z: no email address" in text


def test_status_before_any_scan(lite: Project) -> None:
    lite.ok("db", "upgrade")
    text = lite.ok("status").out
    assert "no reminders yet (run reminders scan)" in text
    assert "next due: none" in text


# --- the clock ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("2027-03-10T12:00:00Z", "2027-03-10T12:00:00Z"),
        ("2027-03-10T12:00:00", "2027-03-10T12:00:00Z"),  # no zone: UTC
        ("2027-03-10 12:00", "2027-03-10T12:00:00Z"),
        ("2027-03-10T07:00:00-05:00", "2027-03-10T12:00:00Z"),
        ("2027-03-10", "2027-03-10T00:00:00Z"),
    ],
)
def test_now_from_the_option_or_the_environment(lite: Project, given: str, expected: str) -> None:
    lite.ok("db", "upgrade")
    by_option = lite.ok("status", "--json", now=given).json_lines()[0]["now"]
    by_env = lite.ok("status", "--json", now=None, env={"REMINDERS_NOW": given}).json_lines()
    assert by_option == by_env[0]["now"] == expected


def test_the_option_wins_over_the_environment(lite: Project) -> None:
    lite.ok("db", "upgrade")
    result = lite.ok("status", "--json", now=NOW, env={"REMINDERS_NOW": "2030-01-01T00:00:00Z"})
    assert result.json_lines()[0]["now"] == NOW


def test_now_drives_the_scan(project: Project) -> None:
    project.ok("db", "upgrade")
    project.ok("scan", now=None, env={"REMINDERS_NOW": "2027-03-16T12:00:00"})
    assert ("1", "-3d") not in project.by_key()  # 46 hours late: past grace
    assert [r["started_at"] for r in project.scan_runs()] == [
        clock.parse_instant("2027-03-16T12:00:00Z")
    ]


def test_a_command_run_with_now_does_not_change_the_clock_of_the_next(lite: Project) -> None:
    lite.ok("db", "upgrade")
    lite.ok("status", now="2030-01-01T00:00:00Z")
    assert clock.ENV not in os.environ
    real = lite.ok("status", "--json", now=None).json_lines()[0]["now"]
    assert not real.startswith("2030")


@pytest.mark.parametrize("how", ["option", "environment"])
def test_a_bad_now_is_a_usage_error(lite: Project, how: str) -> None:
    if how == "option":
        result = lite.run("status", now="next tuesday")
        assert result.err.endswith(
            '"next tuesday" is not an ISO 8601 time (e.g. 2027-03-14T09:00Z)\n'
        )
    else:
        result = lite.run("status", now=None, env={"REMINDERS_NOW": "next tuesday"})
        assert 'REMINDERS_NOW="next tuesday" is not an ISO 8601 time' in result.err
    assert result.code == 2


# --- where the config is, and what its relative paths mean ----------------------------------------


def test_the_config_option_wins_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with project_at(tmp_path / "a", "sqlite") as a, project_at(tmp_path / "b", "sqlite") as b:
        a.setup()
        b.setup(rules=REFILLS.replace("refill-due\n    desc", "other-rule\n    desc"))
        a.ok("db", "upgrade")
        b.ok("db", "upgrade")
        env = {"REMINDERS_CONFIG": str(a.root / "config.yaml")}
        assert "refill-due: 3 rows" in b.ok("scan", config=False, env=env).out
        assert "other-rule: 3 rows" in b.ok("scan", env=env).out
        assert {r["rule"] for r in a.reminders()} == {"refill-due"}
        assert {r["rule"] for r in b.reminders()} == {"other-rule"}
        monkeypatch.chdir(b.root)
        assert "other-rule: 3 rows, 0 created" in b.ok("scan", config=False).out  # ./config.yaml


def test_no_config_anywhere_says_how_to_give_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = Project(tmp_path).run("scan", config=False)
    assert result.code == 2
    assert result.err == (
        "config.yaml: no config file here (pass -c PATH or set REMINDERS_CONFIG)\n"
    )


def test_relative_paths_are_relative_to_the_config_folder(
    lite: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    lite.ok("db", "upgrade")
    assert "refill-due: 3 rows, 6 created" in lite.ok("scan").out
    assert (lite.root / "reminders.db").exists()
    assert list(elsewhere.iterdir()) == []


# --- exit codes -----------------------------------------------------------------------------------


def test_exit_0_with_skipped_rows(lite: Project) -> None:
    lite.sql("UPDATE prescriptions SET runs_out_on = NULL WHERE id = 2")
    lite.ok("db", "upgrade")
    result = lite.run("scan")
    assert result.code == 0
    assert "1 skipped" in result.out


def test_exit_1_when_the_state_db_is_not_migrated(lite: Project) -> None:
    result = lite.run("scan")
    assert result.code == 1
    assert result.err.startswith(
        "error: the state DB has no tables yet; run `reminders db upgrade` first"
    )


def test_exit_1_when_the_business_db_is_missing(lite: Project) -> None:
    lite.ok("db", "upgrade")
    (lite.root / "business.db").unlink()
    result = lite.run("scan")
    assert result.code == 1
    assert result.err == f"error: source.url: no database file at {lite.root / 'business.db'}\n"


@pytest.mark.parametrize(
    "args",
    [["frobnicate"], ["scan", "--bogus"], ["list", "--limit", "many"]],
)
def test_exit_2_on_usage_errors(lite: Project, args: list[str]) -> None:
    lite.ok("db", "upgrade")
    result = lite.run(*args)
    assert result.code == 2
    assert result.err


def test_exit_2_for_an_unknown_rule(lite: Project) -> None:
    lite.ok("db", "upgrade")
    result = lite.run("scan", "--rule", "nope")
    assert (result.code, result.err) == (2, 'no rule named "nope" (rules: refill-due)\n')


def test_scan_one_rule(lite: Project) -> None:
    lite.write("rules/again.yaml", REFILLS.replace("refill-due\n    desc", "again\n    desc"))
    lite.ok("db", "upgrade")
    assert lite.ok("scan", "--rule", "again").out.startswith("again: 3 rows, 6 created")
    assert {r["rule"] for r in lite.reminders()} == {"again"}


# --- validate and db ------------------------------------------------------------------------------


def test_validate_ok(lite: Project) -> None:
    result = lite.ok("validate")
    assert result.out == "ok: 1 rule(s), 0 check(s), channels: sms, email; queries prepared\n"
    assert result.err == ""


def test_validate_warns_once_about_text_that_forces_ucs2(lite: Project) -> None:
    lite.write("templates/refill-due.sms.j2", "Hi {{ first_name }},\nyour refill is due — soon.\n")
    result = lite.ok("validate")
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("templates/refill-due.sms.j2:2: warning: ")
    assert "U+2014" in lines[0]


def test_validate_lists_every_template_problem_with_its_place(lite: Project) -> None:
    (lite.root / "templates" / "refill-due.email.j2").unlink()
    lite.write("templates/refill-due.sms.j2", "Hi\n{{ first_name }\n")
    result = lite.run("validate")
    assert result.code == 2
    assert result.err.splitlines() == [
        "templates/refill-due.sms.j2:2: unexpected '}'",
        "templates/refill-due.email.j2: template file is missing",
    ]


def test_validate_checks_the_message_templates_of_checks(lite: Project) -> None:
    lite.write(
        "rules/checks.yaml",
        "checks:\n  - name: owned\n    query: SELECT 1 AS x WHERE 1 = :n\n"
        "    params: {n: int}\n    message: owned\n",
    )
    result = lite.run("validate")
    assert (result.code, result.err) == (2, "templates/owned.check.j2: template file is missing\n")


def test_db_upgrade_and_current(project: Project) -> None:

    head = state_db.head_revision()  # the newest migration's (re-chained when branches merge)
    assert head is not None
    assert project.ok("db", "upgrade").out == f"state DB at revision {head}\n"
    assert project.ok("db", "current").out.splitlines() == [
        f"state DB: {head}",
        f"code:     {head}",
    ]


def test_sqlite_business_db_with_a_postgresql_state_db(tmp_path: Path, pg_url: str) -> None:
    with project_at(tmp_path, "sqlite") as lite:
        lite.setup()
        lite.write_config(CONFIG.replace("sqlite:///reminders.db", pg_url))
        lite.ok("db", "upgrade")
        assert "6 created" in lite.ok("scan").out
        assert len(lite.ok("list", "--json").json_lines()) == 6

    state_db.dispose_engines(pg_url.rsplit("/", 1)[-1])  # the state DB's engine, by its name


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["scan", "--help"]])
def test_help_and_version_load_none_of_the_engine(args: list[str]) -> None:
    """Each command imports what it needs when it runs: --help and --version answer without
    SQLAlchemy, pydantic, Jinja or Redis (their start-up time is in benchmarks/cli_startup.py)."""
    import subprocess
    import sys

    code = (
        "import sys; from reminders.cli import main; sys.argv = ['reminders', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = {'sqlalchemy', 'pydantic', 'jinja2', 'redis', 'rq', 'flask', 'yaml', 'babel'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy), file=sys.stderr)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
    )
    assert done.stderr.strip().splitlines()[-1] == "[]", done.stderr
    assert "Usage: reminders" in done.stdout or done.stdout.startswith("reminders, version ")
